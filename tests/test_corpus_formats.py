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

RECORDS = [{"prompt": f"question {i} ünïcode ✓", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"}
           for i in range(23)]
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
    assert first["row_id"] == ids.row_id("pairs", first["prompt"], ["good answer 0", "bad answer 0"],
                                         {"kind": "preference", "tie": False, "ranks": None, "ratings": None})
    assert first["prompt_id"] == ids.prompt_id(first["prompt"])
    assert [u["response"] for u in units[:2]] == ["good answer 0", "bad answer 0"]


def _delimited(records: list[dict], delimiter: str) -> str:
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=list(records[0]), delimiter=delimiter, lineterminator="\r\n")
    w.writeheader()
    w.writerows(records)
    return out.getvalue()


@pytest.mark.parametrize("name", ["data.jsonl.gz", "data.json", "data.json.gz", "data.csv", "data.tsv.gz",
                                  "data.parquet", "hf"])
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

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS[:20]),
                               "test": datasets.Dataset.from_list(RECORDS[20:])})
    dd.save_to_disk(str(tmp_path / "in" / "dd"))
    # A folder holding the DatasetDict is one input, not one per split.
    assert expand_files(InputSpec(str(tmp_path / "in"))) == [str(tmp_path / "in" / "dd")]
    assert _content(read_units(InputSpec(str(tmp_path / "in"), source="pairs"))) == _content(reference)
    only_test = read_units(InputSpec(str(tmp_path / "in" / "dd"), source="pairs", options={"split": "test"}))
    assert only_test.column("response").to_pylist() == [s for i in range(20, 23) for s in
                                                       (f"good answer {i}", f"bad answer {i}")]


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
    for rel in ("b.jsonl", "a.json", "sub/c.parquet", "sub/deeper/d.jsonl.gz", "notes.txt", ".hidden.jsonl",
                "sub/_tmp.jsonl"):
        (tmp_path / rel).write_text("[]")
    found = expand_files(InputSpec(str(tmp_path)))
    assert found == sorted(str(tmp_path / r) for r in ("a.json", "b.jsonl", "sub/c.parquet", "sub/deeper/d.jsonl.gz"))
    assert expand_files(InputSpec(str(tmp_path / "*.json*"))) == [str(tmp_path / "a.json"), str(tmp_path / "b.jsonl")]
    assert expand_files(InputSpec([str(tmp_path / "b.jsonl"), str(tmp_path / "**" / "*.parquet"),
                                   str(tmp_path / "b.jsonl")])) == [str(tmp_path / "b.jsonl"),
                                                                    str(tmp_path / "sub" / "c.parquet")]
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
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "how are you?"}]
    units = _read(tmp_path, [
        {"messages": conv + [{"role": "assistant", "content": "fine"}]},
        {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
        {"prompt": conv, "chosen": [{"role": "assistant", "content": "good"}],
         "rejected": [{"role": "assistant", "content": "bad"}]},
        {"chosen": conv + [{"role": "assistant", "content": "A"}], "rejected": conv + [{"role": "assistant", "content": "B"}]},
        {"chosen": conv[:2] + [{"role": "assistant", "content": "A"}], "rejected": conv + [{"role": "assistant", "content": "B"}]},
        {"prompt": "say x", "completion": "x"},
        {"instruction": "add", "input": "1 and 2", "output": "3"},
        {"messages": conv},
    ], source="mixed")
    good = [u for u in units if u["quarantine_reason"] is None]
    assert [(u["source_row"], u["kind"], u["response"]) for u in good] == [
        (0, "instruction", "fine"), (1, "instruction", "4"), (2, "preference", "good"), (2, "preference", "bad"),
        (3, "preference", "A"), (3, "preference", "B"), (5, "instruction", "x"), (6, "instruction", "3")]
    assert good[0]["prompt"] == conv and good[2]["prompt"] == conv and good[4]["prompt"] == conv
    assert good[1]["prompt"] == [{"role": "user", "content": "2+2?"}]
    assert good[7]["prompt"] == [{"role": "user", "content": "add\n\n1 and 2"}]
    assert good[2]["prompt_id"] == good[4]["prompt_id"] == good[0]["prompt_id"]
    bad = {u["source_row"]: u["quarantine_reason"] for u in units if u["quarantine_reason"]}
    assert bad == {4: "chosen and rejected do not share the prompt: they differ before the final assistant turn",
                   7: "messages: the last message must be the assistant response"}


def test_mapping_adapter_and_kind_check(tmp_path):
    recs = [{"q": "What is 2+2?", "a": "4", "meta": {"sys": "math tutor", "score": 3}},
            {"q": "Name a colour", "a": "blue", "meta": {"sys": "", "score": 5}}]
    units = _read(tmp_path, recs, columns={"prompt": "q", "response": "a", "system": "meta.sys",
                                           "ratings": {"topical_chat.overall": "meta.score"}})
    assert [u["kind"] for u in units] == ["rated", "rated"]
    assert units[0]["prompt"] == [{"role": "system", "content": "math tutor"}, {"role": "user", "content": "What is 2+2?"}]
    assert units[1]["prompt"] == [{"role": "user", "content": "Name a colour"}]
    assert [u["ratings"] for u in units] == [[{"name": "topical_chat.overall", "raw": 3.0, "value": 0.5}],
                                             [{"name": "topical_chat.overall", "raw": 5.0, "value": 1.0}]]
    assert units[0]["source"] == "in"  # no adapter default: the file's name
    units = _read(tmp_path, recs, columns={"prompt": "q", "response": "a"}, kind="preference")
    assert [u["quarantine_reason"] for u in units] == ["kind mismatch: the row is instruction, the input spec says preference"] * 2


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


@pytest.mark.parametrize("reader, packed", [("jsonl", False), ("jsonl", True), ("json", False), ("csv", False),
                                            ("csv", True)])
def test_readers_stream_instead_of_loading_whole_files(reader, packed, monkeypatch):
    monkeypatch.setattr(formats, "CHUNK_BYTES", 1 << 14)
    records = [{"prompt": f"q{i}", "response": "r" * 200} for i in range(40000)]  # ~9 MB of text
    text = {"jsonl": lambda: "\n".join(json.dumps(r) for r in records), "json": lambda: json.dumps(records),
            "csv": lambda: _delimited(records, ",")}[reader]()
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
