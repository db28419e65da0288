"""README's walkthrough "a Hub dataset -> nightly labeling -> a DPO set every morning", run as
written: its two configs and its command are read from README.md, against a local server standing
in for the Hub (tests/hub_server.py), over two nights (a second shard file appears on the Hub
between them). Records follow the PKU-SafeRLHF card (tests/test_inputs_named_twice.py)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hub_server import HubServer
from test_inputs_named_twice import pku_rows

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def readme_block(marker: str) -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(rf"<!-- walkthrough:{marker} -->\n```\w*\n(.*?)```", text, re.S)
    assert m, marker
    return m.group(1)


def run(command: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_hub_dataset_to_a_nightly_dpo_set(tmp_path, smollm2_heads):
    rows = pku_rows(24)
    repo = tmp_path / "hub" / "PKU-SafeRLHF"
    (repo / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:12]), repo / "data" / "train-00000-of-00002.parquet")
    hub = HubServer().start()
    hub.add_dataset("PKU-Alignment/PKU-SafeRLHF", repo)

    work = tmp_path / "project"
    (work / "runs" / "heads").mkdir(parents=True)
    (work / "runs" / "heads" / "smollm2").symlink_to(smollm2_heads)
    (work / "runs" / "hub-nightly.yaml").write_text(readme_block("label"))
    (work / "runs" / "hub-dpo.yaml").write_text(readme_block("curate"))
    (command,) = [ln for ln in readme_block("commands").splitlines() if ln.strip()]
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",  # the suite runs offline; this "Hub" is the local server
        "PYTHONPATH": str(REPO),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    try:
        nights = []
        for date in ("2026-12-01", "2026-12-02"):
            if date == "2026-12-02":  # a new shard file appeared on the Hub during the day
                pq.write_table(pa.Table.from_pylist(rows[12:]), repo / "data" / "train-00001-of-00002.parquet")
            report = json.loads(run(f"{command} --date {date}", work, env).stdout)
            assert report["action"] == "dry_run" and report["submission_id"].startswith(f"nightly-{date}-")
            run(report["entrypoint"], work, env)  # what the cluster would run
            nights.append(report["run_id"])
    finally:
        hub.stop()

    labels = work / "runs" / "labels" / "hub-nightly"
    m1, m2 = (json.loads((labels / n / "manifest.json").read_text()) for n in nights)
    uri = "hf://datasets/PKU-Alignment/PKU-SafeRLHF@main/data/train-0000{}-of-00002.parquet"
    assert [f["uri"] for f in m1["input_files"]] == [uri.format(0)]
    assert [f["uri"] for f in m2["skipped_input_files"]] == [uri.format(0)]
    assert [f["uri"] for f in m2["input_files"]] == [uri.format(1)]
    assert m1["sources"]["pku_saferlhf"]["units_labeled"] == m2["sources"]["pku_saferlhf"]["units_labeled"] == 24

    dpo = work / "runs" / "curated" / "hub-dpo"
    man = json.loads((dpo / "manifest.json").read_text())
    assert [r["run_id"] for r in man["runs"]] == nights[::-1]
    counts = man["pairs"]["preference"]
    assert counts["pairs_in"] == 24 and counts["duplicate_units"] == 0
    pairs = pq.read_table(dpo / "data").to_pylist()
    assert len(pairs) == counts["kept"] + counts["flipped"] == 24 - counts["dropped_total"] > 0
    assert max(Counter([p["chosen_unit_id"] for p in pairs] + [p["rejected_unit_id"] for p in pairs]).values()) == 1
    # Kept pairs follow the card's better_response_id, flipped ones the other way.
    by_prompt = {r["prompt"]: r for r in rows}
    for p in pairs:
        r = by_prompt[p["prompt"][-1]["content"]]
        human = r[f"response_{r['better_response_id']}"]
        assert (p["chosen"][-1]["content"] == human) == (p["action"] == "kept"), p["action"]
    assert shlex.split(command)[:3] == ["python", "-m", "jobs.schedule"]
