"""Credentials never leave the config.

The end-to-end part runs, in ONE Ray session, an embed-only labeling run (real minilm, inputs on
the moto S3 server, one of them named by a URI with credentials in it) and every curation task
(sft, dpo, rerank, calibrate) plus the HTML report over a run on the same bucket, all with sentinel
credentials: top-level key/secret, a session token nested in client_kwargs, a user-listed option
(storage_options.redact_keys) nested in s3_additional_kwargs, and key:secret in URIs. Then it reads
back every file written (the local output tree, the whole bucket, Ray's session logs; Parquet
decoded, since its pages are compressed) and everything the jobs printed, and looks for each
sentinel, raw and percent-encoded.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, quote_plus

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import secrets, storage
from pipeline.secrets import REDACTED

SHARED = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()

# Sentinels: distinctive, with characters a URI must percent-encode.
KEY = "AKIASENTINELKEY7Q2X"
SECRET = "sentinel/Secret+Value=9f3"
TOKEN = "SentinelSessionToken.4b1c"
CUSTOM = "SentinelTeamApiKey-77aa"
URI_KEY = "AKIASENTINELURI5M8W"
URI_SECRET = "uri/Sentinel+Secret9z"
SENTINELS = {
    "key": KEY,
    "secret": SECRET,
    "token": TOKEN,
    "custom": CUSTOM,
    "uri_key": URI_KEY,
    "uri_secret": URI_SECRET,
}


def forms(value: str) -> set[bytes]:
    return {value.encode(), quote(value, safe="").encode(), quote_plus(value).encode()}


def leaks(blob: bytes) -> list[str]:
    return sorted(name for name, v in SENTINELS.items() if any(f in blob for f in forms(v)))


def uri_with_credentials(uri: str, key: str = URI_KEY, secret: str = URI_SECRET) -> str:
    scheme, rest = uri.split("://", 1)
    return f"{scheme}://{quote(key, safe='')}:{quote(secret, safe='')}@{rest}"


def sentinel_options(endpoint_url: str) -> dict:
    return {
        "endpoint_url": endpoint_url,
        "key": KEY,
        "secret": SECRET,
        "client_kwargs": {"aws_session_token": TOKEN},
        # a credential name the defaults do not know, named by the user (s3fs drops headers
        # that no S3 operation takes, so this one never travels)
        "s3_additional_kwargs": {"X-Team-Api-Key": CUSTOM},
        "redact_keys": ["X-Team-Api-Key"],
    }


# ---- pure parts ------------------------------------------------------------------------------


def test_redact_nested_user_listed_and_uris():
    cfg = {
        "output": "s3://u1:p1@bucket/out",
        "run_id": "r",
        "storage_options": {
            "endpoint_url": "http://e",
            "key": "k1",
            "secret": "s1",
            "profile": "prod",
            "client_kwargs": {"aws_session_token": "t1", "region_name": "eu-west-1"},
            "config_kwargs": {"retries": {"max_attempts": 3}, "password": "p2"},
            "s3_additional_kwargs": {"ServerSideEncryption": "aws:kms", "X-Api": "x1"},
            "redact_keys": ["x-api"],
            "token": None,
        },
        "inputs": [{"path": "a.json", "storage_options": {"Secret": "s9", "x_api": "x2"}}],
        "sources": {"key": {"units": 3}},
    }  # not storage options: a source may be called anything
    r = secrets.redact(cfg)
    so = r["storage_options"]
    assert so == {
        "endpoint_url": "http://e",
        "key": REDACTED,
        "secret": REDACTED,
        "profile": "prod",
        "client_kwargs": {"aws_session_token": REDACTED, "region_name": "eu-west-1"},
        "config_kwargs": {"retries": {"max_attempts": 3}, "password": REDACTED},
        "s3_additional_kwargs": {"ServerSideEncryption": "aws:kms", "X-Api": REDACTED},
        "redact_keys": ["x-api"],
        "token": None,
    }
    assert r["inputs"][0]["storage_options"] == {"Secret": REDACTED, "x_api": REDACTED}
    assert r["output"] == f"s3://{REDACTED}@bucket/out" and r["sources"] == {"key": {"units": 3}}
    assert cfg["storage_options"]["key"] == "k1"  # a copy: the job keeps its credentials

    w = secrets.without_credentials(cfg)
    assert w["output"] == "s3://bucket/out"
    assert w["storage_options"] == {
        "endpoint_url": "http://e",
        "profile": "prod",
        "client_kwargs": {"region_name": "eu-west-1"},
        "config_kwargs": {"retries": {"max_attempts": 3}},
        "s3_additional_kwargs": {"ServerSideEncryption": "aws:kms"},
    }
    assert w["inputs"][0]["storage_options"] == {}
    assert secrets.inline_credentials(cfg) == [
        "storage_options.key",
        "storage_options.secret",
        "storage_options.client_kwargs.aws_session_token",
        "storage_options.config_kwargs.password",
        "storage_options.s3_additional_kwargs.X-Api",
        "inputs[0].storage_options.Secret",
        "inputs[0].storage_options.x_api",
    ]
    assert secrets.inline_credentials(w) == []


def test_uri_credentials_split_and_lift():
    uri = uri_with_credentials("s3://bucket/p/a@b.json")
    assert secrets.split_uri_credentials(uri) == ("s3://bucket/p/a@b.json", {"key": URI_KEY, "secret": URI_SECRET})
    assert secrets.split_uri_credentials("s3://bucket/x@y/z") == ("s3://bucket/x@y/z", {})
    # pasted unescaped, as AWS secret keys with '/' and '+' often are
    assert secrets.split_uri_credentials(f"s3://{URI_KEY}:{URI_SECRET}@bucket/a@b") == (
        "s3://bucket/a@b",
        {"key": URI_KEY, "secret": URI_SECRET},
    )
    assert secrets.redact_uri(f"s3://{URI_KEY}:{URI_SECRET}@bucket/k") == f"s3://{REDACTED}@bucket/k"
    assert (
        secrets.redact_uri(f"failed: {uri} and gs://tok@b/x")
        == f"failed: s3://{REDACTED}@bucket/p/a@b.json and gs://{REDACTED}@b/x"
    )
    clean, so = secrets.lift_uri_credentials([uri, "s3://bucket/q"], {"endpoint_url": "e"}, "here")
    assert clean == ["s3://bucket/p/a@b.json", "s3://bucket/q"]
    assert so == {"endpoint_url": "e", "key": URI_KEY, "secret": URI_SECRET}
    with pytest.raises(ValueError, match="differ from storage_options.key") as e:
        secrets.lift_uri_credentials([uri], {"key": "other"}, "here")
    assert not leaks(str(e.value).encode())
    # an input's URI credentials override the inherited top-level ones
    assert secrets.lift_uri_credentials([uri], {"key": "other"}, "here", inherited=True)[1]["key"] == URI_KEY


def test_scrub_masks_remembered_values_pairs_and_uris():
    secrets.remember({"secret": "remembered-Secret-xyz/1"})
    text = (
        "boom remembered-Secret-xyz/1 remembered-Secret-xyz%2F1 {'key': 'AKIA0000', 'secret': \"a b\"}\n"
        "  secret: plainvalue\n token=abc, tokens_per_s: 12 token_budget: 4096 s3://A:B@bucket/k"
    )
    out = secrets.scrub(text)
    assert "remembered-Secret" not in out and "AKIA0000" not in out and "plainvalue" not in out
    assert "abc" not in out and "A:B" not in out
    assert "tokens_per_s: 12 token_budget: 4096" in out and f"s3://{REDACTED}@bucket/k" in out


def test_uncaught_traceback_is_scrubbed(capsys):
    secrets.install_excepthook()
    secrets.remember({"password": "hook-Password-123"})
    try:
        raise RuntimeError("could not open with password hook-Password-123")
    except RuntimeError:
        sys.excepthook(*sys.exc_info())
    err = capsys.readouterr().err
    assert "RuntimeError: could not open with password REDACTED" in err and "hook-Password" not in err


def _label_config_dict(output: str, **storage) -> dict:
    return {
        "run_id": "h",
        "output": output,
        "storage_options": storage,
        "model": {"backbone": {"path": "minilm"}},
        "inputs": [{"path": str(SHARED / "llmbar" / "LLMBar_Natural.json"), "format": "llmbar"}],
    }


def test_label_config_hash_ignores_credentials_only(tmp_path):
    from pipeline.labeling.config import parse_config

    a = parse_config(_label_config_dict(str(tmp_path), endpoint_url="http://e", key=KEY, secret=SECRET))
    b = parse_config(_label_config_dict(str(tmp_path), endpoint_url="http://e", key="AKIAOTHER", secret="rotated"))
    none = parse_config(_label_config_dict(str(tmp_path), endpoint_url="http://e"))
    other = parse_config(_label_config_dict(str(tmp_path), endpoint_url="http://other", key=KEY, secret=SECRET))
    in_uri = parse_config(
        _label_config_dict(uri_with_credentials("s3://bucket/out", KEY, SECRET), endpoint_url="http://e")
    )
    in_uri_rotated = parse_config(
        _label_config_dict(uri_with_credentials("s3://bucket/out", "K2", "S2"), endpoint_url="http://e")
    )
    assert a.hash() == b.hash() == none.hash() != other.hash()
    assert in_uri.hash() == in_uri_rotated.hash()
    assert in_uri.output == "s3://bucket/out" and in_uri.storage_options["secret"] == SECRET  # lifted
    assert not leaks(repr(a).encode()) and "REDACTED" in repr(a)


def test_curate_config_hash_ignores_credentials_only(annotated_run):
    from pipeline.curation.config import parse_config

    def cfg(**so):
        return parse_config({"task": "sft", "run": str(annotated_run), "output": "/tmp/x", "storage_options": so})

    assert cfg(key=KEY, secret=SECRET).hash() == cfg(key="other", secret="rotated").hash() == cfg().hash()
    assert cfg(key=KEY, secret=SECRET).hash() != cfg(key=KEY, secret=SECRET, profile="other").hash()
    assert not leaks(repr(cfg(key=KEY, secret=SECRET)).encode())


def test_train_config_hash_ignores_credentials_only(tmp_path):
    from pipeline.training import load_train_config

    def cfg(**so):
        path = tmp_path / "t.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "name": "n",
                    "heads_out": "h",
                    "storage_options": so,
                    "inputs": [{"path": "s3://b/x.json", "storage_options": so}],
                }
            )
        )
        return load_train_config(str(path))

    a, b, c = cfg(key=KEY, secret=SECRET), cfg(key="o", secret="r"), cfg(key=KEY, endpoint_url="http://o")
    assert a.hash() == b.hash() != c.hash()
    assert a.embedding_run().run_id == b.embedding_run().run_id != c.embedding_run().run_id


def test_scheduler_submission_id_ignores_credentials_only():
    from jobs.schedule import config_hash

    def text(key, secret, endpoint="http://e", output="s3://bucket/out"):
        return yaml.safe_dump(
            {
                "output": output,
                "storage_options": {"endpoint_url": endpoint, "key": key, "secret": secret},
                "inputs": [{"path": "s3://bucket/in", "storage_options": {"token": secret}}],
            }
        )

    assert config_hash(text(KEY, SECRET)) == config_hash(text("AKIAOTHER", "rotated"))
    assert config_hash(text(KEY, SECRET)) == config_hash(
        text(KEY, SECRET, output=uri_with_credentials("s3://bucket/out"))
    )
    assert config_hash(text(KEY, SECRET)) != config_hash(text(KEY, SECRET, endpoint="http://other"))


def test_yaml_error_does_not_quote_the_secret(tmp_path, capsys):
    from jobs import curate, label, schedule

    bad = tmp_path / "bad.yaml"
    bad.write_text(f"task: sft\nstorage_options:\n  secret: {SECRET}\n   key: {KEY}\n")
    assert curate.main(["--config", str(bad)]) == 2
    assert label.main(["--config", str(bad)]) == 2
    assert schedule.main(["--dry-run", "--config", bad.name, "--working-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("not valid YAML") == 2 and "schedule error" in err and SECRET[:8] in bad.read_text()
    assert not leaks(err.encode())


# ---- end to end, against the moto server -----------------------------------------------------


@contextmanager
def captured_fds(path: Path):
    """stdout and stderr of this process, at the file descriptors and at sys.stdout/err (pytest
    replaces both), with what Ray forwards from its workers, into one file."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved, saved_sys = (os.dup(1), os.dup(2)), (sys.stdout, sys.stderr)
    with open(path, "wb") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        sys.stdout = sys.stderr = open(1, "w", closefd=False, buffering=1)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stdout, sys.stderr = saved_sys
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def oasst_with_a_broken_line(path: Path) -> Path:
    lines = (SHARED / "oasst" / "en_100_message.jsonl").read_text(encoding="utf-8").splitlines()[:2]
    path.write_text("\n".join(lines + ['{"message_id": "broken", "text": ']) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sentinel_runs(s3_server, annotated_run, tmp_path_factory):
    """Every job with sentinel credentials; returns what to search."""
    import ray

    from jobs import curate, label, report

    tmp = tmp_path_factory.mktemp("secrets")
    configs, out, logs = tmp / "configs", tmp / "out", tmp / "logs"
    for d in (configs, out, logs):
        d.mkdir()
    bucket = s3_server.make_bucket("secrets")
    s3_server.upload(oasst_with_a_broken_line(tmp / "trees.jsonl"), f"{bucket}/in/trees.jsonl")
    s3_server.upload(SHARED / "llmbar" / "LLMBar_Natural.json", f"{bucket}/in/llmbar.json")
    s3_server.upload(annotated_run, f"{bucket}/annotated")
    so = sentinel_options(s3_server.endpoint_url)
    codes = {}

    def write(name: str, cfg: dict) -> str:  # configs hold the credentials: not among the files searched
        (configs / name).write_text(yaml.safe_dump(cfg))
        return str(configs / name)

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        session_dir = Path(ray._private.worker._global_node.get_session_dir_path())
        with captured_fds(logs / "jobs.txt"):
            codes["label"] = label.main(
                [
                    "--config",
                    write(
                        "label.yaml",
                        {
                            "run_id": "r1",
                            "output": uri_with_credentials(f"{bucket}/labels", KEY, SECRET),
                            "storage_options": so,
                            "model": {"backbone": {"path": "minilm"}},
                            "resources": {
                                "actors": 1,
                                "num_cpus_per_actor": 1,
                                "rows_per_shard": 4,
                                "units_per_call": 8,
                            },
                            "limit_rows_per_input": 6,
                            "progress_interval_s": 0.0,
                            "inputs": [
                                {"path": uri_with_credentials(f"{bucket}/in/trees.jsonl"), "format": "oasst_best_of_n"},
                                {"path": f"{bucket}/in/llmbar.json", "format": "llmbar"},
                            ],
                        },
                    ),
                ]
            )
            run = f"{bucket}/annotated"
            codes["calibrate"] = curate.main(
                [
                    "--config",
                    write(
                        "cal.yaml",
                        {
                            "task": "calibrate",
                            "run": run,
                            "output": f"{bucket}/curated/cal.json",
                            "storage_options": so,
                            "output_files": 2,
                            "calibrate": {"fit_temperature": False},
                        },
                    ),
                ]
            )
            codes["sft"] = curate.main(
                [
                    "--config",
                    write(
                        "sft.yaml",
                        {
                            "task": "sft",
                            "run": run,
                            "output": f"{bucket}/curated/sft",
                            "storage_options": so,
                            "output_files": 2,
                            "filters": [{"column": "score", "min": 0.0}],
                            "calibration": f"{bucket}/curated/cal.json",
                        },
                    ),
                ]
            )
            codes["dpo"] = curate.main(
                [
                    "--config",
                    write(
                        "dpo.yaml",
                        {
                            "task": "dpo",
                            "run": run,
                            "output": str(out / "dpo"),
                            "storage_options": so,
                            "output_files": 2,
                            "calibration": f"{bucket}/curated/cal.json",
                        },
                    ),
                ]
            )
            codes["rerank"] = curate.main(
                [
                    "--config",
                    write(
                        "rerank.yaml",
                        {  # credentials in the URI only
                            "task": "rerank",
                            "run": uri_with_credentials(run),
                            "output": str(out / "rerank"),
                            "storage_options": {"endpoint_url": s3_server.endpoint_url},
                            "output_files": 2,
                        },
                    ),
                ]
            )
            codes["report"] = report.main(
                [  # credentials in the URI, the endpoint on the command line
                    "--run",
                    uri_with_credentials(run),
                    "--curation-manifest",
                    f"{bucket}/curated/sft/manifest.json",
                    "--curation-manifest",
                    str(out / "dpo" / "manifest.json"),
                    "--out",
                    str(out / "report.html"),
                    "--storage-options",
                    json.dumps({"endpoint_url": s3_server.endpoint_url}),
                ]
            )
            # error paths: a missing input named with credentials, a storage error
            codes["missing"] = label.main(
                [
                    "--config",
                    write(
                        "missing.yaml",
                        {
                            "run_id": "r2",
                            "output": f"{bucket}/labels",
                            "storage_options": so,
                            "model": {"backbone": {"path": "minilm"}},
                            "inputs": [{"path": uri_with_credentials(f"{bucket}/nothing/*.json"), "format": "llmbar"}],
                        },
                    ),
                ]
            )
            try:
                storage.read_bytes(
                    uri_with_credentials(f"{bucket}/no/such.json"), {"endpoint_url": s3_server.endpoint_url}
                )
            except FileNotFoundError as e:
                import traceback

                codes["storage_error"] = "".join(traceback.format_exception(e))
    finally:
        ray.shutdown()
    return {
        "bucket": bucket,
        "out": out,
        "logs": logs,
        "codes": codes,
        "session_dir": session_dir,
        "fs": s3_server.filesystem(),
        "configs": configs,
    }


@pytest.mark.slow
def test_every_job_ran(sentinel_runs):
    codes = sentinel_runs["codes"]
    assert {k: codes[k] for k in ("label", "calibrate", "sft", "dpo", "rerank", "report", "missing")} == {
        "label": 0,
        "calibrate": 0,
        "sft": 0,
        "dpo": 0,
        "rerank": 0,
        "report": 0,
        "missing": 2,
    }
    fs, bucket = sentinel_runs["fs"], sentinel_runs["bucket"].removeprefix("s3://")
    man = json.loads(fs.cat(f"{bucket}/labels/r1/manifest.json"))
    so = man["config"]["storage_options"]
    # credentials redacted, everything else kept as given
    assert so["key"] == so["secret"] == so["client_kwargs"]["aws_session_token"] == REDACTED
    assert so["s3_additional_kwargs"] == {"X-Team-Api-Key": REDACTED} and so["endpoint_url"].startswith("http://")
    assert man["config"]["output"] == f"s3://{bucket}/labels"  # URI credentials moved out
    assert man["config"]["inputs"][0]["path"] == f"s3://{bucket}/in/trees.jsonl"
    assert man["config"]["inputs"][0]["storage_options"]["secret"] == REDACTED
    assert sum(s["rows_quarantined"] for s in man["sources"].values()) >= 1  # the broken line
    data = pq.read_table(fs.open(fs.find(f"{bucket}/labels/r1/data")[0], "rb"))
    assert set(data.column("source_uri").to_pylist()) <= {
        f"s3://{bucket}/in/trees.jsonl",
        f"s3://{bucket}/in/llmbar.json",
    }
    assert fs.find(f"{bucket}/labels/r1/quarantine") and fs.find(f"{bucket}/labels/r1/_shards")
    assert "no input matches" in (sentinel_runs["logs"] / "jobs.txt").read_text()


def _parquet_text(blob: bytes) -> bytes:
    import io

    f = pq.ParquetFile(io.BytesIO(blob))
    meta = f.schema_arrow.metadata or {}
    return json.dumps(f.read().to_pylist(), default=str).encode() + b"".join(k + v for k, v in meta.items())


@pytest.mark.slow
def test_no_sentinel_in_any_written_file(sentinel_runs):
    fs, bucket = sentinel_runs["fs"], sentinel_runs["bucket"].removeprefix("s3://")
    found, checked = {}, 0
    for key in fs.find(bucket):
        blob = fs.cat(key)
        texts = [blob] + ([_parquet_text(blob)] if key.endswith(".parquet") else [])
        checked += 1
        if any(leaks(t) for t in texts):
            found[f"s3://{key}"] = sorted({n for t in texts for n in leaks(t)})
    for path in sorted(sentinel_runs["out"].rglob("*")):
        if path.is_file():
            blob = path.read_bytes()
            texts = [blob] + ([_parquet_text(blob)] if path.suffix == ".parquet" else [])
            checked += 1
            if any(leaks(t) for t in texts):
                found[str(path)] = sorted({n for t in texts for n in leaks(t)})
    assert found == {}
    # the search itself finds every sentinel where it is: in the configs (raw and percent-encoded)
    assert leaks(b"".join(p.read_bytes() for p in sentinel_runs["configs"].iterdir())) == sorted(SENTINELS)
    kinds = {Path(k).name for k in fs.find(bucket)} | {p.name for p in sentinel_runs["out"].rglob("*")}
    # the artifacts the issue names were really written and read
    assert {"manifest.json", "_run.json", "cal.json", "cal.manifest.json", "report.html"} <= kinds
    assert checked > 20


@pytest.mark.slow
def test_no_sentinel_in_printed_output_or_ray_logs(sentinel_runs):
    printed = (sentinel_runs["logs"] / "jobs.txt").read_bytes()
    assert b"[label]" in printed and b"[curate]" in printed and b'"rows_out"' in printed
    # each job (label, calibrate, sft, dpo, rerank) warns that its config holds credentials: where, not what
    warnings = [
        line.decode() for line in printed.splitlines() if line.startswith(b"warning: the config carries credentials (")
    ]
    assert len(warnings) == 5
    assert "inputs[0].storage_options.secret" in warnings[0] and "storage_options.secret" in warnings[0]
    for w in warnings[1:4]:
        assert all(
            f"storage_options.{n}" in w
            for n in ("key", "secret", "client_kwargs.aws_session_token", "s3_additional_kwargs.X-Team-Api-Key")
        )
    assert "storage_options.key, storage_options.secret)" in warnings[4]  # lifted from the rerank run's URI
    assert leaks(printed) == []
    assert leaks(sentinel_runs["codes"]["storage_error"].encode()) == []
    found = {}
    for path in sentinel_runs["session_dir"].rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                blob = path.read_bytes()
            except OSError:
                continue
            if leaks(blob):
                found[str(path)] = leaks(blob)
    assert found == {}
