"""What differs between reward-model architecture families, one registry entry per family.

A team's reward model is a transformers `*ForSequenceClassification` checkpoint. What the scorer
must know about it depends on its family only: how a conversation becomes its input (the chat
template for decoders, a (prompt text, response) text pair for encoders, as the OpenAssistant
DeBERTa reward models are documented), where the reward is read, and whether our padding-free,
prompt-sharing passes are exact for it. That knowledge lives here, not in branches through the
engine (the same idea as reward-bench's per-model registry).

Decoder families: transformers' generic sequence classifier (`GenericForSequenceClassification`):
`score = Linear(hidden, num_labels)` applied to the base model's last hidden state at the last
token that is not the pad token. The base model is the class's `base_model_prefix` attribute, the
head its `score` attribute. Since the state at a position never depends on later tokens (causal
attention), reading the reward at the last non-pad token equals running the sequence cut after it:
our EmbeddingEngine (token budgets, packing, each prompt once) gives exactly that state.

Encoder families: each has its own pooler and classifier stack (BERT's tanh pooler, RoBERTa's
classification head, DeBERTa's ContextPooler), so the scorer runs the class's own forward on
length-sorted, token-budget, right-padded batches with an attention mask (exact up to fp32 error:
masked positions contribute nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

DECODER = "decoder"
ENCODER = "encoder"
CHAT_TEMPLATE = "chat_template"
TEXT_PAIR = "text_pair"


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.json's model_type values of this family
    kind: str  # DECODER | ENCODER
    call: str  # CHAT_TEMPLATE | TEXT_PAIR: how a (prompt, response) becomes the model's input
    head: str | None  # decoders: the linear head read at the last non-pad token; encoders: None (own forward)
    # Padding-free packing and prompt sharing run the base model with the shared-prompt attention;
    # a model with sliding-window layers or soft-capping keeps padded per-unit passes instead (the
    # engine checks the config itself, pipeline.embed.shared_attention.supports). False here forces it.
    shares_prompts: bool = True


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",), DECODER, CHAT_TEMPLATE, "score"),
    Family("mistral", ("mistral",), DECODER, CHAT_TEMPLATE, "score"),
    Family("qwen2", ("qwen2",), DECODER, CHAT_TEMPLATE, "score"),
    Family("qwen3", ("qwen3",), DECODER, CHAT_TEMPLATE, "score"),
    Family("gemma", ("gemma",), DECODER, CHAT_TEMPLATE, "score"),
    # Gemma-2 soft-caps attention logits and alternates sliding-window layers: the shared-prompt
    # attention would skip both, so it always runs padded per-unit passes with its own (eager) attention.
    Family("gemma2", ("gemma2",), DECODER, CHAT_TEMPLATE, "score", shares_prompts=False),
    Family("gemma3_text", ("gemma3_text",), DECODER, CHAT_TEMPLATE, "score", shares_prompts=False),
    Family("phi3", ("phi3",), DECODER, CHAT_TEMPLATE, "score"),
    Family("olmo2", ("olmo2",), DECODER, CHAT_TEMPLATE, "score"),
    Family("bert", ("bert",), ENCODER, TEXT_PAIR, None),
    Family("roberta", ("roberta", "xlm-roberta"), ENCODER, TEXT_PAIR, None),
    Family("deberta", ("deberta-v2", "deberta"), ENCODER, TEXT_PAIR, None),
    Family("electra", ("electra",), ENCODER, TEXT_PAIR, None),
)
_BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def family_of(model_type: str | None) -> Family | None:
    return _BY_MODEL_TYPE.get(str(model_type))


def known_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)
