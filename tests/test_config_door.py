"""Configs checked at the door (issue 21): strict types, every error at once naming its key path,
exit code 2 from every entry point, `--check` without Ray, `jobs.schedule --dry-run` running that
check, `jobs.inspect` on bad specs, and the max_quarantine_fraction verdict. All fast: no Ray
starts here (the job-level quarantine test is in test_label_quarantine_limit.py)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from label_fixtures import REPO, SHARED, label_config, write_yaml
from s3_faults import FaultPlan, FaultProxy, fault_total

from pipeline.labeling import manifest as mf
from pipeline.labeling.config import SCHEMA, ConfigError, LabelConfig, parse_config


def _label_cfg(tmp_path, **over) -> dict:
    return label_config(tmp_path, heads=None, **over)


def _main(module: str, argv: list[str], capsys) -> tuple[int, str, str]:
    mod = __import__(module, fromlist=["main"])
    rc = mod.main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# ---- the bad values: exit 2, each naming its key --------------------------------------


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.update(incremental="false"), "incremental: expected true or false, got 'false'"),
        (lambda c: c.update(embeddings="no"), "embeddings: expected true or false, got 'no'"),
        (lambda c: c.update(limit_rows_per_input="ten"), "limit_rows_per_input: expected an integer, got 'ten'"),
        (lambda c: c["resources"].update(num_gpus_per_actor="1"), "resources.num_gpus_per_actor: expected a number"),
        (
            lambda c: c["resources"].update(rows_per_shard="lots"),
            "resources.rows_per_shard: expected an integer, got 'lots'",
        ),
        (lambda c: c.update(modle={}), "modle: unknown key; did you mean 'model'?"),
        (lambda c: c["inputs"][0].update(format="llmbarr"), "inputs[0].format: unknown adapter 'llmbarr'"),
        (lambda c: c["inputs"][1].pop("path"), "inputs[1].path: missing required key"),
        (lambda c: c["resources"].update(actors=True), "resources.actors: expected an integer or a list, got True"),
        (lambda c: c["resources"].update(share_prompts="sometimes"), "resources.share_prompts: expected one of"),
        (
            lambda c: c.update(max_quarantine_fraction={"overall": 1.5}),
            "max_quarantine_fraction.overall: expected a value <= 1",
        ),
    ],
)
def test_each_bad_value_exits_2_naming_its_key(tmp_path, capsys, mutate, message):
    cfg = _label_cfg(tmp_path)
    mutate(cfg)
    rc, out, err = _main("jobs.label", ["--config", str(write_yaml(tmp_path / "job.yaml", cfg))], capsys)
    assert rc == 2
    assert err.startswith("config error: ") and message in err
    assert err.count("\n  - ") == 0  # one problem: one line, no list


def test_all_errors_are_reported_together(tmp_path, capsys):
    cfg = _label_cfg(tmp_path, incremental="false", limit_rows_per_input="ten", modle={"heads": "x"})
    cfg["resources"].update(num_gpus_per_actor="1", rows_per_shard="lots")
    cfg["inputs"][0]["path"] = "/nonexistent/in/*.jsonl"  # a semantic error, beside the type errors
    cfg["model"]["heads"] = str(tmp_path / "no-heads")
    rc, _, err = _main("jobs.label", ["--config", str(write_yaml(tmp_path / "job.yaml", cfg))], capsys)
    assert rc == 2
    lines = [line.removeprefix("  - ") for line in err.splitlines()[1:]]
    assert err.splitlines()[0] == f"config error: {len(lines)} errors:"
    assert sorted(line.split(":")[0] for line in lines) == [
        "incremental",
        "inputs[0]",
        "limit_rows_per_input",
        "model.heads",
        "modle",
        "resources.num_gpus_per_actor",
        "resources.rows_per_shard",
    ]
    assert "inputs[0]: no input matches '/nonexistent/in/*.jsonl'" in lines


def test_values_are_kept_as_written_and_null_sections_take_defaults(tmp_path):
    """pydantic only validates: an integer written for a number stays an integer (so config
    hashes do not change), and `model:` with nothing under it means the defaults."""
    cfg = parse_config({**_label_cfg(tmp_path), "resources": {"num_gpus_per_actor": 1, "actors": [1, 2]}})
    assert type(cfg.resources.num_gpus_per_actor) is int and cfg.resources.actors == [1, 2]
    empty = parse_config({**_label_cfg(tmp_path), "model": None, "resources": None})
    assert empty.model.backbone == {"path": "smollm2"} and empty.resources.rows_per_shard == 256
    assert empty.max_quarantine_fraction == mf_limits(0.5, 0.25)
    limits_off = parse_config({**_label_cfg(tmp_path), "max_quarantine_fraction": {"overall": None}})
    assert limits_off.max_quarantine_fraction == mf_limits(0.5, None)
    assert limits_off.hash() == parse_config(_label_cfg(tmp_path)).hash()  # limits are not what a run computes


def mf_limits(per_source, overall):
    from pipeline.labeling.config import QuarantineLimits

    return QuarantineLimits(per_source=per_source, overall=overall)


def test_a_field_added_to_the_dataclass_is_checked_without_schema_edits():
    """What a change adding a field (`future_knob_s: float`) to LabelConfig gets for free."""
    from pipeline.config_schema import Schema

    extended = dataclasses.make_dataclass(
        "LabelConfigPlus", [("future_knob_s", float, dataclasses.field(default=60.0))], bases=(LabelConfig,)
    )
    schema = Schema("labeling", extended, SCHEMA.overrides)
    base = {"inputs": [{"path": "x"}], "output": "o"}
    assert schema.type_errors({**base, "future_knob_s": 30}) == ([], [])
    assert schema.type_errors({**base, "future_knob_s": "30"})[0] == ["future_knob_s: expected a number, got '30'"]
    assert "future_knob_s" in schema.keys() and "future_knob_s" not in SCHEMA.keys()


def test_shipped_configs_validate():
    from jobs.schedule import SCHEMA as SCHEDULE  # noqa: F401 - every kind's schema imports
    from pipeline.curation.config import SCHEMA as CURATION
    from pipeline.training import SCHEMA as TRAINING

    kinds = {"curate": CURATION, "train": TRAINING}
    configs = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
    assert len(configs) == 10  # curate_dpo_nightly.yaml included
    for path in configs:
        schema = kinds.get(path.stem.split("_")[0], SCHEMA)
        assert schema.type_errors(yaml.safe_load(path.read_text())) == ([], []), path.name


def test_training_config_errors_exit_2_with_every_key(tmp_path, capsys):
    path = write_yaml(
        tmp_path / "train.yaml",
        {
            "name": "t",
            "heads_out": str(tmp_path / "heads"),
            "inputs": [{"path": str(SHARED / "llmbar" / "LLMBar_Natural.json"), "format": "llmbar"}],
            "test_fraction": "0.2",
            "heads": {"gating": {"steps": "many"}, "baselin": True},
            "resources": {"rows_per_shard": "lots"},
        },
    )
    rc, _, err = _main("jobs.train_heads", ["--config", str(path)], capsys)
    assert rc == 2
    assert err.splitlines()[1:] == [
        "  - test_fraction: expected a number, got '0.2'",
        "  - heads.gating.steps: expected an integer, got 'many'",
        "  - heads.baselin: unknown key; did you mean 'baseline'? (allowed: baseline, bt_l2_grid, debias_grid, "
        "debias_threshold, ensemble, ensemble_seed, gating, objectives, ridge_grid, threads, val_fraction, "
        "verbosity)",
        "  - resources.rows_per_shard: expected an integer, got 'lots'",
    ]
    rc, _, err = _main("jobs.evaluate", ["--train-config", str(path)], capsys)
    assert rc == 2 and "heads.gating.steps: expected an integer" in err


def test_curation_config_errors_exit_2_with_every_key(tmp_path, capsys):
    path = write_yaml(
        tmp_path / "c.yaml",
        {
            "task": "dpo",
            "run": str(tmp_path / "no-run"),
            "output": str(tmp_path / "o"),
            "partition_rows": "lots",
            "pairs": {"min_margin": "0.1", "preference": "maybe"},
            "filters": [{"column": "score", "min": "high"}, {"column": "score", "top": 2}],
        },
    )
    rc, _, err = _main("jobs.curate", ["--config", str(path)], capsys)
    assert rc == 2
    assert err.splitlines()[1:] == [
        "  - filters[0].min: expected a number, got 'high'",
        "  - partition_rows: expected an integer, got 'lots'",
        "  - pairs.min_margin: expected a number, got '0.1'",
        "  - pairs.preference: expected one of 'keep', 'drop', 'flip' or 'none', got 'maybe'",
        "  - filters[1]: filter on score: top is a fraction in (0, 1], got 2.0",
        f"  - run: no Parquet files under {tmp_path / 'no-run' / 'data'} (is it a labeled run? "
        "<root>/latest and <root>/<glob> name runs by their manifests)",
    ]


# ---- --check: the whole config and the first rows, without Ray -------------------------------

NO_RAY = """
import sys
from {module} import main
rc = main({argv!r})
assert "ray" not in sys.modules, "--check imported ray"
sys.exit(rc)
"""


def _check_without_ray(module: str, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", NO_RAY.format(module=module, argv=argv)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    table = pa.table({"unit_id": ["a", "b", "c"], "score": [0.1, 0.5, 0.9], "rating_x": [1.0, 0.0, 0.5]})
    pq.write_table(table.slice(0, 2), run / "data" / "part-0.parquet")
    pq.write_table(table.slice(2), run / "data" / "part-1.parquet")
    return run


def test_label_check_reads_first_rows_without_ray(tmp_path):
    cfg = _label_cfg(tmp_path)
    proc = _check_without_ray("jobs.label", ["--config", str(write_yaml(tmp_path / "job.yaml", cfg)), "--check"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].endswith("job.yaml: ok")
    # LLMBar: one pair per record; OASST: one best-of-N row per prompter message with >= 2 replies.
    llmbar = [line for line in lines if line.startswith("  inputs[0] ")]
    assert llmbar and llmbar[0].endswith("first 5 record(s) -> 5 row(s) ok, 0 quarantined")
    assert any(line.startswith("  inputs[1] ") and "first 5 record(s)" in line for line in lines)
    assert not (tmp_path / "labels").exists()  # nothing written


def test_label_check_fails_with_exit_2_on_a_bad_config(tmp_path):
    cfg = _label_cfg(tmp_path, incremental="false")
    cfg["inputs"][0]["format"] = "nope"
    proc = _check_without_ray("jobs.label", ["--config", str(write_yaml(tmp_path / "job.yaml", cfg)), "--check"])
    assert proc.returncode == 2
    assert "2 error(s)" in proc.stdout.splitlines()[0]
    assert "incremental: expected true or false" in proc.stderr and "inputs[0].format: unknown adapter" in proc.stderr


def test_train_check_without_ray():
    proc = _check_without_ray("jobs.train_heads", ["--config", "jobs/configs/train_smollm2.yaml", "--check"])
    assert proc.returncode == 0, proc.stderr
    inputs = [line for line in proc.stdout.splitlines() if line.startswith("  inputs[")]
    spec = yaml.safe_load((REPO / "jobs" / "configs" / "train_smollm2.yaml").read_text())
    assert len(inputs) == len(spec["inputs"])


def test_curate_check_lists_the_run_and_checks_filter_columns(tmp_path):
    run = _run_dir(tmp_path)
    good = {"task": "sft", "run": str(run), "output": str(tmp_path / "o"), "filters": [{"column": "score", "min": 0.2}]}
    proc = _check_without_ray("jobs.curate", ["--config", str(write_yaml(tmp_path / "c.yaml", good)), "--check"])
    assert proc.returncode == 0, proc.stderr
    assert f"run {run} (2 data file(s), 3 unit(s))" in proc.stdout
    bad = {**good, "filters": [{"objective": "helpfulness", "min": 0.5}]}
    proc = _check_without_ray("jobs.curate", ["--config", str(write_yaml(tmp_path / "c.yaml", bad)), "--check"])
    assert proc.returncode == 2
    assert "filters[0]: column 'rating_helpfulness' is not in the run (its columns: rating_x, score, unit_id)" in (
        proc.stderr
    )


# ---- jobs.schedule ---------------------------------------------------------------------------


def _schedule(wd: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.schedule", "--config", "job.yaml", "--date", "2026-12-03", "--dry-run", *extra],
        cwd=wd,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
    )


def test_dry_run_fails_on_a_config_the_job_would_refuse(tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    cfg = _label_cfg(tmp_path)
    write_yaml(wd / "job.yaml", cfg)
    ok = _schedule(wd)
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["action"] == "dry_run" and report["check"]["ok"] and report["check"]["errors"] == []
    cfg["inputs"][0]["format"] = "unknown_format"
    write_yaml(wd / "job.yaml", cfg)
    bad = _schedule(wd)
    assert bad.returncode == 2
    assert json.loads(bad.stdout)["check"]["errors"] == [
        "inputs[0].format: unknown adapter 'unknown_format'; known: " + bad.stderr.split("known: ", 1)[1].split("\n")[0]
    ]
    assert "the labeling config would be refused" in bad.stderr


def test_schedule_flags_are_checked(tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    proc = _schedule(wd, "--date", "23/11/2026", "--entrypoint", "python -m jobs.label --config {cfg}")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[1:] == [
        "  - date: expected YYYY-MM-DD, got '23/11/2026'",
        "  - config: no such file 'job.yaml' under the working dir '.'",
        "  - entrypoint: unknown placeholder(s) ['cfg']; known: {config}, {run_id}",
    ]


# ---- jobs.inspect ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, message",
    [
        ({"output": "o", "inputs": [{"format": "llmbar"}]}, "inputs[0].path: missing required key"),
        ({"output": "o", "inputs": [{"path": "x.jsonl"}], "modle": {}}, "modle: unknown key; did you mean 'model'?"),
        ({"output": "o", "inputs": [{"path": 3}]}, "inputs[0].path: expected a string or a list, got 3"),
        ({"output": "o", "inputs": []}, "inputs: expected at least 1 item(s), got []"),
        ({"name": "t", "heads_out": "h", "inputs": [{"path": "x"}], "tset_fraction": 0.1}, "tset_fraction: unknown"),
        (["just", "a", "list"], "expected a mapping at the top level, got list"),
    ],
)
def test_inspect_never_crashes_on_a_bad_spec(tmp_path, capsys, config, message):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    rc, out, err = _main("jobs.inspect", ["--config", str(path)], capsys)
    assert rc == 2 and out == ""
    assert err.startswith("config error: ") and message in err


# ---- max_quarantine_fraction: the pure verdict -------------------------------------------------


def _sources(**counts: tuple[int, int]) -> dict[str, dict]:
    return {name: {"rows_in": n, "rows_quarantined": q} for name, (n, q) in counts.items()}


def test_quarantine_verdict_per_source_and_overall():
    sources = _sources(a=(10, 6), b=(90, 0), empty=(0, 0))
    verdict = mf.quarantine_verdict(sources, per_source=0.5, overall=0.25)
    assert verdict["sources_over"] == {"a": 0.6} and verdict["overall_fraction"] == 0.06
    assert "source 'a': 6 of 10 rows quarantined (60.0% > per_source 0.5)" in verdict["message"]
    assert "the run" not in verdict["message"]
    assert mf.quarantine_verdict(sources, per_source=0.6, overall=0.25) is None  # equal to the limit passes
    assert mf.quarantine_verdict(sources, per_source=None, overall=None) is None
    # every source under its limit, the run over: 30 of 100 rows
    spread = _sources(a=(50, 15), b=(50, 15))
    over = mf.quarantine_verdict(spread, per_source=0.5, overall=0.25)
    assert over["sources_over"] == {} and over["overall_fraction"] == 0.3
    assert "the run: 30.0% of 100 rows quarantined (> overall 0.25)" in over["message"]
    assert mf.quarantine_verdict(spread, per_source=0.5, overall=None) is None
    assert mf.quarantine_verdict(_sources(empty=(0, 0)), per_source=0.0, overall=0.0) is None


def test_the_verdict_marks_the_manifest_before_it_is_written():
    within = {"status": "complete", "sources": _sources(a=(4, 1))}
    assert mf.judge_quarantine(within, mf_limits(0.5, 0.5)) is None
    assert within == {"status": "complete", "sources": _sources(a=(4, 1))}  # untouched
    man = {"status": "complete", "sources": _sources(a=(4, 4))}
    verdict = mf.judge_quarantine(man, mf_limits(0.5, 0.5))
    assert "source 'a': 4 of 4 rows quarantined" in verdict["message"]
    assert man["status"] == "failed_quarantine" and man["failure"] is verdict
    assert verdict["sources_over"] == {"a": 1.0} and verdict["overall_fraction"] == 1.0
    assert verdict["limits"] == {"per_source": 0.5, "overall": 0.5}


def test_parse_config_error_lists_are_the_exception_errors(tmp_path):
    with pytest.raises(ConfigError) as e:
        parse_config({**_label_cfg(tmp_path), "embeddings": "no", "count_units": 1})
    assert e.value.errors == [
        "embeddings: expected true or false, got 'no'",
        "count_units: expected true or false, got 1",
    ]


def test_label_check_names_an_unreachable_output(tmp_path, capsys):
    """An s3:// output whose endpoint nothing listens on: a config error naming `output`, before Ray."""
    import socket

    with socket.socket() as s:  # a free port: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _label_cfg(
        tmp_path,
        output="s3://bucket/labels",
        storage_options={
            "endpoint_url": f"http://127.0.0.1:{port}",
            "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}},
        },
    )
    rc, _, err = _main("jobs.label", ["--config", str(write_yaml(tmp_path / "job.yaml", cfg)), "--check"], capsys)
    assert rc == 2
    assert "output: cannot reach s3://bucket/labels:" in err


