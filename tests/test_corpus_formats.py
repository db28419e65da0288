"""File formats (JSONL, gzip, JSON arrays, CSV/TSV, Parquet, datasets.save_to_disk), path expansion,
input specs, generic adapters and shard bookkeeping."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import ids
from pipeline.corpus import InputSpec, InputSpecError, expand_files, formats, iter_shards, read_units
from pipeline.schema import UNIT_SCHEMA

RECORDS = [
    {"prompt": f"question {i} ünïcode ✓", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"}
    for i in range(23)
]
CONTENT = ["unit_id", "row_id", "prompt_id", "kind", "source", "prompt", "response", "response_index", "preference"]


def _content(table):
    return table.select(CONTENT).to_pylist()


@pytest.fixture()
def reference(tmp_path):
    path = tmp_path / "ref.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS), encoding="utf-8")
    return read_units(InputSpec(str(path), source="pairs"))


def test_reference_units(reference):
    assert reference.schema == UNIT_SCHEMA
    units = reference.to_pylist()
    assert len(units) == 46
    first = units[0]
    assert first["prompt"] == [{"role": "user", "content": RECORDS[0]["prompt"]}]
    assert first["row_id"] == ids.row_id(
        "pairs",
        first["prompt"],
        ["good answer 0", "bad answer 0"],
        {"kind": "preference", "tie": False, "ranks": None, "ratings": None},
    )
    assert first["prompt_id"] == ids.prompt_id(first["prompt"])
    assert [u["response"] for u in units[:2]] == ["good answer 0", "bad answer 0"]


def _delimited(records: list[dict], delimiter: str) -> str:
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=list(records[0]), delimiter=delimiter, lineterminator="\r\n")
    w.writeheader()
    w.writerows(records)
    return out.getvalue()


@pytest.mark.parametrize(
    "name", ["data.jsonl.gz", "data.json", "data.json.gz", "data.csv", "data.tsv.gz", "data.parquet", "hf"]
)
def test_every_file_format_gives_the_same_units(tmp_path, reference, name):
    path = tmp_path / name
    if name.endswith(".csv"):
        path.write_text(_delimited(RECORDS, ","), encoding="utf-8", newline="")
    elif name.endswith(".tsv.gz"):
        path.write_bytes(gzip.compress(_delimited(RECORDS, "\t").encode()))
    elif name.endswith(".jsonl.gz"):
        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in RECORDS).encode()))
    elif name.endswith(".json.gz"):
        path.write_bytes(gzip.compress(json.dumps(RECORDS, indent=1).encode()))
    elif name.endswith(".json"):
        path.write_text(json.dumps(RECORDS, indent=2))
    elif name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(RECORDS), path, row_group_size=5)  # several row groups
    else:
        import datasets

        datasets.Dataset.from_list(RECORDS).save_to_disk(str(path), max_shard_size="1KB")
        assert len([f for f in os.listdir(path) if f.endswith(".arrow")]) > 1  # several Arrow files, in order
    assert expand_files(InputSpec(str(path))) == [str(path)]
    table = read_units(InputSpec(str(path), source="pairs"))
    assert _content(table) == _content(reference)
    assert table.column("source_row").to_pylist() == [i // 2 for i in range(46)]
    assert set(table.column("source_uri").to_pylist()) == {str(path)}


def test_hf_dataset_dict_reads_splits_in_saved_order(tmp_path, reference):
    import datasets

    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(RECORDS[:20]), "test": datasets.Dataset.from_list(RECORDS[20:])}
    )
    dd.save_to_disk(str(tmp_path / "in" / "dd"))
    # A folder holding the DatasetDict is one input, not one per split.
    assert expand_files(InputSpec(str(tmp_path / "in"))) == [str(tmp_path / "in" / "dd")]
    assert _content(read_units(InputSpec(str(tmp_path / "in"), source="pairs"))) == _content(reference)
    only_test = read_units(InputSpec(str(tmp_path / "in" / "dd"), source="pairs", options={"split": "test"}))
    assert only_test.column("response").to_pylist() == [
        s for i in range(20, 23) for s in (f"good answer {i}", f"bad answer {i}")
    ]


def test_json_streaming_across_tiny_chunks(tmp_path, reference, monkeypatch):
    path = tmp_path / "a.json"
    path.write_text(json.dumps(RECORDS, indent=3, ensure_ascii=False), encoding="utf-8")
    # Chunks of a few bytes cut strings, numbers and multi-byte characters at every position.
    monkeypatch.setattr(formats, "CHUNK_BYTES", 3)
    assert _content(read_units(InputSpec(str(path), source="pairs"))) == _content(reference)
    nums = tmp_path / "n.json"
    nums.write_text('[{"prompt": "p", "responses": ["a", "b"], "ranks": [10, 2]}]')
    (u0, u1) = read_units(InputSpec(str(nums))).to_pylist()
    assert (u0["human_rank"], u1["human_rank"], u0["kind"]) == (10, 2, "best_of_n")


@pytest.mark.parametrize("chunk", [2, 1 << 20])
def test_json_file_with_one_object_per_line_is_read_as_jsonl(tmp_path, reference, monkeypatch, chunk):
    monkeypatch.setattr(formats, "CHUNK_BYTES", chunk)
    path = tmp_path / "lines.json"
    path.write_text("\n\n" + "\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS), encoding="utf-8")
    assert _content(read_units(InputSpec(str(path), source="pairs"))) == _content(reference)


def test_dirs_and_globs(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    for rel in (
        "b.jsonl",
        "a.json",
        "sub/c.parquet",
        "sub/deeper/d.jsonl.gz",
        "notes.txt",
        ".hidden.jsonl",
        "sub/_tmp.jsonl",
    ):
        (tmp_path / rel).write_text("[]")
    found = expand_files(InputSpec(str(tmp_path)))
    assert found == sorted(str(tmp_path / r) for r in ("a.json", "b.jsonl", "sub/c.parquet", "sub/deeper/d.jsonl.gz"))
    assert expand_files(InputSpec(str(tmp_path / "*.json*"))) == [str(tmp_path / "a.json"), str(tmp_path / "b.jsonl")]
    assert expand_files(
        InputSpec([str(tmp_path / "b.jsonl"), str(tmp_path / "**" / "*.parquet"), str(tmp_path / "b.jsonl")])
    ) == [str(tmp_path / "b.jsonl"), str(tmp_path / "sub" / "c.parquet")]
    # The same file spelled another way is the same input.
    assert expand_files(InputSpec(str(tmp_path / "sub" / ".." / "b.jsonl"))) == [str(tmp_path / "b.jsonl")]
    # With an explicit file_format every file under a folder counts.
    assert str(tmp_path / "notes.txt") in expand_files(InputSpec(str(tmp_path), file_format="jsonl"))
    with pytest.raises(InputSpecError, match="no input matches"):
        expand_files(InputSpec(str(tmp_path / "missing" / "*.jsonl")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputSpecError, match="no readable input files under"):
        expand_files(InputSpec(str(tmp_path / "empty")))


def test_input_spec_from_dict_errors():
    spec = InputSpec.from_dict({"path": "x.jsonl", "format": "hh_rlhf", "options": {"allow_empty_response": True}})
    assert (spec.format, spec.file_format, spec.source) == ("hh_rlhf", "auto", None)
    with pytest.raises(InputSpecError, match=r"unknown key\(s\) \['colums'\]"):
        InputSpec.from_dict({"path": "x", "colums": {}})
    with pytest.raises(InputSpecError, match="missing required key 'path'"):
        InputSpec.from_dict({"format": "auto"})
    with pytest.raises(InputSpecError, match="unknown adapter 'hh'"):
        InputSpec.from_dict({"path": "x", "format": "hh"})
    with pytest.raises(InputSpecError, match="file_format"):
        InputSpec.from_dict({"path": "x", "file_format": "xlsx"})
    with pytest.raises(InputSpecError, match="format 'mapping' needs columns"):
        InputSpec.from_dict({"path": "x", "format": "mapping"})
    with pytest.raises(InputSpecError, match="unknown target name"):
        InputSpec.from_dict({"path": "x", "columns": {"question": "prompt", "response": "a"}})
    with pytest.raises(InputSpecError, match="unknown objective"):
        InputSpec.from_dict({"path": "x", "columns": {"prompt": "q", "response": "a", "ratings": {"nope.x": "s"}}})
    assert InputSpec.from_dict({"path": "x", "columns": {"prompt": "q", "response": "a"}}).format == "mapping"
    assert InputSpec.from_dict({"path": "x", "format": "unieval_topical_chat"}).format == "topical_chat"


def _read(tmp_path, records, **spec):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return read_units(InputSpec(str(path), **spec)).to_pylist()


def test_generic_adapters(tmp_path):
    conv = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how are you?"},
    ]
    units = _read(
        tmp_path,
        [
            {"messages": conv + [{"role": "assistant", "content": "fine"}]},
            {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
            {
                "prompt": conv,
                "chosen": [{"role": "assistant", "content": "good"}],
                "rejected": [{"role": "assistant", "content": "bad"}],
            },
            {
                "chosen": conv + [{"role": "assistant", "content": "A"}],
                "rejected": conv + [{"role": "assistant", "content": "B"}],
            },
            {
                "chosen": conv[:2] + [{"role": "assistant", "content": "A"}],
                "rejected": conv + [{"role": "assistant", "content": "B"}],
            },
            {"prompt": "say x", "completion": "x"},
            {"instruction": "add", "input": "1 and 2", "output": "3"},
            {"messages": conv},
        ],
        source="mixed",
    )
    good = [u for u in units if u["quarantine_reason"] is None]
    assert [(u["source_row"], u["kind"], u["response"]) for u in good] == [
        (0, "instruction", "fine"),
        (1, "instruction", "4"),
        (2, "preference", "good"),
        (2, "preference", "bad"),
        (3, "preference", "A"),
        (3, "preference", "B"),
        (5, "instruction", "x"),
        (6, "instruction", "3"),
    ]
    assert good[0]["prompt"] == conv and good[2]["prompt"] == conv and good[4]["prompt"] == conv
    assert good[1]["prompt"] == [{"role": "user", "content": "2+2?"}]
    assert good[7]["prompt"] == [{"role": "user", "content": "add\n\n1 and 2"}]
    assert good[2]["prompt_id"] == good[4]["prompt_id"] == good[0]["prompt_id"]
    bad = {u["source_row"]: u["quarantine_reason"] for u in units if u["quarantine_reason"]}
    assert bad == {
        4: "chosen and rejected do not share the prompt: they differ before the final assistant turn",
        7: "messages: the last message must be the assistant response",
    }


def test_mapping_adapter_and_kind_check(tmp_path):
    recs = [
        {"q": "What is 2+2?", "a": "4", "meta": {"sys": "math tutor", "score": 3}},
        {"q": "Name a colour", "a": "blue", "meta": {"sys": "", "score": 5}},
    ]
    units = _read(
        tmp_path,
        recs,
        columns={
            "prompt": "q",
            "response": "a",
            "system": "meta.sys",
            "ratings": {"topical_chat.overall": "meta.score"},
        },
    )
    assert [u["kind"] for u in units] == ["rated", "rated"]
    assert units[0]["prompt"] == [
        {"role": "system", "content": "math tutor"},
        {"role": "user", "content": "What is 2+2?"},
    ]
    assert units[1]["prompt"] == [{"role": "user", "content": "Name a colour"}]
    assert [u["ratings"] for u in units] == [
        [{"name": "topical_chat.overall", "raw": 3.0, "value": 0.5}],
        [{"name": "topical_chat.overall", "raw": 5.0, "value": 1.0}],
    ]
    assert units[0]["source"] == "in"  # no adapter default: the file's name
    units = _read(tmp_path, recs, columns={"prompt": "q", "response": "a"}, kind="preference")
    assert [u["quarantine_reason"] for u in units] == [
        "kind mismatch: the row is instruction, the input spec says preference"
    ] * 2


def test_shards_are_exact_and_deterministic(tmp_path):
    path = tmp_path / "s.jsonl"
    lines = [json.dumps({"prompt": f"q{i}", "chosen": f"c{i}", "rejected": f"r{i}"}) for i in range(10)]
    lines[4] = "{broken"
    path.write_text("\n".join(lines) + "\n")
    spec = InputSpec(str(path))
    shards = list(iter_shards(spec, str(path), rows_per_shard=4))
    assert shards == list(iter_shards(spec, str(path), rows_per_shard=4))
    assert [len(s) for s in shards] == [8, 7, 4]  # record 4 is one quarantine unit
    for chunk, units in enumerate(shards):
        assert {u["shard_id"] for u in units} == {ids.shard_id(str(path), chunk)}
        assert [u["shard_unit"] for u in units] == list(range(len(units)))
        assert {u["shard_units"] for u in units} == {len(units)}
        assert {u["shard_rows"] for u in units} == {len({u["row_id"] for u in units})}
    assert [s[0]["shard_rows"] for s in shards] == [4, 4, 2]
    limited = list(iter_shards(spec, str(path), rows_per_shard=4, limit_rows=5))
    assert [len(s) for s in limited] == [8, 1]


class _CountingFile(io.BytesIO):
    """A file that remembers how many bytes were asked of it."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.bytes_read = 0

    def read(self, n=-1):
        out = super().read(n)
        self.bytes_read += len(out)
        return out


