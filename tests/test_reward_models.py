"""Sequence-classifier reward models as scorers (pipeline/reward_models/), without Ray.

The reference is transformers' own class, called one conversation at a time as model cards call it
(`tokenizer.apply_chat_template(conversation, tokenize=True)` for decoders, `tokenizer(question,
answer)` for encoders), written here and never through the code under test. Conversations are real
rows of the shared data: preference pairs and Topical-Chat's six rated responses per dialogue.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from label_fixtures import SHARED
from reward_model_fixtures import DECODER_ARCHS, TINY_ARCHS, tiny_random_classifier

from pipeline.corpus import InputSpec, read_units
from pipeline.embed.templating import TemplateError, TemplatePolicy
from pipeline.reward_models.families import family_of
from pipeline.reward_models.inputs import reward_model_inputs
from pipeline.reward_models.scorer import RewardModelScorer
from pipeline.reward_models.spec import RewardModelError, RewardModelSpec, inspect_reward_model

MAX_TOKENS = 512


@pytest.fixture(scope="module")
def conversations() -> list[dict]:
    """LLMBar and PandaLM pairs and Topical-Chat groups of six (one prompt, six responses)."""
    out = []
    for path, fmt, rows in (
        ("llmbar/LLMBar_Natural.json", "llmbar", 8),
        ("pandalm/testset-v1.json", "pandalm", 8),
        ("unieval/topical_chat.json", "unieval_topical_chat", 12),
    ):
        t = read_units([InputSpec.from_dict({"path": str(SHARED / path), "format": fmt})], limit_rows=rows)
        out += [u for u in t.to_pylist() if u["quarantine_reason"] is None]
    assert len({u["prompt_id"] for u in out}) < len(out)  # prompts shared within pairs and groups
    return out


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tiny-rm")
    return {arch: tiny_random_classifier(base / arch, arch) for arch in TINY_ARCHS}


def reference_rewards(path: Path, units: list[dict], cap: int = MAX_TOKENS) -> list[float | None]:
    """The class, one conversation at a time; None where the conversation is over `cap` tokens."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    out: list[float | None] = []
    for u in units:
        prompt = [{"role": m["role"], "content": m["content"]} for m in u["prompt"]]
        if getattr(tok, "chat_template", None):
            conv = prompt + [{"role": "assistant", "content": u["response"]}]
            enc = tok.apply_chat_template(conv, tokenize=True, return_tensors="pt", return_dict=True)
        else:  # the OpenAssistant DeBERTa card: tokenizer(question, answer)
            question = (
                prompt[0]["content"] if len(prompt) == 1 else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
            )
            enc = tok(question, u["response"], return_tensors="pt")
        if enc["input_ids"].shape[1] > cap:
            out.append(None)
            continue
        with torch.no_grad():
            out.append(float(model(**enc).logits[0, 0]))
    return out


def ours(scorer: RewardModelScorer, units: list[dict], cap: int = MAX_TOKENS) -> list:
    inputs = reward_model_inputs(
        scorer.tokenizer,
        scorer.family,
        [u["prompt"] for u in units],
        [u["response"] for u in units],
        TemplatePolicy(max_tokens=cap, overflow="quarantine"),
        scorer.info.pad_token_id,
    )
    good = [i for i, x in enumerate(inputs) if not isinstance(x, TemplateError)]
    scored = scorer.score(
        [inputs[i].input_ids for i in good],
        [inputs[i].prompt_end for i in good],
        [inputs[i].token_type_ids for i in good],
    )
    out: list = [None] * len(units)
    for k, i in enumerate(good):
        out[i] = float(scored.rewards[k])
    return out


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_family_scores_as_its_class_one_conversation_at_a_time(arch, tiny_models, conversations):
    path = tiny_models[arch]
    # a small budget: several packed rows (or padded batches) per call, groups split across rows
    scorer = RewardModelScorer(RewardModelSpec(name=arch.replace("-", "_"), path=str(path)), token_budget=300)
    got = ours(scorer, conversations)
    want = reference_rewards(path, conversations)
    assert [g is None for g in got] == [w is None for w in want]  # the same conversations fit the cap
    pairs = [(g, w) for g, w in zip(got, want) if w is not None]
    assert len(pairs) >= 20
    g, w = np.array(pairs).T
    assert np.std(w) > 1e-4  # the rewards differ between conversations: a real comparison
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-6)
    config = json.loads((path / "config.json").read_text())
    # Prompt sharing and padding-free rows where exact (full causal attention), never with a window
    windowed = bool(config.get("sliding_window")) or any(t != "full_attention" for t in config.get("layer_types") or [])
    assert scorer.shares_prompts == (
        arch in DECODER_ARCHS and not windowed and not config.get("attn_logit_softcapping")
    )


