"""(prompt messages, response) -> a reward model's input ids, as its own class is called. Pure: the
tokenizer is passed in, nothing is loaded here.

Decoders (family call `chat_template`): the conversation rendered with the model's own chat
template (no generation prompt), tokenized without added special tokens, exactly as
`tokenizer.apply_chat_template(conversation, tokenize=True)` does in the model cards, through the
same rendering, prefix check and overflow rules as the backbone's (pipeline/embed/templating.py).
The class reads the reward at the last token that is not `config.pad_token_id`: trailing pad ids
are cut here, which changes nothing the class computes (causal attention) and lets the scorer read
every row's last token.

Encoders (family call `text_pair`): `tokenizer(prompt_text, response)` as the OpenAssistant
DeBERTa reward models document it (question, answer). The prompt text is the last user message
alone when the prompt is that one message; otherwise every prompt message as a "role: content"
line, oldest first (a system_prompt policy string is one more such line at the top). Over-long
pairs: overflow `truncate_prompt` cuts prompt tokens (the tokenizer's `only_first` strategy, which
keeps the response whole); a response that alone fills the cap is quarantined. Overflow
`quarantine` quarantines every pair over the cap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.embed.templating import (
    TemplateError,
    TemplatePolicy,
    _clean,
    _with_policy_system,
    token_cap,
    tokenize_many,
)
from pipeline.reward_models.families import TEXT_PAIR, Family


@dataclass
class RewardModelInput:
    input_ids: list[int]
    token_type_ids: list[int] | None  # encoders whose tokenizer makes them; None otherwise
    prompt_end: int  # decoders: index of the prompt's last token (prompt sharing); -1 for encoders
    prompt_tokens: int
    total_tokens: int
    tokens_before_truncation: int
    truncated: bool


def prompt_text(messages: list[dict], policy: TemplatePolicy) -> str:
    """The question of a (question, answer) pair: the lone user message, else 'role: content' lines."""
    messages = _with_policy_system(messages, policy)
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def reward_model_inputs(
    tokenizer,
    family: Family,
    prompts: Sequence[Sequence[dict]],
    responses: Sequence[str],
    policy: TemplatePolicy,
    pad_token_id: int | None,
) -> list[RewardModelInput | TemplateError]:
    if family.call == TEXT_PAIR:
        return _text_pairs(tokenizer, prompts, responses, policy)
    out: list[RewardModelInput | TemplateError] = []
    for res in tokenize_many(tokenizer, prompts, responses, policy, "decoder"):
        if isinstance(res, TemplateError):
            out.append(res)
            continue
        ids = list(res.input_ids)
        if pad_token_id is not None:
            while ids and ids[-1] == pad_token_id:
                ids.pop()
        if len(ids) <= res.prompt_end:
            out.append(TemplateError("the conversation ends in pad tokens back into the prompt"))
            continue
        out.append(
            RewardModelInput(
                ids, None, res.prompt_end, res.prompt_tokens, len(ids), res.tokens_before_truncation, res.truncated
            )
        )
    return out


def _text_pairs(tokenizer, prompts, responses, policy: TemplatePolicy) -> list[RewardModelInput | TemplateError]:
    cap = token_cap(tokenizer, policy)
    types = "token_type_ids" in getattr(tokenizer, "model_input_names", ())
    firsts: list[str] = []
    seconds: list[str] = []
    out: list[RewardModelInput | TemplateError | None] = [None] * len(prompts)
    good: list[int] = []
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        try:
            firsts.append(prompt_text(_clean(prompt), policy))
        except TemplateError as e:
            out[i] = e
            continue
        seconds.append(response if isinstance(response, str) else ("" if response is None else str(response)))
        good.append(i)
    if good:
        enc = tokenizer(firsts, seconds, add_special_tokens=True, return_token_type_ids=types)
        for k, i in enumerate(good):
            ids = enc["input_ids"][k]
            tt = enc["token_type_ids"][k] if types else None
            n = len(ids)
            if n <= cap:
                out[i] = RewardModelInput(ids, tt, -1, _prompt_side(enc.sequence_ids(k), range(n)), n, n, False)
                continue
            if policy.overflow == "quarantine":
                out[i] = TemplateError(f"conversation has {n} tokens, more than max_tokens={cap}")
                continue
            out[i] = _truncated_pair(ids, tt, enc.sequence_ids(k), cap)
    return out  # type: ignore[return-value]


def _truncated_pair(ids: list[int], tt: list[int] | None, sequence_ids: list, cap: int):
    """The pair cut to `cap` as the tokenizer's `only_first` truncation cuts it: the prompt side's
    last tokens go, the response and the special tokens stay. Done on the encoded pair (its
    sequence ids say which side each token is on), so nothing is tokenized twice."""
    n = len(ids)
    over = n - cap
    prompt_at = [j for j, s in enumerate(sequence_ids) if s == 0]
    if len(prompt_at) <= over:
        return TemplateError(
            f"conversation has {n} tokens, more than max_tokens={cap}, and its response leaves no room for a prompt"
        )
    drop = set(prompt_at[len(prompt_at) - over :])
    keep = [j for j in range(n) if j not in drop]
    ids = [ids[j] for j in keep]
    tt = [tt[j] for j in keep] if tt is not None else None
    return RewardModelInput(ids, tt, -1, _prompt_side(sequence_ids, keep), len(ids), n, True)


def _prompt_side(sequence_ids: list, keep) -> int:
    """Tokens before the response's first token (the [CLS] question [SEP] side) among `keep`."""
    answer = next((j for j, s in enumerate(sequence_ids) if s == 1), len(sequence_ids))
    return sum(1 for j in keep if j < answer)