@pytest.mark.parametrize(
    "reader, packed", [("jsonl", False), ("jsonl", True), ("json", False), ("csv", False), ("csv", True)]
)
def test_readers_stream_instead_of_loading_whole_files(reader, packed, monkeypatch):
    monkeypatch.setattr(formats, "CHUNK_BYTES", 1 << 14)
    records = [{"prompt": f"q{i}", "response": "r" * 200} for i in range(40000)]  # ~9 MB of text
    text = {
        "jsonl": lambda: "\n".join(json.dumps(r) for r in records),
        "json": lambda: json.dumps(records),
        "csv": lambda: _delimited(records, ","),
    }[reader]()
    data = text.encode()
    if packed:
        data = gzip.compress(data)
    f = _CountingFile(data)
    uri = f"x.{reader}.gz" if packed else f"x.{reader}"
    it = {"jsonl": formats.iter_jsonl, "json": formats.iter_json, "csv": formats.iter_csv}[reader](f, uri)
    first = next(it)
    assert first.value == records[0]
    assert f.bytes_read <= formats.CHUNK_BYTES < len(data) / 2  # one chunk in, not the whole file
    assert sum(1 for _ in it) + 1 == len(records)
    assert f.bytes_read == len(data)


# --- labels from a column, lists of responses, values as stored ---------------------------------


