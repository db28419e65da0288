"""Adapters: one raw record (a dict as published) -> normalised rows, or a QuarantineError.

A normalised row is a prompt (chat messages, the last one a user turn) and its responses, with
the labels the corpus carries. Every adapter is pure: no I/O, no state across records.

Policies for the published sets (what a reader must decide, stated once):
- HH-RLHF: transcripts are split at "\\n\\nHuman:" / "\\n\\nAssistant:"; the prompt is every turn before
  the final Assistant turn, which is the response. chosen and rejected must have the same prompt
  turns, else the pair is quarantined. Turn texts are stripped of surrounding whitespace.
- PandaLM: the label is the majority of annotator1..3 (0 = tie, 1 = response1 better, 2 = response2
  better). A majority for 1 or 2 makes that response "chosen"; label_confidence = share of
  annotators agreeing (2/3 or 1). A majority for 0 is a tie; so is a three-way disagreement
  (0, 1, 2; label_confidence 1/3). Ties keep the file's order (response1 first), set tie=True and
  leave `preference` null, so pairwise training cannot mistake them for a judgement.
- LLMBar: label 1 or 2 names the output that follows `input`; it becomes "chosen".
- UniEval: `scores` may be a dict or a Python-dict string (parsed with ast.literal_eval). Each
  known attribute becomes a rating named by the objective registry ("topical_chat.naturalness"),
  with value = Objective.to_unit(raw); unknown attributes are ignored; a raw value outside the
  objective's native scale quarantines the row.
  topical_chat: the `source` history is split into turns at newlines; roles alternate backwards
  from the last turn, which is the user's; the grounding `context` fact is a leading system
  message "Grounding fact: ...". sfres: the dialogue act (`source`) is the single user message.
- Open Assistant trees: every prompter message with at least two ranked (rank not null, not
  deleted) assistant replies gives one best-of-N row: prompt = the path of messages from the root
  to that prompter message, responses = the ranked replies ordered by rank (human_rank 0 = best).
  Unranked or deleted replies are left out of that row; deeper turns give their own rows. A tree
  with no such message is quarantined as a whole. "oasst_pairs" turns each such row into all
  (better, worse) pairs by rank order.

Reading records as people store them (every adapter; adapt_mapping and the hub presets):
- Values: numeric strings, integral floats and booleans (1/0) are numbers; null, "", "N/A", "NA",
  "none", "null" and "nan" are missing (a missing rating is left out; a missing label quarantines).
  A list stored as a JSON string (CSV) is decoded where a list is expected, or where it decodes to
  chat messages; lists of plain strings only under options.json_cells (see decode_cell).
- Messages: OpenAI content parts are joined (text parts, newline-separated); a non-text part
  quarantines the row. Tool traffic (tool/function/observation/ipython roles, assistant tool_calls
  with `content: null`, ShareGPT function_call) quarantines the row unless options.tool_messages is
  "inline" (see messages_of). ShareGPT's top-level `system` becomes the system message.
- H4 / Tulu-3 / Argilla: a `prompt` string beside whole-conversation chosen/rejected; the
  conversations' shared prefix is the prompt, and `prompt` must agree with it (check_prompt_matches).
- Labels from a column (columns.label, see label_rule): the winner goes first and is "chosen"; a tie
  keeps the file's order, tie=True and no preference; a signed strength also gives
  label_confidence = |strength| / max. Several sides whose conversations differ before the final
  assistant turn (multi-turn battles) are quarantined (MULTI_TURN_REASON), never paired.
- Lists of responses (columns.responses): ranks become dense 0-based human ranks (ranks_rule);
  per-response ratings give one rated row per response in addition to the ranked group or pair
  (a response is then embedded once per row it belongs to).
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, overload

from pipeline import objectives

ROLES = {
    "user": "user",
    "human": "user",
    "prompter": "user",
    "system": "system",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}


class QuarantineError(Exception):
    """The record (or one row derived from it) cannot be used; `reason` says why.
    `locator` names the part of a record that failed when one record gives several rows."""

    def __init__(self, reason: str, locator: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.locator = locator


@dataclass
class Row:
    kind: str
    prompt: list[dict]
    responses: list[Any]
    tie: bool = False
    label_confidence: float | None = None
    ranks: list[int] | None = None
    ratings: list[dict] | None = None  # rated rows: [{name, raw, value}] for the one response
    response_labels: list[str] | None = None  # names used in reasons ("chosen", "output_2", ...)
    locator: str | None = None  # part of the record this row came from (multi-row records)


@dataclass(frozen=True)
class Adapter:
    name: str
    # (record, options) -> [Row | QuarantineError, ...]; None for "auto" (an adapter chosen per
    # record) and "mapping" (driven by the spec's columns, see adapt_mapping)
    fn: Callable[[dict, dict], list] | None
    default_source: str | None = None  # None: the file's name
    description: str = ""


# --- field access ------------------------------------------------------------------------------


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


_PATH_TOKEN = re.compile(r"\[(\*|\d+)\]|[^.\[\]]+")


def path_tokens(path: str) -> list[str]:
    """ "completions[*].annotations.helpfulness.Rating" -> ["completions", "*", "annotations", ...];
    "turns.0.text" and "turns[0].text" are the same path."""
    toks = [m.group(1) or m.group(0) for m in _PATH_TOKEN.finditer(path)]
    if not toks or toks.count("*") > 1:
        raise ValueError(f"field path {path!r}: expected names separated by '.', with at most one [*]")
    return toks


def has_wildcard(path: Any) -> bool:
    return isinstance(path, str) and "[*]" in path


def _step(cur: Any, tok: str) -> tuple[bool, Any]:
    if isinstance(cur, str) and cur.lstrip().startswith(("[", "{")):
        cur = _json_or_none(cur)  # a JSON-encoded cell (CSV) reached into
    if isinstance(cur, dict) and tok in cur:
        return True, cur[tok]
    if isinstance(cur, list) and tok.isdigit() and int(tok) < len(cur):
        return True, cur[int(tok)]
    return False, None


def field_value(rec: dict, name: str) -> Any:
    """A field by name or path: "meta.question" reaches into nested mappings, "turns.0" or
    "turns[0]" into lists, and one "[*]" maps the rest of the path over a list
    ("completions[*].response" -> one value per completion; an element without the rest of the
    path gives None there). A name that is itself a key of the record wins over a path."""
    if name in rec:
        return rec[name]
    toks = path_tokens(name)
    if len(toks) == 1:
        raise QuarantineError(f"missing field {name!r}")
    found, cur = (toks[0] in rec), (rec[toks[0]] if toks[0] in rec else None)
    if not found:
        raise QuarantineError(f"missing field {name!r}")
    for i, tok in enumerate(toks[1:], 1):
        if tok == "*":
            items = _as_list(cur, name)
            rest = toks[i + 1 :]
            out = []
            for item in items:
                ok, v = True, item
                for t in rest:
                    ok, v = _step(v, t)
                    if not ok:
                        break
                out.append(v if ok else None)
            return out
        found, cur = _step(cur, tok)
        if not found:
            raise QuarantineError(f"missing field {name!r}")
    return cur


def _as_list(v: Any, name: str) -> list:
    if isinstance(v, str):
        decoded = _json_or_none(v)
        if isinstance(decoded, list):
            return decoded
    if not isinstance(v, list):
        raise QuarantineError(f"wrong type: field {name!r} is {_type_name(v)}, expected a list")
    return v


@overload
def text_field(rec: dict, name: str, allow_missing: Literal[False] = False) -> str: ...
@overload
def text_field(rec: dict, name: str, allow_missing: bool) -> str | None: ...
def text_field(rec: dict, name: str, allow_missing: bool = False) -> str | None:
    try:
        v = field_value(rec, name)
    except QuarantineError:
        if allow_missing:
            return None
        raise
    if v is None and allow_missing:
        return None
    if not isinstance(v, str):
        raise QuarantineError(f"wrong type: field {name!r} is {_type_name(v)}, expected a string")
    return v


# --- values as people store them -----------------------------------------------------------------

# Spellings of "no value" in published files (UltraFeedback's "N/A", pandas' "nan", empty CSV cells).
MISSING_STRINGS = frozenset({"", "n/a", "na", "none", "null", "nan"})


def is_missing(v: Any) -> bool:
    return (
        v is None
        or (isinstance(v, float) and math.isnan(v))
        or (isinstance(v, str) and v.strip().lower() in MISSING_STRINGS)
    )


def number_of(v: Any, label: str) -> float | None:
    """A number from a label cell: ints, floats, numeric strings ("4", "4.0", " 3 "), booleans and
    "true"/"false" as 1/0; None for a missing value (is_missing). Anything else quarantines."""
    if is_missing(v):
        return None
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    if isinstance(v, (int, float)):
        if not math.isfinite(v):
            raise QuarantineError(f"wrong type: {label} is {v!r}, expected a finite number")
        return float(v)
    if isinstance(v, str):
        s = v.strip().lower()
        if s in ("true", "false"):
            return 1.0 if s == "true" else 0.0
        try:
            f = float(s)
        except ValueError:
            raise QuarantineError(f"wrong type: {label} is {v!r}, expected a number") from None
        if not math.isfinite(f):
            raise QuarantineError(f"wrong type: {label} is {v!r}, expected a finite number")
        return f
    raise QuarantineError(f"wrong type: {label} is {_type_name(v)}, expected a number")


def _json_or_none(s: str) -> Any:
    try:
        return json.loads(s)
    except (ValueError, RecursionError):
        return None


def _is_message_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(m, dict) and ("role" in m or "from" in m) for m in v)


def decode_cell(v: Any, opts: dict, text_ok: bool = True) -> Any:
    """A list stored as a JSON string (CSV and some Parquet exports store turns so): decoded when
    the field cannot be text (messages, responses, ranks), when it decodes to a list of chat
    messages, or when the input spec sets `options.json_cells: true` (lists of plain strings, as in
    the arena 55k CSV). Otherwise a string stays text: a response may well start with '['."""
    if not isinstance(v, str) or not v.lstrip().startswith(("[", "{")):
        return v
    decoded = _json_or_none(v)
    if decoded is None:
        return v
    if not text_ok or opts.get("json_cells") or _is_message_list(decoded):
        return decoded
    return v


# --- messages ------------------------------------------------------------------------------------

TOOL_ROLES = ("tool", "function", "observation", "ipython", "function_call", "tool_call")
TOOL_POLICIES = ("quarantine", "inline")


def _content_text(content: Any, where: str) -> str:
    """Message content: a string, or OpenAI content parts whose text parts are joined with a
    newline. Any other part (image_url, input_audio, file, ...) quarantines the row: a text
    backbone cannot score what it cannot see."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                texts.append(part)
                continue
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("text", "input_text", "output_text") and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                label = kind if kind is not None else _type_name(part)
                raise QuarantineError(
                    f"non-text content: {where}.content[{j}] is a {label!r} part; only text parts can be scored"
                )
        return "\n".join(texts)
    raise QuarantineError(f"wrong type: {where}.content is {_type_name(content)}, expected a string")


