"""Linear reward heads exported as the backbone's own sequence classifier
(pipeline/embed/classifier_export.py, jobs/export_classifier.py), and the reward-model fixtures of
tests/reward_model_fixtures.py, checked the way other tools load them: transformers'
AutoModelForSequenceClassification (strict, no remote code), a model card's call (the tokenizer's
chat template, no generation prompt), right-padded batches with the dedicated pad, and TRL."""

import copy
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from reward_model_fixtures import (
    DECODER_ARCHS,
    SMOLLM2,
    TINY_ARCHS,
    build_minilm_classifier,
    minilm_classifier,
    prompt_text,
    real_pair_units,
    smollm2_classifier,
    smollm2_pair_units,
    tiny_random_classifier,
)
from safetensors import safe_open
from test_curation_trl import common_args
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from jobs import export_classifier as job
from pipeline.embed.backbone import load_backbone, load_tokenizer
from pipeline.embed.classifier_export import (
    REPORT_FILE,
    SCORE_KEY,
    export_sequence_classifier,
    gated_agreement,
)
from pipeline.embed.engine import EmbeddingEngine
from pipeline.embed.templating import TemplatePolicy, tokenize_many
from pipeline.heads.checkpoint import CheckpointError
from pipeline.heads.gating import GatingNetwork
from pipeline.heads.model import ArmoHeads
from pipeline.training import is_test_row

PAD = 49152  # SmolLM2 has 49,152 ids; the export adds [PAD] as the next one


def load_strict(path):
    model, info = AutoModelForSequenceClassification.from_pretrained(str(path), output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched key, no error
    return model.eval()


def tensors_of(path) -> dict[str, torch.Tensor]:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(path / shard), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def rewards(model, **inputs) -> np.ndarray:
    with torch.no_grad():
        return model(**inputs).logits[:, 0].double().numpy()


def conversation(unit: dict) -> list[dict]:
    return unit["prompt"] + [{"role": "assistant", "content": unit["response"]}]


# --- the exported SmolLM2 classifier ---------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    path = smollm2_classifier(tmp_path_factory.mktemp("smollm2") / "classifier")
    return path, load_strict(path)


@pytest.fixture(scope="module")
def sample_units():
    """Six of the fixture's real conversations, three per source, of different lengths."""
    units = real_pair_units().to_pylist()
    by_source: dict[str, list[dict]] = {}
    for u in units:
        by_source.setdefault(u["source"], []).append(u)
    return [u for rows in by_source.values() for u in rows[:3]]


@pytest.mark.slow
def test_smollm2_classifier_layout(smollm2):
    path, model = smollm2
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and "auto_map" not in config
    assert config["id2label"] == {"0": "LABEL_0"} and model.config.num_labels == 1
    assert (config["pad_token_id"], config["vocab_size"]) == (PAD, PAD + 1)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        assert json.loads((path / name).read_text())["pad_token"] == "[PAD]", name
    assert not [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".py")]
    tensors = tensors_of(path)
    assert tensors[SCORE_KEY].shape == (1, 576) and "score.bias" not in tensors
    assert all(n.startswith("model.") for n in tensors if n != SCORE_KEY) and "lm_head.weight" not in tensors
    assert tensors["model.embed_tokens.weight"].shape == (PAD + 1, 576)
    report = json.loads((path / REPORT_FILE).read_text())
    assert report["head"] == "bradley_terry" and report["architecture"] == "LlamaForSequenceClassification"
    assert report["backbone"]["fingerprint"] == load_backbone(SMOLLM2).fingerprint
    fit = report["fit"]
    assert fit["pairs"] == 60 and fit["units"] == 120 and fit["train_pairs"] + fit["validation_pairs"] == 60
    assert set(fit["per_source"]) == {"llmbar", "pandalm"}
    for entry in fit["per_source"].values():
        assert entry["train_pairs"] > 20 and 0.5 < entry["train_accuracy"] <= 1.0


