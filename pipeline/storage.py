"""Where bytes live: local paths, s3:// and hf:// (Hub, read-only) URIs behind one fsspec interface.

Every read and write in the project goes through here, so that local disk and S3 behave the
same, and so that files become visible only once complete (atomic commit).
"""

from __future__ import annotations

import json
import os
import platform
import posixpath
import uuid
from collections.abc import Callable
from importlib import metadata
from typing import IO, Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import secrets

StorageOptions = dict[str, Any]


TMP_PREFIX = ".tmp-"  # write_atomic's temporary names (local files)
_HF_OPTION_NAMES = frozenset({"endpoint", "token", "block_size", "expand_info", "max_workers"})
_S3_OPTION_NAMES = frozenset({"key", "secret", "endpoint_url", "client_kwargs", "config_kwargs", "profile", "anon"})


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def filesystem(uri: str, storage_options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for a URI and the path within it.

    storage_options go to s3fs for s3:// (e.g. {"endpoint_url": ..., "profile": ...}). Credentials
    are best left to botocore's own lookup (AWS_* environment variables, ~/.aws profiles, instance
    or pod roles; docs/operations.md); given here (key/secret/token) or in the URI
    (s3://KEY:SECRET@bucket/...), they are remembered so that pipeline.secrets masks them in
    anything printed, and a URI's are moved into the options (the path itself never carries them).
    `redact_keys` (names of further credential options) is ours and not passed on.
    """
    uri, creds = secrets.split_uri_credentials(uri)
    opts = {k: v for k, v in (storage_options or {}).items() if k != secrets.REDACT_KEYS}
    opts.update(creds)
    secrets.remember(storage_options)
    secrets.remember(creds)
    if uri.startswith("s3://"):
        endpoint = (
            opts.pop("endpoint_url", None)
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )
        if endpoint:
            opts["client_kwargs"] = {
                **(opts.get("client_kwargs") or {}),
                "endpoint_url": endpoint,
            }  # a copy: never the caller's
        # Listings must see what other processes just wrote (resume, incremental runs).
        opts.setdefault("use_listings_cache", False)
    elif uri.startswith("hf://"):
        # The Hub (huggingface_hub.HfFileSystem): the endpoint from the options or HF_ENDPOINT as
        # set now, a token from the options ({token: ...}) or HF_TOKEN / `hf auth login`, masked.
        # Only HfFileSystem's own options are passed: top-level options meant for S3 reach every
        # input, and their `token` (an AWS session token) must never be sent to the Hub.
        s3_like = any(k in opts for k in _S3_OPTION_NAMES)
        opts = {k: v for k, v in opts.items() if k in _HF_OPTION_NAMES and not (k == "token" and s3_like)}
        if os.environ.get("HF_ENDPOINT"):
            opts.setdefault("endpoint", os.environ["HF_ENDPOINT"].rstrip("/"))
        secrets.remember({"token": os.environ.get("HF_TOKEN")})
    fs, path = fsspec.core.url_to_fs(uri, **opts)
    return fs, path


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Inverse of `filesystem`: a path inside fs back to a URI that `filesystem` accepts."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return path
    return f"{protocol}://{path}"


def exists(uri: str, storage_options: StorageOptions | None = None) -> bool:
    fs, path = filesystem(uri, storage_options)
    return fs.exists(path)


def read_bytes(uri: str, storage_options: StorageOptions | None = None) -> bytes:
    fs, path = filesystem(uri, storage_options)
    with fs.open(path, "rb") as f:
        return f.read()


def write_atomic(
    uri: str, write: Callable[[IO[bytes]], object] | bytes, storage_options: StorageOptions | None = None
) -> None:
    """Write a file so that readers see either nothing or the whole file.

    Local: write to a hidden temporary name in the same directory, fsync, rename.
    S3: an object appears only when its upload completes, so the final key is written directly.
    """
    fs, path = filesystem(uri, storage_options)
    parent = posixpath.dirname(path) if is_remote(uri) else os.path.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if is_remote(uri):
        with fs.open(path, "wb") as f:
            f.write(write) if isinstance(write, bytes) else write(f)
        return
    tmp = os.path.join(parent, f"{TMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(path)}")
    try:
        with open(tmp, "wb") as f:
            f.write(write) if isinstance(write, bytes) else write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def list_files(uri: str, storage_options: StorageOptions | None = None) -> list[str]:
    """Files directly or recursively under a directory URI (sorted); [] when it does not exist."""
    fs, path = filesystem(uri, storage_options)
    if not fs.exists(path):
        return []
    return sorted(to_uri(fs, p) for p in fs.find(path))


def parquet_files(dir_uri: str, storage_options: StorageOptions | None = None) -> list[str]:
    """The Parquet files under a directory (sorted), without temporaries of an interrupted write."""
    return [
        u
        for u in list_files(dir_uri, storage_options)
        if u.endswith(".parquet") and not posixpath.basename(u).startswith(TMP_PREFIX)
    ]


def run_data_files(run_dir: str, storage_options: StorageOptions | None = None) -> list[str]:
    """The Parquet parts of a labeled run (`<run_dir>/data`); FileNotFoundError when there are none."""
    files = parquet_files(join(run_dir, "data"), storage_options)
    if not files:
        raise FileNotFoundError(f"no Parquet files under {join(run_dir, 'data')}")
    return files


def read_run_table(run_dir: str, storage_options: StorageOptions | None = None, columns: list[str] | None = None):
    """Every Parquet part of a labeled run as one Arrow table (only `columns`, when given), in file order."""
    tables = []
    for uri in run_data_files(run_dir, storage_options):
        fs, path = filesystem(uri, storage_options)
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f, columns=columns))
    return pa.concat_tables(tables, promote_options="default")


def remove(uri: str, storage_options: StorageOptions | None = None) -> None:
    fs, path = filesystem(uri, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def write_json(uri: str, obj: dict, storage_options: StorageOptions | None) -> None:
    """Every JSON artifact (run and curation manifests, markers, _run.json) goes out redacted."""
    data = json.dumps(secrets.redact(obj), indent=2, sort_keys=True, default=str).encode()
    write_atomic(uri, data, storage_options)


def read_json(uri: str, storage_options: StorageOptions | None = None) -> dict:
    return json.loads(read_bytes(uri, storage_options))


def versions() -> dict[str, str | None]:
    """Version stamps recorded in every manifest, so a run says what produced it (None: not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("armolabel", "ray", "torch", "transformers", "pyarrow", "datasets", "s3fs"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out
