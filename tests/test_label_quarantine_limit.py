"""A run that quarantines too much fails loudly (a real `python -m jobs.label` process, real SmolLM2,
embed-only): exit code 4, a message naming the source and its fraction, the manifest's status
`failed_quarantine` with the verdict, and what was labeled committed (data, quarantine rows and
shard markers, which a rerun with the same run id resumes from; resuming is tested in
test_label_job.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from label_fixtures import REPO, label_config, manifest, read_output, write_yaml

pytestmark = pytest.mark.slow


def test_a_mostly_quarantined_source_fails_the_run_and_keeps_its_commits(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    # "bad": 1 good row, 3 with an empty response (quarantined by the reader); "good": 3 good rows.
    bad = [{"prompt": "p0", "response": "r0"}] + [{"prompt": f"p{i}", "response": ""} for i in (1, 2, 3)]
    (d / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    (d / "good.jsonl").write_text(
        "".join(json.dumps({"prompt": f"g{i}", "response": f"a{i}"}) + "\n" for i in range(3))
    )
    inputs = [{"path": str(d / "bad.jsonl"), "source": "bad"}, {"path": str(d / "good.jsonl"), "source": "good"}]
    cfg = label_config(tmp_path, None, inputs=inputs, limit_rows_per_input=None)
    path = write_yaml(tmp_path / "job.yaml", cfg)
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.label", "--config", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "source 'bad': 3 of 4 rows quarantined (75.0% > per_source 0.5)" in proc.stderr
    assert "the run: 42.9% of 7 rows quarantined (> overall 0.25)" in proc.stderr

    run_dir = tmp_path / "labels" / "t1"
    man = manifest(run_dir)
    assert man["status"] == "failed_quarantine"
    assert man["failure"]["sources_over"] == {"bad": 0.75}
    assert man["failure"]["overall_fraction"] == round(3 / 7, 4)
    assert man["failure"]["limits"] == {"per_source": 0.5, "overall": 0.25}
    # What was labeled is committed: the good rows of both sources, the 3 bad ones in quarantine/.
    data = read_output(run_dir)
    assert sorted(data.column("prompt_id").to_pylist()) == sorted(set(data.column("prompt_id").to_pylist()))
    assert sorted(data.column("source").to_pylist()) == ["bad", "good", "good", "good"]
    assert read_output(run_dir, "quarantine").num_rows == 3
    markers = sorted((run_dir / "_shards").glob("*.json"))
    assert len(markers) == man["shards"] >= 2
