"""Turning (prompt messages, response) into token ids, and finding where the prompt ends.

Pure: the tokenizer is passed in, nothing is loaded here.

Decoders: the conversation prompt + [assistant: response] is rendered with the tokenizer's chat
template (no generation prompt). The prompt's end is found without any model-specific token
pattern: the prompt-only messages are rendered with the same template, their token ids must be a
prefix of the whole conversation's ids, and the prompt's last token is at len(prompt ids) - 1.
If it is not a prefix, the conversation is quarantined rather than guessed.

Encoders (no chat template): the conversation is rendered as plain "role: content" lines, one per
message, the response as a final "assistant: <response>" line; the prompt alone is rendered the
same way without that line. Both are tokenised with the encoder's special tokens ([CLS] ... [SEP]).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

OVERFLOW_POLICIES = ("truncate_prompt", "quarantine")
KINDS = ("decoder", "encoder")

# Stands in for a system message when measuring what the template renders for one (policy "none").
_SYSTEM_SENTINEL = "ARMOLABELSYSTEMSENTINEL"
NOT_A_PREFIX = "prompt rendering is not a prefix of the conversation rendering"


@dataclass(frozen=True)
class TemplatePolicy:
    """How conversations become model input.

    system_prompt, for conversations without a system message of their own (a conversation's own
    system message is data and is always kept):
      "template_default": render exactly what the chat template renders (SmolLM2's template then
          injects "You are a helpful AI assistant named SmolLM, trained by Hugging Face").
      "none": no system turn at all. Done generically: render the conversation behind a sentinel
          system message, check that the rendering of that system message alone is a prefix of it,
          and cut that prefix out (keeping a BOS token the template writes once at the start, but
          not a BOS that opens every turn). A template for which this does not hold raises
          TemplateError.
      any other string: used as the system message.
    max_tokens: longest sequence allowed (also capped by the tokenizer's model_max_length).
    overflow: "truncate_prompt" drops the oldest prompt turns, keeping a system message, the last
      user turn and the response whole (decoders: quarantined if still too long; encoders: then the
      prompt is cut from its start, keeping the response); "quarantine" rejects the unit.
    """

    system_prompt: str = "template_default"
    max_tokens: int = 2048
    overflow: str = "truncate_prompt"

    def __post_init__(self):
        if self.overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, not {self.overflow!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 2:
            raise ValueError(f"max_tokens must be an integer >= 2, not {self.max_tokens!r}")
        if not isinstance(self.system_prompt, str):
            raise ValueError("system_prompt must be a string")

    @classmethod
    def from_dict(cls, d: dict) -> TemplatePolicy:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown template policy settings: {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    prompt_input_ids: list[int] | None  # encoders: the prompt alone; None for decoders
    prompt_end: int  # decoders: index in input_ids of the prompt's last token; -1 for encoders
    prompt_tokens: int
    response_tokens: int  # total_tokens - prompt_tokens
    total_tokens: int
    tokens_before_truncation: int  # total_tokens of the untruncated rendering
    truncated: bool


class TemplateError(ValueError):
    """A conversation that cannot be turned into model input; `reason` is the quarantine reason."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def token_cap(tokenizer, policy: TemplatePolicy) -> int:
    limit = getattr(tokenizer, "model_max_length", None)
    if limit and limit < 1_000_000:  # tokenizers without a limit report a huge sentinel value
        return min(policy.max_tokens, int(limit))
    return policy.max_tokens


def _clean(messages: Sequence[dict]) -> list[dict]:
    out = []
    for m in messages:
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise TemplateError("message without a role")
        out.append(
            {
                "role": role,
                "content": content if isinstance(content, str) else ("" if content is None else str(content)),
            }
        )
    return out


def _with_policy_system(messages: list[dict], policy: TemplatePolicy) -> list[dict]:
    if policy.system_prompt in ("template_default", "none") or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": policy.system_prompt}] + messages


# --- decoders ----------------------------------------------------------------------------------


def _apply_template(tokenizer, messages: list[dict]) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("tokenizer has no chat template (use kind='encoder' for encoders)")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    except TemplateError:
        raise
    except Exception as e:  # the template's own raise_exception (e.g. roles must alternate)
        raise TemplateError(f"chat template rejected the conversation: {e}") from e


def _render_decoder(tokenizer, messages: list[dict], policy: TemplatePolicy) -> str:
    has_system = bool(messages) and messages[0]["role"] == "system"
    if policy.system_prompt != "none" or has_system:
        return _apply_template(tokenizer, _with_policy_system(messages, policy))
    sentinel = [{"role": "system", "content": _SYSTEM_SENTINEL}]
    system_block = _apply_template(tokenizer, sentinel)
    full = _apply_template(tokenizer, sentinel + messages)
    if (
        system_block.count(_SYSTEM_SENTINEL) != 1
        or not full.startswith(system_block)
        or _SYSTEM_SENTINEL in full[len(system_block) :]
    ):
        raise TemplateError(
            "system_prompt='none' is not supported by this chat template "
            "(a system message does not render as a separable first block)"
        )
    rest = full[len(system_block) :]
    # A BOS the template writes once at the very start (Llama-3's <|begin_of_text|>) is kept. A
    # "BOS" that opens every turn (SmolLM2's bos_token is <|im_start|>) belongs to the system
    # turn being cut, and the next turn opens with its own.
    bos = getattr(tokenizer, "bos_token", None) or ""
    preamble = bos if bos and system_block.startswith(bos) and not rest.startswith(bos) else ""
    return preamble + rest


def _decoder_texts(tokenizer, prompt: list[dict], response: str, policy: TemplatePolicy) -> tuple[str, str]:
    """(conversation rendering, prompt-only rendering)."""
    full = _render_decoder(tokenizer, prompt + [{"role": "assistant", "content": response}], policy)
    prompt_only = _render_decoder(tokenizer, prompt, policy)
    return full, prompt_only


def _decoder_result(full_ids: list[int], prompt_ids: list[int], before: int) -> TokenizedConversation:
    if not prompt_ids or len(prompt_ids) > len(full_ids) or full_ids[: len(prompt_ids)] != prompt_ids:
        raise TemplateError(NOT_A_PREFIX)
    n, p = len(full_ids), len(prompt_ids)
    return TokenizedConversation(
        input_ids=list(full_ids),
        prompt_input_ids=None,
        prompt_end=p - 1,
        prompt_tokens=p,
        response_tokens=n - p,
        total_tokens=n,
        tokens_before_truncation=before,
        truncated=before != n,
    )


def _ids(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=special)["input_ids"]


def _truncation_starts(messages: list[dict]) -> list[int]:
    """Indices where a shortened prompt may start: each later user turn (oldest first), after an
    optional leading system message that is kept."""
    first = 1 if messages and messages[0]["role"] == "system" else 0
    return [j for j in range(first + 1, len(messages)) if messages[j]["role"] == "user"]


def _shortened(messages: list[dict], start: int) -> list[dict]:
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    return head + messages[start:]


def _too_long(n: int, cap: int) -> str:
    return f"conversation has {n} tokens, more than max_tokens={cap}"


def _truncate_decoder(tokenizer, prompt, response, policy, cap, before) -> TokenizedConversation:
    for start in _truncation_starts(prompt):
        full, prompt_only = _decoder_texts(tokenizer, _shortened(prompt, start), response, policy)
        full_ids, prompt_ids = _ids(tokenizer, [full, prompt_only], special=False)
        if len(full_ids) <= cap:
            return _decoder_result(full_ids, prompt_ids, before)
    raise TemplateError(_too_long(before, cap) + " even with only the last user turn and the response")


# --- encoders ----------------------------------------------------------------------------------


def _encoder_texts(prompt: list[dict], response: str, policy: TemplatePolicy) -> tuple[str, str]:
    messages = _with_policy_system(prompt, policy)
    prompt_text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
    answer = _encoder_answer(response)
    return (f"{prompt_text}\n{answer}" if prompt_text else answer), prompt_text


def _encoder_answer(response: str) -> str:
    return f"assistant: {response}"


def _encoder_result(tokenizer, full_ids, prompt_ids, before, cap, full_text, prompt_text) -> TokenizedConversation:
    if len(full_ids) > cap:
        full_ids = tokenizer(full_text, add_special_tokens=True, truncation=True, max_length=cap)["input_ids"]
    if len(prompt_ids) > cap:
        prompt_ids = tokenizer(prompt_text, add_special_tokens=True, truncation=True, max_length=cap)["input_ids"]
    n, p = len(full_ids), len(prompt_ids)
    return TokenizedConversation(
        input_ids=list(full_ids),
        prompt_input_ids=list(prompt_ids),
        prompt_end=-1,
        prompt_tokens=p,
        response_tokens=max(0, n - p),
        total_tokens=n,
        tokens_before_truncation=before,
        truncated=before != n,
    )


def _truncate_encoder(tokenizer, prompt, response, policy, cap, before) -> TokenizedConversation:
    full = prompt_only = ""
    for start in _truncation_starts(prompt) or [0]:
        full, prompt_only = _encoder_texts(_shortened(prompt, start) if start else prompt, response, policy)
        full_ids, prompt_ids = _ids(tokenizer, [full, prompt_only], special=True)
        if len(full_ids) <= cap:
            return _encoder_result(tokenizer, full_ids, prompt_ids, before, cap, full, prompt_only)
    return _encoder_keep_response(tokenizer, prompt_only, _encoder_answer(response), cap, before)


def _special_wrap(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens an encoder puts before and after a text ([CLS] … [SEP] for BERT)."""
    empty = tokenizer("", add_special_tokens=True)["input_ids"]
    starts = {tokenizer.cls_token_id, tokenizer.bos_token_id} - {None}
    n_head = 1 if empty and empty[0] in starts else 0
    return list(empty[:n_head]), list(empty[n_head:])


def _encoder_keep_response(
    tokenizer, prompt_text: str, answer_text: str, cap: int, before: int
) -> TokenizedConversation:
    """Still too long with only the last user turn: keep the response whole (its start, if it alone
    exceeds the cap) and the END of the prompt, the part nearest the response. Cutting the joined
    text at the cap instead would drop the very response being rated. The prompt-alone sequence
    keeps the prompt's end as well."""
    prompt_ids, answer_ids = _ids(tokenizer, [prompt_text, answer_text], special=False)
    head, tail = _special_wrap(tokenizer)
    room = cap - len(head) - len(tail)
    answer_ids = answer_ids[:room]
    keep = room - len(answer_ids)
    kept_prompt = prompt_ids[len(prompt_ids) - keep :] if keep > 0 else []
    full_ids = head + kept_prompt + answer_ids + tail
    prompt_alone = head + prompt_ids[max(0, len(prompt_ids) - room) :] + tail
    n = len(full_ids)
    return TokenizedConversation(
        input_ids=list(full_ids),
        prompt_input_ids=list(prompt_alone),
        prompt_end=-1,
        prompt_tokens=n - len(answer_ids),
        response_tokens=len(answer_ids),
        total_tokens=n,
        tokens_before_truncation=before,
        truncated=True,
    )


# --- public API --------------------------------------------------------------------------------


def tokenize_many(
    tokenizer,
    prompts: Sequence[Sequence[dict]],
    responses: Sequence[str],
    policy: TemplatePolicy,
    kind: str = "decoder",
) -> list[TokenizedConversation | TemplateError]:
    """Tokenise many conversations with one batched tokenizer call; each result is either a
    TokenizedConversation or the TemplateError that quarantines that unit."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    cap = token_cap(tokenizer, policy)
    results: list[TokenizedConversation | TemplateError | None] = [None] * len(prompts)
    cleaned: dict[int, tuple[list[dict], str]] = {}
    texts: list[str] = []
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        try:
            messages = _clean(prompt)
            response = response if isinstance(response, str) else ("" if response is None else str(response))
            pair = (
                _decoder_texts(tokenizer, messages, response, policy)
                if kind == "decoder"
                else _encoder_texts(messages, response, policy)
            )
        except TemplateError as e:
            results[i] = e
            continue
        cleaned[i] = (messages, response)
        texts.extend(pair)
    ids = _ids(tokenizer, texts, special=kind == "encoder")
    for k, (i, (messages, response)) in enumerate(cleaned.items()):
        full_ids, prompt_ids = ids[2 * k], ids[2 * k + 1]
        n = len(full_ids)
        try:
            if kind == "decoder":
                # The prefix check comes first: a template that breaks it is never guessed around.
                result = _decoder_result(full_ids, prompt_ids, n)
                if n > cap:
                    if policy.overflow == "quarantine":
                        raise TemplateError(_too_long(n, cap))
                    result = _truncate_decoder(tokenizer, messages, response, policy, cap, n)
            else:
                if n > cap and policy.overflow == "quarantine":
                    raise TemplateError(_too_long(n, cap))
                if n > cap:
                    result = _truncate_encoder(tokenizer, messages, response, policy, cap, n)
                else:
                    result = _encoder_result(tokenizer, full_ids, prompt_ids, n, cap, texts[2 * k], texts[2 * k + 1])
            results[i] = result
        except TemplateError as e:
            results[i] = e
    return results  # type: ignore[return-value]


def tokenize_conversation(
    tokenizer, prompt: Sequence[dict], response: str, policy: TemplatePolicy, kind: str = "decoder"
) -> TokenizedConversation:
    """Tokenise one conversation; raises TemplateError when the unit must be quarantined."""
    (result,) = tokenize_many(tokenizer, [prompt], [response], policy, kind)
    if isinstance(result, TemplateError):
        raise result
    return result
