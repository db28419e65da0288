"""Curation inputs (issue 21 item 4): one run, tonight's (`<root>/latest`) or several incremental
nights (`<root>/<glob>`) as one input, each unit_id once (the newest night's copy)."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from curation_fixtures import write_run

from pipeline.curation.config import ConfigError, parse_config
from pipeline.curation.inputs import resolve_runs, run_files


def _age(run_dir: Path, t: float) -> None:
    os.utime(run_dir / "manifest.json", (t, t))


@pytest.fixture
def nights(tmp_path, shared_data) -> Path:
    """Two complete nights (night 2 repeats night 1's first HH rows with other scores, as a file
    relabeled after it changed), a night still running and a complete night that labeled nothing."""
    root = tmp_path / "labels"
    write_run(shared_data, root / "nightly-2026-11-01-aaaa", "nightly-2026-11-01-aaaa", hh_pairs=20, pandalm_pairs=10)
    n2 = write_run(
        shared_data, root / "nightly-2026-11-02-bbbb", "nightly-2026-11-02-bbbb", hh_pairs=30, pandalm_pairs=0
    )
    for f in sorted((n2 / "data").glob("*.parquet")):
        t = pq.read_table(f)
        t = t.set_column(t.schema.get_field_index("score"), "score", pa_add(t.column("score"), 1.0))
        pq.write_table(t, f)
    running = root / "nightly-2026-11-03-cccc"
    write_run(shared_data, running, "nightly-2026-11-03-cccc", hh_pairs=5, pandalm_pairs=0)
    m = json.loads((running / "manifest.json").read_text())
    (running / "manifest.json").write_text(json.dumps({**m, "status": "running"}))
    empty = root / "nightly-2026-11-04-dddd"
    empty.mkdir()
    (empty / "manifest.json").write_text(json.dumps({"run_id": "nightly-2026-11-04-dddd", "status": "complete"}))
    for i, d in enumerate(sorted(root.iterdir())):
        _age(d, 1_700_000_000 + 3600 * i)
    return root


def pa_add(col, v: float):
    import pyarrow.compute as pc

    return pc.add(col, v).cast(col.type)


def test_latest_is_the_newest_complete_run_with_data(nights):
    runs = resolve_runs(str(nights / "latest"))
    assert [r.run_id for r in runs] == ["nightly-2026-11-02-bbbb"]
    # A run dir is read as today, manifest or not.
    assert [r.run_dir for r in resolve_runs(str(nights / "nightly-2026-11-01-aaaa"))] == [
        str(nights / "nightly-2026-11-01-aaaa")
    ]


def test_a_glob_reads_every_complete_night_newest_first(nights):
    runs = resolve_runs(str(nights / "nightly-*"))
    assert [r.run_id for r in runs] == ["nightly-2026-11-02-bbbb", "nightly-2026-11-01-aaaa"]
    files = run_files(str(nights / "nightly-*"))
    assert files == sorted(str(p) for p in (nights / "nightly-2026-11-02-bbbb" / "data").glob("*.parquet")) + sorted(
        str(p) for p in (nights / "nightly-2026-11-01-aaaa" / "data").glob("*.parquet")
    )
    # Newest first by manifest time, not by name: an older manifest under a later name comes second.
    _age(nights / "nightly-2026-11-01-aaaa", 1_800_000_000)
    assert [r.run_id for r in resolve_runs(str(nights / "nightly-*"))][0] == "nightly-2026-11-01-aaaa"


def test_curation_config_names_what_it_could_not_find(nights, tmp_path):
    base = {"task": "dpo", "output": str(tmp_path / "dpo")}
    assert parse_config({**base, "run": str(nights / "latest")}).run == str(nights / "latest")
    with pytest.raises(ConfigError, match=r"run: no complete labeled run with data under .*nowhere"):
        parse_config({**base, "run": str(tmp_path / "nowhere" / "latest")})
    with pytest.raises(ConfigError, match=r"run: no complete labeled run with data matches .*other-\*"):
        parse_config({**base, "run": str(nights / "other-*")})
    with pytest.raises(ConfigError, match=r"run: no Parquet files under .*nightly-2026-11-04-dddd"):
        parse_config({**base, "run": str(nights / "nightly-2026-11-04-dddd")})


@pytest.mark.slow
def test_dpo_over_several_nights_keeps_each_unit_once_from_the_newest_night(nights, tmp_path):
    import ray

    from pipeline.curation.job import run

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        man = run(parse_config({"task": "dpo", "run": str(nights / "nightly-*"), "output": str(tmp_path / "dpo")}))
    finally:
        ray.shutdown()
    pairs = pq.read_table(tmp_path / "dpo" / "data").to_pandas()
    # Reference in pandas: both nights, newest first, each unit_id once.
    n1, n2 = (
        pq.read_table(nights / n / "data").to_pandas() for n in ("nightly-2026-11-01-aaaa", "nightly-2026-11-02-bbbb")
    )
    both = pd.concat([n2, n1])
    union = both.drop_duplicates("unit_id")
    assert len(set(n1["unit_id"]) & set(n2["unit_id"])) > 100  # night 2 repeats night 1's HH rows
    pref = union[union["kind"] == "preference"]
    assert man["pairs"]["preference"]["pairs_in"] == pref["row_id"].nunique()
    for origin, kind in (("preference", "preference"), ("best_of_n", "best_of_n")):
        of_kind = both[both["kind"] == kind]
        assert man["pairs"][origin]["duplicate_units"] == len(of_kind) - of_kind["unit_id"].nunique()
    assert [r["run_id"] for r in man["runs"]] == ["nightly-2026-11-02-bbbb", "nightly-2026-11-01-aaaa"]
    used = Counter(list(pairs["chosen_unit_id"]) + list(pairs["rejected_unit_id"]))
    assert max(used.values()) == 1
    # Scores are the newest night's (night 2 added 1.0 to every score it holds).
    score = dict(zip(union["unit_id"], union["score"]))
    assert np.allclose(pairs["score_chosen"], [score[u] for u in pairs["chosen_unit_id"]])
    in_both = pairs["chosen_unit_id"].isin(set(n2["unit_id"]))
    assert in_both.any()
    n1_score = dict(zip(n1["unit_id"], n1["score"]))
    moved = [u for u in pairs["chosen_unit_id"][in_both] if u in n1_score]
    assert moved and all(abs(score[u] - n1_score[u] - 1.0) < 1e-5 for u in moved)


def test_latest_and_globs_on_s3(nights, s3_server):
    import time

    bucket = s3_server.make_bucket("runs")
    so = s3_server.storage_options
    # Uploaded oldest first: S3's LastModified orders them (to the second).
    for name in ("nightly-2026-11-01-aaaa", "nightly-2026-11-02-bbbb", "nightly-2026-11-03-cccc"):
        s3_server.upload(nights / name, f"{bucket}/labels/{name}")
        time.sleep(1.1)
    assert [r.run_id for r in resolve_runs(f"{bucket}/labels/latest", so)] == ["nightly-2026-11-02-bbbb"]
    runs = resolve_runs(f"{bucket}/labels/nightly-*", so)
    assert [r.run_id for r in runs] == ["nightly-2026-11-02-bbbb", "nightly-2026-11-01-aaaa"]
    assert all(
        f.startswith(f"{bucket}/labels/nightly-2026-11-0") and f.endswith(".parquet") for r in runs for f in r.files
    )
    assert len(run_files(f"{bucket}/labels/nightly-*", so)) == sum(len(r.files) for r in runs) == 8
