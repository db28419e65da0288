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
"""

from __future__ import annotations

import ast
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from pipeline import objectives

ROLES = {"user": "user", "human": "user", "prompter": "user", "system": "system",
         "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


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
    ratings: list[dict] | None = None      # rated rows: [{name, raw, value}] for the one response
    response_labels: list[str] | None = None  # names used in reasons ("chosen", "output_2", ...)
    locator: str | None = None             # part of the record this row came from (multi-row records)


@dataclass(frozen=True)
class Adapter:
    name: str
    fn: Callable[[dict, dict], list]       # (record, options) -> [Row | QuarantineError, ...]
    default_source: str | None = None      # None: the file's name
    description: str = ""


# --- field access ------------------------------------------------------------------------------

def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def field_value(rec: dict, name: str) -> Any:
    """A field by name; a dotted name ("meta.question") reaches into nested mappings."""
    if name in rec:
        return rec[name]
    if "." in name:
        cur: Any = rec
        for part in name.split("."):
            if isinstance(cur, dict) and part in cur:
                cur = cur[part]
            elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
                cur = cur[int(part)]
            else:
                raise QuarantineError(f"missing field {name!r}")
        return cur
    raise QuarantineError(f"missing field {name!r}")


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


def messages_of(value: Any, name: str) -> list[dict]:
    """Chat messages from [{role, content}] (OpenAI/TRL) or [{from, value}] (ShareGPT)."""
    if not isinstance(value, list):
        raise QuarantineError(f"wrong type: field {name!r} is {_type_name(value)}, expected a list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise QuarantineError(f"wrong type: {name}[{i}] is {_type_name(m)}, expected a message object")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if role is None or ("content" not in m and "value" not in m):
            raise QuarantineError(f"missing field: {name}[{i}] needs 'role' and 'content'")
        if not isinstance(role, str) or role.lower() not in ROLES:
            raise QuarantineError(f"unknown role {role!r} in {name}[{i}] (expected one of {sorted(set(ROLES))})")
        if not isinstance(content, str):
            raise QuarantineError(f"wrong type: {name}[{i}].content is {_type_name(content)}, expected a string")
        out.append({"role": ROLES[role.lower()], "content": content})
    return out


def prompt_of(value: Any, name: str, system: str | None = None) -> list[dict]:
    """A prompt given as a string (one user turn) or as messages."""
    if isinstance(value, str):
        msgs = [{"role": "user", "content": value}]
    elif isinstance(value, list):
        msgs = messages_of(value, name)
    else:
        raise QuarantineError(f"wrong type: field {name!r} is {_type_name(value)}, expected a string or messages")
    if system:
        msgs = [{"role": "system", "content": system}] + msgs
    return msgs


def completion_of(value: Any, name: str) -> str:
    """A response given as a string or as one assistant message (TRL conversational format)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        msgs = messages_of(value, name)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise QuarantineError(f"{name}: expected one assistant message, got roles {[m['role'] for m in msgs]}")
        return msgs[0]["content"]
    if isinstance(value, dict):
        return completion_of([value], name)
    raise QuarantineError(f"wrong type: field {name!r} is {_type_name(value)}, expected a string")


def _system_option(rec: dict, opts: dict) -> str | None:
    if opts.get("system_field"):
        return text_field(rec, opts["system_field"], allow_missing=True)
    return opts.get("system")


# --- generic formats -----------------------------------------------------------------------------

def adapt_messages(rec: dict, opts: dict) -> list:
    """OpenAI/TRL `messages` (or ShareGPT `conversations`): the last assistant message is the response."""
    key = "messages" if "messages" in rec or "conversations" not in rec else "conversations"
    msgs = messages_of(field_value(rec, key), key)
    if not msgs or msgs[-1]["role"] != "assistant":
        raise QuarantineError(f"{key}: the last message must be the assistant response")
    return [Row("instruction", msgs[:-1], [msgs[-1]["content"]])]


def adapt_prompt_response(rec: dict, opts: dict) -> list:
    """`prompt` + `response` (or TRL's `completion`)."""
    key = "response" if "response" in rec or "completion" not in rec else "completion"
    prompt = prompt_of(field_value(rec, "prompt"), "prompt", _system_option(rec, opts))
    return [Row("instruction", prompt, [completion_of(field_value(rec, key), key)])]


