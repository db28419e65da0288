import numpy as np
import pytest

from pipeline import ids
from pipeline.labeling.commit import ExactlyOnceViolation, ShardLedger, contiguous_runs, part_name, shard_of_part


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


def _summary(sid, first, last, units_total=10):
    return {
        "shard_id": sid,
        "first": first,
        "last": last,
        "shard_units": units_total,
        "shard_rows": 5,
        "source": "s",
        "source_uri": "u",
        "units": last - first + 1,
        "labeled_units": last - first + 1,
        "quarantined_units": 0,
        "rows_labeled": 1,
        "rows_quarantined": 0,
        "tokens": 3,
        "files": [f"{first}"],
    }


def test_ledger_completes_exactly_once_and_refuses_overlap():
    ledger = ShardLedger()
    assert ledger.add(_summary("a", 0, 3)) is None
    assert ledger.add(_summary("b", 0, 9)) is not None
    assert ledger.incomplete() == ["a"]
    done = ledger.add(_summary("a", 4, 9))
    assert done is not None and done.totals["units"] == 10 and done.totals["files"] == ["0", "4"]
    assert ledger.incomplete() == []
    with pytest.raises(ExactlyOnceViolation):
        ledger.add(_summary("a", 2, 2))


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
