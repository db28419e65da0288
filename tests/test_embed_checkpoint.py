"""ArmoRM-layout checkpoints as a backbone source (pipeline/embed/checkpoint.py), tested through the
path production takes: export, then `checkpoint_backbone` + EmbeddingEngine + heads, as the
labeling job's scoring stage does, against the independent first-pad reader of
tests/checkpoint_reference.py (transformers' own loader, right-padded batches, the reward at the
token before the FIRST pad, as the released class reads it).

Backbones here are tiny random Llamas (format tests) with SmolLM2's real tokenizer; the real
SmolLM2 weights are exported and checked in test_embed_checkpoint_smollm2.py."""

import json
import pathlib
import pickle
import shutil

import numpy as np
import pytest
import torch
from checkpoint_reference import first_pad_reference, labeling_path
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

from pipeline.corpus import InputSpec, read_units
from pipeline.embed.backbone import BackboneSpec, load_tokenizer
from pipeline.embed.checkpoint import (
    checkpoint_backbone,
    checkpoint_fingerprint,
    dedicated_pad_id,
    export_armorm_checkpoint,
    load_armorm_checkpoint,
    read_objective_names,
)
from pipeline.embed.templating import TemplatePolicy, tokenize_many
from pipeline.heads.checkpoint import CheckpointError
from pipeline.heads.gating import GatingNetwork
from pipeline.heads.model import ArmoHeads

K, H = 5, 64
SMOL_VOCAB, SMOL_EOS = 49152, 2  # SmolLM2: 49,152 ids, pad = eos = <|im_end|> (id 2)


def tiny_llama_config(vocab=SMOL_VOCAB, hidden=H, pad=SMOL_EOS):
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        pad_token_id=pad,
        bos_token_id=1,
        eos_token_id=2,
        max_position_embeddings=256,
    )


def make_heads(hidden=H, seed=0):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed + 1)
    gating = GatingNetwork(hidden, K, hidden_dim=48, n_hidden=3)
    with torch.no_grad():
        gating.logit_scale.fill_(1.3)
        for layer in gating.layers:
            layer.weight.mul_(8)  # logits of a size where temperature and the softmax axis matter
    T = np.eye(K)
    T[1, :] -= [0.05, 1.0, 0.2, 0.0, 0.125]
    return ArmoHeads(
        [f"tiny.obj{i}" for i in range(K)], rng.normal(size=(K, hidden)) * 0.3, T, gating, verbosity_index=1
    )


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(BackboneSpec(path="smollm2"))


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return LlamaModel(tiny_llama_config()).eval()


@pytest.fixture(scope="module")
def heads():
    return make_heads()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, backbone, heads, tokenizer):
    out = tmp_path_factory.mktemp("ckpt") / "armo"
    export_armorm_checkpoint(heads, backbone, str(out), tokenizer=tokenizer, shard_size=2_000_000)
    return out


@pytest.fixture(scope="module")
def conversations(shared_data, tokenizer):
    """Real conversations (LLMBar), tokenized with SmolLM2's chat template, short enough for the tiny model."""
    units = read_units(InputSpec(str(shared_data / "llmbar" / "LLMBar_Natural.json"))).to_pylist()[:24]
    results = tokenize_many(
        tokenizer,
        [u["prompt"] for u in units],
        [u["response"] for u in units],
        TemplatePolicy(max_tokens=200, overflow="quarantine"),
    )
    good = [r for r in results if not isinstance(r, Exception)]
    assert len(good) >= 10
    return [r.input_ids for r in good], [r.prompt_end for r in good]


# --- layout -------------------------------------------------------------------------------------