def adapt_alpaca(rec: dict, opts: dict) -> list:
    """Alpaca-style `instruction` (+ optional `input`) + `output`."""
    prompt = _instruction_prompt(rec, "instruction", "input")
    return [Row("instruction", prompt_of(prompt, "instruction", _system_option(rec, opts)),
                [text_field(rec, "output")])]


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
        raise QuarantineError("chosen and rejected do not share the prompt: they differ before the final assistant turn")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def adapt_preference(rec: dict, opts: dict) -> list:
    """TRL preference: `prompt` + `chosen` + `rejected` (strings or messages), or the implicit-prompt
    form where chosen and rejected are whole conversations sharing a prefix."""
    chosen, rejected = field_value(rec, "chosen"), field_value(rec, "rejected")
    if rec.get("prompt") is not None:
        prompt = prompt_of(rec["prompt"], "prompt", _system_option(rec, opts))
        pair = [completion_of(chosen, "chosen"), completion_of(rejected, "rejected")]
    else:
        if isinstance(chosen, str) and isinstance(rejected, str):
            raise QuarantineError("missing field 'prompt' (chosen and rejected are plain strings, not conversations)")
        prompt, c, r = _shared_prefix_pair(messages_of(chosen, "chosen"), messages_of(rejected, "rejected"))
        pair = [c, r]
    return [Row("preference", prompt, pair, response_labels=["chosen", "rejected"])]


def adapt_best_of_n(rec: dict, opts: dict) -> list:
    """`prompt` + `responses` (list of strings) + optional `ranks` (0 = best)."""
    prompt = prompt_of(field_value(rec, "prompt"), "prompt", _system_option(rec, opts))
    responses = field_value(rec, "responses")
    if not isinstance(responses, list):
        raise QuarantineError(f"wrong type: field 'responses' is {_type_name(responses)}, expected a list")
    texts = [completion_of(r, f"responses[{i}]") for i, r in enumerate(responses)]
    ranks = rec.get("ranks")
    if ranks is not None:
        if not isinstance(ranks, list) or len(ranks) != len(texts) or not all(_is_int(r) for r in ranks):
            raise QuarantineError("wrong type: 'ranks' must be a list of integers, one per response")
        ranks = [int(r) for r in ranks]
    return [Row("best_of_n", prompt, texts, ranks=ranks)]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# --- HH-RLHF -------------------------------------------------------------------------------------

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def hh_turns(transcript: Any, name: str) -> list[dict]:
    if not isinstance(transcript, str):
        raise QuarantineError(f"wrong type: field {name!r} is {_type_name(transcript)}, expected a string")
    parts = _HH_TURN.split(transcript)
    if parts[0].strip() or len(parts) < 3:
        raise QuarantineError(f"{name}: not an HH transcript (expected it to start with '\\n\\nHuman:')")
    return [{"role": "user" if who == "Human" else "assistant", "content": text.strip()}
            for who, text in zip(parts[1::2], parts[2::2])]


def adapt_hh_rlhf(rec: dict, opts: dict) -> list:
    chosen = hh_turns(field_value(rec, "chosen"), "chosen")
    rejected = hh_turns(field_value(rec, "rejected"), "rejected")
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1]["role"] != "assistant":
            raise QuarantineError(f"{name}: the transcript does not end with an Assistant turn")
    if chosen[:-1] != rejected[:-1]:
        raise QuarantineError("chosen and rejected do not share the prompt: their turns before the final "
                              "Assistant turn differ")
    return [Row("preference", chosen[:-1], [chosen[-1]["content"], rejected[-1]["content"]],
                response_labels=["chosen", "rejected"])]


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


def rating(obj: objectives.Objective, raw: Any, label: str) -> dict:
    """One entry of the `ratings` column: the raw value on the native scale and its map to [0, 1]."""
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
        raise QuarantineError(f"wrong type: rating {label!r} is {raw!r}, expected a finite number")
    if not obj.low <= raw <= obj.high:
        raise QuarantineError(f"rating {label!r} = {raw} is outside its scale [{obj.low}, {obj.high}]")
    return {"name": obj.name, "raw": float(raw), "value": obj.to_unit(raw)}


