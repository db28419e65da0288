"""The job config is validated up front: each mistake gives one clear error naming the key."""

from __future__ import annotations

import pytest
from label_fixtures import REPO, SHARED, label_config, write_yaml

from pipeline.labeling.config import ConfigError, load_config, parse_config


def _cfg(tmp_path, **over):
    return label_config(tmp_path, heads=None, **over)


def test_valid_config_parses_and_hash_ignores_where_it_runs(tmp_path):
    a = parse_config(_cfg(tmp_path))
    b = parse_config({**_cfg(tmp_path), "ray_address": "ray://elsewhere:10001"})
    assert a.run_dir.endswith("labels/t1")
    assert a.hash() == b.hash()
    assert a.hash() != parse_config(_cfg(tmp_path, run_id="t2")).hash()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.update(bogus=1), "bogus: unknown key (allowed: count_units, "),
        (lambda c: c["model"].update(heds="x"), "model.heds: unknown key; did you mean 'heads'?"),
        (lambda c: c["resources"].update(actors=[3, 1]), "resources.actors"),
        (lambda c: c.pop("output"), "output: missing required key"),
        (lambda c: c.update(inputs=[{"path": "/nonexistent/*.jsonl", "format": "llmbar"}]), "inputs[0]"),
        (lambda c: c["model"].update(heads="/nonexistent/heads"), "model.heads"),
        (lambda c: c["model"].update(backbone={"path": "/nonexistent/model"}), "model.backbone"),
        (lambda c: c.update(run_id="a/b"), "run_id"),
        (lambda c: c["model"].update(template={"overflow": "drop"}), "model.template.overflow: expected one of"),
        (lambda c: c["model"].update(template={"max_tokenz": 5}), "model.template.max_tokenz: unknown key"),
    ],
)
def test_config_errors_name_the_problem(tmp_path, mutate, message):
    cfg = _cfg(tmp_path)
    mutate(cfg)
    with pytest.raises(ConfigError) as e:
        parse_config(cfg)
    assert message in str(e.value)


def test_cli_reports_config_errors_with_exit_code_2(tmp_path):
    import subprocess
    import sys

    cfg = _cfg(tmp_path)
    cfg["resources"]["token_budgett"] = 5
    path = write_yaml(tmp_path / "bad.yaml", cfg)
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.label", "--config", str(path)], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "token_budgett" in proc.stderr


def test_demo_config_is_valid(monkeypatch):
    monkeypatch.chdir(REPO)
    assert SHARED.is_dir()
    cfg = load_config(str(REPO / "jobs" / "configs" / "demo.yaml"))
    assert cfg.model.train_if_missing


def test_resume_with_a_different_model_is_refused(tmp_path):
    """A run's committed shards were scored by one model; a rerun under the same run id with another
    template (or backbone, heads) must not mix in a second model's scores."""
    from pipeline.labeling import manifest as mf

    first = parse_config(_cfg(tmp_path))
    run_dir = str(tmp_path / "run")
    mf.check_run_identity(run_dir, first.scoring_identity(), None)
    mf.check_run_identity(run_dir, parse_config(_cfg(tmp_path, limit_rows_per_input=3)).scoring_identity(), None)
    other = parse_config(_cfg(tmp_path, model={"template": {"max_tokens": 128}}))
    with pytest.raises(RuntimeError, match="different template"):
        mf.check_run_identity(run_dir, other.scoring_identity(), None)