@pytest.mark.slow
def test_smollm2_classifier_reward_is_the_head_on_our_embedding(smollm2, sample_units):
    """One conversation at a time as a model card calls it, then a right-padded batch: both give
    w·h, h from our EmbeddingEngine (the labeling job's tokenization), within 1e-4 relative."""
    path, model = smollm2
    backbone = load_backbone(SMOLLM2)
    w = tensors_of(path)[SCORE_KEY][0].double().numpy()
    ours = tokenize_many(
        backbone.tokenizer,
        [u["prompt"] for u in sample_units],
        [u["response"] for u in sample_units],
        TemplatePolicy(max_tokens=512),
    )
    e = EmbeddingEngine(backbone).embed([t.input_ids for t in ours], [t.prompt_end for t in ours])
    want = e.response.astype(np.float64) @ w
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    single = []
    for u, t in zip(sample_units, ours):
        ids = tokenizer.apply_chat_template(conversation(u), add_generation_prompt=False, return_dict=False)
        assert ids == t.input_ids and PAD not in ids  # the same tokens; the pad occurs in no text
        single.append(rewards(model, input_ids=torch.tensor([ids]))[0])
    tol = 1e-4 * np.abs(want).max()
    np.testing.assert_allclose(single, want, rtol=1e-4, atol=tol)
    assert np.std(want) > 100 * tol  # rewards that differ by far more than the tolerance
    # a right-padded batch with the dedicated pad: the reward is read before the first pad
    tokenizer.padding_side = "right"
    texts = [tokenizer.apply_chat_template(conversation(u), tokenize=False) for u in sample_units]
    batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 3 and (batch["input_ids"][batch["attention_mask"] == 0] == PAD).all()
    first_pad = torch.where(batch["input_ids"] == PAD, 1, 0).argmax(1)
    assert [int(f) for f, n in zip(first_pad, lengths) if n < batch["input_ids"].shape[1]] == [
        int(n) for n in lengths if n < batch["input_ids"].shape[1]
    ]
    batched = rewards(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    np.testing.assert_allclose(batched, want, rtol=1e-4, atol=tol)


# --- jobs.export_classifier: the gated fit, and refusals --------------------------------------


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """The fixture's SmolLM2 embeddings as a run directory (Parquet parts, no _run.json), and
    synthetic heads of SmolLM2's size with a training.json naming that run, as jobs.train_heads
    writes it."""
    base = tmp_path_factory.mktemp("embedded")
    units = smollm2_pair_units()
    (base / "run" / "data").mkdir(parents=True)
    pq.write_table(units, base / "run" / "data" / "part-0.parquet")
    h, k = 576, 3
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    gating = GatingNetwork(h, k, hidden_dim=64, n_hidden=2)
    with torch.no_grad():
        for layer in gating.layers:
            layer.weight.mul_(4)
    heads = ArmoHeads([f"syn.obj{i}" for i in range(k)], rng.normal(size=(k, h)) * 0.05, np.eye(k), gating)
    heads.save(str(base / "heads"))
    training = {
        "embedding_run": str(base / "run"),
        "config": {"test_fraction": 0.25, "backbone": {"path": "smollm2"}},
    }
    (base / "heads" / "training.json").write_text(json.dumps(training))
    return base, units, heads


def run_job(*argv, capsys=None) -> tuple[int, str, str]:
    rc = job.main([str(a) for a in argv])
    out, err = capsys.readouterr() if capsys else ("", "")
    return rc, out, err


@pytest.mark.slow
def test_gated_fit_reports_agreement_with_the_gated_score(embedded, tmp_path, capsys):
    base, units, heads = embedded
    out = tmp_path / "gated"
    rc, stdout, err = run_job("--head", "gated", "--heads", base / "heads", "--out", out, capsys=capsys)
    assert rc == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["architecture"] == "LlamaForSequenceClassification"
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["head"] == "gated_fit" and report["embeddings"]["split"] == "train"
    assert report["heads"]["fingerprint"] == heads.fingerprint == report["fit"]["heads_fingerprint"]
    # the same units: the training split of the run, by the training config's test_fraction
    table = pq.read_table(base / "run" / "data" / "part-0.parquet").sort_by("unit_id")
    train = table.filter(pa.array(~is_test_row(table.column("row_id").to_pylist(), 0.25)))
    assert report["fit"]["units"] == train.num_rows == report["embeddings"]["units"] < units.num_rows
    rows = train.to_pylist()
    X = np.array([r["embedding"] for r in rows], dtype=np.float32)
    P = np.array([r["prompt_embedding"] for r in rows], dtype=np.float32)
    gated = heads.score(X, P).score.astype(np.float64)
    linear = X.astype(np.float64) @ tensors_of(out)[SCORE_KEY][0].double().numpy()
    # the agreement, pair by pair: responses to one prompt, ordered alike by both scores
    expected = {}
    for src in sorted({r["source"] for r in rows}):
        credit = pairs = ties = 0.0
        for i in range(len(rows)):
            for j in range(i + 1, len(rows)):
                same = rows[i]["source"] == rows[j]["source"] == src and rows[i]["prompt_id"] == rows[j]["prompt_id"]
                if not same:
                    continue
                if gated[i] == gated[j]:  # e.g. a pair of identical responses
                    ties += 1
                    continue
                pairs += 1
                d = (linear[i] - linear[j]) * (gated[i] - gated[j])
                credit += 1.0 if d > 0 else 0.5 if linear[i] == linear[j] else 0.0
        expected[src] = (pairs, credit / pairs, ties)
    per_source = report["fit"]["per_source"]
    assert set(per_source) == set(expected) == {"llmbar", "pandalm"}
    for src, (pairs, agreement, ties) in expected.items():
        assert per_source[src]["pairs"] == pairs > 10 and per_source[src]["gated_ties"] == ties
        assert 0.0 <= per_source[src]["agreement"] <= 1.0
        assert per_source[src]["agreement"] == pytest.approx(agreement, abs=1e-12)
        assert 0.0 <= per_source[src]["human_accuracy"] <= 1.0
    assert gated_agreement(train, linear, gated) == {
        s: {"pairs": int(p), "gated_ties": int(t), "agreement": pytest.approx(a, abs=1e-12)}
        for s, (p, a, t) in expected.items()
    }
    # fitted, not merely agreeing by chance: the linear head tracks the gated score
    assert np.corrcoef(linear, gated)[0, 1] > 0.5


def test_missing_heads_folder_is_one_clear_error(tmp_path, capsys):
    rc, _, err = run_job("--head", "gated", "--heads", tmp_path / "nope", "--out", tmp_path / "o", capsys=capsys)
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("cannot export: heads directory") and "jobs.train_heads" in err
    rc, _, err = run_job("--head", "bt", "--run", tmp_path / "norun", "--out", tmp_path / "o", capsys=capsys)
    assert rc == 2 and err.startswith("cannot export: run ") and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_usage_errors(tmp_path, capsys):
    for argv in (["--head", "bt"], ["--head", "gated", "--run", "r"], ["--head", "bt", "--run", "r", "--all-rows"]):
        with pytest.raises(SystemExit) as e:
            job.main(argv + ["--out", str(tmp_path / "o")])
        assert e.value.code == 2
    capsys.readouterr()


@pytest.mark.slow
def test_job_refuses_embeddings_of_another_backbone_and_encoders(embedded, tmp_path, capsys):
    base, units, _ = embedded
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    fp = units.schema.get_field_index("backbone_fingerprint")
    other = units.set_column(fp, "backbone_fingerprint", pa.array(["0123456789abcdef"] * units.num_rows))
    pq.write_table(other, run / "data" / "part-0.parquet")
    rc, _, err = run_job("--head", "bt", "--run", run, "--backbone", "smollm2", "--out", tmp_path / "o", capsys=capsys)
    assert rc == 2 and "computed by backbone 0123456789abcdef" in err
    rc, _, err = run_job("--head", "bt", "--run", run, "--out", tmp_path / "o", capsys=capsys)
    assert rc == 2 and "records no backbone" in err
    rc, _, err = run_job("--head", "bt", "--run", run, "--backbone", "minilm", "--out", tmp_path / "o", capsys=capsys)
    assert rc == 2 and "is an encoder" in err
    no_embeddings = tmp_path / "plain"
    (no_embeddings / "data").mkdir(parents=True)
    pq.write_table(units.drop_columns(["embedding"]), no_embeddings / "data" / "part-0.parquet")
    rc, _, err = run_job("--head", "bt", "--run", no_embeddings, "--out", tmp_path / "o", capsys=capsys)
    assert rc == 2 and "embeddings: true" in err
    assert not (tmp_path / "o").exists()


# --- export refusals and sources (tiny random Llama, SmolLM2's tokenizer) -----------------------


def tiny_llama(vocab=PAD, hidden=32):
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        pad_token_id=2,
        bos_token_id=1,
        eos_token_id=2,
        max_position_embeddings=256,
    )
    return LlamaModel(config).eval()