def test_the_check_probes_a_store_briefly_and_the_job_keeps_its_retries(tmp_path, capsys, s3_server):
    """A check gives an unreachable S3 endpoint two attempts a call (storage.S3_PROBE_DEFAULTS), not
    the job's eight with backoff: behind the fault proxy every request is reset, and counted."""
    from pipeline import storage

    with FaultProxy(s3_server.endpoint_url, FaultPlan(rate=1.0, kinds=("reset",))) as proxy:
        so = {**s3_server.storage_options, "endpoint_url": proxy.url}
        cfg = _label_cfg(tmp_path, output=f"{s3_server.make_bucket('probe')}/labels", storage_options=so)
        rc, _, err = _main("jobs.label", ["--config", str(write_yaml(tmp_path / "job.yaml", cfg)), "--check"], capsys)
        resets = fault_total(proxy.counts(), "reset")
    assert rc == 2 and "output: cannot reach s3://probe-" in err
    # The fault landed, and was retried within the probe's policy: the check's few S3 calls got
    # two attempts each (6 resets seen). The job's policy gives each call eight, with backoff (an
    # endpoint that hangs up took 90 connections over four minutes in one exists()).
    assert 2 <= resets <= 8, resets
    # The policies as resolved: the probe's inside a check, the job's outside, given options win.
    with storage.probing():
        assert storage.store("s3://b/x", so).options["config_kwargs"]["retries"]["max_attempts"] == 2
        given = {**so, "config_kwargs": {"retries": {"max_attempts": 4}}}
        assert storage.store("s3://b/x", given).options["config_kwargs"]["retries"]["max_attempts"] == 4
    assert storage.store("s3://b/x", so).options["config_kwargs"]["retries"]["max_attempts"] == 8


def test_lease_and_stall_settings_are_typed_positive_seconds_or_null(tmp_path):
    with pytest.raises(ConfigError) as e:
        parse_config({**_label_cfg(tmp_path), "lease_ttl_s": "120", "stall_timeout_s": 0})
    assert "lease_ttl_s: expected a number, got '120'" in str(e.value) and "stall_timeout_s" in str(e.value)
    cfg = parse_config({**_label_cfg(tmp_path), "lease_ttl_s": None, "stall_timeout_s": 30})
    assert cfg.lease_ttl_s is None and cfg.stall_timeout_s == 30
    assert cfg.hash() == parse_config(_label_cfg(tmp_path)).hash()  # how it runs, not what it computes