def _tool_call_text(calls: Any, where: str) -> str:
    if not isinstance(calls, list):
        calls = [calls]
    out = []
    for c in calls:
        fn = c.get("function", c) if isinstance(c, dict) else {}
        name, args = fn.get("name"), fn.get("arguments")
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False, sort_keys=True)
        out.append(f"[tool call] {name}({args})")
    if not out:
        raise QuarantineError(f"wrong type: {where}.tool_calls is empty")
    return "\n".join(out)


def messages_of(value: Any, name: str, opts: dict | None = None) -> list[dict]:
    """Chat messages from [{role, content}] (OpenAI/TRL) or [{from, value}] (ShareGPT).

    Content may be OpenAI content parts (see _content_text). Tool traffic follows
    `options.tool_messages`: "quarantine" (default) quarantines a row holding a tool/function/
    observation message or an assistant tool call, with that reason; "inline" keeps it as text:
    an assistant tool call becomes "[tool call] name(arguments)" in the assistant turn, and a tool
    result becomes a user turn "[tool result] ..." (the roles the chat template knows), so a final
    assistant answer after a tool result is scored with that result in its prompt."""
    opts = opts or {}
    policy = opts.get("tool_messages", "quarantine")
    value = decode_cell(value, opts, text_ok=False)
    if not isinstance(value, list):
        raise QuarantineError(f"wrong type: field {name!r} is {_type_name(value)}, expected a list of messages")
    out = []
    for i, m in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise QuarantineError(f"wrong type: {where} is {_type_name(m)}, expected a message object")
        role = m.get("role", m.get("from"))
        has_content = "content" in m or "value" in m
        content = m.get("content", m.get("value"))
        if role is None or not has_content:
            raise QuarantineError(f"missing field: {where} needs 'role' and 'content'")
        if not isinstance(role, str):
            raise QuarantineError(f"unknown role {role!r} in {where} (expected one of {sorted(set(ROLES))})")
        r = role.lower()
        calls = m.get("tool_calls") or m.get("function_call")
        if r in TOOL_ROLES or (calls and ROLES.get(r) == "assistant"):
            if policy != "inline":
                what = f"a {role!r} message" if r in TOOL_ROLES else "an assistant tool call"
                raise QuarantineError(
                    f"tool message: {where} is {what}; set options.tool_messages: inline to read tool traffic as text"
                )
            if r in ("function_call", "tool_call"):  # ShareGPT (LLaMA-Factory): the call is the value
                out.append({"role": "assistant", "content": f"[tool call] {_content_text(content, where)}"})
            elif r in TOOL_ROLES:
                text = _content_text(content if content is not None else "", where)
                label = m.get("name") or m.get("tool_call_id")
                out.append({"role": "user", "content": f"[tool result{' ' + label if label else ''}] {text}"})
            else:
                said = _content_text(content, where) if content not in (None, "") else ""
                call = _tool_call_text(calls, where)
                out.append({"role": "assistant", "content": f"{said}\n{call}" if said else call})
            continue
        if r not in ROLES:
            raise QuarantineError(
                f"unknown role {role!r} in {where} (expected one of {sorted(set(ROLES))}, "
                f"or a tool role under options.tool_messages)"
            )
        out.append({"role": ROLES[r], "content": _content_text(content, where)})
    return out


def hh_prompt(text: str, name: str) -> list[dict]:
    """A prompt written as an HH transcript ("\n\nHuman: ...\n\nAssistant:", as in Nectar): its turns,
    without the empty Assistant turn it ends with."""
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text
    turns = hh_turns(text, name)
    if turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
        turns = turns[:-1]
    return turns


_STEERLM_TURN = re.compile(r"\n?<extra_id_1>(User|Assistant)\n")


def steerlm_prompt(text: str) -> list[dict]:
    """A HelpSteer2 multi-turn prompt ("{user 1}\n<extra_id_1>Assistant\n{assistant 1}\n<extra_id_1>User\n
    {user 2}", as its card documents) split into turns; a prompt without the markers is one user turn."""
    parts = _STEERLM_TURN.split(text)
    msgs = [{"role": "user", "content": parts[0].strip()}]
    for who, turn in zip(parts[1::2], parts[2::2]):
        msgs.append({"role": "user" if who == "User" else "assistant", "content": turn.strip()})
    return msgs