def test_export_refuses_what_it_cannot_make_safe(tmp_path):
    tokenizer = load_tokenizer(SMOLLM2)
    model, w = tiny_llama(), np.ones(32, np.float32)
    with pytest.raises(CheckpointError, match="needs the backbone's tokenizer"):
        export_sequence_classifier(w, model, str(tmp_path / "a"), None)
    taken = copy.deepcopy(tokenizer)
    taken.add_tokens(["[PAD]"])  # an ordinary token: text "[PAD]" maps to it
    with pytest.raises(CheckpointError, match=r"already has a token '\[PAD\]' that is not a dedicated pad"):
        export_sequence_classifier(w, tiny_llama(vocab=PAD + 1), str(tmp_path / "b"), taken)
    with pytest.raises(CheckpointError, match="hidden_size 32 ≠ head size 31"):
        export_sequence_classifier(w[:31], model, str(tmp_path / "c"), tokenizer)
    with pytest.raises(CheckpointError, match="non-finite"):
        export_sequence_classifier(np.full(32, np.nan, np.float32), model, str(tmp_path / "d"), tokenizer)
    with pytest.raises(CheckpointError, match="the embedding only"):
        export_sequence_classifier(w, tiny_llama(vocab=1000), str(tmp_path / "e"), tokenizer)
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_export_from_an_armorm_checkpoint_keeps_its_pad_and_drops_its_heads(tmp_path):
    from pipeline.embed.checkpoint import export_armorm_checkpoint

    tokenizer, model = load_tokenizer(SMOLLM2), tiny_llama()
    gating = GatingNetwork(32, 2, hidden_dim=8, n_hidden=1)
    heads = ArmoHeads(["a", "b"], np.ones((2, 32)), np.eye(2), gating)
    armo = export_armorm_checkpoint(heads, model, str(tmp_path / "armo"), tokenizer=tokenizer)
    w = np.random.default_rng(1).normal(size=32).astype(np.float32)
    out = tmp_path / "cls"
    export_sequence_classifier(w, armo, str(out), AutoTokenizer.from_pretrained(armo), shard_size=100_000)
    assert len(list(out.glob("model-*.safetensors"))) > 1  # sharded by the shared writer
    config = json.loads((out / "config.json").read_text())
    assert (config["pad_token_id"], config["vocab_size"]) == (PAD, PAD + 1)  # the export's own dedicated pad
    assert not [k for k in config if k in ("num_objectives", "gating_temperature", "auto_map")]
    cls = load_strict(out)
    ids = torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], return_dict=False)])
    with torch.no_grad():
        h = model(input_ids=ids).last_hidden_state[0, -1].double().numpy()
    assert rewards(cls, input_ids=ids)[0] == pytest.approx(float(h @ w), rel=1e-5)


