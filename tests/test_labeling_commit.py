import numpy as np
import pytest

from pipeline import ids
from pipeline.labeling.commit import (
    RANGE_SCHEMA,
    ExactlyOnceViolation,
    RangeSummary,
    ShardLedger,
    contiguous_runs,
    part_name,
    shard_of_part,
    summaries_of,
    summaries_table,
)


def test_part_name_round_trip_keeps_shard_id_with_dashes():
    sid = ids.shard_id("s3://bucket/dir/my-file.part-1.jsonl.gz", 12)
    assert shard_of_part(part_name(sid, 0, 41)) == sid
    assert part_name(sid, 0, 41) != part_name(sid, 0, 40)


def test_contiguous_runs_split_and_cover():
    rng = np.random.default_rng(0)
    idx = np.array([7, 3, 4, 5, 10, 11, 0])
    runs = contiguous_runs(idx)
    assert [(a, b) for a, b, _ in runs] == [(0, 0), (3, 5), (7, 7), (10, 11)]
    for a, b, pos in runs:
        assert list(idx[pos]) == list(range(a, b + 1))
    perm = rng.permutation(100)
    runs = contiguous_runs(perm)
    assert [(a, b) for a, b, _ in runs] == [(0, 99)]
    with pytest.raises(ValueError, match="twice"):
        contiguous_runs(np.array([1, 2, 2]))


def _summary(sid, first, last, units_total=10, **over):
    fields = dict(
        shard_id=sid,
        first=first,
        last=last,
        source="s",
        source_uri="u",
        shard_units=units_total,
        shard_rows=5,
        units=last - first + 1,
        labeled_units=last - first + 1,
        quarantined_units=0,
        rows_labeled=1,
        rows_quarantined=0,
        tokens=3,
        computed_tokens=4,
        useful_tokens=2,
        storage_retries=1,
        reasons={},
        scored_on={"node-a": last - first + 1},
        scored_by_stage={"embed_score@node-a": last - first + 1, "rm_x@node-b": last - first + 1},
        scored_from=1.0,
        scored_until=2.0,
        fields_present=None,
        fields_read=None,
        files=[f"{first}"],
    )
    return RangeSummary(**{**fields, **over})


def test_range_summaries_travel_as_typed_arrow_rows():
    """The write stage's summaries cross Ray as RANGE_SCHEMA rows (maps and lists, no JSON) and
    come back equal; the schema follows the dataclass field for field."""
    import dataclasses

    import pyarrow as pa

    assert RANGE_SCHEMA.names == [f.name for f in dataclasses.fields(RangeSummary)]
    a = _summary("a", 0, 3, reasons={"too long": 2}, fields_present={"label": 4, "x": 4}, fields_read=["x"])
    b = _summary("b", 0, 9, scored_from=None, scored_until=None, scored_on={})
    table = summaries_table([a, b])
    assert table.schema == RANGE_SCHEMA and not any(
        pa.types.is_string(table.schema.field(k).type) for k in ("reasons", "scored_on")
    )
    assert summaries_of(table) == [a, b]


def test_ledger_completes_exactly_once_and_refuses_overlap():
    ledger = ShardLedger()
    assert ledger.add(_summary("a", 0, 3)) is None
    assert ledger.add(_summary("b", 0, 9)) is not None
    assert ledger.incomplete() == ["a"]
    done = ledger.add(
        _summary(
            "a",
            4,
            9,
            reasons={"too long": 1},
            fields_present={"label": 2},
            fields_read=[],
            scored_from=0.5,
            scored_until=1.5,
        )
    )
    assert done is not None and done.totals["units"] == 10 and done.totals["files"] == ["0", "4"]
    marker = done.marker()
    assert marker["computed_tokens"] == 8 and marker["useful_tokens"] == 4 and marker["tokens"] == 6
    assert marker["reasons"] == {"too long": 1} and marker["scored_on"] == {"node-a": 10}
    assert marker["record_fields"] == {"present": {"label": 2}, "read": []}
    # the shard's scoring window spans its ranges' calls: (1.0, 2.0) and (0.5, 1.5)
    assert (marker["scored_from"], marker["scored_until"]) == (0.5, 2.0)
    assert ledger.incomplete() == []
    assert marker["storage_retries"] == 2  # one per range, summed
    with pytest.raises(ExactlyOnceViolation):
        ledger.add(_summary("a", 2, 2))


