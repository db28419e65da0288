"""The nightly schedule is one source of truth (issue 21 item 4): the crontab, the KubeRay CronJob
and the shipped configs name the same slot (same configs by content, same submission id), and the
slot labels and then curates the labeling output."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from jobs import schedule as sched
from pipeline.curation.config import CurateConfig

REPO = Path(__file__).resolve().parents[1]
DATE = "2026-12-01"


def _kuberay() -> dict:
    return {d["kind"]: d for d in yaml.safe_load_all((REPO / "infra" / "kuberay-nightly.yaml").read_text()) if d}


def _cron_args():
    script = " ".join(_kuberay()["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"])
    return sched.build_parser().parse_args(shlex.split(script[script.index("python -m jobs.schedule") :])[3:])


def _crontab_args():
    line = next(
        ln
        for ln in (REPO / "infra" / "crontab").read_text().splitlines()
        if ln.strip() and not ln.startswith("#") and "jobs.schedule" in ln
    )
    invocation = line[line.index("-m jobs.schedule") + len("-m jobs.schedule") :].split(">>")[0]
    return sched.build_parser().parse_args(shlex.split(invocation))


def test_the_inline_kuberay_configs_hash_as_the_shipped_ones():
    data = _kuberay()["ConfigMap"]["data"]
    cron, tab = _cron_args(), _crontab_args()
    assert [Path(c).name for c in cron.curate] == [Path(c).name for c in tab.curate] == ["curate_dpo_nightly.yaml"]
    pairs = [(cron.config, tab.config)] + list(zip(cron.curate, tab.curate))
    for inline, shipped in pairs:
        assert sched.config_hash(data[inline]) == sched.config_hash((REPO / shipped).read_text()), (inline, shipped)


def test_crontab_and_cronjob_schedule_the_same_slot(tmp_path):
    cron, tab = _cron_args(), _crontab_args()
    # The CronJob's working dir: the project plus the ConfigMap's files at its root.
    for name, text in _kuberay()["ConfigMap"]["data"].items():
        (tmp_path / name).write_text(text)
    k8s = sched.schedule(
        None, cron.config, date=DATE, job_name=cron.job_name, working_dir=str(tmp_path), incremental=cron.incremental,
        dry_run=True, curate=cron.curate,
    )  # fmt: skip
    host = sched.schedule(
        None, tab.config, date=DATE, job_name=tab.job_name, working_dir=str(REPO), incremental=tab.incremental,
        dry_run=True, curate=tab.curate,
    )  # fmt: skip
    assert k8s["submission_id"] == host["submission_id"]
    assert re.fullmatch(rf"nightly-{DATE}-[0-9a-f]{{8}}", host["submission_id"])
    # Label, then curate, in one job: curation runs only once labeling succeeded.
    label, curate = host["entrypoint"].split(" && ")
    assert shlex.split(label) == [
        "python", "-m", "jobs.label", "--config", "jobs/configs/nightly.yaml",
        "--run-id", host["run_id"], "--incremental",
    ]  # fmt: skip
    assert shlex.split(curate) == ["python", "-m", "jobs.curate", "--config", "jobs/configs/curate_dpo_nightly.yaml"]


def test_the_nightly_curation_reads_the_nightly_labels():
    label = yaml.safe_load((REPO / "jobs" / "configs" / "nightly.yaml").read_text())
    curate = yaml.safe_load((REPO / "jobs" / "configs" / "curate_dpo_nightly.yaml").read_text())
    assert set(curate) <= set(CurateConfig.__dataclass_fields__)
    # Every night's run id is <job name>-<date>-<hash>: the glob names them all.
    assert curate["run"] == f"{label['output']}/{_crontab_args().job_name}-*"


def test_a_schedule_refuses_a_curation_of_something_else(tmp_path):
    (tmp_path / "label.yaml").write_text("output: s3://b/labels/nightly\ninputs: []\n")
    (tmp_path / "dpo.yaml").write_text("task: dpo\nrun: s3://b/labels/other/latest\noutput: s3://b/dpo\n")
    with pytest.raises(ValueError, match=r"dpo.yaml: run: 's3://b/labels/other/latest' does not read the labeling"):
        sched.schedule(None, "label.yaml", date=DATE, working_dir=str(tmp_path), dry_run=True, curate=["dpo.yaml"])
    rc = sched.main(["--dry-run", "--config", "label.yaml", "--working-dir", str(tmp_path), "--curate", "dpo.yaml"])
    assert rc == 2
    # Without --curate the hash (and so the submission id) is the labeling config's, as before.
    alone = sched.schedule(None, "label.yaml", date=DATE, working_dir=str(tmp_path), dry_run=True)
    digest = sched.config_hash((tmp_path / "label.yaml").read_text())
    assert alone["submission_id"] == f"label-{DATE}-{digest[:8]}" and alone["curate"] == []
