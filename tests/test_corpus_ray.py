"""read_corpus on a real local Ray: the same units as the pure reader, shard by shard;
exclude_shards, files and limit_rows."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import ray

from pipeline.corpus import InputSpec, expand_files, read_corpus, read_units
from pipeline.corpus.ray_read import summarize
from pipeline.schema import UNIT_SCHEMA


@pytest.fixture(scope="module")
def local_ray():
    if ray.is_initialized():  # a Ray left running by another module's fixture: use it, leave it
        yield
        return
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture()
def specs(shared_data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n{oops\n" + json.dumps({"prompt": "q2"}) + "\n")
    return [
        InputSpec(str(shared_data / "llmbar")),
        InputSpec(str(shared_data / "oasst"), format="oasst_best_of_n"),
        InputSpec(str(shared_data / "unieval")),  # two files
        InputSpec(str(bad)),
    ]


def _collect(ds) -> pa.Table:
    return pa.concat_tables([ray.get(ref) for ref in ds.to_arrow_refs()] or [UNIT_SCHEMA.empty_table()])


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by([("shard_id", "ascending"), ("shard_unit", "ascending")])


def test_read_corpus_equals_pure_reader(local_ray, specs):
    reference = read_units(specs, rows_per_shard=40)
    table = _collect(read_corpus(specs, rows_per_shard=40))
    assert table.schema == UNIT_SCHEMA
    assert table.num_rows == reference.num_rows == 200 + 268 + 192 + 1181 + 3
    assert _sorted(table).equals(_sorted(reference))
    assert summarize(table)["bad"] == {
        "rows_in": 3,
        "rows_ok": 1,
        "rows_quarantined": 2,
        "units": 3,
        "units_ok": 1,
        "quarantine_reasons": {"malformed JSON": 1, "missing field 'response'": 1},
    }
    # Every shard arrives whole: its units are exactly 0 .. shard_units-1.
    by_shard: dict[str, list[int]] = {}
    for sid, unit, n in zip(*(table.column(c).to_pylist() for c in ("shard_id", "shard_unit", "shard_units"))):
        by_shard.setdefault(sid, []).append(unit)
        assert 0 <= unit < n
    assert all(sorted(units) == list(range(len(units))) for units in by_shard.values())
    assert len(by_shard) == sum(-(-rows // 40) for rows in (100, 43, 192, 1181, 3))


def test_exclude_shards_files_and_limit(local_ray, specs):
    reference = read_units(specs, rows_per_shard=40)
    shard_ids = sorted(set(reference.column("shard_id").to_pylist()))
    skip = {shard_ids[0], shard_ids[5], shard_ids[-1]}
    table = _collect(read_corpus(specs, rows_per_shard=40, exclude_shards=skip))
    expected = reference.filter(pa.array([s not in skip for s in reference.column("shard_id").to_pylist()]))
    assert table.num_rows == expected.num_rows < reference.num_rows
    assert _sorted(table).equals(_sorted(expected))

    sfres = expand_files(specs[2])[0]
    assert sfres.endswith("sfres.json")
    only = _collect(read_corpus(specs, rows_per_shard=40, files=[sfres], limit_rows=50))
    assert set(only.column("source_uri").to_pylist()) == {sfres}
    assert only.num_rows == 50 and sorted(set(only.column("shard_rows").to_pylist())) == [10, 40]

    # Tasks expanded already (the labeling plan's): the same read, the specs not expanded again.
    planned = _collect(read_corpus(specs, rows_per_shard=40, tasks=[(2, sfres)], limit_rows=50))
    assert _sorted(planned).equals(_sorted(only))

    assert read_corpus(specs, files=[]).count() == 0
    assert read_corpus(specs, tasks=[]).count() == 0


def test_objectives_declared_in_a_spec_reach_the_read_tasks(local_ray, tmp_path):
    # Read tasks run in Ray worker processes, which never built the spec: its declared objective
    # must be registered there too, or every rating row would be quarantined.
    path = tmp_path / "support.jsonl"
    path.write_text(
        "".join(json.dumps({"q": f"ticket {i}", "a": f"reply {i}", "c": i % 7 + 1}) + "\n" for i in range(30))
    )
    spec = InputSpec.from_dict(
        {
            "path": str(path),
            "objectives": [{"name": "raytest-clarity", "kind": "rated", "low": 1, "high": 7}],
            "columns": {"prompt": "q", "response": "a", "ratings": {"raytest-clarity": "c"}},
        }
    )
    table = _collect(read_corpus([spec], rows_per_shard=8))
    assert table.column("quarantine_reason").null_count == table.num_rows == 30
    assert _sorted(table).equals(_sorted(read_units([spec], rows_per_shard=8)))
    assert sorted(r[0]["value"] for r in table.column("ratings").to_pylist())[::6] == [0.0, 1 / 6, 2 / 6, 4 / 6, 5 / 6]