def _pairs(units):
    """(source_row, chosen-or-first response, preference, tie, label_confidence) per good pair, or the reason."""
    out = []
    for u in units:
        if u["quarantine_reason"]:
            out.append((u["source_row"], u["quarantine_reason"]))
        elif u["response_index"] == 0:
            out.append((u["source_row"], u["response"], u["preference"], u["tie"], u["label_confidence"]))
    return out


LABEL_RECORDS = [
    {
        "q": "Which?",
        "a": "answer A",
        "b": "answer B",
        "idx01": 1,
        "idx12": 2,
        "who": "model_b",
        "oh_a": 0,
        "oh_b": 1,
        "oh_t": 0,
        "strength": 2,
    },  # B wins in every encoding
    {
        "q": "Which one?",
        "a": "A again",
        "b": "B again",
        "idx01": 0,
        "idx12": 1,
        "who": "model_a",
        "oh_a": 1,
        "oh_b": 0,
        "oh_t": 0,
        "strength": -3,
    },  # A wins
    {
        "q": "Tie?",
        "a": "same A",
        "b": "same B",
        "idx01": "tie",
        "idx12": 0,
        "who": "tie (bothbad)",
        "oh_a": 0,
        "oh_b": 0,
        "oh_t": 1,
        "strength": 0,
    },
]  # a tie


