"""Where bytes live: local paths, s3:// and hf:// (Hub, read-only) URIs behind one fsspec interface.

Every read and write in the project goes through here, so that local disk and S3 behave the
same, and so that files become visible only once complete (atomic commit).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import json
import logging
import os
import platform
import posixpath
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from importlib import metadata
from typing import IO, Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import secrets

StorageOptions = dict[str, Any]


TMP_PREFIX = ".tmp-"  # temporary names of atomic writes (local files)
_HF_OPTION_NAMES = frozenset({"endpoint", "token", "block_size", "expand_info", "max_workers"})
_S3_OPTION_NAMES = frozenset({"key", "secret", "endpoint_url", "client_kwargs", "config_kwargs", "profile", "anon"})


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


# ---- the store handle: one resolved filesystem per (protocol, options), per process ----------

# S3 request policy, chosen for a run that makes thousands of requests a second and must ride
# out throttling: botocore's "standard" retry mode (exponential backoff with jitter, capped at
# 20 s) retries 503 SlowDown, 500/502/504, throttling codes, connection resets and read timeouts;
# 8 attempts span about a minute of backoff. s3fs retries on top of that what botocore cannot see:
# a body cut off mid-read (IncompleteRead), parser errors from a throttled response. A stalled
# request is given up after `read_timeout` seconds and retried. Every value is overridable in
# storage_options (`config_kwargs`, `retries`), which win over these.
S3_DEFAULTS: dict[str, Any] = {
    "config_kwargs": {
        "retries": {"max_attempts": 8, "mode": "standard"},
        "connect_timeout": 10,
        "read_timeout": 30,
    },
    "retries": 5,  # s3fs's own layer (see above)
}

# A config check (`--check`, `jobs.schedule --dry-run`) probes each store once: one that cannot be
# reached (no route, no credentials the endpoint takes) is reported in seconds, where the job's
# policy above would back off for minutes. Options given in storage_options still win.
S3_PROBE_DEFAULTS: dict[str, Any] = {
    "config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"}, "connect_timeout": 5, "read_timeout": 30},
    "retries": 1,
}
_probing = 0  # > 0 while a check runs in this process (see `probing`)


@contextlib.contextmanager
def probing() -> Iterator[None]:
    """Stores resolved inside use S3_PROBE_DEFAULTS (a decorator too: `@storage.probing()`)."""
    global _probing
    _probing += 1
    try:
        yield
    finally:
        _probing -= 1


class FaultCounts:
    """Retried storage requests seen in this process (the job adds them to its manifest).

    `retries` counts every request re-sent after a failed attempt (botocore's retry loop: a
    throttled, failed, reset or timed-out request); `reads_retried` the body reads s3fs re-issued.
    `take()` returns the counts since the previous take and starts again, so that each task can
    report what happened while it ran (a process runs one task at a time)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self._counts[kind] += n

    def take(self) -> dict[str, int]:
        with self._lock:
            out, self._counts = dict(self._counts), Counter()
        return out


FAULTS = FaultCounts()


def _count_retry(request=None, **_kwargs) -> None:
    """botocore `request-created` hook: a request whose retry context says attempt > 1 is a retry."""
    ctx = getattr(request, "context", None) or {}
    if (ctx.get("retries") or {}).get("attempt", 1) > 1:
        FAULTS.add("retries")