# --- the fixtures -----------------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_classifier_reloads_and_scores_as_built(tmp_path):
    from transformers import BertModel

    built, tokenizer, report = build_minilm_classifier()
    path = minilm_classifier(tmp_path / "minilm")
    loaded = load_strict(path)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and loaded.config.num_labels == 1
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.bin"))
    saved_tokenizer = AutoTokenizer.from_pretrained(str(path))
    assert not saved_tokenizer.chat_template and saved_tokenizer.pad_token_id == config["pad_token_id"] == 0
    units = real_pair_units().to_pylist()[::10]
    enc = saved_tokenizer(
        [prompt_text(u["prompt"]) for u in units], [u["response"] for u in units], padding=True, return_tensors="pt"
    )
    got, want = rewards(loaded, **enc), rewards(built, **enc)
    np.testing.assert_array_equal(got, want)
    # the real MiniLM weights, pooler included, with the fitted head on its pooled output
    minilm = BertModel.from_pretrained(str(_minilm_dir())).eval()
    with torch.no_grad():
        pooled = minilm(**enc).pooler_output.double().numpy()
    w = loaded.classifier.weight[0].double().detach().numpy()
    np.testing.assert_allclose(got, pooled @ w + float(loaded.classifier.bias.detach()), rtol=1e-5, atol=1e-6)
    assert report["fit"]["pairs"] == 60 and json.loads((path / REPORT_FILE).read_text())["fit"] == report["fit"]