@pytest.mark.parametrize(
    "label, confidence",
    [
        ({"column": "idx01", "values": {0: 0, 1: 1, "tie": "tie"}}, (None, None, None)),
        ({"column": "idx12", "values": {1: 0, 2: 1, 0: "tie"}}, (None, None, None)),
        (
            {"column": "who", "values": {"model_a": 0, "model_b": 1, "tie": "tie", "tie (bothbad)": "tie"}},
            (None, None, None),
        ),
        ({"one_hot": {"oh_a": 0, "oh_b": 1, "oh_t": "tie"}}, (None, None, None)),
        ({"column": "strength", "negative": 0, "max": 3}, (2 / 3, 1.0, None)),
    ],
)
def test_every_label_encoding_b_wins_a_wins_and_tie(tmp_path, label, confidence):
    units = _read(tmp_path, LABEL_RECORDS, columns={"prompt": "q", "responses": ["a", "b"], "label": label})
    assert _pairs(units) == [
        (0, "answer B", "chosen", False, confidence[0]),
        (1, "A again", "chosen", False, confidence[1]),
        (2, "same A", None, True, confidence[2]),
    ]
    by_row = {(u["source_row"], u["response_index"]): u for u in units}
    assert (by_row[0, 1]["response"], by_row[0, 1]["preference"]) == ("answer A", "rejected")
    assert (by_row[2, 1]["response"], by_row[2, 1]["preference"], by_row[2, 1]["tie"]) == ("same B", None, True)
    assert by_row[0, 0]["prompt"] == [{"role": "user", "content": "Which?"}]


