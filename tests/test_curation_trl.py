"""The curation outputs as a TRL user takes them: `datasets.load_dataset(<dir>)` finds a `train` split,
and DPOTrainer, RewardTrainer and SFTTrainer each run two steps on them as written (no column
renaming, no flags). One tiny random Llama (SmolLM2's tokenizer and chat template) is shared."""

import json

import pytest
from datasets import load_dataset

from pipeline.curation.config import parse_config
from pipeline.curation.job import run

pytestmark = pytest.mark.slow

HIDDEN = 16


@pytest.fixture(scope="module")
def curated(annotated_run, tmp_path_factory):
    """sft, dpo, rerank (top 2) and rerank (rank 0 only) outputs of the job over the fixture run."""
    import ray

    base = tmp_path_factory.mktemp("trl")
    configs = {
        "sft": {"task": "sft", "sft": {"one_per_prompt": True}, "output_files": 2},
        "dpo": {"task": "dpo", "pairs": {"best_of_n": "all_pairs"}},
        "rerank": {"task": "rerank", "rerank": {"top_k": 2}},
        "rerank_best": {"task": "rerank", "rerank": {"top_k": 1}},
    }
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        for name, cfg in configs.items():
            run(parse_config({**cfg, "run": str(annotated_run), "output": str(base / name)}))
    finally:
        ray.shutdown()
    return base


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from pipeline.embed.backbone import BackboneSpec, resolve_source

    src = resolve_source(BackboneSpec(path="smollm2"))
    return AutoTokenizer.from_pretrained(src.directory, gguf_file=src.gguf_file)


def tiny_llama(tokenizer, head: str = "causal"):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        num_labels=1,
    )
    return (LlamaForCausalLM if head == "causal" else LlamaForSequenceClassification)(config)


def common_args(tmp_path):
    return dict(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        dataloader_num_workers=0,
    )


def train_split(out_dir):
    """The output directory as a user loads it: by name, no data_files, no split flags."""
    ds = load_dataset(str(out_dir))
    assert list(ds) == ["train"]
    return ds["train"]


def first_rows(ds, n: int = 8):
    """Two steps of batch 2 see 4 rows; tokenising the rest would only cost time."""
    return ds.select(range(min(n, ds.num_rows)))


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_file_names_give_a_train_split_with_every_row(curated):
    for name in ("sft", "dpo", "rerank", "rerank_best"):
        man = json.loads((curated / name / "manifest.json").read_text())
        assert all(f.startswith("train-") for f in man["output"]["files"])
        assert train_split(curated / name).num_rows == man["rows_out"] > 0
        assert train_split(curated / name / "data").num_rows == man["rows_out"]


def test_dpo_trainer_runs_on_the_dpo_output(curated, tokenizer, tmp_path):
    from trl import DPOConfig, DPOTrainer

    ds = train_split(curated / "dpo")
    assert "margin" not in ds.column_names and "score_margin" in ds.column_names
    trainer = DPOTrainer(
        model=tiny_llama(tokenizer),
        ref_model=tiny_llama(tokenizer),
        args=DPOConfig(**common_args(tmp_path), max_length=128),
        train_dataset=first_rows(ds),
        processing_class=tokenizer,
    )
    trainer.train()
    assert trainer.state.global_step == 2 and len(losses(trainer)) == 2


def test_reward_trainer_reads_no_margin_unless_asked(curated, tokenizer, tmp_path):
    """Without a `margin` column RewardTrainer's first loss is the plain Bradley-Terry -log sigmoid(r_c - r_r),
    about log 2 for a near-zero random reward head. The same rows with a `margin` column (as a raw score
    gap named so would be) change that loss: the trainer does read the name, so it must not be there."""
    from trl import RewardConfig, RewardTrainer

    ds = first_rows(train_split(curated / "dpo"))

    def first_loss(data):
        trainer = RewardTrainer(
            model=tiny_llama(tokenizer, head="reward"),
            args=RewardConfig(**common_args(tmp_path), max_length=128),
            train_dataset=data,
            processing_class=tokenizer,
        )
        trainer.train()
        assert trainer.state.global_step == 2
        return losses(trainer)[0]

    plain = first_loss(ds)
    assert plain == pytest.approx(0.693, abs=0.05)
    with_margin = first_loss(ds.add_column("margin", [3.0] * ds.num_rows))
    assert with_margin > plain + 1.0


@pytest.mark.parametrize("name", ["sft", "rerank", "rerank_best"])
def test_sft_trainer_runs_on_sft_and_rerank_outputs(curated, tokenizer, tmp_path, name):
    from trl import SFTConfig, SFTTrainer

    ds = train_split(curated / name)
    assert "messages" in ds.column_names and "prompt" not in ds.column_names
    if name == "rerank_best":
        assert set(ds["rank"]) == {0}
    trainer = SFTTrainer(
        model=tiny_llama(tokenizer),
        args=SFTConfig(**common_args(tmp_path), max_length=128),
        train_dataset=first_rows(ds),
        processing_class=tokenizer,
    )
    trainer.train()
    assert trainer.state.global_step == 2 and len(losses(trainer)) == 2
