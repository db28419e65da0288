"""Reading from S3 (a local moto server, real HTTP): the same units as the local read."""

from __future__ import annotations

import pyarrow as pa

from pipeline import ids
from pipeline.corpus import InputSpec, expand_files, read_units

# Everything but where the bytes came from (source_uri, and shard ids that hash it) must match.
LOCATION = ("source_uri", "shard_id")


def _without_location(table: pa.Table) -> list[dict]:
    units = table.drop_columns(list(LOCATION)).to_pylist()
    for u in units:
        if u["quarantine_reason"] is not None:
            # A row that could not be read is known only by its location, so its id hashes the URI.
            del u["row_id"], u["unit_id"]
    return units


def test_s3_read_matches_local(s3_server, shared_data):
    bucket = s3_server.make_bucket("corpus")
    s3_server.upload(shared_data / "hh-rlhf" / "harmless-base-test.jsonl.gz", f"{bucket}/in/hh/harmless.jsonl.gz")
    s3_server.upload(shared_data / "llmbar" / "LLMBar_Natural.json", f"{bucket}/in/llmbar/LLMBar_Natural.json")
    s3_server.upload(shared_data / "oasst" / "en_100_message.jsonl", f"{bucket}/in/oasst/trees.jsonl")
    so = s3_server.storage_options

    assert expand_files(InputSpec(f"{bucket}/in", storage_options=so)) == [
        f"{bucket}/in/hh/harmless.jsonl.gz",
        f"{bucket}/in/llmbar/LLMBar_Natural.json",
        f"{bucket}/in/oasst/trees.jsonl",
    ]
    assert expand_files(InputSpec(f"{bucket}/in/*/*.json", storage_options=so)) == [
        f"{bucket}/in/llmbar/LLMBar_Natural.json"
    ]

    local = read_units(
        [
            InputSpec(str(shared_data / "hh-rlhf"), source="hh"),
            InputSpec(str(shared_data / "llmbar")),
            InputSpec(str(shared_data / "oasst"), format="oasst_best_of_n"),
        ],
        rows_per_shard=100,
    )
    remote = read_units(
        [
            InputSpec(f"{bucket}/in/hh", source="hh", storage_options=so),
            InputSpec(f"{bucket}/in/llmbar", storage_options=so),
            InputSpec(f"{bucket}/in/oasst/trees.jsonl", format="oasst_best_of_n", storage_options=so),
        ],
        rows_per_shard=100,
    )
    assert remote.num_rows == local.num_rows == 2332 + 200 + 268
    assert _without_location(remote) == _without_location(local)
    bad = [u for u in remote.to_pylist() if u["quarantine_reason"]]
    assert len(bad) == 4
    assert all(u["row_id"] == ids.bad_row_id(u["source_uri"], u["source_row"]) for u in bad)
    assert set(remote.column("source_uri").to_pylist()) == {
        f"{bucket}/in/hh/harmless.jsonl.gz",
        f"{bucket}/in/llmbar/LLMBar_Natural.json",
        f"{bucket}/in/oasst/trees.jsonl",
    }


def test_s3_parquet_and_hf_dataset(s3_server, tmp_path):
    import datasets
    import pyarrow.parquet as pq

    recs = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(30)]
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "p.parquet", row_group_size=7)
    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "hf"), max_shard_size="1KB")
    bucket = s3_server.make_bucket("formats")
    s3_server.upload(tmp_path / "p.parquet", f"{bucket}/p.parquet")
    s3_server.upload(tmp_path / "hf", f"{bucket}/hf")
    so = s3_server.storage_options
    assert expand_files(InputSpec(bucket, storage_options=so)) == [f"{bucket}/hf", f"{bucket}/p.parquet"]
    expected = [f"a{i}" for i in range(30)]
    for name in ("p.parquet", "hf"):
        table = read_units(InputSpec(f"{bucket}/{name}", source="s", storage_options=so))
        assert table.column("response").to_pylist() == expected
        local = read_units(InputSpec(str(tmp_path / name), source="s"))
        assert table.column("row_id").to_pylist() == local.column("row_id").to_pylist()


def test_missing_s3_object_is_one_quarantined_row(s3_server):
    from pipeline.corpus import iter_shards

    bucket = s3_server.make_bucket("gone")
    spec = InputSpec.from_dict({"path": bucket, "storage_options": s3_server.storage_options, "format": "messages"})
    (unit,) = [u for shard in iter_shards(spec, f"{bucket}/nothing.jsonl", 8) for u in shard]
    assert unit["quarantine_reason"].startswith("unreadable file: FileNotFoundError")
    assert unit["source_uri"] == f"{bucket}/nothing.jsonl"
