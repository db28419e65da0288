"""CSV/TSV files, byte-order marks and text that cannot be stored (lone surrogates, invalid
UTF-8): every bad row is one quarantine unit with its reason, good rows still come through, and
rows in = good + quarantined for every file, in every format."""

from __future__ import annotations

import csv
import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.corpus import InputSpec, expand_files, formats, read_units, summarize
from pipeline.corpus.reader import FileReader

BOM = b"\xef\xbb\xbf"


def _reasons(table) -> dict[int, str | None]:
    return {u["source_row"]: u["quarantine_reason"] for u in table.to_pylist() if u["response_index"] == 0}


def _counts(table, source: str) -> tuple[int, int, int]:
    s = summarize(table)[source]
    assert s["rows_in"] == s["rows_ok"] + s["rows_quarantined"]
    return s["rows_in"], s["rows_ok"], s["rows_quarantined"]


def test_csv_rows_quoting_and_per_row_quarantine(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_bytes(
        b"id,prompt,response\r\n"
        b'1,"hello, you","a cell\nover two lines"\r\n'  # row 0: quoted comma and newline
        b'2,"left open,x\r\n'  # row 1: a quote never closed (the parser reads on)
        b"3,fine,yes\r\n"  # row 2: not swallowed by row 1
        b"4,a,b,c\r\n"  # row 3: one field too many
        b'5,"q"z,r\r\n'  # row 4: text after a closing quote
        b"\r\n"  # blank: layout, not a row
        b'6,he said "hi",ok\r\n'  # row 5: a quote inside an unquoted cell is text
        b"7,caf\xc3 au lait,x\r\n"  # row 6: invalid UTF-8
        b"8,short\r\n"  # row 7: one field short
        b'9,"say ""yes""",done'
    )  # row 8: doubled quotes, no final newline
    table = read_units(InputSpec(str(path)))
    reasons = _reasons(table)
    assert reasons == {
        0: None,
        1: "malformed CSV on line 4: ',' expected after '\"' (broken quoting)",
        2: None,
        3: "wrong field count on line 6: 4 fields, the header has 3",
        4: "malformed CSV on line 7: ',' expected after '\"' (broken quoting)",
        5: None,
        6: "undecodable bytes (invalid UTF-8) on line 10 at byte 5",
        7: "wrong field count on line 11: 2 fields, the header has 3",
        8: None,
    }
    good = {u["source_row"]: u for u in table.to_pylist() if u["quarantine_reason"] is None}
    assert good[0]["prompt"] == [{"role": "user", "content": "hello, you"}]
    assert good[0]["response"] == "a cell\nover two lines"
    assert good[5]["prompt"][0]["content"] == 'he said "hi"' and good[8]["prompt"][0]["content"] == 'say "yes"'
    assert _counts(table, "pairs") == (9, 4, 5)
    raw = {u["source_row"]: u["raw"] for u in table.to_pylist() if u["quarantine_reason"]}
    assert raw[1] == '2,"left open,x' and raw[3] == "4,a,b,c"


def test_quote_left_open_to_the_end_of_the_file(tmp_path):
    path = tmp_path / "open.csv"
    path.write_text('prompt,response\nq1,a1\n"q2,a2\nq3,a3\nq4,a4\n')
    reasons = _reasons(read_units(InputSpec(str(path))))
    assert reasons == {0: None, 1: "malformed CSV on line 3: unexpected end of data (broken quoting)", 2: None, 3: None}


def test_csv_header_names_and_broken_header(tmp_path):
    path = tmp_path / "h.csv"
    path.write_text(",prompt,response,response\n0,q,a,b\n")
    rec = next(formats.iter_records(str(path), "csv"))
    assert rec.value == {"Unnamed: 0": "0", "prompt": "q", "response": "a", "response.1": "b"}  # as pandas names them
    path.write_text('"prompt,response\nq,a\n')
    table = read_units(InputSpec(str(path)))
    assert table.num_rows == 1
    assert table.column("quarantine_reason")[0].as_py() == (
        "malformed CSV header on line 1: unexpected end of data; the file cannot be read without it"
    )


def test_tsv_and_gzip_and_extension_detection(tmp_path):
    body = 'prompt\tresponse\nq, with comma\t"tab\there"\nq2\ta2\n'
    (tmp_path / "a.tsv").write_text(body)
    (tmp_path / "b.tsv.gz").write_bytes(gzip.compress(body.encode()))
    (tmp_path / "c.csv.gz").write_bytes(gzip.compress(b"prompt,response\nq,a\n"))
    files = expand_files(InputSpec(str(tmp_path)))
    assert [f.rsplit("/", 1)[1] for f in files] == ["a.tsv", "b.tsv.gz", "c.csv.gz"]
    table = read_units(InputSpec(str(tmp_path)))
    assert table.column("response").to_pylist() == ["tab\there", "a2", "tab\there", "a2", "a"]
    assert sorted(set(table.column("source").to_pylist())) == ["a", "b", "c"]
    # An explicit file_format reads any name.
    (tmp_path / "d.txt").write_text(body)
    assert read_units(InputSpec(str(tmp_path / "d.txt"), file_format="tsv")).num_rows == 2


def _arena_record(i: int, winner: str) -> dict:
    # lmsys-arena-human-preference-55k, train.csv (kaggle "LMSYS - Chatbot Arena Human Preference
    # Predictions" data page / HF dataset card lmsys/lmsys-arena-human-preference-55k): columns
    # id, model_a, model_b, prompt, response_a, response_b, winner_model_a, winner_model_b,
    # winner_tie; prompt and response_* hold JSON-encoded lists of strings (one per turn).
    return {
        "id": str(30192 + i),
        "model_a": "gpt-4-1106-preview",
        "model_b": "gpt-4-0613",
        "prompt": json.dumps([f"Is it morally right to try to have a certain percentage {i}?"]),
        "response_a": json.dumps(["The question of whether it is morally right...", None]),
        "response_b": json.dumps(['As an AI, I don\'t have personal beliefs, "quoted"\nnext line']),
        "winner_model_a": str(int(winner == "a")),
        "winner_model_b": str(int(winner == "b")),
        "winner_tie": str(int(winner == "tie")),
    }


def test_arena_csv_cells_come_through_as_the_published_strings(tmp_path):
    records = [_arena_record(0, "a"), _arena_record(1, "b"), _arena_record(2, "tie")]
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=list(records[0]))  # pandas.to_csv / csv quoting, \r\n line ends
    w.writeheader()
    w.writerows(records)
    path = tmp_path / "train.csv"
    path.write_text(out.getvalue(), newline="")
    got = [r.value for r in formats.iter_records(str(path), "csv")]
    assert got == records  # every cell a string, JSON cells undecoded (the adapter decodes them)
    assert json.loads(got[1]["response_b"]) == ['As an AI, I don\'t have personal beliefs, "quoted"\nnext line']