def _minilm_dir():
    from pipeline.embed.backbone import BackboneSpec, resolve_source

    return resolve_source(BackboneSpec(path="minilm")).directory


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_random_classifiers_load_strictly_with_their_pad(tmp_path, arch):
    path = tiny_random_classifier(tmp_path / arch, arch)
    model = load_strict(path)
    config = json.loads((path / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    assert model.config.num_labels == 1 and "auto_map" not in config
    assert config["architectures"][0].endswith("ForSequenceClassification")
    assert config["num_hidden_layers"] == 2 and 32 <= config["hidden_size"] <= 64
    assert config["pad_token_id"] == tokenizer.pad_token_id is not None
    assert not list(path.glob("*.bin"))
    if arch in DECODER_ARCHS:
        assert config["vocab_size"] == len(tokenizer) == PAD + 1 and tokenizer.pad_token == "[PAD]"
        assert tokenizer.chat_template
        messages = [{"role": "user", "content": "What is the capital of France? Answer with its history."}]
        ids = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": "Paris, for a very long time now."}], return_dict=False
        )
        enc = {"input_ids": torch.tensor([ids])}
    else:
        assert config["vocab_size"] == len(tokenizer) and not tokenizer.chat_template
        enc = dict(tokenizer("What is the capital of France?", "Paris.", return_tensors="pt"))
    r = rewards(model, **enc)
    assert np.isfinite(r).all() and 0.01 < abs(r[0]) < 100
    again = tiny_random_classifier(tmp_path / "again", arch)  # deterministic
    assert rewards(load_strict(again), **enc)[0] == r[0]
    if arch in ("gemma2", "gemma3"):
        assert config["sliding_window"] == 8 and len(ids) > 8
        wide = AutoModelForSequenceClassification.from_pretrained(str(path), sliding_window=4096).eval()
        assert abs(rewards(wide, **enc)[0] - r[0]) > 1e-3  # the window matters on this input
    if arch == "gemma2":
        assert config["attn_logit_softcapping"] == 50.0
        uncapped = AutoModelForSequenceClassification.from_pretrained(str(path), attn_logit_softcapping=None).eval()
        assert abs(rewards(uncapped, **enc)[0] - r[0]) > 1e-3  # and so does the cap


@pytest.mark.slow
def test_trl_reward_trainer_trains_an_exported_classifier(tmp_path):
    """TRL's own loading path (a checkpoint path, its tokenizer): RewardTrainer keeps the dedicated
    pad and runs two steps on real pairs."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    path = tiny_random_classifier(tmp_path / "llama", "llama")
    rows = real_pair_units(per_source=2).to_pylist()
    by_row: dict[str, dict] = {}
    for u in rows:
        by_row.setdefault(u["row_id"], {})[u["preference"]] = u
    data = Dataset.from_list(
        [{"chosen": conversation(p["chosen"]), "rejected": conversation(p["rejected"])} for p in by_row.values()]
    )
    trainer = RewardTrainer(
        model=str(path),
        args=RewardConfig(**common_args(tmp_path / "trl"), max_length=256),
        train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(str(path)),
    )
    assert trainer.model.config.pad_token_id == PAD and trainer.processing_class.pad_token == "[PAD]"
    trainer.train()
    assert trainer.state.global_step == 2
