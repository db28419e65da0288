"""Record fields the adapter never read: tracked per record, summed per shard and per source,
label-like ones flagged (no silent label loss)."""

from __future__ import annotations

import json

import pytest

from pipeline.corpus import InputSpec, iter_shards
from pipeline.corpus.field_use import FieldUse, TrackedRecord, looks_like_label
from pipeline.corpus.reader import FIELD_USE
from pipeline.labeling.manifest import summarize_sources

# Label columns as the published sets name them (dataset cards: nvidia/HelpSteer2, nvidia/HelpSteer3,
# PKU-Alignment/PKU-SafeRLHF, PKU-Alignment/BeaverTails, stanfordnlp/SHP, lmsys arena 55k,
# lmsys/mt_bench_human_judgments, HuggingFaceH4/ultrafeedback_binarized, berkeley-nest/Nectar,
# allenai/llama-3.1-tulu-3-8b-preference-mixture).
LABELS = [
    "helpfulness",
    "correctness",
    "coherence",
    "complexity",
    "verbosity",
    "overall_preference",
    "individual_preference",
    "is_response_0_safe",
    "better_response_id",
    "safer_response_id",
    "response_0_severity_level",
    "is_safe",
    "labels",
    "score_A",
    "winner_model_a",
    "winner_tie",
    "winner",
    "score_chosen",
    "score_rejected",
    "good_natured",
    "chosen_rating",
    "rejected-rating",
    "overallScore",
    "toxic_chat_tag",
    "openai_moderation",
]
NOT_LABELS = [
    "id",
    "prompt",
    "model_a",
    "response_b",
    "source",
    "conversation_id",
    "language",
    "turn",
    "tstamp",
    "messages",
    "prompt_id",
    "history",
    "domain",
    "judge",
    "human_ref_A",
    "c_root_id_A",
    "post_id",
]


@pytest.mark.parametrize("name", LABELS)
def test_label_like_names(name):
    assert looks_like_label(name)


@pytest.mark.parametrize("name", NOT_LABELS)
def test_not_label_like_names(name):
    assert not looks_like_label(name)


def test_tracked_record_counts_value_reads_only():
    rec = TrackedRecord({"a": 1, "b": 2, "c": 3, "d": None})
    assert "a" in rec and sorted(rec) == ["a", "b", "c", "d"] and len(rec) == 4
    assert rec.read == set()  # membership and listing keys read no value
    assert rec["a"] == 1 and rec.get("b") == 2 and rec.get("zz") is None
    assert rec.read == {"a", "b", "zz"}
    use = FieldUse()
    use.add(rec)
    assert use.unused() == ["c"]  # "d" held no value; "zz" is not a field of the record
    copy = TrackedRecord({"x": 1, "y": 2})
    assert {**copy} == {"x": 1, "y": 2} and copy.read == {"x", "y"}  # a copy reads every value
    listed = TrackedRecord({"x": 1})
    list(listed.items())
    assert listed.read == {"x"}


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_unused_fields_per_shard_and_source(tmp_path):
    # An instruction file whose records also carry a reward and a language tag, neither read by
    # the prompt/response adapter; and a row that is quarantined (its fields do not count).
    records = [{"prompt": f"q{i}", "response": f"a{i}", "reward_gpt4": 0.5, "lang": "en"} for i in range(5)]
    records[3] = {"prompt": "q3", "response": "", "only_on_a_bad_row": 1}
    records[4]["lang"] = None
    path = tmp_path / "sft.jsonl"
    _write(path, records)
    shards = list(iter_shards(InputSpec(str(path)), str(path), rows_per_shard=2))
    assert len(shards) == 3
    per_shard = [FieldUse.from_dict(s[0][FIELD_USE]) for s in shards]
    assert all(FIELD_USE not in u for s in shards for u in s[1:])  # only on each shard's first unit
    assert [dict(u.present) for u in per_shard] == [
        {"prompt": 2, "response": 2, "reward_gpt4": 2, "lang": 2},
        {"prompt": 1, "response": 1, "reward_gpt4": 1, "lang": 1},
        {"prompt": 1, "response": 1, "reward_gpt4": 1},
    ]
    markers = [
        {
            "source": "sft",
            "shard_rows": len(s),
            "rows_labeled": 0,
            "rows_quarantined": 0,
            "shard_units": len(s),
            "labeled_units": 0,
            "quarantined_units": 0,
            "tokens": 0,
            "record_fields": s[0][FIELD_USE],
        }
        for s in shards
    ]
    summary = summarize_sources(markers)["sft"]
    assert summary["unused_fields"] == ["lang", "reward_gpt4"]
    assert summary["unused_label_fields"] == ["reward_gpt4"]
    # Markers written before field use was recorded: nothing to report, nothing fails.
    old = summarize_sources([{k: v for k, v in markers[0].items() if k != "record_fields"}])["sft"]
    assert old["unused_fields"] == [] and old["unused_label_fields"] == []


def test_fields_read_by_a_mapping_are_not_unused(tmp_path):
    path = tmp_path / "m.jsonl"
    _write(path, [{"question": "q", "meta": {"answer": "a"}, "score": 3, "id": 1}])
    spec = InputSpec(str(path), columns={"prompt": "question", "response": "meta.answer"})
    use = FieldUse.from_dict(next(iter_shards(spec, str(path)))[0][FIELD_USE])
    assert use.unused() == ["id", "score"] and use.unused_labels() == ["score"]