def with_system(msgs: list[dict], system: str | None) -> list[dict]:
    """Prepend a system prompt given beside the conversation (a column, ShareGPT's top-level
    `system`, options.system); one already at the head of the conversation must say the same."""
    if not system:
        return msgs
    if msgs and msgs[0]["role"] == "system":
        if msgs[0]["content"].strip() != system.strip():
            raise QuarantineError("two different system prompts: one beside the conversation and one in it")
        return msgs
    return [{"role": "system", "content": system}] + msgs


def prompt_of(value: Any, name: str, system: str | None = None, opts: dict | None = None) -> list[dict]:
    """A prompt given as a string (one user turn; an HH transcript under options.prompt_format: hh),
    as messages, or as a one-element list of strings; JSON-encoded cells are decoded (decode_cell)."""
    opts = opts or {}
    value = decode_cell(value, opts)
    if isinstance(value, str):
        fmt = opts.get("prompt_format")
        msgs = (
            hh_prompt(value, name)
            if fmt == "hh"
            else steerlm_prompt(value)
            if fmt == "steerlm"
            else [{"role": "user", "content": value}]
        )
    elif isinstance(value, list) and value and all(isinstance(t, str) for t in value):
        if len(value) != 1:
            raise QuarantineError(
                f"{name}: {len(value)} user turns without the assistant turns between them; "
                f"map the responses as lists of turns of the same length"
            )
        msgs = [{"role": "user", "content": value[0]}]
    elif isinstance(value, list):
        msgs = messages_of(value, name, opts)
    else:
        raise QuarantineError(f"wrong type: field {name!r} is {_type_name(value)}, expected a string or messages")
    return with_system(msgs, system)


def completion_of(value: Any, name: str, opts: dict | None = None) -> str:
    """A response given as a string or as one assistant message (TRL conversational format)."""
    value = decode_cell(value, opts or {})
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        msgs = messages_of(value, name, opts)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise QuarantineError(f"{name}: expected one assistant message, got roles {[m['role'] for m in msgs]}")
        return msgs[0]["content"]
    if isinstance(value, dict):
        return completion_of([value], name, opts)
    raise QuarantineError(f"wrong type: field {name!r} is {_type_name(value)}, expected a string")


def _system_option(rec: dict, opts: dict) -> str | None:
    if opts.get("system_field"):
        return text_field(rec, opts["system_field"], allow_missing=True)
    return opts.get("system")


def is_conversation(value: Any) -> bool:
    """A whole conversation (prompt turns + the response), not one assistant message."""
    if not _is_message_list(value):
        return False
    first = value[0].get("role", value[0].get("from"))
    return len(value) > 1 or ROLES.get(str(first).lower()) != "assistant"


# --- generic formats -----------------------------------------------------------------------------


def adapt_messages(rec: dict, opts: dict) -> list:
    """OpenAI/TRL `messages` (or ShareGPT `conversations`, with its optional top-level `system`):
    the last assistant message is the response."""
    key = "messages" if "messages" in rec or "conversations" not in rec else "conversations"
    msgs = messages_of(field_value(rec, key), key, opts)
    if not msgs or msgs[-1]["role"] != "assistant":
        raise QuarantineError(f"{key}: the last message must be the assistant response")
    system = rec.get("system") if key == "conversations" else None
    if system is not None and not isinstance(system, str):
        raise QuarantineError(f"wrong type: field 'system' is {_type_name(system)}, expected a string")
    return [Row("instruction", with_system(msgs[:-1], system or _system_option(rec, opts)), [msgs[-1]["content"]])]


def adapt_prompt_response(rec: dict, opts: dict) -> list:
    """`prompt` + `response` (or TRL's `completion`)."""
    key = "response" if "response" in rec or "completion" not in rec else "completion"
    prompt = prompt_of(field_value(rec, "prompt"), "prompt", _system_option(rec, opts), opts)
    return [Row("instruction", prompt, [completion_of(field_value(rec, key), key, opts)])]


def adapt_alpaca(rec: dict, opts: dict) -> list:
    """Alpaca-style `instruction` (+ optional `input`) + `output`."""
    prompt = _instruction_prompt(rec, "instruction", "input")
    return [
        Row("instruction", prompt_of(prompt, "instruction", _system_option(rec, opts)), [text_field(rec, "output")])
    ]


def _instruction_prompt(rec: dict, instruction: str, extra_input: str) -> str:
    text = text_field(rec, instruction)
    more = text_field(rec, extra_input, allow_missing=True)
    return f"{text}\n\n{more}" if more and more.strip() else text


def _shared_prefix_pair(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], str, str]:
    """TRL implicit prompt: both are full conversations that differ only in the final assistant turn."""
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if not conv or conv[-1]["role"] != "assistant":
            raise QuarantineError(f"{name}: a conversation must end with the assistant response")
    if chosen[:-1] != rejected[:-1]:
        raise QuarantineError(
            "chosen and rejected do not share the prompt: they differ before the final assistant turn"
        )
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def check_prompt_matches(given: list[dict], prefix: list[dict]) -> None:
    """A `prompt` given beside whole conversations (H4, Tulu-3 and Argilla mixtures) must be
    the conversation's prompt, or its last or first user turn; the conversation's own prefix, which
    holds any system prompt and earlier turns, is what gets scored."""
    if given == prefix or given == prefix[-len(given) :]:
        return
    users = [m["content"].strip() for m in prefix if m["role"] == "user"]
    texts = [m["content"].strip() for m in given if m["role"] == "user"]
    if len(texts) == 1 and users and texts[0] in (users[0], users[-1]):
        return
    raise QuarantineError(
        "prompt does not match the conversations: 'prompt' is neither their shared prefix nor one of its user turns"
    )


def adapt_preference(rec: dict, opts: dict) -> list:
    """TRL preference: `prompt` + `chosen` + `rejected` (strings or messages), the implicit-prompt
    form where chosen and rejected are whole conversations sharing a prefix, and the H4/Tulu-3
    layout: a `prompt` string beside whole-conversation chosen/rejected (checked to agree)."""
    chosen = decode_cell(field_value(rec, "chosen"), opts)
    rejected = decode_cell(field_value(rec, "rejected"), opts)
    system = _system_option(rec, opts)
    if rec.get("prompt") is not None and not (is_conversation(chosen) or is_conversation(rejected)):
        prompt = prompt_of(rec["prompt"], "prompt", system, opts)
        pair = [completion_of(chosen, "chosen", opts), completion_of(rejected, "rejected", opts)]
    else:
        if isinstance(chosen, str) and isinstance(rejected, str):
            raise QuarantineError("missing field 'prompt' (chosen and rejected are plain strings, not conversations)")
        prompt, c, r = _shared_prefix_pair(messages_of(chosen, "chosen", opts), messages_of(rejected, "rejected", opts))
        if rec.get("prompt") is not None:
            check_prompt_matches(prompt_of(rec["prompt"], "prompt", None, opts), prompt)
        prompt = with_system(prompt, system)
        pair = [c, r]
    return [Row("preference", prompt, pair, response_labels=["chosen", "rejected"])]


def adapt_best_of_n(rec: dict, opts: dict) -> list:
    """`prompt` + `responses` (list of strings) + optional `ranks` (0 = best)."""
    prompt = prompt_of(field_value(rec, "prompt"), "prompt", _system_option(rec, opts), opts)
    responses = decode_cell(field_value(rec, "responses"), opts, text_ok=False)
    if not isinstance(responses, list):
        raise QuarantineError(f"wrong type: field 'responses' is {_type_name(responses)}, expected a list")
    texts = [completion_of(r, f"responses[{i}]", opts) for i, r in enumerate(responses)]
    ranks = decode_cell(rec.get("ranks"), opts, text_ok=False)
    if ranks is not None:
        # Ranks are kept as given (0 = best); integral floats and digit strings (CSV) are integers.
        values = (
            [number_of(r, "rank") if isinstance(r, (str, float)) else r for r in ranks]
            if isinstance(ranks, list)
            else None
        )
        ints = [_integral(v) for v in values] if values is not None else []
        if len(ints) != len(texts) or None in ints:
            raise QuarantineError("wrong type: 'ranks' must be a list of integers, one per response")
        ranks = [i for i in ints if i is not None]
    return [Row("best_of_n", prompt, texts, ranks=ranks)]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _integral(v: Any) -> int | None:
    """An int, or a float with an integral value, as an int; None for anything else."""
    if _is_int(v) or (isinstance(v, float) and v == int(v)):
        return int(v)
    return None