def test_ledger_refuses_more_units_than_the_shard_holds():
    """A range reaching past the shard's unit count (a reader and a writer disagreeing on the
    shard) is an error, never a shard 'complete' with units beyond its end."""
    ledger = ShardLedger()
    assert ledger.add(_summary("a", 0, 2, units_total=5)) is None
    with pytest.raises(ExactlyOnceViolation, match="3-6 are not a range of a 5-unit shard"):
        ledger.add(_summary("a", 3, 6, units_total=5))
    # Ranges outside the shard never count as coverage: (5, 7) and (0, 1) would sum to 5 units of a
    # 5-unit shard with units 2-4 missing; (-3, 1) likewise.
    for bad in [(5, 7), (-3, 1), (3, 2)]:
        with pytest.raises(ExactlyOnceViolation, match="not a range"):
            ShardLedger().add(_summary("b", *bad, units_total=5))
    fresh = ShardLedger()
    assert fresh.add(_summary("c", 0, 1, units_total=5)) is None and fresh.incomplete() == ["c"]


def test_readers_take_only_the_parts_markers_name(tmp_path):
    """A stray part beside a committed shard's own (another unit range: a late or retried write,
    a previous driver's task) and a part of an uncommitted shard are never read."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import storage

    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "_shards").mkdir()
    (run / storage.RUN_IDENTITY).write_text("{}")

    def part(shard: str, first: int, last: int) -> str:
        path = run / "data" / storage.part_name(shard, first, last)
        pq.write_table(pa.table({"unit_id": [f"{shard}-{i}" for i in range(first, last + 1)]}), path)
        return str(path)

    named = [part("s1", 0, 1), part("s1", 2, 4)]
    (run / "_shards" / "s1.json").write_text(json.dumps({"shard_id": "s1", "files": named}))
    part("s1", 0, 4)  # a stray: the same units under another range
    part("s2", 0, 2)  # a shard without a marker
    assert storage.run_data_files(str(run)) == sorted(named)
    ids = storage.read_run_table(str(run)).column("unit_id").to_pylist()
    assert sorted(ids) == [f"s1-{i}" for i in range(5)] and len(ids) == len(set(ids))


def test_manifest_counts_reasons_by_category_and_rows_reconcile():
    from pipeline.labeling.manifest import summarize_sources

    markers = [
        {
            "source": "s",
            "shard_rows": 3,
            "rows_labeled": 2,
            "rows_quarantined": 1,
            "shard_units": 6,
            "labeled_units": 4,
            "quarantined_units": 2,
            "tokens": 10,
            "reasons": {
                "duplicate row: same as source_row 4 (row_id ab12)": 1,
                "conversation has 300 tokens, more than max_tokens=256": 1,
            },
        },
        {
            "source": "s",
            "shard_rows": 2,
            "rows_labeled": 1,
            "rows_quarantined": 1,
            "shard_units": 3,
            "labeled_units": 2,
            "quarantined_units": 1,
            "tokens": 5,
            "reasons": {"duplicate row: same as source_row 9 (row_id ff00)": 1},
        },
    ]
    s = summarize_sources(markers)["s"]
    assert s["rows_in"] == 5 == s["rows_labeled"] + s["rows_quarantined"]
    assert s["units_in"] == 9 and s["tokens"] == 15
    assert s["quarantine_reasons"] == {
        "duplicate row: same as source_row N": 2,
        "conversation has N tokens, more than max_tokens=N": 1,
    }
