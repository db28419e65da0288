"""The embedding engine: frozen backbones (Hugging Face / GGUF sources, ArmoRM checkpoints), chat templating,
token-budget batching."""

from pipeline.embed.backbone import Backbone, BackboneSpec, load_backbone, load_tokenizer
from pipeline.embed.batching import check_permutation, plan_batches, plan_packs, restore_order
from pipeline.embed.engine import EmbeddingEngine, Embeddings
from pipeline.embed.templating import (
    TemplateError,
    TemplatePolicy,
    TokenizedConversation,
    tokenize_conversation,
    tokenize_many,
)

__all__ = [
    "Backbone",
    "BackboneSpec",
    "load_backbone",
    "load_tokenizer",
    "check_permutation",
    "plan_batches",
    "plan_packs",
    "restore_order",
    "EmbeddingEngine",
    "Embeddings",
    "TemplateError",
    "TemplatePolicy",
    "TokenizedConversation",
    "tokenize_conversation",
    "tokenize_many",
]