# --- HH-RLHF -------------------------------------------------------------------------------------

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def hh_turns(transcript: Any, name: str) -> list[dict]:
    if not isinstance(transcript, str):
        raise QuarantineError(f"wrong type: field {name!r} is {_type_name(transcript)}, expected a string")
    parts = _HH_TURN.split(transcript)
    if parts[0].strip() or len(parts) < 3:
        raise QuarantineError(f"{name}: not an HH transcript (expected it to start with '\\n\\nHuman:')")
    return [
        {"role": "user" if who == "Human" else "assistant", "content": text.strip()}
        for who, text in zip(parts[1::2], parts[2::2])
    ]


def adapt_hh_rlhf(rec: dict, opts: dict) -> list:
    chosen = hh_turns(field_value(rec, "chosen"), "chosen")
    rejected = hh_turns(field_value(rec, "rejected"), "rejected")
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1]["role"] != "assistant":
            raise QuarantineError(f"{name}: the transcript does not end with an Assistant turn")
    if chosen[:-1] != rejected[:-1]:
        raise QuarantineError(
            "chosen and rejected do not share the prompt: their turns before the final Assistant turn differ"
        )
    return [
        Row(
            "preference",
            chosen[:-1],
            [chosen[-1]["content"], rejected[-1]["content"]],
            response_labels=["chosen", "rejected"],
        )
    ]


# --- PandaLM, LLMBar -----------------------------------------------------------------------------


def _vote(rec: dict, name: str, allowed: tuple[int, ...]) -> int:
    v = field_value(rec, name)
    if isinstance(v, str) and v.strip().isdigit():
        v = int(v)
    if not _is_int(v) or v not in allowed:
        raise QuarantineError(f"wrong type: field {name!r} is {v!r}, expected one of {list(allowed)}")
    return v


def pandalm_label(votes: list[int]) -> tuple[int, bool, float]:
    """(winner 1|2, or 0 for a tie; tie flag; share of annotators agreeing) from annotator votes."""
    label, agree = Counter(votes).most_common(1)[0]
    if agree * 2 <= len(votes):
        return 0, True, agree / len(votes)  # no majority (three-way disagreement): a tie
    return label, label == 0, agree / len(votes)


def adapt_pandalm(rec: dict, opts: dict) -> list:
    prompt = prompt_of(_instruction_prompt(rec, "instruction", "input"), "instruction", _system_option(rec, opts))
    r1, r2 = text_field(rec, "response1"), text_field(rec, "response2")
    votes = [_vote(rec, f"annotator{i}", (0, 1, 2)) for i in (1, 2, 3)]
    label, tie, confidence = pandalm_label(votes)
    if label == 2:
        return [Row("preference", prompt, [r2, r1], False, confidence, response_labels=["response2", "response1"])]
    return [Row("preference", prompt, [r1, r2], tie, confidence, response_labels=["response1", "response2"])]


def adapt_llmbar(rec: dict, opts: dict) -> list:
    prompt = prompt_of(text_field(rec, "input"), "input", _system_option(rec, opts))
    o1, o2 = text_field(rec, "output_1"), text_field(rec, "output_2")
    label = _vote(rec, "label", (1, 2))
    pair, names = ([o1, o2], ["output_1", "output_2"]) if label == 1 else ([o2, o1], ["output_2", "output_1"])
    return [Row("preference", prompt, pair, response_labels=names)]


# --- UniEval (rated) -----------------------------------------------------------------------------