def test_bad_labels_are_quarantined_with_a_reason(tmp_path):
    recs = [
        {"q": "x", "a": "A", "b": "B", "w": "model_c", "s": 5, "oa": 1, "ob": 1},
        {"q": "y", "a": "A", "b": "B", "w": None, "s": "N/A", "oa": 0, "ob": 0},
        {"q": "z", "a": "A", "b": "B", "w": "model_a", "s": "lots", "oa": "2", "ob": 0},
    ]
    cols = {"prompt": "q", "responses": ["a", "b"]}
    reasons = [
        u["quarantine_reason"]
        for u in _read(
            tmp_path, recs, columns={**cols, "label": {"column": "w", "values": {"model_a": 0, "model_b": 1}}}
        )
    ]
    assert reasons == [
        "label 'w' = 'model_c' is not in its value map ['model_a', 'model_b']",
        "missing label: field 'w' is None",
        None,
        None,
    ]
    reasons = [
        u["quarantine_reason"]
        for u in _read(tmp_path, recs, columns={**cols, "label": {"column": "s", "negative": 1, "max": 3}})
    ]
    assert reasons == [
        "label 's' = 5 is outside [-3, 3]",
        "missing label: field 's' is 'N/A'",
        "wrong type: label 's' is 'lots', expected a number",
    ]
    reasons = [
        u["quarantine_reason"]
        for u in _read(tmp_path, recs, columns={**cols, "label": {"one_hot": {"oa": 0, "ob": 1}}})
    ]
    assert reasons == [
        "label: 2 of the one-hot columns ['oa', 'ob'] are set, expected exactly one",
        "label: 0 of the one-hot columns ['oa', 'ob'] are set, expected exactly one",
        "wrong type: label column 'oa' is 2, expected 0 or 1",
    ]


def test_signed_label_with_positive_side_first(tmp_path):
    # negative: 1 -> a negative value means responses[1] won (the opposite of HelpSteer's convention).
    units = _read(
        tmp_path,
        LABEL_RECORDS,
        columns={"prompt": "q", "responses": ["a", "b"], "label": {"column": "strength", "negative": 1}},
    )
    assert _pairs(units) == [
        (0, "answer A", "chosen", False, None),
        (1, "B again", "chosen", False, None),
        (2, "same A", None, True, None),
    ]


