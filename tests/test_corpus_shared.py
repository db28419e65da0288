"""Every shared set read in its published format: exact counts (expected values computed here
with plain json/gzip parsing, independently of the reader) and spot-checked content."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import pytest

from pipeline.corpus import InputSpec, read_units, summarize


def _good(table):
    return [u for u in table.to_pylist() if u["quarantine_reason"] is None]


def _bad(table):
    return [u for u in table.to_pylist() if u["quarantine_reason"] is not None]


def _rows_of(units):
    """Units grouped by row, in file order."""
    rows: dict[str, list[dict]] = {}
    for u in units:
        rows.setdefault(u["row_id"], []).append(u)
    return list(rows.values())


@pytest.fixture(scope="module")
def hh(shared_data):
    path = shared_data / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    return records, read_units(InputSpec(str(path)))


def _hh_split(text: str) -> list[tuple[str, str]]:
    # Independent of the reader's regex: split on the Human marker, then on the Assistant marker.
    turns = []
    for chunk in text.split("\n\nHuman:")[1:]:
        parts = chunk.split("\n\nAssistant:")
        turns.append(("user", parts[0].strip()))
        turns += [("assistant", p.strip()) for p in parts[1:]]
    return turns


def test_hh_rlhf_counts_and_quarantine(hh):
    records, table = hh
    assert len(records) == 1168
    expected_bad = set()
    for i, r in enumerate(records):
        c, rj = r["chosen"], r["rejected"]
        same_prompt = c[: c.rfind("\n\nAssistant:")] == rj[: rj.rfind("\n\nAssistant:")]
        empty = not c[c.rfind("\n\nAssistant:") + 12 :].strip() or not rj[rj.rfind("\n\nAssistant:") + 12 :].strip()
        if not same_prompt or empty:
            expected_bad.add(i)
    s = summarize(table)["hh_rlhf"]
    assert s["rows_in"] == 1168
    assert s["rows_quarantined"] == len(expected_bad) == 4
    assert s["rows_ok"] == 1168 - len(expected_bad)
    assert s["units_ok"] == 2 * s["rows_ok"]
    bad = {u["source_row"]: u["quarantine_reason"] for u in _bad(table)}
    assert set(bad) == expected_bad
    assert bad[262] == "empty response: chosen is empty"
    assert all(bad[i].startswith("chosen and rejected do not share the prompt") for i in expected_bad - {262})
    assert all(u["raw"] and len(u["raw"]) <= 4096 for u in _bad(table))


def test_hh_rlhf_multi_turn_prompt(hh):
    records, table = hh
    by_row = {}
    for u in _good(table):
        by_row.setdefault(u["source_row"], []).append(u)
    i = next(i for i, r in enumerate(records) if r["chosen"].count("\n\nHuman:") == 4 and i in by_row)
    turns = _hh_split(records[i]["chosen"])
    rejected_turns = _hh_split(records[i]["rejected"])
    chosen_unit, rejected_unit = sorted(by_row[i], key=lambda u: u["response_index"])
    expected_prompt = [{"role": r, "content": c} for r, c in turns[:-1]]
    assert len(expected_prompt) == 7
    assert chosen_unit["prompt"] == expected_prompt == rejected_unit["prompt"]
    assert chosen_unit["response"] == turns[-1][1]
    assert rejected_unit["response"] == rejected_turns[-1][1]
    assert (chosen_unit["preference"], rejected_unit["preference"]) == ("chosen", "rejected")
    assert chosen_unit["kind"] == "preference" and chosen_unit["n_responses"] == 2 and chosen_unit["tie"] is False
    assert chosen_unit["prompt_id"] == rejected_unit["prompt_id"]
    assert chosen_unit["unit_id"] == chosen_unit["row_id"] + "-0"


def test_pandalm_majority_ties_and_quarantine(shared_data):
    path = shared_data / "pandalm" / "testset-v1.json"
    records = json.loads(path.read_text())
    table = read_units(InputSpec(str(path)))
    assert len(records) == 999
    s = summarize(table)["pandalm"]
    assert s["rows_in"] == 999 and s["rows_ok"] + s["rows_quarantined"] == 999

    # Expected outcome per record, computed here: type, emptiness, majority label, duplicate content.
    expected_ok, seen = {}, set()
    reasons = Counter()
    for i, r in enumerate(records):
        if not all(isinstance(r[k], str) for k in ("response1", "response2")):
            reasons["wrong type"] += 1
            continue
        if not r["response1"].strip() or not r["response2"].strip():
            reasons["empty response"] += 1
            continue
        votes = Counter([r["annotator1"], r["annotator2"], r["annotator3"]])
        label, agree = votes.most_common(1)[0]
        tie = agree == 1 or label == 0
        pair = (r["response2"], r["response1"]) if label == 2 and not tie else (r["response1"], r["response2"])
        prompt = r["instruction"] + (f"\n\n{r['input']}" if r["input"].strip() else "")
        key = (prompt, pair, tie)
        if key in seen:
            reasons["duplicate row"] += 1
            continue
        seen.add(key)
        expected_ok[i] = (pair, tie, agree / 3, prompt)
    assert s["rows_ok"] == len(expected_ok)
    assert s["quarantine_reasons"] == dict(reasons)

    rows = _rows_of(_good(table))
    assert len(rows) == len(expected_ok)
    n_ties = 0
    for first, second in rows:
        pair, tie, confidence, prompt = expected_ok[first["source_row"]]
        assert (first["response"], second["response"]) == pair
        assert first["tie"] is tie and first["label_confidence"] == pytest.approx(confidence)
        assert first["prompt"] == [{"role": "user", "content": prompt}]
        if tie:
            n_ties += 1
            assert first["preference"] is None and second["preference"] is None
        else:
            assert (first["preference"], second["preference"]) == ("chosen", "rejected")
    assert n_ties == sum(1 for v in expected_ok.values() if v[1]) > 0
    # A split vote (1, 0, 1): response1 chosen, 2 of 3 agree.
    i = next(i for i in expected_ok if [records[i][f"annotator{k}"] for k in (1, 2, 3)] == [1, 0, 1])
    row = next(r for r in rows if r[0]["source_row"] == i)
    assert row[0]["response"] == records[i]["response1"] and row[0]["label_confidence"] == pytest.approx(2 / 3)


def test_llmbar_labels(shared_data):
    path = shared_data / "llmbar" / "LLMBar_Natural.json"
    records = json.loads(path.read_text())
    table = read_units(InputSpec(str(path)))
    assert summarize(table) == {
        "llmbar": {
            "rows_in": 100,
            "rows_ok": 100,
            "rows_quarantined": 0,
            "units": 200,
            "units_ok": 200,
            "quarantine_reasons": {},
        }
    }
    for chosen, rejected in _rows_of(table.to_pylist()):
        r = records[chosen["source_row"]]
        winner, loser = ("output_1", "output_2") if r["label"] == 1 else ("output_2", "output_1")
        assert chosen["response"] == r[winner] and rejected["response"] == r[loser]
        assert chosen["prompt"] == [{"role": "user", "content": r["input"]}]
        assert chosen["preference"] == "chosen" and chosen["label_confidence"] is None


# Native scales as published in ../shared/data/README.md.
TOPICAL_SCALES = {
    "understandability": (0, 1),
    "naturalness": (1, 3),
    "coherence": (1, 3),
    "engagingness": (1, 3),
    "groundedness": (0, 1),
    "overall": (1, 5),
}


def test_topical_chat_ratings_and_prompt(shared_data):
    path = shared_data / "unieval" / "topical_chat.json"
    records = json.loads(path.read_text())
    table = read_units(InputSpec(str(path)))
    s = summarize(table)["topical_chat"]
    assert (s["rows_in"], s["rows_ok"], s["rows_quarantined"]) == (192, 192, 0)
    units = table.to_pylist()
    for u in units:
        r = records[u["source_row"]]
        assert u["kind"] == "rated" and u["response"] == r["system_output"]
        got = {x["name"]: (x["raw"], x["value"]) for x in u["ratings"]}
        assert set(got) == {f"topical_chat.{k}" for k in TOPICAL_SCALES}
        for attr, (low, high) in TOPICAL_SCALES.items():
            raw, value = got[f"topical_chat.{attr}"]
            assert raw == r["scores"][attr]
            assert value == pytest.approx((raw - low) / (high - low)) and 0 <= value <= 1
        history = [t.strip() for t in r["source"].split("\n") if t.strip()]
        prompt = u["prompt"]
        assert prompt[0] == {"role": "system", "content": "Grounding fact: " + r["context"].strip()}
        assert [m["content"] for m in prompt[1:]] == history
        assert prompt[-1]["role"] == "user"
        assert all(a["role"] != b["role"] for a, b in zip(prompt[1:], prompt[2:]))
    # Six systems answer each context: their units share one prompt id.
    assert Counter(Counter(u["prompt_id"] for u in units).values()) == {6: 32}


def test_sfres_ratings_and_duplicates(shared_data):
    path = shared_data / "unieval" / "sfres.json"
    records = json.loads(path.read_text())
    table = read_units(InputSpec(str(path)))
    keys = [(r["source"], r["system_output"], json.dumps(r["scores"], sort_keys=True)) for r in records]
    dupes = len(keys) - len(set(keys))
    s = summarize(table)["sfres"]
    assert (s["rows_in"], s["rows_ok"], s["rows_quarantined"]) == (1181, 1181 - dupes, dupes)
    assert s["quarantine_reasons"] == ({"duplicate row": dupes} if dupes else {})
    u = _good(table)[1]
    r = records[u["source_row"]]
    assert u["prompt"] == [{"role": "user", "content": r["source"]}]
    assert {x["name"]: x["value"] for x in u["ratings"]} == {
        f"sfres.{k}": pytest.approx((v - 1) / 5) for k, v in r["scores"].items()
    }


def _oasst_expected(tree):
    """(prompt path, replies by rank) for every prompter node with >= 2 ranked replies."""
    out = []

    def walk(node, path):
        path = path + [node]
        ranked = sorted(
            (r for r in node["replies"] if r["role"] == "assistant" and r["rank"] is not None and not r["deleted"]),
            key=lambda r: r["rank"],
        )
        if node["role"] == "prompter" and len(ranked) >= 2:
            out.append(([m["text"] for m in path], ranked))
        for child in node["replies"]:
            walk(child, path)

    walk(tree, [])
    return out


def test_oasst_best_of_n(shared_data):
    path = shared_data / "oasst" / "en_100_message.jsonl"
    trees = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(trees) == 43
    expected = [row for t in trees for row in _oasst_expected(t)]
    table = read_units(InputSpec(str(path), format="oasst_best_of_n"))
    s = summarize(table)["oasst"]
    assert s["rows_quarantined"] == sum(1 for t in trees if not _oasst_expected(t)) == 0
    assert s["rows_ok"] == len(expected) == 87
    assert s["units_ok"] == sum(len(ranked) for _, ranked in expected) == 268
    rows = _rows_of(table.to_pylist())
    for units, (path_texts, ranked) in zip(rows, expected):
        assert [m["content"] for m in units[0]["prompt"]] == path_texts
        assert [u["response"] for u in units] == [r["text"] for r in ranked]
        assert [u["human_rank"] for u in units] == [r["rank"] for r in ranked]
        assert units[0]["human_rank"] == 0 and units[0]["kind"] == "best_of_n"
        assert all(u["n_responses"] == len(ranked) for u in units)
    # Deeper turns: some rows' prompts run through earlier assistant replies.
    assert any(len(units[0]["prompt"]) == 3 for units in rows)


def test_oasst_pairs_from_rank_order(shared_data):
    path = shared_data / "oasst" / "en_100_message.jsonl"
    trees = [json.loads(line) for line in path.read_text().splitlines()]
    expected = [row for t in trees for row in _oasst_expected(t)]
    table = read_units(InputSpec(str(path), format="oasst_pairs"))
    n_pairs = sum(len(r) * (len(r) - 1) // 2 for _, r in expected)
    assert summarize(table)["oasst"]["rows_ok"] == n_pairs == 333
    texts_by_rank = {(tuple(p), r["text"]): r["rank"] for p, ranked in expected for r in ranked}
    for chosen, rejected in _rows_of(table.to_pylist()):
        key = tuple(m["content"] for m in chosen["prompt"])
        assert texts_by_rank[(key, chosen["response"])] < texts_by_rank[(key, rejected["response"])]
        assert chosen["preference"] == "chosen" and rejected["preference"] == "rejected"
