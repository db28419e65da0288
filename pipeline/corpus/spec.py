"""What to read: an input spec, and the concrete files it names."""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

from pipeline import ids, objectives, storage
from pipeline.corpus.adapters import ADAPTERS, ALIASES, PRESETS, check_columns
from pipeline.schema import KINDS

FILE_FORMATS = ("auto", "jsonl", "json", "csv", "tsv", "parquet", "hf_dataset")

# Extensions recognised when a directory or glob is expanded, and what they mean.
_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl",
    ".ndjson": "jsonl",
    ".ndjson.gz": "jsonl",
    ".json": "json",
    ".json.gz": "json",
    ".csv": "csv",
    ".csv.gz": "csv",
    ".tsv": "tsv",
    ".tsv.gz": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
# Files that mark a `datasets.save_to_disk` directory (a Dataset, or a DatasetDict of splits).
HF_MARKERS = ("state.json", "dataset_dict.json")


class InputSpecError(ValueError):
    pass


@dataclass
class InputSpec:
    path: str | list[str]  # file, directory, glob or s3:// URI of any of those (or a list)
    format: str = "auto"  # adapter name, see pipeline.corpus.adapters.ADAPTERS
    source: str | None = None  # corpus name; default from the adapter, else dataset_source(file)
    columns: dict | None = None  # column mapping for the "mapping" adapter (or changes to a hub preset's)
    kind: str | None = None  # expected kind of every row (checked), e.g. "preference"
    file_format: str = "auto"  # jsonl | json | csv | tsv | parquet | hf_dataset; auto from the name
    storage_options: dict | None = None  # passed to pipeline.storage.filesystem
    options: dict = field(default_factory=dict)  # adapter options
    objectives: list | None = None  # objectives this input's ratings use (pipeline.objectives.Objective fields)
    revision: str | None = None  # hf:// paths: the branch, tag or commit to read (default: the path's, else main)

    def __post_init__(self):
        # Declared objectives first: the columns check below looks their names up. Registering
        # here (and in __setstate__) registers them in every process that holds the spec.
        try:
            objectives.register_all(self.objectives)
        except ValueError as e:
            raise InputSpecError(str(e)) from None

        if not self.path or not isinstance(self.path, (str, list)):
            raise InputSpecError(f"path: expected a non-empty string or list of strings, got {self.path!r}")
        self.format = ALIASES.get(self.format, self.format)
        if self.format not in ADAPTERS:
            raise InputSpecError(
                f"format: unknown adapter {self.format!r}; known: {sorted(ADAPTERS)} (or an alias: {sorted(ALIASES)})"
            )
        if self.file_format not in FILE_FORMATS:
            raise InputSpecError(f"file_format: expected one of {FILE_FORMATS}, got {self.file_format!r}")
        if self.kind is not None and self.kind not in KINDS:
            raise InputSpecError(f"kind: expected one of {KINDS}, got {self.kind!r}")
        if self.format == "mapping" and not self.columns:
            raise InputSpecError("format 'mapping' needs columns, e.g. {'prompt': 'question', 'response': 'answer'}")
        if self.columns is not None and not isinstance(self.columns, dict):
            raise InputSpecError(f"columns: expected a mapping, got {type(self.columns).__name__}")
        if self.columns is not None and self.format in PRESETS:
            # A hub preset adjusted by the spec: its columns with these replacing (null removes one).
            if not isinstance(self.options, dict):
                raise InputSpecError(f"options: expected a mapping, got {type(self.options).__name__}")
            preset_columns, preset_options = PRESETS[self.format]
            self.source = self.source or ADAPTERS[self.format].default_source
            self.columns = {k: v for k, v in {**preset_columns, **self.columns}.items() if v is not None}
            self.options = {**preset_options, **self.options}
            self.format = "mapping"
        if self.columns is not None and self.format not in ("mapping", "auto"):
            raise InputSpecError(f"columns: only used by format 'mapping', not {self.format!r}")
        if self.columns is not None:
            if self.format == "auto":
                self.format = "mapping"  # giving columns means asking for the mapping adapter
            try:
                check_columns(self.columns)
            except (ValueError, KeyError) as e:
                raise InputSpecError(str(e).strip('"')) from None
        if not isinstance(self.options, dict):
            raise InputSpecError(f"options: expected a mapping, got {type(self.options).__name__}")
        self.storage_options = self.storage_options or None
        if self.revision is not None:
            if not isinstance(self.revision, str) or not self.revision:
                raise InputSpecError(f"revision: expected a branch, tag or commit name, got {self.revision!r}")
            if not all(p.startswith("hf://") for p in self.paths()):
                raise InputSpecError("revision: only for hf:// paths (a Hub dataset's branch, tag or commit)")
        for p in self.paths():
            if isinstance(p, str) and p.startswith("hf://"):
                hub_path(p, self.revision)  # a malformed Hub path is a spec error
        # Files this spec shares with other specs of its run -> the source name that tells its
        # reading apart in shard ids (set by assign_readings; not a key of the spec, not hashed).
        self.readings: dict[str, str] = {}

    def __setstate__(self, state: dict) -> None:
        # Unpickling (a Ray read task receiving the spec) skips __post_init__: register the
        # declared objectives in that process too, or the adapters could not look them up.
        self.__dict__.update(state)
        if self.objectives:
            objectives.register_all(self.objectives)

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        if isinstance(d, InputSpec):
            return d
        if not isinstance(d, dict):
            raise InputSpecError(f"input spec: expected a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputSpecError(f"input spec: unknown key(s) {unknown}; known keys: {sorted(known)}")
        if "path" not in d:
            raise InputSpecError("input spec: missing required key 'path'")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def paths(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)

    def identity(self) -> dict:
        """What decides how this spec reads a file: every key but where the files are (`path`)
        and how to reach them (`storage_options`), after presets are expanded."""
        d = self.to_dict()
        for key in ("path", "storage_options", "readings", "revision"):
            d.pop(key, None)
        return d

    def key(self) -> str:
        """Short id of identity(): one file under two specs is two inputs (manifests, incremental skip)."""
        return ids.spec_key(self.identity())

    def source_for(self, uri: str) -> str | None:
        """The source name this spec gives the rows of `uri`; None for format 'auto' without a
        `source` (each record's detected adapter names it)."""
        if self.source:
            return self.source
        if self.format == "auto":
            return None
        return ADAPTERS[self.format].default_source or dataset_source(uri)


# `train-00000-of-00002`: one shard file of a split, as `datasets` / `push_to_hub` name them.
_SHARD_FILE = re.compile(r"^(?P<split>.+?)-\d+-of-\d+$")
# `<config>/<split>/0000.parquet` (the Hub's parquet conversion): numbered files in a split folder.
_NUMBERED_FILE = re.compile(r"^\d+$")
_SPLIT_FOLDER = re.compile(r"^(train|test|validation|valid|dev|eval)([_-].*)?$")


def dataset_source(uri: str) -> str:
    """The default source name of a file no spec or adapter names: its dataset and split when
    the file is one shard of a split, else the file's name (its stem).

    - `<dataset>/<split>-NNNNN-of-NNNNN.<ext>` and `<dataset>/data/<split>-NNNNN-of-NNNNN.<ext>`
      (push_to_hub and hub downloads) -> `<dataset>/<split>`;
    - `<dataset>/<config>/<split>/NNNN.<ext>` (the Hub's parquet conversion) -> `<dataset>/<split>`
      for the `default` config, else `<dataset>/<config>/<split>`;
    - the dataset folder is the one above: a revision suffix (`name@main`, as in hf:// paths) is
      dropped, and in a huggingface_hub cache (`datasets--<org>--<name>/snapshots/<hash>/`) it is
      `<name>`.
    So every shard file of one split is one source (one set of per-source counts and heads).
    """
    path = uri.split("://", 1)[-1].rstrip("/").replace("\\", "/")
    dirs = [p for p in path.split("/")[:-1] if p]
    stem = file_stem(uri)
    config = None
    if m := _SHARD_FILE.match(stem):
        split = m.group("split")
    elif _NUMBERED_FILE.match(stem) and dirs and _SPLIT_FOLDER.match(dirs[-1]):
        split = dirs.pop()
        if len(dirs) >= 2:
            config = dirs.pop()
    else:
        return stem
    if dirs and dirs[-1] == "data":
        dirs.pop()
    if len(dirs) >= 3 and dirs[-2] == "snapshots" and dirs[-3].startswith("datasets--"):
        dataset = dirs[-3].split("--")[-1]
    else:
        dataset = dirs[-1].split("@", 1)[0] if dirs else ""
    parts = [dataset, config if config not in (None, "default") else None, split]
    return "/".join(p for p in parts if p)


def file_stem(uri: str) -> str:
    name = posixpath.basename(uri.rstrip("/").replace("\\", "/"))
    for ext in (".gz", ".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".pq", ".arrow"):
        if name.lower().endswith(ext) and len(name) > len(ext):
            name = name[: -len(ext)]
    return name


def assign_readings(specs: list[InputSpec], files: list[list[str]]) -> None:
    """Check and record how the specs of one run share files (`files[i]`: spec i's expansion).

    One file under several different specs is several sources of units: each reading must name a
    source of its own (row and unit ids hash the source with the content, so equal sources could
    give two readings of one row one id), and its shard ids carry that source (ids.shard_id).
    Two specs with the same identity() naming one file are a config error, as is a shared file
    read by a format 'auto' spec without `source` (its sources are known only per record).
    A file read by one spec gets no qualifier: its ids are those it always had.
    """
    readers: dict[str, list[int]] = {}
    for i, uris in enumerate(files):
        for uri in dict.fromkeys(uris):
            readers.setdefault(uri, []).append(i)
    for spec in specs:
        spec.readings = {}
    for uri, which in readers.items():
        if len(which) < 2:
            continue
        by_key: dict[str, int] = {}
        by_source: dict[str, int] = {}
        for i in which:
            other = next(j for j in which if j != i)
            key = specs[i].key()
            if key in by_key:
                raise InputSpecError(
                    f"inputs[{by_key[key]}] and inputs[{i}] read {uri} with the same spec: remove one "
                    f"(within one spec a file is read once, however many of its paths match it)"
                )
            by_key[key] = i
            source = specs[i].source_for(uri)
            if source is None:
                raise InputSpecError(
                    f"inputs[{i}]: {uri} is also read by inputs[{other}]; format 'auto' names sources "
                    f"per record, so give inputs[{i}] a `source:` of its own"
                )
            if source in by_source:
                raise InputSpecError(
                    f"inputs[{by_source[source]}] and inputs[{i}] read {uri} as one source {source!r}: "
                    f"a source is part of each unit's id, so give them distinct `source:` names"
                )
            by_source[source] = i
        for source, i in by_source.items():
            specs[i].readings[uri] = source


def expand_all(specs: list[InputSpec]) -> list[list[str]]:
    """Every spec's files (expand_files), with the sharing between specs checked and recorded
    (assign_readings): the one expansion a run or a pure read should use."""
    files = [expand_files(spec) for spec in specs]
    assign_readings(specs, files)
    return files


def file_format_of(uri: str, spec: InputSpec | None = None, is_dir: bool = False) -> str | None:
    """The file format for one concrete input: the spec's choice, else the directory layout or
    the file name's extension; None when unknown."""
    if spec is not None and spec.file_format != "auto":
        return spec.file_format
    if is_dir:
        return "hf_dataset"
    name = uri.lower().rstrip("/")
    for ext in sorted(_EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return _EXTENSIONS[ext]
    return None


def _normalise_local(path: str) -> str:
    # The same file named two ways ("a/../b", relative) must get the same source_uri and shard ids.
    return os.path.abspath(path)


def _is_hf_dir(fs, path: str) -> bool:
    return any(fs.exists(posixpath.join(path, m)) for m in HF_MARKERS)


_HF_PATH = re.compile(
    r"^hf://(?P<type>datasets|models|spaces)/(?P<repo>[^/@]+/[^/@]+)(?:@(?P<rev>[^/]+))?(?P<rest>/.*)?$"
)


def hub_path(pattern: str, revision: str | None = None) -> str:
    """An hf:// path with the spec's `revision` in it (`hf://datasets/<org>/<name>@<rev>/<files>`;
    a revision holding '/', e.g. refs/convert/parquet, is URL-quoted as HfFileSystem expects)."""
    m = _HF_PATH.match(pattern)
    if m is None:
        raise InputSpecError(
            f"path: {pattern!r} is not a Hub path; expected hf://datasets/<org>/<name>[@<revision>]/<files>"
        )
    in_path = unquote(m.group("rev")) if m.group("rev") else None
    if revision and in_path and in_path != revision:
        raise InputSpecError(f"revision: {revision!r} differs from the revision in the path {pattern!r}")
    rev = revision or in_path
    at = f"@{quote(rev, safe='')}" if rev else ""
    return f"hf://{m.group('type')}/{m.group('repo')}{at}{m.group('rest') or ''}"


def _offline_hub_path(pattern: str) -> str:
    """Offline (HF_HUB_OFFLINE): the hf:// path inside huggingface_hub's local cache, where an
    earlier `hf download` / snapshot_download of the repository put it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    m = _HF_PATH.match(pattern)
    assert m is not None  # hub_path checked it
    rev = unquote(m.group("rev")) if m.group("rev") else None
    repo_type = m.group("type")[:-1]
    try:
        folder = snapshot_download(m.group("repo"), repo_type=repo_type, revision=rev, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as e:
        name = m.group("repo") + (f"@{rev}" if rev else "")
        raise InputSpecError(
            f"path: {pattern!r}: offline (HF_HUB_OFFLINE is set) and {name} is not in the huggingface_hub "
            f"cache; download it first (hf download --repo-type {repo_type} {m.group('repo')}) ({e})"
        ) from None
    return folder.rstrip("/") + (m.group("rest") or "")


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def expand_files(spec: InputSpec) -> list[str]:
    """Sorted concrete inputs named by the spec: files, plus `save_to_disk` directories (each one input).

    A directory is searched recursively for files with a known extension (or every file when the
    spec names a file_format); hidden files are skipped.
    """
    found: set[str] = set()
    for named in spec.paths():
        pattern = named
        if named.startswith("hf://"):
            pattern = hub_path(named, spec.revision)
            if _hub_offline():
                pattern = _offline_hub_path(pattern)
        fs, path = storage.filesystem(pattern, spec.storage_options)
        remote = storage.is_remote(pattern)
        try:
            if pattern.startswith("hf://"):
                fs.resolve_path(path)  # no such repository or revision, or no access: say which
            if any(c in pattern for c in "*?["):
                # As in a shell, a wildcard does not match hidden names (".tmp-..." files of atomic writes).
                matches = sorted(m for m in fs.glob(path) if not posixpath.basename(m.rstrip("/")).startswith("."))
            else:
                matches = [path] if fs.exists(path) else []
        except Exception as e:  # noqa: BLE001 - the Hub's answers (no such repo or revision, no access) name the path
            if not pattern.startswith("hf://"):
                raise
            raise InputSpecError(f"path: {named!r}: {type(e).__name__}: {e}") from None
        if not matches:
            raise InputSpecError(f"no input matches {named!r}")
        inputs: set[str] = set()
        for m in matches:
            if fs.isdir(m):
                inputs.update(_expand_dir(fs, m, spec))
            else:
                inputs.add(storage.to_uri(fs, m))
        if not inputs:
            raise InputSpecError(
                f"no readable input files under {pattern!r} "
                f"(looked for {sorted(set(_EXTENSIONS))} and datasets.save_to_disk folders)"
            )
        found |= inputs
        if not remote:
            found = {_normalise_local(u) for u in found}
    return sorted(found)


def _expand_dir(fs, path: str, spec: InputSpec) -> list[str]:
    if _is_hf_dir(fs, path):
        return [storage.to_uri(fs, path)]
    files = fs.find(path)
    hf_dirs = sorted({posixpath.dirname(f) for f in files if posixpath.basename(f) in HF_MARKERS})
    # A split folder inside a DatasetDict folder belongs to the DatasetDict.
    hf_dirs = [d for d in hf_dirs if not any(d != o and d.startswith(o.rstrip("/") + "/") for o in hf_dirs)]
    out = [storage.to_uri(fs, d) for d in hf_dirs]
    for f in files:
        rel = f[len(path) :].lstrip("/")
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue
        if any(f.startswith(d.rstrip("/") + "/") for d in hf_dirs):
            continue
        if spec.file_format != "auto" or file_format_of(f) is not None:
            out.append(storage.to_uri(fs, f))
    return out