def parse_scores(value: Any) -> dict:
    """`scores` as published: a dict, or a Python-dict string (literal_eval: data, never code)."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
            raise QuarantineError(f"wrong type: 'scores' is not a Python dict literal ({type(e).__name__})") from None
    if not isinstance(value, dict):
        raise QuarantineError(f"wrong type: 'scores' is {_type_name(value)}, expected a dict")
    return value


def rating(obj: objectives.Objective, raw: Any, label: str) -> dict | None:
    """One entry of the `ratings` column: the raw value and its map to [0, 1]; None when the value
    is missing (null, "N/A", an empty cell). Numeric strings, integral floats and booleans (1/0)
    are read as numbers; a value map (booleans, categories) is looked up by canonical key."""
    if obj.values is not None:
        if is_missing(raw) and objectives.canonical_key(raw) not in obj.values:
            return None
        try:
            value = obj.to_unit(raw)
        except ValueError as e:
            raise QuarantineError(f"rating {label!r} = {e}") from None
        num = number_of(raw, f"rating {label!r}") if not isinstance(raw, str) or _is_number(raw) else None
        return {"name": obj.name, "raw": value if num is None else num, "value": value}
    x = number_of(raw, f"rating {label!r}")
    if x is None:
        return None
    try:
        value = obj.to_unit(x)  # checks the native scale
    except ValueError as e:
        raise QuarantineError(f"rating {label!r} = {e}") from None
    return {"name": obj.name, "raw": x, "value": value}


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return s.strip().lower() in ("true", "false")


def ratings_of(scores: dict, namespace: str) -> list[dict]:
    """[{name, raw, value}] for the attributes the objective registry knows under `namespace`."""
    out = []
    for attribute in sorted(scores):
        name = f"{namespace}.{attribute}"
        try:
            obj = objectives.get(name)
        except KeyError:
            continue
        entry = rating(obj, scores[attribute], attribute)
        if entry is not None:
            out.append(entry)
    if not out:
        raise QuarantineError(
            f"no known rating in 'scores' (attributes {sorted(scores)}; "
            f"known: {[o.attribute for o in objectives.for_source(namespace, 'rating')]})"
        )
    return out


def topical_chat_prompt(history: str, fact: str | None) -> list[dict]:
    turns = [t.strip() for t in history.split("\n") if t.strip()]
    n = len(turns)
    # The response answers the last turn, so that one is the user's; roles alternate backwards.
    msgs = [{"role": "user" if (n - 1 - i) % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    if fact and fact.strip():
        msgs.insert(0, {"role": "system", "content": f"Grounding fact: {fact.strip()}"})
    return msgs


def adapt_topical_chat(rec: dict, opts: dict) -> list:
    history = text_field(rec, "source")
    fact = text_field(rec, "context", allow_missing=True) if opts.get("grounding", "system") == "system" else None
    ratings = ratings_of(parse_scores(field_value(rec, "scores")), "topical_chat")
    return [Row("rated", topical_chat_prompt(history, fact), [text_field(rec, "system_output")], ratings=ratings)]


def adapt_sfres(rec: dict, opts: dict) -> list:
    prompt = prompt_of(text_field(rec, "source").strip(), "source", _system_option(rec, opts))
    ratings = ratings_of(parse_scores(field_value(rec, "scores")), "sfres")
    return [Row("rated", prompt, [text_field(rec, "system_output")], ratings=ratings)]


# --- Open Assistant trees ------------------------------------------------------------------------


def _oasst_message(node: Any, where: str) -> tuple[dict, list]:
    if not isinstance(node, dict):
        raise QuarantineError(f"wrong type: message at {where} is {_type_name(node)}, expected an object")
    role = node.get("role")
    if role not in ("prompter", "assistant"):
        raise QuarantineError(f"unknown role {role!r} at {where} (expected 'prompter' or 'assistant')")
    text = node.get("text")
    if not isinstance(text, str):
        raise QuarantineError(f"wrong type: 'text' at {where} is {_type_name(text)}, expected a string")
    replies = node.get("replies") or []
    if not isinstance(replies, list):
        raise QuarantineError(f"wrong type: 'replies' at {where} is {_type_name(replies)}, expected a list")
    return {"role": ROLES[role], "content": text}, replies


def oasst_ranked_rows(tree: dict, min_replies: int = 2) -> list:
    """Best-of-N rows of a message tree, depth first in file order (see module docstring)."""
    out: list = []

    def visit(node: Any, path: list[dict], where: str) -> None:
        msg, replies = _oasst_message(node, where)
        path = path + [msg]
        if msg["role"] == "user":
            ranked = [
                r
                for r in replies
                if isinstance(r, dict)
                and r.get("role") == "assistant"
                and _is_int(r.get("rank"))
                and not r.get("deleted")
            ]
            if len(ranked) >= min_replies:
                ranked.sort(key=lambda r: r["rank"])
                locator = str(node.get("message_id") or where)
                try:
                    texts = [_oasst_message(r, f"{where}/{r.get('message_id')}")[0]["content"] for r in ranked]
                    out.append(Row("best_of_n", path, texts, ranks=[r["rank"] for r in ranked], locator=locator))
                except QuarantineError as e:
                    out.append(QuarantineError(e.reason, locator))
        for i, child in enumerate(replies):
            visit(child, path, f"{where}.replies[{i}]")

    visit(tree, [], "root")
    if not out:
        raise QuarantineError(f"no prompter message with at least {min_replies} ranked assistant replies in this tree")
    return out


def adapt_oasst_best_of_n(rec: dict, opts: dict) -> list:
    return oasst_ranked_rows(rec, int(opts.get("min_replies", 2)))


def adapt_oasst_pairs(rec: dict, opts: dict) -> list:
    out: list = []
    for row in oasst_ranked_rows(rec, 2):
        if isinstance(row, QuarantineError):
            out.append(row)
            continue
        n = len(row.responses)
        for i in range(n):
            for j in range(i + 1, n):
                if row.ranks[i] == row.ranks[j]:
                    continue  # equal ranks state no preference
                out.append(
                    Row(
                        "preference",
                        row.prompt,
                        [row.responses[i], row.responses[j]],
                        response_labels=[f"rank {row.ranks[i]}", f"rank {row.ranks[j]}"],
                        locator=f"{row.locator}:{row.ranks[i]}>{row.ranks[j]}",
                    )
                )
    return out


# --- column mapping ------------------------------------------------------------------------------

MAPPABLE = (
    "prompt",
    "system",
    "response",
    "chosen",
    "rejected",
    "messages",
    "responses",
    "label",
    "ranks",
    "ratings",
    "turn",
)
TIE = "tie"
MULTI_TURN_REASON = (
    "the responses do not share a prompt: their conversations differ before the final assistant "
    "turn (a multi-turn comparison); only pairs that differ in the last assistant turn alone are read"
)


def _check_path(key: str, path: Any) -> None:
    if not isinstance(path, str) or not path:
        raise ValueError(f"columns.{key}: expected a column name or field path, got {path!r}")
    path_tokens(path)


def _paths(key: str, spec: Any) -> list[str] | str:
    """A list of columns, or one path (a [*] path or a column holding a list)."""
    if isinstance(spec, list):
        if not spec:
            raise ValueError(f"columns.{key}: expected a non-empty list of columns")
        for i, p in enumerate(spec):
            _check_path(f"{key}[{i}]", p)
        return spec
    _check_path(key, spec)
    return spec


def label_rule(spec: Any) -> dict:
    """The normalised `columns.label` (raises ValueError). Three encodings:
    {column, values: {value: 0 | 1 | tie}}   winner index (0/1, 1/2 ...) or winner string, with ties;
    {column, negative: 0 | 1, max: M}        signed strength: the sign picks the side (a negative value
                                              means responses[negative] won), 0 is a tie,
                                              label_confidence = |value| / M;
    {one_hot: {column: 0 | 1 | tie, ...}}    one 0/1 column per outcome; exactly one must be set."""
    if not isinstance(spec, dict):
        raise ValueError(f"columns.label: expected a mapping, got {spec!r}")

    def side(v: Any, where: str) -> int | str:
        if isinstance(v, str) and v.strip().lower() == TIE:
            return TIE
        if isinstance(v, bool) or not isinstance(v, int) or v not in (0, 1):
            raise ValueError(f"columns.label.{where}: expected 0 or 1 (a position in responses) or 'tie', got {v!r}")
        return v

    keys = set(spec)
    if "one_hot" in keys:
        if keys - {"one_hot"} or not isinstance(spec["one_hot"], dict) or len(spec["one_hot"]) < 2:
            raise ValueError("columns.label.one_hot: expected a mapping column -> 0 | 1 | tie, and nothing beside it")
        for col in spec["one_hot"]:
            _check_path("label.one_hot", col)
        return {"type": "one_hot", "columns": {c: side(v, f"one_hot.{c}") for c, v in spec["one_hot"].items()}}
    _check_path("label.column", spec.get("column"))
    if "values" in keys:
        if keys - {"column", "values"} or not isinstance(spec["values"], dict) or not spec["values"]:
            raise ValueError("columns.label: a value map is {column: C, values: {value: 0 | 1 | tie, ...}}")
        values = {objectives.canonical_key(k): side(v, f"values.{k}") for k, v in spec["values"].items()}
        return {"type": "values", "column": spec["column"], "values": values}
    if "negative" in keys:
        if keys - {"column", "negative", "max"}:
            raise ValueError(f"columns.label: a signed label is {{column, negative, max}}, got keys {sorted(keys)}")
        m = spec.get("max")
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or m <= 0):
            raise ValueError(f"columns.label.max: expected a positive number, got {m!r}")
        neg = side(spec["negative"], "negative")
        if neg == TIE:
            raise ValueError("columns.label.negative: expected 0 or 1")
        return {"type": "signed", "column": spec["column"], "negative": neg, "max": m}
    raise ValueError("columns.label: give `values` (a value map), `negative` (a signed strength) or `one_hot`")


def ranks_rule(spec: Any) -> dict:
    """`columns.ranks`: a path / list of columns (lower is better), or {path, order: ascending |
    descending} (descending: higher is better, e.g. a score). Ranks are made dense and 0-based in
    that order (1-based ranks, gaps and scores all become 0 = best, 1, ...; equal values share a rank)."""
    if isinstance(spec, dict):
        if set(spec) - {"path", "order"} or "path" not in spec:
            raise ValueError(f"columns.ranks: expected {{path, order}}, got keys {sorted(spec)}")
        order = spec.get("order", "ascending")
        if order not in ("ascending", "descending"):
            raise ValueError(f"columns.ranks.order: expected ascending or descending, got {order!r}")
        return {"path": _paths("ranks.path", spec["path"]), "order": order}
    return {"path": _paths("ranks", spec), "order": "ascending"}


def check_columns(columns: dict) -> None:
    """Config-time check of a mapping adapter's `columns` (raises ValueError / KeyError)."""
    unknown = sorted(set(columns) - set(MAPPABLE))
    if unknown:
        raise ValueError(f"columns: unknown target name(s) {unknown}; allowed: {list(MAPPABLE)}")
    if not set(columns) & {"response", "chosen", "rejected", "responses", "messages"}:
        raise ValueError("columns: map at least one of response, chosen/rejected, responses or messages")
    for key in ("prompt", "system", "response", "chosen", "rejected", "messages", "turn"):
        if key in columns:
            if not isinstance(columns[key], str):
                raise ValueError(f"columns.{key}: expected a column name, got {columns[key]!r}")
            _check_path(key, columns[key])
    group = "responses" in columns
    if group:
        if set(columns) & {"response", "chosen", "rejected", "messages"}:
            raise ValueError("columns.responses: map either responses or response / chosen+rejected / messages")
        responses = _paths("responses", columns["responses"])
        if isinstance(responses, list) and len(responses) < 2:
            raise ValueError("columns.responses: a list needs at least two columns")
    for key in ("label", "ranks", "turn"):
        if key in columns and not group:
            raise ValueError(f"columns.{key}: only with columns.responses (the responses it ranks or picks from)")
    if "label" in columns:
        label_rule(columns["label"])
        if isinstance(columns["responses"], list) and len(columns["responses"]) != 2:
            raise ValueError("columns.label: a label picks one of exactly two responses")
        if "ranks" in columns:
            raise ValueError("columns: give label or ranks, not both")
    if "ranks" in columns:
        ranks_rule(columns["ranks"])
    ratings = columns.get("ratings")
    if ratings is not None:
        if not isinstance(ratings, dict) or not ratings:
            raise ValueError("columns.ratings: expected a mapping objective name -> column")
        for name, col in ratings.items():
            obj = objectives.get(name)  # KeyError names the known objectives
            if obj.kind != "rating":
                raise ValueError(f"columns.ratings: {name} is a {obj.kind} objective, not a rating")
            if group:
                cols = _paths(f"ratings.{name}", col)
                n = len(columns["responses"]) if isinstance(columns["responses"], list) else None
                if isinstance(cols, str) and not has_wildcard(cols):
                    raise ValueError(
                        f"columns.ratings.{name}: with responses, give one column per response (a list) or a [*] path"
                    )
                if isinstance(cols, list) and n is not None and len(cols) != n:
                    raise ValueError(f"columns.ratings.{name}: {len(cols)} columns for {n} responses")
            else:
                _check_path(f"ratings.{name}", col)
        if not group and not set(columns) & {"response", "messages"}:
            raise ValueError("columns.ratings: ratings apply to a single response (map 'response' or 'messages')")


