"""Corrupted inputs written here: each bad row becomes one quarantine unit with a clear reason,
good rows still come through, and for every file rows in = good + quarantined."""

from __future__ import annotations

import gzip
import json
import zlib

import pyarrow.parquet as pq

from pipeline import ids
from pipeline.corpus import InputSpec, iter_shards, read_units, summarize


def _pr(i: int) -> dict:
    return {"prompt": f"question {i}", "response": f"answer {i}"}


def _line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def _by_row(table) -> dict[int, dict]:
    return {u["source_row"]: u for u in table.to_pylist() if u["response_index"] == 0}


def test_bad_jsonl_rows_each_quarantined_with_reason(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [
        _line(_pr(0)),  # 0 good
        b'{"prompt": "q", "response": \n',  # 1 broken JSON
        b'{"prompt": "caf\xc3 au lait", "response": "x"}\n',  # 2 invalid UTF-8
        _line({"prompt": 5, "response": "x"}),  # 3 wrong type
        _line({"prompt": "   ", "response": "x"}),  # 4 empty prompt
        _line({"prompt": "q", "response": ""}),  # 5 empty response
        _line({"prompt": "q"}),  # 6 missing field
        _line(_pr(0)),  # 7 duplicate of line 0
        _line([1, 2, 3]),  # 8 not an object
        b"\n",  # 9 blank: layout, not a row
        _line(_pr(1)),  # 10 good
        _line({"prompt": [{"role": "user", "content": "hi"}], "response": "yo"}),  # 11 good (messages prompt)
    ]
    path.write_bytes(b"".join(lines))
    table = read_units(InputSpec(str(path)))
    rows = _by_row(table)
    reasons = {i: u["quarantine_reason"] for i, u in rows.items()}
    assert reasons[0] is None and reasons[10] is None and reasons[11] is None
    assert reasons[1].startswith("malformed JSON on line 2")
    assert reasons[2] == "undecodable bytes (invalid UTF-8) on line 3 at byte 15"
    assert reasons[3] == "wrong type: field 'prompt' is int, expected a string or messages"
    assert reasons[4] == "empty prompt: the last user turn is empty"
    assert reasons[5] == "empty response: response 0 is empty"
    assert reasons[6] == "missing field 'response'"
    assert reasons[7] == f"duplicate row: same content as source_row 0 of this file (row_id {rows[0]['row_id']})"
    assert reasons[8] == "wrong type: the record is list, expected an object"
    assert 9 not in rows
    s = summarize(table)["mixed"]
    assert (s["rows_in"], s["rows_ok"], s["rows_quarantined"]) == (11, 3, 8)
    # Quarantine units: one per bad row, ids from their location, raw text kept.
    bad = rows[1]
    assert bad["row_id"] == ids.bad_row_id(str(path), 1) and bad["unit_id"] == bad["row_id"] + "-0"
    assert (bad["kind"], bad["n_responses"], bad["response_index"], bad["prompt"]) == (None, 0, 0, None)
    assert bad["raw"] == '{"prompt": "q", "response": '
    assert rows[7]["row_id"] == ids.bad_row_id(str(path), 7)
    assert "\ufffd" in rows[2]["raw"]
    assert rows[11]["prompt"] == [{"role": "user", "content": "hi"}]


def test_raw_text_is_cut(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text('{"prompt": "' + "x" * 10000 + "\n")
    (unit,) = read_units(InputSpec(str(path))).to_pylist()
    assert unit["quarantine_reason"].startswith("malformed JSON")
    assert len(unit["raw"]) == 4096


def test_truncated_gzip_keeps_rows_before_the_cut(tmp_path):
    payload = b"".join(_line({"prompt": f"question {i} " * 20, "response": f"answer {i} " * 30}) for i in range(400))
    packed = gzip.compress(payload)
    cut = packed[: len(packed) // 2]
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(cut)
    # What survives, found another way: one-shot inflate of the cut bytes; complete lines only.
    survived = zlib.decompressobj(wbits=31).decompress(cut)
    complete = survived.count(b"\n")
    assert 0 < complete < 400
    table = read_units(InputSpec(str(path)))
    rows = _by_row(table)
    good = [u for u in rows.values() if u["quarantine_reason"] is None]
    assert len(good) == complete
    assert [u["response"] for u in good] == [f"answer {i} " * 30 for i in range(complete)]
    tail = rows[complete]
    assert tail["quarantine_reason"].startswith("truncated compressed file")
    assert f"rows from line {complete + 1} on could not be read" in tail["quarantine_reason"]
    assert len(rows) == complete + 1
    s = summarize(table)["cut"]
    assert s["rows_in"] == s["rows_ok"] + s["rows_quarantined"] == complete + 1


def test_corrupt_gzip_and_concatenated_members(tmp_path):
    # Two gzip members back to back are one valid stream (as `cat a.gz b.gz` makes).
    ok = tmp_path / "two.jsonl.gz"
    ok.write_bytes(gzip.compress(_line(_pr(0)) + _line(_pr(1))) + gzip.compress(_line(_pr(2))))
    assert [u["response"] for u in read_units(InputSpec(str(ok))).to_pylist()] == ["answer 0", "answer 1", "answer 2"]
    lines = [_line({"prompt": f"question {i}", "response": f"answer {i} " + "x" * (i % 97)}) for i in range(3000)]
    packed = bytearray(gzip.compress(b"".join(lines)))
    at = int(len(packed) * 0.7)
    packed[at : at + 64] = bytes(range(64))  # garbage inside the deflate stream
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(bytes(packed))
    units = read_units(InputSpec(str(bad))).to_pylist()
    # Rows wholly before the damage come through intact and in order. (Deflate can turn damaged
    # bytes into plausible text; gzip only notices at an invalid code or at the member's CRC, and
    # that is where the file ends with one unit saying why.)
    intact = zlib.decompressobj(wbits=31).decompress(bytes(packed[:at])).count(b"\n")
    assert intact > 1000
    assert [u["response"] for u in units[:intact]] == [json.loads(line)["response"] for line in lines[:intact]]
    assert units[-1]["quarantine_reason"].startswith("corrupt compressed file")
    assert units[-1]["source_row"] == len(units) - 1 < 3000


def test_one_unreadable_file_among_good_ones(tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(_line(_pr(0)) + _line(_pr(1)))
    (folder / "b.parquet").write_bytes(b"this is not parquet at all")
    (folder / "c.json").write_text(json.dumps([_pr(2), _pr(3), _pr(4)]))
    table = read_units(InputSpec(str(folder), format="prompt_response", source="mix"))
    units = table.to_pylist()
    assert [u["response"] for u in units if u["quarantine_reason"] is None] == [f"answer {i}" for i in (0, 1, 2, 3, 4)]
    (bad,) = [u for u in units if u["quarantine_reason"]]
    assert bad["source_uri"] == str(folder / "b.parquet") and bad["source_row"] == 0
    assert bad["quarantine_reason"].startswith("corrupt Parquet file")
    assert summarize(table)["mix"] == {
        "rows_in": 6,
        "rows_ok": 5,
        "rows_quarantined": 1,
        "units": 6,
        "units_ok": 5,
        "quarantine_reasons": {"corrupt Parquet file": 1},
    }
    # A file that vanished after listing cannot be opened at all: one unit says so.
    gone = str(folder / "gone.jsonl")
    (unit,) = [u for shard in iter_shards(InputSpec(str(folder)), gone, 10) for u in shard]
    assert unit["quarantine_reason"].startswith("unreadable file: FileNotFoundError")
    assert (unit["shard_rows"], unit["shard_units"], unit["source_row"]) == (1, 1, 0)


def test_json_array_bad_element_and_bad_bytes(tmp_path):
    path = tmp_path / "arr.json"
    good = [json.dumps(_pr(i)).encode() for i in range(3)]
    # Element 1 holds an invalid byte; after element 3 the array breaks (missing comma).
    path.write_bytes(
        b"["
        + good[0]
        + b", "
        + b'{"prompt": "a\xfe", "response": "b"}'
        + b",\n"
        + good[1]
        + b", "
        + good[2]
        + b' {"prompt": "lost"} ]'
    )
    rows = _by_row(read_units(InputSpec(str(path))))
    assert [rows[i]["quarantine_reason"] for i in (0, 2, 3)] == [None, None, None]
    assert rows[1]["quarantine_reason"] == "undecodable bytes (invalid UTF-8) in element 1"
    assert rows[4]["quarantine_reason"].startswith("malformed JSON in element 4 (expected ',' or ']' after element 3")
    assert rows[4]["raw"].startswith('{"prompt": "lost"}')
    assert len(rows) == 5


def test_json_array_cut_short(tmp_path):
    path = tmp_path / "short.json"
    path.write_text(json.dumps([_pr(0), _pr(1)])[:-20])
    rows = _by_row(read_units(InputSpec(str(path))))
    assert rows[0]["quarantine_reason"] is None
    assert rows[1]["quarantine_reason"].startswith("malformed JSON in element 1")
    assert len(rows) == 2


def test_wrong_types_in_published_formats(tmp_path):
    path = tmp_path / "pairs.json"
    base = {
        "instruction": "Say hi",
        "input": "",
        "response1": "hi",
        "response2": "hello",
        "annotator1": 1,
        "annotator2": 1,
        "annotator3": 2,
    }
    recs = [
        base,
        {**base, "response1": True},
        {**base, "annotator2": 7},
        {**base, "response2": "hey", "annotator3": "2"},
        {k: v for k, v in base.items() if k != "annotator1"},
    ]
    path.write_text(json.dumps(recs))
    table = read_units(InputSpec(str(path), format="pandalm"))
    rows = _by_row(table)
    assert rows[0]["quarantine_reason"] is None and rows[0]["label_confidence"] == 2 / 3
    assert rows[1]["quarantine_reason"] == "wrong type: field 'response1' is bool, expected a string"
    assert rows[2]["quarantine_reason"] == "wrong type: field 'annotator2' is 7, expected one of [0, 1, 2]"
    assert rows[3]["quarantine_reason"] is None  # "2" as a digit string is the README's documented form
    assert (rows[3]["response"], rows[3]["preference"], rows[3]["label_confidence"]) == ("hi", "chosen", 2 / 3)
    assert rows[4]["quarantine_reason"] == "missing field 'annotator1'"
    scores = tmp_path / "rated.json"
    scores.write_text(
        json.dumps(
            [
                {
                    "source": "inform(name=x)",
                    "system_output": "x is nice",
                    "scores": "{'overall': 4.0, 'naturalness': 2}",
                    "reference": "",
                },
                {
                    "source": "inform(name=y)",
                    "system_output": "y",
                    "scores": "{'overall': __import__('os')}",
                    "reference": "",
                },
                {"source": "inform(name=z)", "system_output": "z", "scores": {"overall": 9.0}, "reference": ""},
            ]
        )
    )
    rows = _by_row(read_units(InputSpec(str(scores), format="sfres")))
    assert {r["name"]: r["value"] for r in rows[0]["ratings"]} == {"sfres.overall": 0.6, "sfres.naturalness": 0.2}
    assert rows[1]["quarantine_reason"] == "wrong type: 'scores' is not a Python dict literal (ValueError)"
    assert rows[2]["quarantine_reason"] == "rating 'overall' = 9.0 is outside its scale [1, 6]"


def test_duplicates_across_shards_and_parquet_rows(tmp_path):
    path = tmp_path / "dups.parquet"
    import pyarrow as pa

    recs = [_pr(0), _pr(1), _pr(0), _pr(2), _pr(1)]
    pq.write_table(pa.Table.from_pylist(recs), path, row_group_size=2)
    shards = list(iter_shards(InputSpec(str(path)), str(path), rows_per_shard=2))
    assert [len(s) for s in shards] == [2, 2, 1]
    units = [u for s in shards for u in s]
    assert [u["quarantine_reason"] is None for u in units] == [True, True, False, True, False]
    assert units[2]["quarantine_reason"].startswith("duplicate row: same content as source_row 0")
    assert units[4]["quarantine_reason"].startswith("duplicate row: same content as source_row 1")


def _msg(mid, role, text, rank=None, replies=(), deleted=False):
    return {"message_id": mid, "role": role, "text": text, "rank": rank, "deleted": deleted, "replies": list(replies)}


def test_oasst_tree_edge_cases(tmp_path):
    trees = [
        # Root with 3 replies: one deleted, one unranked -> only 2 ranked remain; a deeper prompter
        # whose ranked replies include an empty text -> that row alone is quarantined.
        _msg(
            "p0",
            "prompter",
            "root question",
            replies=[
                _msg(
                    "a0",
                    "assistant",
                    "best",
                    0,
                    replies=[
                        _msg(
                            "p1",
                            "prompter",
                            "follow-up",
                            replies=[_msg("a2", "assistant", "", 0), _msg("a3", "assistant", "ok", 1)],
                        )
                    ],
                ),
                _msg("a1", "assistant", "worse", 1),
                _msg("ax", "assistant", "gone", 2, deleted=True),
                _msg("ay", "assistant", "unranked"),
            ],
        ),
        # No prompter with two ranked replies: the whole tree is one quarantined row.
        _msg("q0", "prompter", "lonely", replies=[_msg("b0", "assistant", "only one", 0)]),
    ]
    path = tmp_path / "trees.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in trees))
    units = read_units(InputSpec(str(path), format="oasst_best_of_n")).to_pylist()
    good = [u for u in units if u["quarantine_reason"] is None]
    assert [(u["response"], u["human_rank"]) for u in good] == [("best", 0), ("worse", 1)]
    assert good[0]["prompt"] == [{"role": "user", "content": "root question"}]
    bad = [u for u in units if u["quarantine_reason"]]
    assert [(u["source_row"], u["quarantine_reason"]) for u in bad] == [
        (0, "empty response: response 0 is empty"),
        (1, "no prompter message with at least 2 ranked assistant replies in this tree"),
    ]
    assert bad[0]["row_id"] == ids.bad_row_id(f"{path}#p1", 0)  # told apart from other rows of the same tree
    s = summarize(read_units(InputSpec(str(path), format="oasst_best_of_n")))["oasst"]
    assert (s["rows_in"], s["rows_ok"], s["rows_quarantined"]) == (3, 1, 2)


def test_empty_responses_can_be_kept_by_option(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text(json.dumps({"prompt": "say nothing", "chosen": "", "rejected": "something"}) + "\n")
    (bad,) = read_units(InputSpec(str(path))).to_pylist()
    assert bad["quarantine_reason"] == "empty response: chosen is empty"
    kept = read_units(InputSpec(str(path), options={"allow_empty_response": True})).to_pylist()
    assert [(u["response"], u["preference"]) for u in kept] == [("", "chosen"), ("something", "rejected")]
