"""Hub inputs (issue 21 item 2): `hf://datasets/<org>/<name>/<files>` (+ `revision`) read through
huggingface_hub's HfFileSystem from a local server standing in for the Hub's file API
(tests/hub_server.py: real HTTP, the client unpatched), and offline from huggingface_hub's cache.

Records follow the PKU-Alignment/PKU-SafeRLHF card (see tests/test_inputs_named_twice.py).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hub_server import HubServer
from test_inputs_named_twice import pku_rows

from pipeline import secrets, storage
from pipeline.corpus import InputSpec, read_units
from pipeline.corpus.spec import InputSpecError, expand_files

TOKEN = "hf_localTestToken0123456789"
REPO = "PKU-Alignment/PKU-SafeRLHF"


def write_repo(folder: Path, rows: list[dict]) -> Path:
    """The layout push_to_hub makes: data/<split>-NNNNN-of-NNNNN.parquet, plus a card."""
    (folder / "data").mkdir(parents=True)
    half = len(rows) // 2
    for i, part in enumerate((rows[:half], rows[half:])):
        pq.write_table(pa.Table.from_pylist(part), folder / "data" / f"train-{i:05d}-of-00002.parquet")
    (folder / "data" / "test-00000-of-00001.parquet").write_bytes(b"")
    pq.write_table(pa.Table.from_pylist(rows[:2]), folder / "data" / "test-00000-of-00001.parquet")
    (folder / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n")
    return folder


@pytest.fixture
def hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    server = HubServer(token=TOKEN).start()
    rows = pku_rows(12)
    server.main = write_repo(tmp_path / "main", rows)  # type: ignore[attr-defined]
    server.add_dataset(REPO, server.main)  # type: ignore[attr-defined]
    server.v1 = write_repo(tmp_path / "v1", rows[:4])  # type: ignore[attr-defined]
    server.add_dataset(REPO, server.v1, revision="v1")  # type: ignore[attr-defined]
    # The suite runs offline (conftest); this test's "Hub" is the local server.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield server
    server.stop()


def spec(path: str, **kw) -> dict:
    return {"path": path, "format": "pku_saferlhf", "storage_options": {"token": TOKEN}, **kw}


def test_hub_glob_reads_like_the_local_files(hub):
    hf = read_units([spec(f"hf://datasets/{REPO}/data/train-*.parquet")])
    local = read_units([spec(str(hub.main / "data" / "train-*.parquet"), storage_options=None)])
    assert hf.num_rows == 24
    assert Counter(hf.column("unit_id").to_pylist()) == Counter(local.column("unit_id").to_pylist())
    assert hf.column("preference").to_pylist() == local.column("preference").to_pylist()
    uris = sorted(set(hf.column("source_uri").to_pylist()))
    assert uris == [f"hf://datasets/{REPO}/data/train-0000{i}-of-00002.parquet" for i in (0, 1)]
    # Streamed: Parquet read in byte ranges, listings through the tree API, nothing else.
    assert hub.ranged_reads("train-00000-of-00002.parquet")
    routes = {p.split("/")[5 if p.startswith("/api/") else 4] for _, p, _ in hub.requests if "/PKU-SafeRLHF/" in p}
    assert {"tree", "resolve"} <= routes


def test_revision_key_and_revision_in_the_path(hub):
    files = expand_files(InputSpec.from_dict(spec(f"hf://datasets/{REPO}/data/*.parquet", revision="v1")))
    assert files == [
        f"hf://datasets/{REPO}@v1/data/test-00000-of-00001.parquet",
        f"hf://datasets/{REPO}@v1/data/train-00000-of-00002.parquet",
        f"hf://datasets/{REPO}@v1/data/train-00001-of-00002.parquet",
    ]
    t = read_units([spec(f"hf://datasets/{REPO}@v1/data/train-*.parquet")])
    assert t.num_rows == 8  # v1 holds the first 4 rows
    with pytest.raises(InputSpecError, match="revision: 'main' differs from the revision in the path"):
        InputSpec.from_dict(spec(f"hf://datasets/{REPO}@v1/data", revision="main"))
    with pytest.raises(InputSpecError, match=r"path: .*Invalid rev id: v9|path: .*v9"):
        expand_files(InputSpec.from_dict(spec(f"hf://datasets/{REPO}/data", revision="v9")))


def test_a_whole_repo_folder_is_one_source_per_split(hub):
    # A mapping spec names no source: the split files give theirs. README.md is skipped (no data extension).
    label = {"column": "better_response_id", "values": {0: 0, 1: 1}}
    columns = {"prompt": "prompt", "responses": ["response_0", "response_1"], "label": label}
    s = {"path": f"hf://datasets/{REPO}", "storage_options": {"token": TOKEN}, "columns": columns}
    t = read_units([s])
    assert Counter(t.column("source").to_pylist()) == {"PKU-SafeRLHF/train": 24, "PKU-SafeRLHF/test": 4}


def test_bad_hub_paths_and_credentials_are_named(hub):
    with pytest.raises(InputSpecError, match=r"path: 'hf://datasets/PKU-SafeRLHF' is not a Hub path"):
        InputSpec.from_dict(spec("hf://datasets/PKU-SafeRLHF"))
    with pytest.raises(InputSpecError, match="revision: only for hf:// paths"):
        InputSpec.from_dict(spec("/tmp/x.jsonl", revision="main"))
    with pytest.raises(InputSpecError, match=r"path: 'hf://datasets/nobody/nothing/data'"):
        expand_files(InputSpec.from_dict(spec("hf://datasets/nobody/nothing/data")))
    # No token for a repository that needs one: the path is named, the server's answer given.
    with pytest.raises(InputSpecError, match=rf"path: 'hf://datasets/{REPO}/data'"):
        expand_files(InputSpec.from_dict(spec(f"hf://datasets/{REPO}/data", storage_options=None)))
    with pytest.raises(InputSpecError, match="no input matches"):
        expand_files(InputSpec.from_dict(spec(f"hf://datasets/{REPO}/data/nothing-*.parquet")))


def test_hub_token_from_the_environment_and_kept_out_of_artifacts(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    t = read_units([spec(f"hf://datasets/{REPO}/data/test-*.parquet", storage_options=None)])
    assert t.num_rows == 4
    assert TOKEN not in secrets.scrub(f"request failed: Authorization: Bearer {TOKEN}")
    cfg = {"inputs": [spec(f"hf://datasets/{REPO}/data")]}
    assert TOKEN not in json.dumps(secrets.redact(cfg))
    # Options meant for S3 (inherited top-level ones) never send their session token to the Hub.
    fs, _ = storage.filesystem(f"hf://datasets/{REPO}", {"key": "AKIA", "secret": "s", "token": "aws-session-token"})
    assert fs.token is None and fs.endpoint == hub.url


def test_offline_reads_the_huggingface_hub_cache(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants, snapshot_download

    online = read_units([spec(f"hf://datasets/{REPO}/data/train-*.parquet")])
    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    snapshot_download(REPO, repo_type="dataset", cache_dir=str(cache), token=TOKEN, endpoint=hub.url)
    hub.stop()  # nothing left to reach
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = read_units([spec(f"hf://datasets/{REPO}/data/train-*.parquet")])
    assert Counter(offline.column("unit_id").to_pylist()) == Counter(online.column("unit_id").to_pylist())
    uris = set(offline.column("source_uri").to_pylist())
    assert all("datasets--PKU-Alignment--PKU-SafeRLHF/snapshots/" in u for u in uris) and len(uris) == 2
    with pytest.raises(InputSpecError, match="offline .* not in the huggingface_hub cache"):
        expand_files(InputSpec.from_dict(spec("hf://datasets/nobody/nothing/data")))
    shutil.rmtree(cache)