def _values_at(rec: dict, spec: list[str] | str) -> tuple[list, list[str]]:
    """(values, names) of a list of columns or of a path to a list."""
    if isinstance(spec, list):
        return [field_value(rec, p) for p in spec], list(spec)
    values = field_value(rec, spec)
    values = _as_list(values, spec)
    base = spec.split("[*]")[0] if has_wildcard(spec) else spec
    return values, [f"{base}[{i}]" for i in range(len(values))]


def _side(value: Any, name: str, opts: dict) -> tuple[str, Any]:
    """One response as stored: ("text", str), ("turns", [assistant turn strings]) or ("conv", messages)."""
    value = decode_cell(value, opts)
    if isinstance(value, str):
        return "text", value
    if isinstance(value, dict):
        return "text", completion_of(value, name, opts)
    if isinstance(value, list) and value and all(isinstance(t, str) for t in value):
        return ("text", value[0]) if len(value) == 1 else ("turns", value)
    if isinstance(value, list) and value:
        msgs = messages_of(value, name, opts)
        if len(msgs) == 1 and msgs[0]["role"] == "assistant":
            return "text", msgs[0]["content"]
        return "conv", msgs
    raise QuarantineError(
        f"wrong type: field {name!r} is {_type_name(value) if value != [] else 'an empty list'}, "
        f"expected a string, a message or a conversation"
    )


def _group_prompt(rec: dict, columns: dict, opts: dict) -> tuple[str, Any] | None:
    if "prompt" not in columns:
        return None
    name = columns["prompt"]
    value = decode_cell(field_value(rec, name), opts)
    if isinstance(value, list) and len(value) > 1 and all(isinstance(t, str) for t in value):
        return "turns", value  # user turns; the responses hold the assistant turns (arena 55k)
    return "msgs", prompt_of(value, name, None, opts)


def _cut_at_turn(conv: list[dict], turn: int, name: str) -> list[dict]:
    seen = 0
    for i, m in enumerate(conv):
        if m["role"] == "assistant":
            seen += 1
            if seen == turn:
                return conv[: i + 1]
    raise QuarantineError(f"{name}: the judged turn {turn} is past the conversation's {seen} assistant turns")


def _group_conversations(
    prompt, sides: list[tuple[str, Any]], names: list[str], turn: int | None
) -> tuple[list[dict], list[str]]:
    """The shared prompt and the final responses of several stored responses (see _side)."""
    if all(k == "text" for k, _ in sides) and turn is None:
        if prompt is None:
            raise QuarantineError("missing field: the responses are plain strings, so columns.prompt is needed")
        if prompt[0] == "turns":
            raise QuarantineError(f"prompt has {len(prompt[1])} user turns but each response is a single turn")
        return prompt[1], [v for _, v in sides]
    convs = []
    for (k, v), name in zip(sides, names):
        if k == "conv":
            convs.append(v)
        elif k == "turns" or (k == "text" and prompt is not None and prompt[0] == "turns"):
            turns = v if k == "turns" else [v]
            users = prompt[1] if prompt is not None and prompt[0] == "turns" else None
            if users is None or len(users) != len(turns):
                raise QuarantineError(
                    f"{name}: {len(turns)} assistant turns do not match the prompt's "
                    f"{len(users) if users else 'single'} user turn(s)"
                )
            conv = []
            for u, a in zip(users, turns):
                if not isinstance(a, str):
                    raise QuarantineError(f"wrong type: {name} holds a {_type_name(a)} turn, expected strings")
                conv += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
            convs.append(conv)
        else:
            if prompt is None:
                raise QuarantineError(f"missing field: {name} is a plain string, so columns.prompt is needed")
            convs.append(prompt[1] + [{"role": "assistant", "content": v}])
    if turn is not None:
        convs = [_cut_at_turn(c, turn, name) for c, name in zip(convs, names)]
    for c, name in zip(convs, names):
        if not c or c[-1]["role"] != "assistant":
            raise QuarantineError(f"{name}: a conversation must end with the assistant response")
    prefix = convs[0][:-1]
    if any(c[:-1] != prefix for c in convs[1:]):
        raise QuarantineError(MULTI_TURN_REASON)
    if prompt is not None and prompt[0] == "msgs" and any(k == "conv" for k, _ in sides):
        check_prompt_matches(prompt[1], prefix)
    return prefix, [c[-1]["content"] for c in convs]


def winner_of(rec: dict, rule: dict) -> tuple[int | None, float | None]:
    """(index of the better response, or None for a tie; label_confidence) from a label rule."""
    if rule["type"] == "one_hot":
        on = []
        for col, side in rule["columns"].items():
            x = number_of(field_value(rec, col), f"label column {col!r}")
            if x not in (None, 0.0, 1.0):
                raise QuarantineError(f"wrong type: label column {col!r} is {x:g}, expected 0 or 1")
            if x == 1.0:
                on.append((col, side))
        if len(on) != 1:
            raise QuarantineError(
                f"label: {len(on)} of the one-hot columns {sorted(rule['columns'])} are set, expected exactly one"
            )
        side = on[0][1]
        return (None if side == TIE else side), None
    col = rule["column"]
    raw = field_value(rec, col)
    if is_missing(raw):
        raise QuarantineError(f"missing label: field {col!r} is {raw!r}")
    if rule["type"] == "values":
        key = objectives.canonical_key(raw)
        if key not in rule["values"]:
            raise QuarantineError(f"label {col!r} = {raw!r} is not in its value map {sorted(rule['values'])}")
        side = rule["values"][key]
        return (None if side == TIE else side), None
    x = number_of(raw, f"label {col!r}")
    assert x is not None  # a missing label was quarantined above
    m = rule["max"]
    if m is not None and abs(x) > m:
        raise QuarantineError(f"label {col!r} = {x:g} is outside [-{m:g}, {m:g}]")
    confidence = abs(x) / m if m is not None else None
    if x == 0:
        return None, None
    return (rule["negative"] if x < 0 else 1 - rule["negative"]), confidence