class _S3fsRetryFilter(logging.Filter):
    """s3fs says only in its debug log that it re-issues a request ('Retryable error: ...', a
    SlowDown it retries itself): count those, and let through only what the logger's own level
    would have let through, so nobody sees debug lines they did not ask for."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else ""
        if msg.startswith("Retryable error") or (
            msg.startswith("Client error (maybe retryable)") and "SlowDown" in str(record.args)
        ):
            FAULTS.add("reads_retried")
        return record.levelno >= self.level


_S3FS_HOOKED = False


def _hook_s3fs_log() -> None:
    global _S3FS_HOOKED
    if _S3FS_HOOKED:
        return
    logger = logging.getLogger("s3fs")
    logger.addFilter(_S3fsRetryFilter(logger.getEffectiveLevel()))
    logger.setLevel(min(logger.getEffectiveLevel(), logging.DEBUG))
    _S3FS_HOOKED = True


def _merge(defaults: dict, given: dict) -> dict:
    """`given` over `defaults`, one level of nested mappings merged (config_kwargs, client_kwargs)."""
    out = copy.deepcopy(defaults)
    for k, v in given.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass
class Store:
    """One resolved store: the fsspec filesystem of a protocol with its options (credentials,
    retries, timeouts), what it can guarantee, and where its retries are counted.

    Resolved once per process for each distinct (protocol, options) by `store()`; every
    function below goes through it. Pickles as its inputs (a Ray task resolves its own)."""

    protocol: str
    options: dict
    fs: fsspec.AbstractFileSystem = dataclass_field(repr=False, compare=False)

    @property
    def conditional_writes(self) -> bool:
        """Create-if-absent and replace-if-unchanged writes (what a lease needs): S3 has them
        (If-None-Match / If-Match), a local disk has O_EXCL and atomic rename."""
        return self.protocol in ("s3", "file")

    @property
    def multipart(self) -> bool:
        return self.protocol == "s3"

    def __reduce__(self):
        return (_resolve, (self.protocol, self.options))

    # ---- conditional writes (compare-and-swap on one small object) ----------------------

    def read_versioned(self, path: str) -> tuple[bytes, str] | None:
        """An object's bytes and the version tag a conditional replace compares against
        (S3: its ETag; local: a content hash); None when it does not exist."""
        if self.protocol == "s3":
            for _ in range(5):  # the tag and the bytes must belong to the same version
                try:
                    before = self.fs.info(path, refresh=True)["ETag"]
                    data = self.fs.cat_file(path)
                    after = self.fs.info(path, refresh=True)["ETag"]
                except FileNotFoundError:
                    return None
                if before == after:
                    return data, after
            raise OSError(f"{path} keeps changing while it is read")
        if self.protocol == "file":
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                return None
            return data, hashlib.sha256(data).hexdigest()
        raise UnsupportedStore(f"{self.protocol}:// has no conditional writes")

    def create_exclusive(self, path: str, data: bytes) -> str | None:
        """Write `path` only if it does not exist: the new version tag, or None when it exists. An
        ambiguous outcome (the write was applied but its answer lost, then the retry refused)
        also reads None: callers read the object back to tell (their content carries a token)."""
        if self.protocol == "s3":
            try:
                resp = self.fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                return None
            except OSError as e:
                if e.errno == errno.EINVAL:  # s3fs's PreconditionFailed
                    return None
                raise
            return _etag(resp) or self._tag_of(path)
        if self.protocol == "file":
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = os.path.join(os.path.dirname(path), f"{TMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(path)}")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # atomic, and fails when path exists: the whole file or nothing
            except FileExistsError:
                return None
            finally:
                os.remove(tmp)
            return hashlib.sha256(data).hexdigest()
        raise UnsupportedStore(f"{self.protocol}:// has no conditional writes")

    def replace_if(self, path: str, data: bytes, tag: str) -> str | None:
        """Replace `path` only if its version tag is still `tag` (see read_versioned): the new
        tag, or None when the object changed (or is gone)."""
        if self.protocol == "s3":
            try:
                resp = self.fs.pipe_file(path, data, IfMatch=tag)
            except (FileNotFoundError, FileExistsError):
                return None
            except OSError as e:
                if e.errno == errno.EINVAL:
                    return None
                raise
            return _etag(resp) or self._tag_of(path)
        if self.protocol == "file":
            # A lock file serialises compare-and-replace among processes (flock; NFSv4 too).
            import fcntl

            with open(f"{path}.lock", "a+b") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                current = self.read_versioned(path)
                if current is None or current[1] != tag:
                    return None
                write_atomic(path, data)
            return hashlib.sha256(data).hexdigest()
        raise UnsupportedStore(f"{self.protocol}:// has no conditional writes")

    def _tag_of(self, path: str) -> str | None:
        got = self.read_versioned(path)
        return got[1] if got else None

    # ---- what an interrupted writer leaves --------------------------------------------

    def abandoned_uploads(self, prefix: str) -> list[tuple[str, str]]:
        """(key path, upload id) of multipart uploads begun under `prefix` and never completed
        or aborted (a writer killed mid-upload): invisible to listings, billed until aborted."""
        if self.protocol != "s3":
            return []
        bucket, key, _ = self.fs.split_path(prefix)
        out: list[tuple[str, str]] = []
        marker: dict[str, str] = {}
        while True:
            resp = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key.rstrip("/") + "/", **marker)
            out += [(f"{bucket}/{u['Key']}", u["UploadId"]) for u in resp.get("Uploads", [])]
            if not resp.get("IsTruncated"):
                return out
            marker = {"KeyMarker": resp["NextKeyMarker"], "UploadIdMarker": resp["NextUploadIdMarker"]}

    def abort_upload(self, path: str, upload_id: str) -> None:
        bucket, key, _ = self.fs.split_path(path)
        self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)


def _etag(resp: Any) -> str | None:
    return resp.get("ETag") if isinstance(resp, dict) else None


class UnsupportedStore(RuntimeError):
    """The store cannot give a guarantee the job relies on (e.g. conditional writes)."""


_STORES: dict[str, Store] = {}
_STORES_LOCK = threading.Lock()


def _protocol(uri: str) -> str:
    return uri.split("://", 1)[0] if is_remote(uri) else "file"


def _resolve(protocol: str, opts: dict) -> Store:
    key = json.dumps([protocol, opts], sort_keys=True, default=repr)
    with _STORES_LOCK:
        found = _STORES.get(key)
        if found is not None:
            return found
        kwargs = copy.deepcopy(opts)  # botocore rewrites its config in place
        if protocol == "s3":
            import aiobotocore.session

            _hook_s3fs_log()
            session = aiobotocore.session.AioSession()
            session.register("request-created.s3", _count_retry)
            kwargs["session"] = session
            kwargs["skip_instance_cache"] = True  # this cache is the one instance cache
        fs = fsspec.filesystem(protocol, **kwargs)
        made = _STORES[key] = Store(protocol, opts, fs)
        return made


def store(uri: str, storage_options: StorageOptions | None = None) -> Store:
    """The store holding `uri`, resolved once per process for these options.

    storage_options go to s3fs for s3:// (e.g. {"endpoint_url": ..., "profile": ...}), over
    S3_DEFAULTS. Credentials are best left to botocore's own lookup (AWS_* environment variables,
    ~/.aws profiles, instance or pod roles; docs/operations.md); given here (key/secret/token) or in
    the URI (s3://KEY:SECRET@bucket/...), they are remembered so that pipeline.secrets masks them in
    anything printed, and a URI's are moved into the options (the path itself never carries them).
    `redact_keys` (names of further credential options) is ours and not passed on.
    """
    uri, creds = secrets.split_uri_credentials(uri)
    opts = {k: v for k, v in (storage_options or {}).items() if k != secrets.REDACT_KEYS}
    opts.update(creds)
    secrets.remember(storage_options)
    secrets.remember(creds)
    protocol = _protocol(uri)
    if protocol == "s3":
        endpoint = (
            opts.pop("endpoint_url", None)
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )
        if endpoint:
            opts["client_kwargs"] = {**(opts.get("client_kwargs") or {}), "endpoint_url": endpoint}
        # Listings must see what other processes just wrote (resume, incremental runs).
        opts.setdefault("use_listings_cache", False)
        opts = _merge(S3_PROBE_DEFAULTS if _probing else S3_DEFAULTS, opts)
    elif protocol == "hf":
        # The Hub (huggingface_hub.HfFileSystem): the endpoint from the options or HF_ENDPOINT as
        # set now, a token from the options ({token: ...}) or HF_TOKEN / `hf auth login`, masked.
        # Only HfFileSystem's own options are passed: top-level options meant for S3 reach every
        # input, and their `token` (an AWS session token) must never be sent to the Hub.
        s3_like = any(k in opts for k in _S3_OPTION_NAMES)
        opts = {k: v for k, v in opts.items() if k in _HF_OPTION_NAMES and not (k == "token" and s3_like)}
        if os.environ.get("HF_ENDPOINT"):
            opts.setdefault("endpoint", os.environ["HF_ENDPOINT"].rstrip("/"))
        secrets.remember({"token": os.environ.get("HF_TOKEN")})
    return _resolve(protocol, opts)


def filesystem(uri: str, storage_options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for a URI (its resolved `store`) and the path within it."""
    st = store(uri, storage_options)
    bare, _ = secrets.split_uri_credentials(uri)
    return st.fs, _strip_protocol(st.fs, bare)


def _strip_protocol(fs: fsspec.AbstractFileSystem, uri: str) -> str:
    return fs._strip_protocol(uri)


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
    S3: an object appears only when its upload completes, so the final key is written directly;
    a writer that fails part-way discards its upload (a plain `with open` would complete it and
    publish the partial file). One killed outright leaves at most an unfinished multipart upload,
    which `Store.abandoned_uploads` finds and the labeling job's resume aborts.
    """
    fs, path = filesystem(uri, storage_options)
    parent = posixpath.dirname(path) if is_remote(uri) else os.path.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if is_remote(uri):
        f = fs.open(path, "wb")
        try:
            f.write(write) if isinstance(write, bytes) else write(f)
        except BaseException:
            if hasattr(f, "discard"):
                f.discard()
            raise
        f.close()
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


# ---- a labeled run's layout (written by pipeline.labeling; read here by every consumer) -----

SHARDS_DIR = "_shards"  # <run_dir>/_shards/<shard_id>.json: one commit marker per complete shard
RUN_IDENTITY = "_run.json"  # written when a labeling run starts
PART_SUFFIX = ".parquet"


def part_name(shard_id: str, first: int, last: int) -> str:
    """A part file holds units first..last of one shard: `<shard_id>-<first>-<last>.parquet`."""
    return f"{shard_id}-{first:07d}-{last:07d}{PART_SUFFIX}"


def shard_of_part(file_name: str) -> str:
    """Inverse of part_name for the shard id (shard ids themselves contain dashes)."""
    stem = file_name[: -len(PART_SUFFIX)] if file_name.endswith(PART_SUFFIX) else file_name
    return stem.rsplit("-", 2)[0]


def committed_shards(run_dir: str, storage_options: StorageOptions | None = None) -> set[str]:
    """Ids of the run's committed shards (those with a marker): one listing, no reads."""
    return {
        posixpath.basename(u)[: -len(".json")]
        for u in list_files(join(run_dir, SHARDS_DIR), storage_options)
        if u.endswith(".json")
    }


def read_markers(run_dir: str, storage_options: StorageOptions | None = None) -> list[dict]:
    """Every commit marker of the run, read in one batched call (s3fs fetches them concurrently)."""
    uris = [u for u in list_files(join(run_dir, SHARDS_DIR), storage_options) if u.endswith(".json")]
    if not uris:
        return []
    fs, _ = filesystem(uris[0], storage_options)
    blobs = fs.cat([_strip_protocol(fs, u) for u in uris], on_error="raise")
    return [json.loads(blob) for blob in blobs.values()]


def named_parts(markers) -> set[str]:
    """`<sub>/<file name>` of every part file the markers name (data/ and quarantine/): the run's
    committed parts, and nothing else."""
    out = set()
    for m in markers:
        for uri in m.get("files", []):
            parts = uri.rstrip("/").rsplit("/", 2)
            out.add(f"{parts[-2]}/{parts[-1]}")
    return out


def run_data_files(run_dir: str, storage_options: StorageOptions | None = None, sub: str = "data") -> list[str]:
    """The committed Parquet parts of a labeled run (`<run_dir>/data`, sorted); FileNotFoundError
    when there are none.

    A part counts only when a shard's marker names it: a part of a shard without a marker was left
    by an interrupted attempt, and a part beside a committed shard's own (another unit range: a
    late or retried write, a previous driver's task) holds units the named parts already have. So
    a reader never sees a partial shard or a unit twice, even while a run is crashed, resuming or
    still going; the next attempt deletes both kinds. Directories that no labeling run wrote (no
    `_run.json`) are read whole."""
    files = parquet_files(join(run_dir, sub), storage_options)
    if exists(join(run_dir, RUN_IDENTITY), storage_options):
        named = named_parts(read_markers(run_dir, storage_options))
        files = [u for u in files if f"{sub}/{posixpath.basename(u)}" in named]
    if not files:
        raise FileNotFoundError(f"no committed Parquet files under {join(run_dir, sub)}")
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