def test_bom_is_skipped_in_every_text_format(tmp_path):
    rec = {"prompt": "q", "response": "a"}
    files = {
        "a.jsonl": BOM + json.dumps(rec).encode() + b"\n",
        "b.json": BOM + json.dumps([rec]).encode(),
        "c.csv": BOM + b"prompt,response\nq,a\n",
        "d.jsonl.gz": gzip.compress(BOM + json.dumps(rec).encode()),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        table = read_units(InputSpec(str(tmp_path / name)))
        assert table.num_rows == 1 and table.column("quarantine_reason")[0].as_py() is None, name
        assert table.column("response")[0].as_py() == "a"
    (tmp_path / "e.jsonl").write_bytes(json.dumps(rec).encode("utf-16"))
    table = read_units(InputSpec(str(tmp_path / "e.jsonl")))
    assert table.column("quarantine_reason").to_pylist() == [
        "unreadable file: it is UTF-16 encoded (byte-order mark at its start); only UTF-8 is read, convert it "
        "first: rows from line 1 on could not be read"
    ]


SURROGATE_REASON = (
    'unencodable text: {where} holds a lone surrogate U+D800 (a "\\ud800" escape without its pair), '
    "which is not valid Unicode"
)


def test_lone_surrogates_are_quarantined_per_row_in_every_format(tmp_path):
    good = [{"prompt": "q0", "response": "a0"}, {"prompt": "q2", "response": "a2 \ud83d\ude00"}]  # a valid pair
    bad = {"prompt": "q1 \ud800 broken emoji", "response": "a1"}
    rows = [good[0], bad, good[1]]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # ASCII escapes: "\ud800"
    (tmp_path / "s.json").write_text(json.dumps(rows))
    arena = tmp_path / "s.csv"  # a JSON-encoded cell (the arena layout) holding the escape
    arena.write_text('prompt,response\nq0,a0\n"[""\\ud800""]",a1\nq2,a2\n')
    for name in ("s.jsonl", "s.json"):
        table = read_units(InputSpec(str(tmp_path / name), source="s"))
        assert _reasons(table) == {0: None, 1: SURROGATE_REASON.format(where="prompt message 0"), 2: None}, name
        assert table.column("response").to_pylist() == ["a0", None, "a2 \U0001f600"]
        assert _counts(table, "s") == (3, 2, 1)
        assert table.column("raw")[1].as_py().count("\\ud800") == 1  # stored as its escape
    pairs = tmp_path / "p.jsonl"
    pairs.write_text(
        json.dumps({"prompt": "q", "chosen": "ok", "rejected": "x\ud800"})
        + "\n"
        + json.dumps({"prompt": "\ud800", "response": [1]})
        + "\n"
    )  # quarantined for its type
    reasons = _reasons(read_units(InputSpec(str(pairs))))
    assert reasons[0] == SURROGATE_REASON.format(where="rejected")
    assert reasons[1].startswith("wrong type") or reasons[1].startswith("missing")


def test_invalid_utf8_in_parquet_strings_is_one_row(tmp_path):
    # Arrow does not validate UTF-8 on read: a file written by another tool can carry invalid bytes.
    prompts = pa.array([b"q0", b"q1 \xff\xfe", b"q2"], pa.binary()).view(pa.string())
    table = pa.table({"prompt": prompts, "response": ["a0", "a1", "a2"]})
    pq.write_table(table, tmp_path / "bad.parquet")
    units = read_units(InputSpec(str(tmp_path / "bad.parquet")))
    assert _reasons(units) == {
        0: None,
        1: "undecodable bytes (invalid UTF-8) in column(s) ['prompt'] of row 1",
        2: None,
    }
    assert _counts(units, "bad") == (3, 2, 1)


def test_corrupted_file_set_among_good_ones(tmp_path):
    """The issue's case: a lone surrogate, a BOM and a broken CSV quote among good files."""
    d = tmp_path / "in"
    d.mkdir()
    (d / "good.jsonl").write_text(
        "".join(json.dumps({"prompt": f"g{i}", "response": f"r{i}"}) + "\n" for i in range(4))
    )
    (d / "surrogate.jsonl").write_text(
        '{"prompt": "s0", "response": "r"}\n{"prompt": "s1 \\ud800", "response": "r"}\n'
        '{"prompt": "s2", "response": "r"}\n'
    )
    (d / "bom.jsonl").write_bytes(BOM + b'{"prompt": "b0", "response": "r"}\n{"prompt": "b1", "response": "r"}\n')
    (d / "quote.csv").write_text('prompt,response\nc0,r\n"c1,r\nc2,r\n')
    table = read_units(InputSpec(str(d), source="mixed"))
    s = summarize(table)["mixed"]
    assert (s["rows_in"], s["rows_ok"], s["rows_quarantined"]) == (4 + 3 + 2 + 3, 4 + 2 + 2 + 2, 2)
    assert s["quarantine_reasons"] == {"unencodable text": 1, "malformed CSV": 1}


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_file_reader_notes_format_and_adapter(tmp_path, fmt):
    path = tmp_path / f"x.{fmt}"
    path.write_text("prompt,response\nq,a\n" if fmt == "csv" else json.dumps({"prompt": "q", "response": "a"}) + "\n")
    reader = FileReader(InputSpec(str(path)), str(path))
    assert len(list(reader.rows())) == 1
    assert reader.file_format == fmt and dict(reader.adapters_used) == {"prompt_response": 1}


def test_csv_on_s3(s3_server, tmp_path):
    bucket = s3_server.make_bucket("csv")
    local = tmp_path / "pairs.csv"
    local.write_text('prompt,chosen,rejected\nq,good,bad\n"q2,x\nq3,good3,bad3\n')
    s3_server.upload(local, f"{bucket}/in/pairs.csv")
    so = s3_server.storage_options
    assert expand_files(InputSpec(f"{bucket}/in", storage_options=so)) == [f"{bucket}/in/pairs.csv"]
    remote = read_units(InputSpec(f"{bucket}/in", storage_options=so))
    here = read_units(InputSpec(str(local)))
    assert (
        remote.column("response").to_pylist()
        == here.column("response").to_pylist()
        == ["good", "bad", None, "good3", "bad3"]
    )
    assert _reasons(remote) == _reasons(here)