def dense_ranks(values: list[float | None], order: str) -> list[int | None]:
    """0 = best; equal values share a rank; None stays None (unranked)."""
    distinct = sorted({v for v in values if v is not None}, reverse=(order == "descending"))
    pos = {v: i for i, v in enumerate(distinct)}
    return [None if v is None else pos[v] for v in values]


def _adapt_group(rec: dict, opts: dict, columns: dict) -> list:
    """Several responses to one prompt: a preference row (with a label), a ranked best-of-N row
    (with ranks), per-response rated rows (with ratings), or an unranked best-of-N row."""
    stored, names = _values_at(rec, columns["responses"])
    sides = [_side(v, n, opts) for v, n in zip(stored, names)]
    turn = None
    if columns.get("turn"):
        try:
            t = number_of(field_value(rec, columns["turn"]), f"turn {columns['turn']!r}")
        except QuarantineError as e:
            if not e.reason.startswith("missing field"):
                raise
            t = None
        if t is not None:
            if t < 1 or t != int(t):
                raise QuarantineError(f"wrong type: turn {columns['turn']!r} is {t:g}, expected a turn number >= 1")
            turn = int(t)
    system = (
        text_field(rec, columns["system"], allow_missing=True) if "system" in columns else _system_option(rec, opts)
    )
    prompt, texts = _group_conversations(_group_prompt(rec, columns, opts), sides, names, turn)
    prompt = with_system(prompt, system)
    rows: list = []
    if "label" in columns:
        if len(texts) != 2:
            raise QuarantineError(f"a label picks one of two responses, got {len(texts)}")
        winner, confidence = winner_of(rec, label_rule(columns["label"]))
        if winner is None:
            rows.append(Row("preference", prompt, texts, True, confidence, response_labels=names))
        else:
            order = [winner, 1 - winner]
            rows.append(
                Row(
                    "preference",
                    prompt,
                    [texts[i] for i in order],
                    False,
                    confidence,
                    response_labels=[names[i] for i in order],
                )
            )
    elif "ranks" in columns:
        rule = ranks_rule(columns["ranks"])
        raw, _ = _values_at(rec, rule["path"])
        if len(raw) != len(texts):
            raise QuarantineError(f"ranks: {len(raw)} values for {len(texts)} responses")
        ranks = dense_ranks([number_of(v, f"rank of {n}") for v, n in zip(raw, names)], rule["order"])
        keep = [i for i, r in enumerate(ranks) if r is not None]  # an unranked response is left out of the group
        if len(keep) >= 2:
            rows.append(
                Row(
                    "best_of_n",
                    prompt,
                    [texts[i] for i in keep],
                    ranks=[r for r in ranks if r is not None],  # the ranks of `keep`
                    response_labels=[names[i] for i in keep],
                    locator="ranked",
                )
            )
        elif not columns.get("ratings"):
            raise QuarantineError(f"ranks: {len(keep)} of {len(texts)} responses have a rank, a group needs 2")
    elif not columns.get("ratings"):
        rows.append(Row("best_of_n", prompt, texts, response_labels=names))
    for i, (text, name) in enumerate(zip(texts, names)):
        if not columns.get("ratings"):
            break
        entries: list[dict] = []
        for obj_name, spec in sorted(columns["ratings"].items()):
            values, _ = _values_at(rec, spec)
            if len(values) != len(texts):
                raise QuarantineError(f"ratings.{obj_name}: {len(values)} values for {len(texts)} responses")
            try:
                entry = rating(objectives.get(obj_name), values[i], f"{obj_name} of {name}")
            except QuarantineError as e:
                rows.append(QuarantineError(e.reason, name))  # this response is quarantined, no rated row
                break
            if entry is not None:
                entries.append(entry)
        else:
            if entries:
                rows.append(Row("rated", prompt, [text], ratings=entries, response_labels=[name], locator=name))
            else:
                reason = f"no rating present for {name} (all of its rating values are missing)"
                rows.append(QuarantineError(reason, name))
    return rows


def adapt_mapping(rec: dict, opts: dict, columns: dict) -> list:
    """Read a record through `columns` (canonical name -> the record's column or field path).
    `responses` (a list of columns or a [*] path) with `label`, `ranks` and per-response `ratings`
    reads several responses to one prompt (_adapt_group); otherwise the record is renamed and read
    as the generic format the names imply, and `ratings` rate its single response."""
    if "responses" in columns:
        return _adapt_group(rec, opts, columns)
    renamed = {k: field_value(rec, v) for k, v in columns.items() if k not in ("ratings", "system", "turn")}
    system = text_field(rec, columns["system"], allow_missing=True) if "system" in columns else None
    sub_opts = {**opts, "system": system, "system_field": None} if system else opts
    if "messages" in renamed:
        rows = adapt_messages(renamed, sub_opts)
    elif "chosen" in renamed or "rejected" in renamed:
        rows = adapt_preference(renamed, sub_opts)
    elif "response" in renamed:
        rows = adapt_prompt_response(renamed, sub_opts)
    else:
        raise ValueError("columns: map at least one of response, chosen/rejected, responses or messages")
    if columns.get("ratings"):
        ratings = []
        for name, col in sorted(columns["ratings"].items()):
            entry = rating(objectives.get(name), field_value(rec, col), col)
            if entry is not None:
                ratings.append(entry)
        if not ratings:
            raise QuarantineError("no rating present in the mapped rating columns")
        rows[0].kind, rows[0].ratings = "rated", ratings
    return rows


# --- published hub layouts, as column mappings ---------------------------------------------------
# Each is a `columns` mapping (+ options) over the dataset's published schema, read by
# adapt_mapping; the README's "dataset -> input spec" table lists them. Sources of the schemas are
# cited in tests/test_corpus_hub_formats.py.

ARENA_WINNER = {"model_a": 0, "model_b": 1, "tie": TIE, "tie (bothbad)": TIE}
_HS_ATTRS = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
_UF_ASPECTS = ("instruction_following", "honesty", "truthfulness", "helpfulness")

PRESETS: dict[str, tuple[dict, dict]] = {
    "ultrafeedback": (
        {
            "prompt": "instruction",
            "responses": "completions[*].response",
            # the ranked group follows the mean of the four aspect ratings, as ultrafeedback_binarized picks `chosen`
            "ranks": {"path": "completions[*].fine-grained_score", "order": "descending"},
            "ratings": {
                **{f"ultrafeedback-{a}": f"completions[*].annotations.{a}.Rating" for a in _UF_ASPECTS},
                "ultrafeedback-overall_score": "completions[*].overall_score",
            },
        },
        {},
    ),
    "helpsteer": (
        {"prompt": "prompt", "response": "response", "ratings": {f"helpsteer-{a}": a for a in _HS_ATTRS}},
        {"prompt_format": "steerlm"},
    ),
    "helpsteer2": (
        {"prompt": "prompt", "response": "response", "ratings": {f"helpsteer2-{a}": a for a in _HS_ATTRS}},
        {"prompt_format": "steerlm"},
    ),
    "helpsteer2_preference": (
        {
            "prompt": "prompt",
            "responses": ["response_1", "response_2"],
            "label": {"column": "preference_strength", "negative": 0, "max": 3},
        },
        {"prompt_format": "steerlm"},
    ),
    "helpsteer3": (
        {
            "prompt": "context",
            "responses": ["response1", "response2"],
            "label": {"column": "overall_preference", "negative": 0, "max": 3},
        },
        {},
    ),
    "beavertails": ({"prompt": "prompt", "response": "response", "ratings": {"beavertails-is_safe": "is_safe"}}, {}),
    "pku_saferlhf": (
        {
            "prompt": "prompt",
            "responses": ["response_0", "response_1"],
            "label": {"column": "better_response_id", "values": {0: 0, 1: 1}},
        },
        {},
    ),
    "pku_saferlhf_safer": (
        {
            "prompt": "prompt",
            "responses": ["response_0", "response_1"],
            "label": {"column": "safer_response_id", "values": {0: 0, 1: 1}},
        },
        {},
    ),
    "shp": (
        {
            "prompt": "history",
            "responses": ["human_ref_A", "human_ref_B"],
            "label": {"column": "labels", "values": {1: 0, 0: 1}},
        },
        {},
    ),
    "nectar": (
        {"prompt": "prompt", "responses": "answers[*].answer", "ranks": "answers[*].rank"},
        {"prompt_format": "hh"},
    ),
    "arena": (
        {
            "responses": ["conversation_a", "conversation_b"],
            "turn": "turn",
            "label": {"column": "winner", "values": ARENA_WINNER},
        },
        {},
    ),
    "arena_55k": (
        {
            "prompt": "prompt",
            "responses": ["response_a", "response_b"],
            "label": {"one_hot": {"winner_model_a": 0, "winner_model_b": 1, "winner_tie": TIE}},
        },
        {"json_cells": True},
    ),
}