def test_prompt_sharing_computes_each_prompt_once(tiny_models, conversations):
    scorer = RewardModelScorer(RewardModelSpec(name="llama", path=str(tiny_models["llama"])))
    groups = [u for u in conversations if u["kind"] == "rated"]  # Topical-Chat: six responses a dialogue
    inputs = reward_model_inputs(
        scorer.tokenizer,
        scorer.family,
        [u["prompt"] for u in groups],
        [u["response"] for u in groups],
        TemplatePolicy(max_tokens=1024),
        scorer.info.pad_token_id,
    )
    scored = scorer.score([x.input_ids for x in inputs], [x.prompt_end for x in inputs])
    whole = sum(len(x.input_ids) for x in inputs)
    prompts = {tuple(x.input_ids[: x.prompt_end + 1]) for x in inputs}
    once = whole - sum(x.prompt_end + 1 for x in inputs) + sum(len(p) for p in prompts)
    assert len(prompts) == 2 and int(scored.computed.sum()) == once < whole


def test_shared_attention_would_change_a_windowed_soft_capped_model(tiny_models, conversations, monkeypatch):
    """Gemma-2 keeps padded per-unit passes: forced through the shared-prompt attention (which
    applies neither its sliding window nor its soft-capping) its rewards move. This is the
    difference the family entry avoids."""
    from pipeline.embed import engine as engine_module
    from pipeline.embed import shared_attention

    path = tiny_models["gemma2"]
    spec = RewardModelSpec(name="gemma2", path=str(path))
    exact = RewardModelScorer(spec)
    units = [u for u in conversations if u["kind"] == "rated"]
    want = np.array(reference_rewards(path, units, cap=1024), dtype=float)
    assert not exact.shares_prompts
    np.testing.assert_allclose(ours(exact, units, cap=1024), want, rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(shared_attention, "supports", lambda model: None)
    forced = RewardModelScorer(spec)
    forced.engine = engine_module.EmbeddingEngine(forced.engine.backbone, share_prompts="always")
    assert forced.shares_prompts
    moved = np.abs(np.array(ours(forced, units, cap=1024)) - want) / np.abs(want)
    assert np.median(moved) > 1e-3, moved


def test_a_chosen_logit_of_a_multi_label_head(tiny_models, conversations, tmp_path):
    from transformers import AutoModelForSequenceClassification

    src = AutoModelForSequenceClassification.from_pretrained(tiny_models["llama"])
    torch.manual_seed(3)
    src.score = torch.nn.Linear(src.config.hidden_size, 3, bias=False)
    src.config.num_labels = 3
    src.config.id2label = {0: "helpful", 1: "harmless", 2: "overall"}
    src.save_pretrained(tmp_path / "multi")
    shutil.copy(tiny_models["llama"] / "tokenizer.json", tmp_path / "multi")
    for name in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tiny_models["llama"] / name).exists():
            shutil.copy(tiny_models["llama"] / name, tmp_path / "multi")
    with pytest.raises(RewardModelError, match="3 logits .*set logit_index"):
        inspect_reward_model(RewardModelSpec(name="m", path=str(tmp_path / "multi")))
    scorer = RewardModelScorer(RewardModelSpec(name="m", path=str(tmp_path / "multi"), logit_index=2))
    units = conversations[:6]
    got = ours(scorer, units)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "multi").eval()
    tok = scorer.tokenizer
    for u, g in zip(units, got):
        conv = [dict(m) for m in u["prompt"]] + [{"role": "assistant", "content": u["response"]}]
        enc = tok.apply_chat_template(conv, tokenize=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            assert g == pytest.approx(float(model(**enc).logits[0, 2]), rel=1e-4, abs=1e-5)


def test_text_pairs_keep_the_response_when_cut(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["bert"])
    family = family_of("bert")
    prompt = [{"role": "user", "content": "word " * 200}]
    response = "the answer to keep whole"
    (cut,) = reward_model_inputs(tok, family, [prompt], [response], TemplatePolicy(max_tokens=64), 0)
    answer = tok(response, add_special_tokens=False)["input_ids"]
    assert len(cut.input_ids) == 64 and cut.truncated and cut.tokens_before_truncation > 200
    assert cut.input_ids[-len(answer) - 1 : -1] == answer and cut.token_type_ids.count(1) == len(answer) + 1
    assert cut.prompt_tokens == 64 - len(answer) - 1
    (refused,) = reward_model_inputs(
        tok, family, [prompt], [response], TemplatePolicy(max_tokens=64, overflow="quarantine"), 0
    )
    assert isinstance(refused, TemplateError) and "more than max_tokens=64" in refused.reason
    (too_long,) = reward_model_inputs(
        tok, family, [[{"role": "user", "content": "q"}]], ["a " * 100], TemplatePolicy(max_tokens=64), 0
    )
    assert isinstance(too_long, TemplateError) and "no room for a prompt" in too_long.reason


# --- bad input: config errors naming the model and the file ------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _shard(path: Path) -> Path:
    (shard,) = path.glob("*.safetensors")
    return shard


def _resave(path: Path, tensors: dict) -> None:
    """The tensors as the checkpoint's single weights file (its shards and index removed)."""
    from safetensors.torch import save_file

    for f in [*path.glob("*.safetensors"), *path.glob("*.index.json")]:
        f.unlink()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _label_errors(tmp_path: Path, models: list[dict]) -> list[str]:
    from pipeline.labeling.config import ConfigError, parse_config

    cfg = {
        "inputs": [{"path": str(SHARED / "llmbar" / "LLMBar_Natural.json"), "format": "llmbar"}],
        "output": str(tmp_path / "out"),
        "model": {"reward_models": models},
    }
    with pytest.raises(ConfigError) as e:
        parse_config(cfg)
    return e.value.errors


def test_bad_checkpoints_are_config_errors_naming_model_and_file(tiny_models, tmp_path):
    from safetensors.torch import load_file

    llama = tiny_models["llama"]
    remote = _copy(llama, tmp_path / "remote")
    _edit_config(remote, auto_map={"AutoModelForSequenceClassification": "modeling.RM"})
    pickled = _copy(llama, tmp_path / "pickled")
    torch.save(load_file(_shard(pickled)), pickled / "pytorch_model.bin")
    for f in [*pickled.glob("*.safetensors"), *pickled.glob("*.index.json")]:
        f.unlink()
    headless = _copy(llama, tmp_path / "headless")
    tensors = load_file(_shard(headless))
    del tensors["score.weight"]
    _resave(headless, tensors)
    multi = _copy(llama, tmp_path / "multi")
    _edit_config(multi, id2label={"0": "a", "1": "b"}, label2id={"a": 0, "b": 1})
    no_template = _copy(llama, tmp_path / "notemplate")
    tc = json.loads((no_template / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(tc))
    for f in ("chat_template.jinja", "chat_template.json"):
        (no_template / f).unlink(missing_ok=True)
    causal = _copy(llama, tmp_path / "causal")
    _edit_config(causal, architectures=["LlamaForCausalLM"])
    cases = [
        ("remote", remote, "auto_map"),
        ("pickled", pickled, "only pickle weights"),
        ("headless", headless, "no score head"),
        ("multi", multi, "2 logits"),
        ("notemplate", no_template, "without a chat template"),
        ("causal", causal, "not a sequence-classifier"),
        ("hubid", Path("Skywork/Skywork-Reward-V2-Llama-3.1-8B"), "hub ids are not read"),
    ]
    errors = _label_errors(tmp_path, [{"name": n, "path": str(p)} for n, p, _ in cases])
    assert len(errors) == len(cases), errors
    for i, (name, path, what) in enumerate(cases):
        (err,) = [e for e in errors if e.startswith(f"model.reward_models[{i}]")]
        assert f"'{name}'" in err and str(path) in err and what in err, err


def test_names_and_columns_are_checked(tiny_models, tmp_path):
    p = str(tiny_models["bert"])
    errors = _label_errors(
        tmp_path,
        [
            {"name": "a", "path": p},
            {"name": "a", "path": p},
            {"name": "Bad-Name", "path": p},
            {"name": "b", "path": p, "dtype": "fp8"},
        ],
    )
    joined = "\n".join(errors)
    assert "model.reward_models[1].name: 'a' is used twice" in joined
    assert "model.reward_models[2].name: 'Bad-Name'" in joined
    assert "model.reward_models[3].dtype" in joined


def test_loading_is_strict(tiny_models, tmp_path):
    """A checkpoint whose tensors do not match its class (one missing, one extra) is refused when
    loaded; transformers alone would initialise the missing one at random."""
    from safetensors.torch import load_file

    broken = _copy(tiny_models["llama"], tmp_path / "broken")
    tensors = load_file(_shard(broken))
    missing = next(n for n in tensors if n.endswith("mlp.down_proj.weight"))
    del tensors[missing]
    tensors["extra.weight"] = torch.zeros(2)
    _resave(broken, tensors)
    spec = RewardModelSpec(name="broken", path=str(broken))
    inspect_reward_model(spec)  # the header alone passes: the head is there
    with pytest.raises(RewardModelError, match="'broken'.*missing keys.*down_proj.*unexpected keys.*extra"):
        RewardModelScorer(spec)


def test_check_refuses_with_exit_2(tiny_models, tmp_path):
    import subprocess
    import sys

    import yaml
    from label_fixtures import REPO

    remote = _copy(tiny_models["llama"], tmp_path / "remote")
    _edit_config(remote, auto_map={"AutoModelForSequenceClassification": "modeling.RM"})
    cfg = {
        "inputs": [{"path": str(SHARED / "llmbar" / "LLMBar_Natural.json"), "format": "llmbar"}],
        "output": str(tmp_path / "out"),
        "model": {"reward_models": [{"name": "sky", "path": str(remote)}]},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.label", "--config", str(path), "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "model.reward_models[0]" in out and "'sky'" in out and "auto_map" in out and "Traceback" not in out


def test_pools_that_cannot_all_start_are_said_up_front(tiny_models, tmp_path):
    """Every scoring pool must hold its minimum at once for a unit to get through: on 2 CPUs three
    one-CPU pools wait forever (seen), so the run says so when it starts."""
    from pipeline.labeling.config import parse_config
    from pipeline.labeling.run import capacity_shortfall, scoring_pools

    cfg = parse_config(
        {
            "inputs": [{"path": str(SHARED / "llmbar" / "LLMBar_Natural.json"), "format": "llmbar"}],
            "output": str(tmp_path / "out"),
            "model": {
                "reward_models": [
                    {"name": "a", "path": str(tiny_models["llama"])},
                    {
                        "name": "b",
                        "path": str(tiny_models["bert"]),
                        "resources": {"custom_resources_per_actor": {"enc": 1}},
                    },
                ]
            },
            "resources": {"num_cpus_per_actor": 1},
        }
    )
    assert list(scoring_pools(cfg)) == ["rm_a", "rm_b"]  # no backbone pass without heads
    said = capacity_shortfall(cfg, {"CPU": 2.0})
    assert said and "CPU 2.25 (cluster: 2)" in said and "enc 1 (cluster: 0)" in said
    assert capacity_shortfall(cfg, {"CPU": 3.0, "enc": 1.0}) is None