def test_export_writes_the_released_layout_with_a_dedicated_pad(exported, heads, backbone):
    config = json.loads((exported / "config.json").read_text())
    assert config["num_objectives"] == K and config["gating_temperature"] == 10.0
    assert config["gating_hidden_dim"] == 48 and config["gating_n_hidden"] == 3
    assert config["model_type"] == "llama" and config["hidden_size"] == H and config["num_hidden_layers"] == 2
    # SmolLM2's pad is <|im_end|>: the export adds [PAD] as id 49152 and grows the vocabulary by one
    assert config["pad_token_id"] == SMOL_VOCAB and config["vocab_size"] == SMOL_VOCAB + 1
    assert config["eos_token_id"] == SMOL_EOS
    tc = json.loads((exported / "tokenizer_config.json").read_text())
    assert tc["pad_token"] == "[PAD]" and tc["eos_token"] == "<|im_end|>"
    assert json.loads((exported / "special_tokens_map.json").read_text())["pad_token"] == "[PAD]"
    added = [t for t in json.loads((exported / "tokenizer.json").read_text())["added_tokens"] if t["id"] == SMOL_VOCAB]
    assert added == [dict(added[0], content="[PAD]", special=True)]
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((exported / s).is_file() for s in shards)
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    names = set(index["weight_map"])
    assert {"regression_layer.weight", "reward_transform_matrix", "gating.logit_scale"} <= names
    assert {f"gating.layers.{i}.{p}" for i in range(4) for p in ("weight", "bias")} <= names
    assert not any(n.startswith("lm_head") for n in names)
    assert len({n for n in names if n.startswith("model.")}) == len(backbone.state_dict())
    assert sorted(p.name for p in exported.iterdir() if not p.name.startswith("model-")) == [
        "chat_template.jinja",
        "config.json",
        "model.safetensors.index.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]  # no generation_config: a reward model does not generate


def test_roundtrip_restores_heads_and_backbone_exactly(exported, heads, backbone):
    config, weights, loaded = load_armorm_checkpoint(str(exported))
    assert loaded.fingerprint == heads.fingerprint
    assert loaded.objectives == heads.objectives and loaded.verbosity_index == 1
    state, original = weights.load(), backbone.state_dict()
    assert set(state) == set(original)
    for name, value in original.items():
        if name == "embed_tokens.weight":  # one row more, for [PAD]: the mean of the others
            assert state[name].shape == (SMOL_VOCAB + 1, H) and torch.equal(state[name][:SMOL_VOCAB], value)
            torch.testing.assert_close(state[name][SMOL_VOCAB], value.mean(0))
        else:
            assert torch.equal(state[name], value), name


# --- scoring: the labeling path against the released rule ------------------------------------


@pytest.mark.parametrize("token_budget,rows_per_batch", [(600, 4), (4096, 24)])
def test_labeling_path_matches_first_pad_reading_on_padded_batches(
    exported, conversations, token_budget, rows_per_batch
):
    seqs, ends = conversations
    backbone, _, out = labeling_path(exported, seqs, ends, token_budget)
    assert backbone.tokenizer.pad_token_id == SMOL_VOCAB
    assert not any(SMOL_VOCAB in s for s in seqs)
    ref = first_pad_reference(exported, seqs, ends, rows_per_batch)
    np.testing.assert_array_equal(ref["position"], [len(s) - 1 for s in seqs])  # the last real token
    np.testing.assert_allclose(out.score, ref["score"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.rewards, ref["rewards"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.gate, ref["gate"], atol=1e-5, rtol=0)
    assert out.gate.std(axis=1).min() > 1e-3  # the gate is not uniform, so its axis is tested
    # what the old export's pad (<|im_end|>) made of the same rows: the first turn's end, not the reply's
    first_im_end = [s.index(SMOL_EOS) - 1 for s in seqs]
    assert all(p < len(s) - 1 for p, s in zip(first_im_end, seqs))


def test_objective_names_and_checkpoint_fingerprint(exported, heads, tmp_path, tokenizer):
    assert read_objective_names(str(exported)) == heads.objectives
    _, _, loaded = load_armorm_checkpoint(str(exported))
    fp = checkpoint_fingerprint(str(exported), loaded)
    assert fp == checkpoint_backbone(str(exported), device="cpu")[0].fingerprint and len(fp) == 64
    changed = ArmoHeads(heads.objectives, heads.regression_weight * 2, heads.transform, heads.gating, 1)
    other = export_armorm_checkpoint(
        changed, str(exported), str(tmp_path / "other"), tokenizer=tokenizer, shard_size=2_000_000
    )
    assert checkpoint_backbone(other, device="cpu")[0].fingerprint != fp


# --- export -> import -> export --------------------------------------------------------------


def _files(directory: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _tensors(directory: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for p in sorted(directory.glob("model-*.safetensors")):
        out.update(load_file(str(p)))
    return out


def test_export_import_export_is_stable(exported, tmp_path):
    # from the directory (heads replaced by the same heads) and from the imported model object
    backbone, heads = checkpoint_backbone(str(exported), device="cpu", dtype="float32")
    again = pathlib.Path(
        export_armorm_checkpoint(
            heads, str(exported), str(tmp_path / "again"), tokenizer=backbone.tokenizer, shard_size=2_000_000
        )
    )
    from_model = pathlib.Path(
        export_armorm_checkpoint(
            heads, backbone.model, str(tmp_path / "from_model"), tokenizer=backbone.tokenizer, shard_size=2_000_000
        )
    )
    original = _tensors(exported)
    for copy in (again, from_model):
        assert json.loads((copy / "config.json").read_text()) == json.loads((exported / "config.json").read_text())
        tensors = _tensors(copy)
        assert set(tensors) == set(original)
        assert all(torch.equal(tensors[n], original[n]) and tensors[n].dtype == original[n].dtype for n in original)
        files, before = _files(copy), _files(exported)
        assert sorted(files) == sorted(before)
        for name in (
            "model.safetensors.index.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "chat_template.jinja",
        ):
            assert files[name] == before[name], name
    assert _files(again) == _files(exported)  # byte for byte, shards included


# --- the released layout: Llama-3's 128,256 ids plus [PAD] = 128256 -----------------------------

LLAMA3_SPECIAL = {
    "<|begin_of_text|>": 128000,
    "<|end_of_text|>": 128001,
    "<|start_header_id|>": 128006,
    "<|end_header_id|>": 128007,
    "<|eot_id|>": 128009,
}
LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
    "'<|end_header_id|> ' + m['content'] + ' <|eot_id|>' }}{% endfor %}"
)


def release_like_tokenizer(directory: pathlib.Path, pad_token: str | None = "[PAD]", ordinary_pad: bool = False):
    """A word-level stand-in for the release's tokenizer, with Llama-3's vocabulary size and special ids:
    words w0..w127999, the specials above, the reserved ids between them, and `[PAD]` added as id 128256
    (as the released config says: pad_token_id 128256, vocab_size 128257)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(128000)}
    by_id = {v: k for k, v in LLAMA3_SPECIAL.items()}
    for i in range(128000, 128256):
        vocab[by_id.get(i, f"<|reserved_special_token_{i - 128000}|>")] = i
    if ordinary_pad:
        vocab["[PAD]"] = vocab.pop("w5")  # a plain word of the vocabulary, not an added token
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", unk_token="w0"
    )
    tok.add_special_tokens({"additional_special_tokens": list(LLAMA3_SPECIAL)})
    if pad_token == "[PAD]" and not ordinary_pad:
        tok.add_special_tokens({"pad_token": "[PAD]"})
        assert tok.pad_token_id == 128256
    elif pad_token:
        tok.pad_token = pad_token
    tok.chat_template = LLAMA3_TEMPLATE
    tok.model_max_length = 256
    tok.save_pretrained(str(directory))
    return tok


@pytest.fixture(scope="module")
def release_checkpoint(tmp_path_factory):
    """A checkpoint as the release lays it out: config without our keys, vocab 128257, pad 128256."""
    root = tmp_path_factory.mktemp("release")
    tok = release_like_tokenizer(root / "tok")
    torch.manual_seed(5)
    model = LlamaModel(tiny_llama_config(vocab=128257, hidden=16, pad=128256)).eval()
    heads = make_heads(hidden=16, seed=3)
    out = root / "ArmoRM-like"
    export_armorm_checkpoint(heads, model, str(out), tokenizer=tok)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 128257 and config["pad_token_id"] == 128256  # kept, not grown again
    for key in ("objectives", "verbosity_index", "gating_dropout"):
        config.pop(key)
    (out / "config.json").write_text(json.dumps(config))
    return out, tok


def test_release_layout_imports_and_scores_like_the_first_pad_rule(release_checkpoint):
    out, tok = release_checkpoint
    texts = [
        [{"role": "user", "content": " ".join(f"w{(7 * i + j) % 128000}" for j in range(n))}]
        for i, n in enumerate([3, 17, 8, 30, 1, 12])
    ]
    responses = [f"w{9 * i} w{i + 1}" for i in range(len(texts))]
    results = tokenize_many(tok, texts, responses, TemplatePolicy(max_tokens=128))
    seqs, ends = [r.input_ids for r in results], [r.prompt_end for r in results]
    assert all(s[0] == 128000 and 128009 in s and 128256 not in s for s in seqs)
    backbone, heads, out_scores = labeling_path(out, seqs, ends, token_budget=80)
    assert backbone.tokenizer.pad_token_id == 128256 and backbone.model.embed_tokens.weight.shape[0] == 128257
    assert heads.objectives == [f"objective_{i}" for i in range(K)] and heads.verbosity_index == 1
    ref = first_pad_reference(out, seqs, ends, rows_per_batch=3)
    np.testing.assert_array_equal(ref["position"], [len(s) - 1 for s in seqs])
    np.testing.assert_allclose(out_scores.score, ref["score"], atol=1e-5, rtol=0)


def test_release_layout_export_import_export_is_stable(release_checkpoint, tmp_path):
    out, _ = release_checkpoint
    backbone, heads = checkpoint_backbone(str(out), device="cpu")
    again = pathlib.Path(
        export_armorm_checkpoint(heads, str(out), str(tmp_path / "again"), tokenizer=backbone.tokenizer)
    )
    config = json.loads((again / "config.json").read_text())
    assert config["vocab_size"] == 128257 and config["pad_token_id"] == 128256
    original = _tensors(out)
    tensors = _tensors(again)
    assert set(tensors) == set(original) and all(torch.equal(tensors[n], original[n]) for n in original)


# --- pads: which are dedicated, what is refused ---------------------------------------------


def test_dedicated_pad_rules(tokenizer, tmp_path):
    import copy

    assert tokenizer.pad_token_id == SMOL_EOS and dedicated_pad_id(tokenizer) is None  # eos: in every turn
    t = copy.deepcopy(tokenizer)
    t.pad_token = "<|im_start|>"  # the chat template writes it: never a pad
    assert dedicated_pad_id(t) is None
    t.pad_token = "<file_sep>"  # a special token with no other role that the template never writes: reusable
    assert dedicated_pad_id(t) == 5
    assert dedicated_pad_id(release_like_tokenizer(tmp_path / "r")) == 128256
    ordinary = release_like_tokenizer(tmp_path / "o", ordinary_pad=True)
    assert ordinary.pad_token_id == 5 and dedicated_pad_id(ordinary) is None  # plain text can produce it


def test_export_refuses_what_it_cannot_make_safe(tmp_path, heads, backbone, tokenizer):
    with pytest.raises(CheckpointError, match="needs the backbone's tokenizer"):
        export_armorm_checkpoint(heads, backbone, str(tmp_path / "a"), tokenizer=None)
    ordinary = release_like_tokenizer(tmp_path / "o", pad_token="<|eot_id|>", ordinary_pad=True)
    with pytest.raises(CheckpointError, match="already has a token '\\[PAD\\]' that is not a dedicated pad"):
        export_armorm_checkpoint(
            make_heads(hidden=16),
            LlamaModel(tiny_llama_config(vocab=128256, hidden=16)),
            str(tmp_path / "b"),
            tokenizer=ordinary,
        )
    small = LlamaModel(tiny_llama_config(vocab=1000))
    with pytest.raises(CheckpointError, match="49152 tokens but the embedding only 1000 rows"):
        export_armorm_checkpoint(heads, small, str(tmp_path / "c"), tokenizer=tokenizer)
    assert not (tmp_path / "c").exists() and not (tmp_path / "b").exists()


def test_import_refuses_disagreeing_pads_and_keeps_old_exports_scoring(exported, conversations, tmp_path):
    copy = tmp_path / "disagree"
    copy.mkdir()
    for p in exported.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "pad_token_id": SMOL_EOS}))
    with pytest.raises(CheckpointError, match="pad_token_id 2, the tokenizer 49152"):
        checkpoint_backbone(str(copy), device="cpu")
    # an export from before the dedicated pad (pad = <|im_end|> in config and tokenizer) still loads,
    # and this project's scores do not change: positions come from lengths, not from the pad
    tc = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**tc, "pad_token": "<|im_end|>"}))
    (copy / "special_tokens_map.json").unlink()
    seqs, ends = conversations
    backbone, _, old = labeling_path(copy, seqs, ends, token_budget=600)
    assert backbone.tokenizer.pad_token_id == SMOL_EOS
    _, _, new = labeling_path(exported, seqs, ends, token_budget=600)
    np.testing.assert_array_equal(old.score, new.score)


# --- sources, safety ---------------------------------------------------------------------------


def test_checkpoint_from_s3_scores_like_the_local_one(
    exported, heads, backbone, tokenizer, conversations, s3_server, tmp_path, monkeypatch
):
    monkeypatch.setenv("ARMOLABEL_CACHE", str(tmp_path / "cache"))
    uri = s3_server.make_bucket("ckpt") + "/runs/armo"
    export_armorm_checkpoint(
        heads, backbone, uri, tokenizer=tokenizer, shard_size=2_000_000, storage_options=s3_server.storage_options
    )
    assert read_objective_names(uri, s3_server.storage_options) == heads.objectives
    seqs, ends = conversations
    remote, _, got = labeling_path(uri, seqs, ends, 600, storage_options=s3_server.storage_options)
    local, _, want = labeling_path(exported, seqs, ends, 600)
    assert remote.fingerprint == local.fingerprint and remote.name == "armo"
    np.testing.assert_array_equal(got.score, want.score)
    copies = list((tmp_path / "cache" / "checkpoints").iterdir())
    assert len(copies) == 1
    assert sorted(p.name for p in copies[0].iterdir()) == sorted(p.name for p in exported.iterdir())
    checkpoint_backbone(uri, device="cpu", storage_options=s3_server.storage_options)  # reuses the copy
    assert list((tmp_path / "cache" / "checkpoints").iterdir()) == copies


def test_export_from_a_causal_lm_directory_drops_lm_head(tmp_path, heads, backbone, tokenizer):
    causal = LlamaForCausalLM(tiny_llama_config())
    causal.model.load_state_dict(backbone.state_dict())
    causal.save_pretrained(str(tmp_path / "hf"))
    out = export_armorm_checkpoint(heads, str(tmp_path / "hf"), str(tmp_path / "armo2"), tokenizer=tokenizer)
    _, weights, loaded = load_armorm_checkpoint(out)
    assert loaded.fingerprint == heads.fingerprint
    state = weights.load()
    assert set(state) == set(backbone.state_dict()) and "lm_head.weight" not in state
    assert all(torch.equal(state[n][:SMOL_VOCAB], v) for n, v in backbone.state_dict().items())


class _Trap:
    """Unpickling this creates a file: proof that a pickle was read."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickle_files_are_never_read(tmp_path, exported, s3_server):
    marker = tmp_path / "UNPICKLED"
    trap = pickle.dumps(_Trap(str(marker)))
    # (1) only a pickle checkpoint: refused
    only_bin = tmp_path / "only_bin"
    only_bin.mkdir()
    (only_bin / "config.json").write_text((exported / "config.json").read_text())
    (only_bin / "pytorch_model.bin").write_bytes(trap)
    with pytest.raises(CheckpointError, match="never read"):
        load_armorm_checkpoint(str(only_bin))
    # (2) safetensors next to a pickle: loads, the pickle is untouched (and not copied from s3)
    both = tmp_path / "both"
    both.mkdir()
    for p in exported.iterdir():
        (both / p.name).write_bytes(p.read_bytes())
    (both / "pytorch_model.bin").write_bytes(trap)
    (both / "model.pt").write_bytes(trap)
    load_armorm_checkpoint(str(both))
    uri = s3_server.upload(both, s3_server.make_bucket("pickle") + "/both")
    config, weights, _ = load_armorm_checkpoint(uri, s3_server.storage_options)
    assert not any(p.suffix in (".bin", ".pt") for p in pathlib.Path(weights.directory).iterdir())
    # (3) an index pointing at a pickle shard: refused
    index = json.loads((both / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "pytorch_model.bin"
    (both / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="refusing shard"):
        load_armorm_checkpoint(str(both))
    assert not marker.exists()
    # sanity: the trap does fire when unpickled, so the assertion above means something
    pickle.loads(trap)
    assert marker.exists()


def test_unexpected_or_missing_tensors_are_errors(exported, tmp_path):
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "extra"
    copy.mkdir()
    for p in exported.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["regression_layer.weight"]
    tensors = load_file(str(copy / shard))
    tensors["value_head.weight"] = torch.zeros(1, H)
    save_file(tensors, str(copy / shard))
    index["weight_map"]["value_head.weight"] = shard
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="unexpected tensors"):
        load_armorm_checkpoint(str(copy))
    # a missing backbone tensor fails the strict backbone load
    del index["weight_map"]["value_head.weight"]
    del index["weight_map"]["model.norm.weight"]
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    del tensors["value_head.weight"]
    save_file(tensors, str(copy / shard))
    with pytest.raises(RuntimeError, match="norm.weight"):
        checkpoint_backbone(str(copy), device="cpu")


def test_a_checkpoint_without_tokenizer_files_is_refused(exported, tmp_path):
    copy = tmp_path / "no_tokenizer"
    copy.mkdir()
    for p in exported.iterdir():
        if "token" not in p.name and "chat_template" not in p.name:
            (copy / p.name).write_bytes(p.read_bytes())
    load_armorm_checkpoint(str(copy))  # heads and weights alone read fine
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        checkpoint_backbone(str(copy), device="cpu")


def test_an_export_carries_the_heads_ensemble_bound_to_the_checkpoint(exported, heads, tmp_path):
    """jobs.export_armorm's carry step on a written checkpoint: the ensemble trained beside the heads
    lands in <ckpt>/ensemble/ and passes the check a labeling run on the checkpoint makes; one
    trained beside other heads, or on another backbone, is refused."""
    from jobs.export_armorm import carry_ensemble
    from pipeline.heads.ensemble import EnsembleError, HeadsEnsemble, load_beside

    ckpt = tmp_path / "armo"
    shutil.copytree(exported, ckpt)
    heads_dir = tmp_path / "heads"
    heads.save(str(heads_dir))
    members = [make_heads(seed=s) for s in (1, 2, 3)]
    records = [{"bootstrap_seed": s, "gating_seed": s} for s in (1, 2, 3)]
    HeadsEnsemble(members, records, heads.fingerprint, "bb-1").save(str(heads_dir / "ensemble"))

    with pytest.raises(EnsembleError, match="backbone"):
        carry_ensemble(str(heads_dir), heads, "bb-2", str(ckpt))
    other = make_heads(seed=9)
    with pytest.raises(EnsembleError, match="beside heads"):
        carry_ensemble(str(heads_dir), other, "bb-1", str(ckpt))
    assert not (ckpt / "ensemble").exists()

    carried = carry_ensemble(str(heads_dir), heads, "bb-1", str(ckpt))
    backbone, ckpt_heads = checkpoint_backbone(str(ckpt), device="cpu")
    bound = load_beside(str(ckpt))
    assert carried == {"size": 3, "fingerprint": bound.fingerprint}
    bound.check(ckpt_heads.fingerprint, backbone.fingerprint)  # what EmbedScoreStage checks
    assert backbone.fingerprint == checkpoint_fingerprint(str(exported), ckpt_heads)  # the ensemble left it alone
    x = np.random.default_rng(0).normal(size=(4, H)).astype(np.float32)
    np.testing.assert_array_equal(bound.member_scores(x, x), np.column_stack([m.score(x, x).score for m in members]))