def ratings_of(scores: dict, namespace: str) -> list[dict]:
    """[{name, raw, value}] for the attributes the objective registry knows under `namespace`."""
    out = []
    for attribute in sorted(scores):
        name = f"{namespace}.{attribute}"
        try:
            obj = objectives.get(name)
        except KeyError:
            continue
        out.append(rating(obj, scores[attribute], attribute))
    if not out:
        raise QuarantineError(f"no known rating in 'scores' (attributes {sorted(scores)}; "
                              f"known: {[o.attribute for o in objectives.for_source(namespace, 'rating')]})")
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
            ranked = [r for r in replies if isinstance(r, dict) and r.get("role") == "assistant"
                      and _is_int(r.get("rank")) and not r.get("deleted")]
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
                out.append(Row("preference", row.prompt, [row.responses[i], row.responses[j]],
                               response_labels=[f"rank {row.ranks[i]}", f"rank {row.ranks[j]}"],
                               locator=f"{row.locator}:{row.ranks[i]}>{row.ranks[j]}"))
    return out


# --- column mapping ------------------------------------------------------------------------------

MAPPABLE = ("prompt", "system", "response", "chosen", "rejected", "messages", "responses", "ranks", "ratings")


def check_columns(columns: dict) -> None:
    """Config-time check of a mapping adapter's `columns` (raises ValueError)."""
    unknown = sorted(set(columns) - set(MAPPABLE))
    if unknown:
        raise ValueError(f"columns: unknown target name(s) {unknown}; allowed: {list(MAPPABLE)}")
    if not set(columns) & {"response", "chosen", "rejected", "responses", "messages"}:
        raise ValueError("columns: map at least one of response, chosen/rejected, responses or messages")
    for key, col in columns.items():
        if key != "ratings" and not isinstance(col, str):
            raise ValueError(f"columns.{key}: expected a column name, got {col!r}")
    ratings = columns.get("ratings")
    if ratings is not None:
        if not isinstance(ratings, dict) or not ratings:
            raise ValueError("columns.ratings: expected a mapping objective name -> column")
        for name in ratings:
            obj = objectives.get(name)  # KeyError names the known objectives
            if obj.kind != "rating":
                raise ValueError(f"columns.ratings: {name} is a {obj.kind} objective, not a rating")
        if not set(columns) & {"response", "messages"}:
            raise ValueError("columns.ratings: ratings apply to a single response (map 'response' or 'messages')")


def adapt_mapping(rec: dict, opts: dict, columns: dict) -> list:
    """Rename the record's columns to the canonical names in `columns` (canonical -> record column),
    then read it as the generic format those names imply. "ratings" maps objective names to columns."""
    renamed = {k: field_value(rec, v) for k, v in columns.items() if k not in ("ratings", "system")}
    system = text_field(rec, columns["system"], allow_missing=True) if "system" in columns else None
    sub_opts = {**opts, "system": system} if system else opts
    if "messages" in renamed:
        rows = adapt_messages(renamed, sub_opts)
        if system:
            rows[0].prompt.insert(0, {"role": "system", "content": system})
    elif "chosen" in renamed or "rejected" in renamed:
        rows = adapt_preference(renamed, sub_opts)
    elif "responses" in renamed:
        rows = adapt_best_of_n(renamed, sub_opts)
    elif "response" in renamed:
        rows = adapt_prompt_response(renamed, sub_opts)
    else:
        raise ValueError("columns: map at least one of response, chosen/rejected, responses or messages")
    if columns.get("ratings"):
        ratings = []
        for name, col in sorted(columns["ratings"].items()):
            v = field_value(rec, col)
            if v is not None:
                ratings.append(rating(objectives.get(name), v, col))
        if not ratings:
            raise QuarantineError("no rating present in the mapped rating columns")
        rows[0].kind, rows[0].ratings = "rated", ratings
    return rows


ADAPTERS: dict[str, Adapter] = {a.name: a for a in (
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
)}


# Other names users reach for; InputSpec turns them into the adapter's own name.
ALIASES = {"unieval_topical_chat": "topical_chat", "unieval_sfres": "sfres", "oasst": "oasst_best_of_n",
           "hh-rlhf": "hh_rlhf", "trl_preference": "preference", "chat": "messages", "sharegpt": "messages"}


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