def test_wildcards_ranks_and_per_response_ratings(tmp_path):
    recs = [
        {
            "question": "Best fruit?",
            "answers": [
                {"text": "apple", "rank": 3, "score": "5", "ok": "true"},
                {"text": "mango", "rank": 1, "score": 6.0, "ok": True},
                {"text": "kiwi", "rank": 2, "score": "N/A", "ok": 0},
            ],
        }
    ]
    cols = {"prompt": "question", "responses": "answers[*].text", "ranks": "answers[*].rank"}
    units = _read(tmp_path, recs, columns=cols)
    # 1-based ranks become 0-based (0 = best).
    assert [(u["kind"], u["response"], u["human_rank"]) for u in units] == [
        ("best_of_n", "apple", 2),
        ("best_of_n", "mango", 0),
        ("best_of_n", "kiwi", 1),
    ]
    # Descending order: the score is better when higher; a missing score leaves that answer out of the group.
    units = _read(tmp_path, recs, columns={**cols, "ranks": {"path": "answers[*].score", "order": "descending"}})
    assert [(u["response"], u["human_rank"], u["n_responses"]) for u in units] == [("apple", 1, 2), ("mango", 0, 2)]
    # Per-response ratings: one rated unit per answer beside the ranked group.
    units = _read(
        tmp_path,
        recs,
        columns={
            **cols,
            "ratings": {"topical_chat.groundedness": "answers[*].ok", "sfres.overall": "answers[*].score"},
        },
    )
    assert [(u["kind"], u["response"], u["human_rank"]) for u in units[:3]] == [
        ("best_of_n", "apple", 2),
        ("best_of_n", "mango", 0),
        ("best_of_n", "kiwi", 1),
    ]
    rated = [(u["response"], [(r["name"], r["raw"], r["value"]) for r in u["ratings"]]) for u in units[3:]]
    assert rated == [
        ("apple", [("sfres.overall", 5.0, 0.8), ("topical_chat.groundedness", 1.0, 1.0)]),
        ("mango", [("sfres.overall", 6.0, 1.0), ("topical_chat.groundedness", 1.0, 1.0)]),
        ("kiwi", [("topical_chat.groundedness", 0.0, 0.0)]),
    ]
    assert {u["prompt"][0]["content"] for u in units} == {"Best fruit?"}
    # A rating off its scale quarantines that response's rated row only, named by its position.
    recs[0]["answers"][1]["score"] = 9
    units = _read(tmp_path, recs, columns={**cols, "ratings": {"sfres.overall": "answers[*].score"}})
    assert [(u["kind"], u["response"], u["quarantine_reason"]) for u in units] == [
        ("best_of_n", "apple", None),
        ("best_of_n", "mango", None),
        ("best_of_n", "kiwi", None),
        ("rated", "apple", None),
        (None, None, "rating 'sfres.overall of answers[1]' = 9.0 is outside its scale [1, 6]"),
        (None, None, "no rating present for answers[2] (all of its rating values are missing)"),
    ]


def test_value_coercion_in_ratings(tmp_path):
    recs = [
        {"q": "a", "r": "x", "s": "4"},
        {"q": "b", "r": "y", "s": 2.0},
        {"q": "c", "r": "z", "s": "N/A"},
        {"q": "d", "r": "w", "s": True},
        {"q": "e", "r": "v", "s": "four"},
    ]
    units = _read(tmp_path, recs, columns={"prompt": "q", "response": "r", "ratings": {"sfres.overall": "s"}})
    got = [(u["response"], u["ratings"], u["quarantine_reason"]) for u in units]
    assert got == [
        ("x", [{"name": "sfres.overall", "raw": 4.0, "value": 0.6}], None),
        ("y", [{"name": "sfres.overall", "raw": 2.0, "value": 0.2}], None),
        (None, None, "no rating present in the mapped rating columns"),
        ("w", [{"name": "sfres.overall", "raw": 1.0, "value": 0.0}], None),
        (None, None, "wrong type: rating 's' is 'four', expected a number"),
    ]


