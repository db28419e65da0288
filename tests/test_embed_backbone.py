"""Backbone specs, sources, fingerprints, and GGUF materialisation (real SmolLM2 GGUF)."""

import json

import numpy as np
import pytest

from pipeline.embed import BackboneSpec, EmbeddingEngine, TemplatePolicy, tokenize_many
from pipeline.embed import backbone as bb

CONVERSATIONS = [
    ([{"role": "user", "content": "Name three primary colours."}], "Red, yellow and blue."),
    (
        [
            {"role": "user", "content": "How do I boil an egg?"},
            {"role": "assistant", "content": "Put it in water."},
            {"role": "user", "content": "For how long?"},
        ],
        "About nine minutes for a hard-boiled egg.",
    ),
]


def test_spec_from_dict_and_validation():
    assert BackboneSpec.from_dict("smollm2") == BackboneSpec(path="smollm2")
    spec = BackboneSpec.from_dict({"path": "minilm", "kind": "encoder", "dtype": "float32"})
    assert (spec.path, spec.kind, spec.dtype, spec.device) == ("minilm", "encoder", "float32", "auto")
    assert BackboneSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown backbone settings"):
        BackboneSpec.from_dict({"path": "x", "precision": "fp8"})
    with pytest.raises(ValueError, match="kind"):
        BackboneSpec("smollm2", kind="seq2seq")


def test_sources(tmp_path, monkeypatch):
    smol = bb.resolve_source(BackboneSpec("smollm2"))
    assert smol.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf" and smol.local
    gguf_path = f"{smol.directory}/{smol.gguf_file}"
    direct = bb.resolve_source(BackboneSpec(gguf_path))
    assert (direct.directory, direct.gguf_file) == (smol.directory, smol.gguf_file)
    assert bb.resolve_source(BackboneSpec("minilm")).gguf_file is None
    with pytest.raises(FileNotFoundError):
        bb.resolve_source(BackboneSpec(str(tmp_path / "missing")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        bb.resolve_source(BackboneSpec("meta-llama/Llama-3-8B"))


def test_file_fingerprint_is_the_sha256_and_is_remembered(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setenv("ARMOLABEL_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"weights" * 1000)
    assert bb.file_sha256(f) == hashlib.sha256(b"weights" * 1000).hexdigest()
    index = json.loads((tmp_path / "cache" / "sha256.json").read_text())
    assert list(index.values()) == [hashlib.sha256(b"weights" * 1000).hexdigest()]
    f.write_bytes(b"other weights")  # new size and mtime: hashed again
    assert bb.file_sha256(f) == hashlib.sha256(b"other weights").hexdigest()


@pytest.mark.slow
def test_materialised_gguf_gives_identical_embeddings(tmp_path, monkeypatch):
    monkeypatch.setenv("ARMOLABEL_CACHE", str(tmp_path / "cache"))
    spec = BackboneSpec("smollm2")
    direct = bb.build_backbone(spec, materialise=False)
    assert direct.loaded_from == "gguf"
    first = bb.build_backbone(spec)  # writes the HF copy
    second = bb.build_backbone(spec)  # loads it
    copies = list((tmp_path / "cache" / "backbones").iterdir())
    assert len(copies) == 1 and not copies[0].name.startswith(".")  # renamed into place, no temp dir left
    assert {p.name for p in copies[0].iterdir()} >= {"config.json", "model.safetensors", "tokenizer_config.json"}
    assert first.loaded_from == second.loaded_from == "materialised"
    assert direct.fingerprint == first.fingerprint == second.fingerprint

    texts = ["Hello world", "<|im_start|>user\nÉté à Zürich — 東京<|im_end|>\n"]
    assert [direct.tokenizer(t)["input_ids"] for t in texts] == [second.tokenizer(t)["input_ids"] for t in texts]
    outputs = []
    for backbone in (direct, second):
        results = tokenize_many(
            backbone.tokenizer, [c[0] for c in CONVERSATIONS], [c[1] for c in CONVERSATIONS], TemplatePolicy()
        )
        outputs.append(EmbeddingEngine(backbone).embed([r.input_ids for r in results], [r.prompt_end for r in results]))
    np.testing.assert_array_equal(outputs[0].response, outputs[1].response)
    np.testing.assert_array_equal(outputs[0].prompt, outputs[1].prompt)