def _preset(name: str) -> Callable[[dict, dict], list]:
    columns, preset_opts = PRESETS[name]

    def fn(rec: dict, opts: dict) -> list:
        return adapt_mapping(rec, {**preset_opts, **opts}, columns)

    return fn


for _name, (_cols, _) in PRESETS.items():
    check_columns(_cols)


ADAPTERS: dict[str, Adapter] = {
    a.name: a
    for a in (
        Adapter("auto", None, None, "chosen per file from the first record's fields"),
        Adapter("mapping", None, None, "generic: spec.columns maps canonical names to the record's columns"),
        Adapter("messages", adapt_messages, None, "OpenAI/TRL messages or ShareGPT conversations"),
        Adapter("prompt_response", adapt_prompt_response, None, "prompt + response (or completion)"),
        Adapter("alpaca", adapt_alpaca, None, "instruction + input + output"),
        Adapter("preference", adapt_preference, None, "TRL prompt/chosen/rejected, explicit or implicit prompt"),
        Adapter("best_of_n", adapt_best_of_n, None, "prompt + responses (+ ranks)"),
        Adapter("hh_rlhf", adapt_hh_rlhf, "hh_rlhf", "Anthropic HH-RLHF raw transcripts"),
        Adapter("pandalm", adapt_pandalm, "pandalm", "PandaLM test set, majority of 3 annotators"),
        Adapter("llmbar", adapt_llmbar, "llmbar", "LLMBar pairs"),
        Adapter("topical_chat", adapt_topical_chat, "topical_chat", "UniEval Topical-Chat ratings"),
        Adapter("sfres", adapt_sfres, "sfres", "UniEval SF-RES ratings"),
        Adapter("oasst_best_of_n", adapt_oasst_best_of_n, "oasst", "Open Assistant trees -> ranked best-of-N"),
        Adapter("oasst_pairs", adapt_oasst_pairs, "oasst", "Open Assistant trees -> preference pairs by rank"),
        Adapter(
            "ultrafeedback",
            _preset("ultrafeedback"),
            "ultrafeedback",
            "openbmb/UltraFeedback raw: rated units per completion + a group ranked by fine-grained_score",
        ),
        Adapter(
            "helpsteer",
            _preset("helpsteer"),
            "helpsteer",
            "HelpSteer / HelpSteer2 ratings as helpsteer-* (ArmoRM names)",
        ),
        Adapter("helpsteer2", _preset("helpsteer2"), "helpsteer2", "HelpSteer2 ratings as helpsteer2-*"),
        Adapter(
            "helpsteer2_preference",
            _preset("helpsteer2_preference"),
            "helpsteer2_preference",
            "HelpSteer2 preference: signed preference_strength",
        ),
        Adapter("helpsteer3", _preset("helpsteer3"), "helpsteer3", "HelpSteer3 preference: signed overall_preference"),
        Adapter("beavertails", _preset("beavertails"), "beavertails", "BeaverTails QA pairs rated by is_safe"),
        Adapter("pku_saferlhf", _preset("pku_saferlhf"), "pku_saferlhf", "PKU-SafeRLHF pairs by better_response_id"),
        Adapter(
            "pku_saferlhf_safer",
            _preset("pku_saferlhf_safer"),
            "pku_saferlhf_safer",
            "PKU-SafeRLHF pairs by safer_response_id",
        ),
        Adapter("shp", _preset("shp"), "shp", "Stanford SHP: labels 1 = A preferred, 0 = B"),
        Adapter("nectar", _preset("nectar"), "nectar", "Nectar: 7 ranked answers to an HH-style prompt"),
        Adapter(
            "arena",
            _preset("arena"),
            "arena",
            "Chatbot Arena / MT-Bench human judgments: conversation_a/b + winner (ties flagged)",
        ),
        Adapter(
            "arena_55k",
            _preset("arena_55k"),
            "arena_55k",
            "lmsys-arena-human-preference-55k: JSON-list cells + one-hot winner columns",
        ),
    )
}


# Other names users reach for; InputSpec turns them into the adapter's own name.
ALIASES = {
    "unieval_topical_chat": "topical_chat",
    "unieval_sfres": "sfres",
    "oasst": "oasst_best_of_n",
    "hh-rlhf": "hh_rlhf",
    "trl_preference": "preference",
    "chat": "messages",
    "sharegpt": "messages",
}


def detect(rec: Any) -> str | None:
    """The adapter a record's field names point to, or None."""
    if not isinstance(rec, dict):
        return None
    keys = set(rec)
    if {"message_id", "role", "replies"} <= keys:
        return "oasst_best_of_n"
    if {"response1", "response2", "annotator1"} <= keys:
        return "pandalm"
    if {"output_1", "output_2", "label"} <= keys:
        return "llmbar"
    if {"system_output", "scores"} <= keys:
        return "topical_chat" if "context" in keys else "sfres"
    for name, fields in _HUB_FIELDS:
        if fields <= keys:
            return name
    if {"prompt", "answers"} <= keys and _is_list_of_dicts(decode_cell(rec["answers"], {}, text_ok=False)):
        return "nectar"
    if {"chosen", "rejected"} <= keys:
        if "prompt" not in keys and isinstance(rec["chosen"], str) and rec["chosen"].startswith("\n\nHuman:"):
            return "hh_rlhf"
        return "preference"
    if "messages" in keys or "conversations" in keys:
        return "messages"
    if "prompt" in keys and ("response" in keys or "completion" in keys):
        return "prompt_response"
    if "prompt" in keys and "responses" in keys:
        return "best_of_n"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    return None


# Field sets that name a published layout (checked in this order, before the generic ones).
_HUB_FIELDS: tuple[tuple[str, frozenset], ...] = tuple(
    (n, frozenset(f))
    for n, f in (
        ("ultrafeedback", {"instruction", "completions"}),
        ("arena", {"conversation_a", "conversation_b", "winner"}),
        ("arena_55k", {"response_a", "response_b", "winner_model_a", "winner_model_b", "winner_tie"}),
        ("helpsteer3", {"context", "response1", "response2", "overall_preference"}),
        ("helpsteer2_preference", {"prompt", "response_1", "response_2", "preference_strength"}),
        ("pku_saferlhf", {"prompt", "response_0", "response_1", "better_response_id"}),
        ("shp", {"history", "human_ref_A", "human_ref_B", "labels"}),
        ("beavertails", {"prompt", "response", "is_safe"}),
        ("helpsteer", {"prompt", "response", *_HS_ATTRS}),
    )
)


def _is_list_of_dicts(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)