def test_mapping_config_errors():
    base = {"path": "x", "columns": {"prompt": "q", "responses": ["a", "b"]}}
    for extra, match in [
        ({"label": {"column": "w"}}, "give `values`"),
        ({"label": {"column": "w", "values": {"x": 2}}}, r"expected 0 or 1 \(a position in responses\) or 'tie'"),
        ({"label": {"one_hot": {"a": 0}}}, "one_hot"),
        ({"label": {"column": "w", "negative": 0, "max": 0}}, "positive number"),
        ({"ranks": {"path": "r", "order": "up"}}, "ascending or descending"),
        ({"ratings": {"sfres.overall": "s"}}, r"one column per response \(a list\) or a \[\*\] path"),
        ({"ratings": {"sfres.overall": ["s"]}}, "1 columns for 2 responses"),
        ({"response": "r"}, "map either responses or response"),
    ]:
        with pytest.raises(InputSpecError, match=match):
            InputSpec.from_dict({**base, "columns": {**base["columns"], **extra}})
    with pytest.raises(InputSpecError, match="only with columns.responses"):
        InputSpec.from_dict({"path": "x", "columns": {"prompt": "q", "response": "r", "label": {"one_hot": {}}}})
    with pytest.raises(InputSpecError, match="a label picks one of exactly two responses"):
        InputSpec.from_dict(
            {
                "path": "x",
                "columns": {"prompt": "q", "responses": ["a", "b", "c"], "label": {"column": "w", "values": {1: 0}}},
            }
        )


def test_json_cells_and_text_that_looks_like_json(tmp_path):
    recs = [
        {"q": "Give a JSON list.", "a": '["x", "y"]', "b": "no"},
        {"q": json.dumps([{"role": "user", "content": "hi"}]), "a": "A", "b": "B"},
    ]
    units = _read(
        tmp_path,
        recs,
        columns={"prompt": "q", "responses": ["a", "b"], "label": {"column": "q", "values": {"give a json list.": 0}}},
    )
    # A response that merely looks like a JSON list stays text (no json_cells option) ...
    assert (units[0]["response"], units[0]["preference"]) == ('["x", "y"]', "chosen")
    # ... while a cell holding encoded chat messages is decoded (and the label value lookup fails here).
    assert units[2]["quarantine_reason"].startswith("label 'q' = '[{")
    units = _read(
        tmp_path,
        recs[:1],
        columns={"prompt": "q", "responses": ["a", "b"], "label": {"column": "q", "values": {"give a json list.": 0}}},
        options={"json_cells": True},
    )
    assert units[0]["quarantine_reason"] == "a: 2 assistant turns do not match the prompt's single user turn(s)"


def test_label_with_per_response_ratings_and_csv_best_of_n(tmp_path):
    # PKU-SafeRLHF-like: a pair by better_response_id plus a safety rating per response.
    recs = [
        {
            "prompt": "p",
            "response_0": "r0",
            "response_1": "r1",
            "better_response_id": "1",
            "is_response_0_safe": "False",
            "is_response_1_safe": "True",
        }
    ]
    units = _read(
        tmp_path,
        recs,
        columns={
            "prompt": "prompt",
            "responses": ["response_0", "response_1"],
            "label": {"column": "better_response_id", "values": {0: 0, 1: 1}},
            "ratings": {"beavertails-is_safe": ["is_response_0_safe", "is_response_1_safe"]},
        },
    )
    assert [(u["kind"], u["response"], u["preference"], u["ratings"]) for u in units] == [
        ("preference", "r1", "chosen", None),
        ("preference", "r0", "rejected", None),
        ("rated", "r0", None, [{"name": "beavertails-is_safe", "raw": 0.0, "value": 0.0}]),
        ("rated", "r1", None, [{"name": "beavertails-is_safe", "raw": 1.0, "value": 1.0}]),
    ]
    # The generic best-of-N format with CSV cells: JSON-encoded responses, ranks as strings.
    units = _read(tmp_path, [{"prompt": "p", "responses": '["a", "b"]', "ranks": '["1", "0"]'}])
    assert [(u["response"], u["human_rank"]) for u in units] == [("a", 1), ("b", 0)]
