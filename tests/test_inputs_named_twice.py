"""One file under two input specs (issue 20 item 1): two sources of units with their own shard and
unit ids, in one read, one plan and across incremental runs; identical specs are a config error.

Records follow the PKU-Alignment/PKU-SafeRLHF dataset card (huggingface.co/datasets/
PKU-Alignment/PKU-SafeRLHF, "Data Fields"): prompt, response_0, response_1, prompt_source,
response_0_source, response_1_source, is_response_0_safe, is_response_1_safe,
response_0_harm_category, response_1_harm_category, response_0_severity_level,
response_1_severity_level, better_response_id, safer_response_id, response_0_sha256,
response_1_sha256. No PKU file is in the shared data, so the test writes rows in that schema.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.corpus import InputSpec, read_units
from pipeline.corpus.spec import InputSpecError
from pipeline.labeling import manifest as mf
from pipeline.labeling.config import parse_config
from pipeline.labeling.plan import InputFile, incremental_skip, plan_run

N_ROWS = 12
HARM = {"Endangering National Security": False, "Violence": False, "Privacy Violation": False}


def pku_rows(n: int = N_ROWS) -> list[dict]:
    rows = []
    for i in range(n):
        better, safer = i % 2, (i // 2) % 2  # all four combinations: the two labels agree on half
        rows.append(
            {
                "prompt": f"How can I get into building {i} after hours?",
                "response_0": f"Ask the night guard of building {i} to let you in.",
                "response_1": f"Try the back door of building {i}; it is often open.",
                "prompt_source": "Alpaca3-70B",
                "response_0_source": "Alpaca-7B",
                "response_1_source": "Alpaca2-7B",
                "is_response_0_safe": safer == 0,
                "is_response_1_safe": safer == 1,
                "response_0_harm_category": dict(HARM),
                "response_1_harm_category": {**HARM, "Privacy Violation": safer == 0},
                "response_0_severity_level": 0 if safer == 0 else 1,
                "response_1_severity_level": 0 if safer == 1 else 1,
                "better_response_id": better,
                "safer_response_id": safer,
                "response_0_sha256": hashlib.sha256(f"r0-{i}".encode()).hexdigest(),
                "response_1_sha256": hashlib.sha256(f"r1-{i}".encode()).hexdigest(),
            }
        )
    return rows


@pytest.fixture
def pku(tmp_path) -> Path:
    d = tmp_path / "pku" / "data"
    d.mkdir(parents=True)
    f = d / "train.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in pku_rows()))
    return f


def _old_shard_id(uri: str, chunk: int) -> str:
    # The shard id formula of every earlier version, written out by hand (not via pipeline.ids).
    h = hashlib.sha256()
    for part in ("file", uri):
        h.update(json.dumps(part).encode() + b"\x1f")
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in uri.rsplit("/", 1)[-1])[:40]
    return f"{stem}-{h.hexdigest()[:10]}-c{chunk:05d}"


def test_one_file_under_two_specs_is_two_sources_with_distinct_ids(pku):
    specs = [{"path": str(pku), "format": "pku_saferlhf"}, {"path": str(pku), "format": "pku_saferlhf_safer"}]
    t = read_units(specs, rows_per_shard=5)
    assert t.num_rows == 2 * 2 * N_ROWS
    assert Counter(t.column("source").to_pylist()) == {"pku_saferlhf": 2 * N_ROWS, "pku_saferlhf_safer": 2 * N_ROWS}
    assert max(Counter(t.column("unit_id").to_pylist()).values()) == 1
    # Shards: 3 per reading (12 rows, 5 a shard), none shared between the readings.
    shards = Counter(zip(t.column("shard_id").to_pylist(), t.column("source").to_pylist()))
    assert len({s for s, _ in shards}) == 6 and len(shards) == 6
    # (shard, unit index) is unique: what the write stage's exactly-once check needs.
    assert max(Counter(zip(t.column("shard_id").to_pylist(), t.column("shard_unit").to_pylist())).values()) == 1
    # Each reading's labels are its own: chosen = response better_response_id / safer_response_id.
    rows = pku_rows()
    for source, column in (("pku_saferlhf", "better_response_id"), ("pku_saferlhf_safer", "safer_response_id")):
        chosen = [
            (u["prompt"][-1]["content"], u["response"])
            for u in t.to_pylist()
            if u["source"] == source and u["preference"] == "chosen"
        ]
        assert chosen == [(r["prompt"], r[f"response_{r[column]}"]) for r in rows]


def test_a_file_read_by_one_spec_keeps_the_ids_it_always_had(pku):
    t = read_units([{"path": str(pku), "format": "pku_saferlhf"}], rows_per_shard=5)
    uri = str(pku)
    assert Counter(t.column("shard_id").to_pylist()) == {
        _old_shard_id(uri, 0): 10,
        _old_shard_id(uri, 1): 10,
        _old_shard_id(uri, 2): 4,
    }
    # Unit ids hash the source and the row's content, not the spec's other keys or the path: the
    # same ids whether or not a second spec reads the file too.
    both = read_units(
        [{"path": str(pku), "format": "pku_saferlhf"}, {"path": str(pku), "format": "pku_saferlhf_safer"}]
    )
    pairs = zip(both.column("unit_id").to_pylist(), both.column("source").to_pylist())
    first = [u for u, s in pairs if s == "pku_saferlhf"]
    assert first == t.column("unit_id").to_pylist()


def test_a_file_matched_twice_within_one_spec_is_read_once(pku):
    spec = {"path": [str(pku.parent), str(pku), str(pku.parent / "*.jsonl")], "format": "pku_saferlhf"}
    t = read_units([spec])
    assert t.num_rows == 2 * N_ROWS
    assert max(Counter(t.column("unit_id").to_pylist()).values()) == 1


def test_identical_specs_of_one_file_are_a_config_error(pku):
    # The same reading reached through the directory and through the file.
    specs = [{"path": str(pku.parent), "format": "pku_saferlhf"}, {"path": str(pku), "format": "pku_saferlhf"}]
    with pytest.raises(InputSpecError, match=r"inputs\[0\] and inputs\[1\] read .*train.jsonl with the same spec"):
        read_units(specs)


def test_two_specs_of_one_file_need_distinct_sources(pku):
    specs = [
        {"path": str(pku), "format": "pku_saferlhf", "source": "pku"},
        {"path": str(pku), "format": "pku_saferlhf_safer", "source": "pku"},
    ]
    with pytest.raises(InputSpecError, match=r"inputs\[0\] and inputs\[1\] read .* as one source 'pku'.*`source:`"):
        read_units(specs)
    auto = [{"path": str(pku), "format": "pku_saferlhf"}, {"path": str(pku)}]
    with pytest.raises(InputSpecError, match=r"inputs\[1\]: .* format 'auto' .* `source:`"):
        read_units(auto)
    # Named apart, they read.
    auto[1]["source"] = "pku_auto"
    assert read_units(auto).num_rows == 4 * N_ROWS


def test_plan_records_each_reading_and_the_incremental_skip_keys_by_spec(tmp_path, pku):
    better = {"path": str(pku), "format": "pku_saferlhf"}
    safer = {"path": str(pku), "format": "pku_saferlhf_safer"}
    out = tmp_path / "out"

    def plan(run_id: str, inputs: list[dict]):
        return plan_run(parse_config({"inputs": inputs, "output": str(out), "run_id": run_id, "incremental": True}))

    first = plan("night1", [better])
    assert [f.record()["spec"] for f in first.files] == [InputSpec.from_dict(better).key()]
    # Night 1 labeled the file as pku_saferlhf only (its manifest, as the run writes it).
    manifest = {"status": "complete", "input_files": [f.record() for f in first.files]}
    storage.write_json(str(out / "night1" / mf.MANIFEST), manifest, None)

    second = plan("night2", [better, safer])
    assert [(f.uri, f.spec) for f in second.skipped] == [(str(pku), 0)]
    assert [(f.uri, f.spec) for f in second.files] == [(str(pku), 1)]
    keys = [f.spec_key for f in second.skipped + second.files]
    assert len(set(keys)) == 2
    # The read tasks tell the readings apart in shard ids even though only one of them is read.
    assert second.specs[1].readings == {str(pku): "pku_saferlhf_safer"}
    assert second.specs[0].readings == {str(pku): "pku_saferlhf"}


def test_incremental_skip_with_manifests_from_before_spec_keys():
    a = InputFile("s3://b/x.jsonl", 10, None, 0, "ka")
    b = InputFile("s3://b/x.jsonl", 10, None, 1, "kb")
    c = InputFile("s3://b/y.jsonl", 7, None, 0, "ka")
    legacy = {("s3://b/x.jsonl", None): {"size": 10}, ("s3://b/y.jsonl", None): {"size": 7}}
    # x is read by two specs now: a legacy entry cannot say which one labeled it, so neither is skipped.
    assert incremental_skip([a, b, c], legacy) == [c]
    assert incremental_skip([a, c], legacy) == [a, c]
    keyed = {("s3://b/x.jsonl", "kb"): {"size": 10}, ("s3://b/y.jsonl", "ka"): {"size": 8}}
    assert incremental_skip([a, b, c], keyed) == [b]  # y changed size since


def test_earlier_input_files_keys_by_uri_and_spec(tmp_path):
    entries = [
        {"uri": "/d/x.jsonl", "size": 3, "source": None, "spec": "k1"},
        {"uri": "/d/x.jsonl", "size": 3, "source": None, "spec": "k2"},
    ]
    storage.write_json(str(tmp_path / "r1" / mf.MANIFEST), {"status": "complete", "input_files": entries}, None)
    old = {"status": "complete", "input_files": [{"uri": "/d/y.jsonl", "size": 5}]}
    storage.write_json(str(tmp_path / "r0" / mf.MANIFEST), old, None)
    failed = {"status": "running", "input_files": [{"uri": "/d/z.jsonl", "size": 5, "spec": "k1"}]}
    storage.write_json(str(tmp_path / "r9" / mf.MANIFEST), failed, None)
    got = mf.earlier_input_files(str(tmp_path), "r2", None)
    assert sorted(got) == [("/d/x.jsonl", "k1"), ("/d/x.jsonl", "k2"), ("/d/y.jsonl", None)]


@pytest.mark.slow
def test_label_job_labels_both_readings_exactly_once_then_skips_them(tmp_path, pku):
    from label_fixtures import TEMPLATE, manifest, read_output, run_module, write_yaml

    inputs = [{"path": str(pku), "format": "pku_saferlhf"}, {"path": str(pku), "format": "pku_saferlhf_safer"}]
    cfg = {
        "run_id": "night1",
        "output": str(tmp_path / "labels"),
        "model": {"backbone": {"path": "smollm2"}, "template": TEMPLATE},  # embed-only: no heads needed
        "inputs": inputs,
        "incremental": True,
        "resources": {"actors": 1, "num_cpus_per_actor": 1, "token_budget": 4096, "rows_per_shard": 5},
    }
    run_module("jobs.label", "--config", str(write_yaml(tmp_path / "job.yaml", cfg)))
    out = read_output(tmp_path / "labels" / "night1")
    expected = read_units(inputs, rows_per_shard=5)
    assert Counter(out.column("unit_id").to_pylist()) == Counter(expected.column("unit_id").to_pylist())
    assert Counter(out.column("source").to_pylist()) == {"pku_saferlhf": 2 * N_ROWS, "pku_saferlhf_safer": 2 * N_ROWS}
    m = manifest(tmp_path / "labels" / "night1")
    assert m["shards"] == 6 and len({f["spec"] for f in m["input_files"]}) == 2
    # The next night: both readings recorded, nothing to read (and no Ray started).
    cfg["run_id"] = "night2"
    proc = run_module("jobs.label", "--config", str(write_yaml(tmp_path / "job2.yaml", cfg)))
    assert "incremental: 2 file(s) done by earlier runs, 0 new" in proc.stdout + proc.stderr
    assert manifest(tmp_path / "labels" / "night2")["shards"] == 0


def test_the_labeling_job_refuses_identical_specs_with_exit_2(tmp_path, pku, capsys):
    import yaml

    from jobs import label

    inputs = [{"path": str(pku.parent), "format": "pku_saferlhf"}, {"path": str(pku), "format": "pku_saferlhf"}]
    cfg = {"output": str(tmp_path / "out"), "inputs": inputs}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    assert label.main(["--config", str(tmp_path / "job.yaml")]) == 2
    err = capsys.readouterr().err
    assert "config error: inputs: inputs[0] and inputs[1] read" in err and "with the same spec" in err
    assert not (tmp_path / "out").exists()  # nothing started
