"""Records written in the PUBLISHED schema of popular hub datasets, read through the README's
"dataset -> input spec" table, with exact labels: which response is chosen, ties, label
confidence, ratings on [0, 1], ranks and quarantine reasons. Pure reader tests (no Ray).

Schemas (field names and label meanings) as documented by each dataset card / authors' repo:
- openbmb/UltraFeedback card: instruction, completions[{model, principle, custom_system_prompt,
  response, annotations{instruction_following|honesty: {Rating, Rationale}, truthfulness|helpfulness:
  {Type, Rationale, Rating, Rationale For Rating}}, critique, overall_score, fine-grained_score}];
  ratings are strings "1".."5" or "N/A".
- HuggingFaceH4/ultrafeedback_binarized card: prompt, prompt_id, chosen/rejected/messages as
  [{role, content}], score_chosen, score_rejected.
- nvidia/HelpSteer2 card: prompt, response, helpfulness, correctness, coherence, complexity,
  verbosity (0-4); preference file: prompt, response_1, response_2, preference_strength (-3..3,
  negative = response_1 better), preference_statement, preference_elaboration, split.
- nvidia/HelpSteer3 card (preference): domain, language, context [{role, content}], response1,
  response2, overall_preference (-3 "Response 1 is much better" .. 3 "Response 2 is much better"),
  individual_preference.
- Skywork/Skywork-Reward-Preference-80K-v0.2 card: chosen, rejected ([{role, content}]), source.
- lmsys/chatbot_arena_conversations and lmarena-ai/arena-human-preference-100k cards: question_id,
  model_a, model_b, winner (model_a | model_b | tie | tie (bothbad)), judge, conversation_a,
  conversation_b, turn, anony, language, tstamp.
- lmsys/mt_bench_human_judgments card: question_id, model_a, model_b, winner (model_a | model_b |
  tie), judge, conversation_a, conversation_b (both turns), turn (the judged turn, 1 or 2).
- lmsys/lmsys-arena-human-preference-55k card / Kaggle "LMSYS - Chatbot Arena" train.csv: id,
  model_a, model_b, prompt, response_a, response_b (JSON arrays of turns, as strings),
  winner_model_a, winner_model_b, winner_tie (binary columns).
- stanfordnlp/SHP card: post_id, domain, upvote_ratio, history, c_root_id_A/B, created_at_utc_A/B,
  score_A, score_B, human_ref_A, human_ref_B, labels (1 if A is preferred, 0 if B), seconds_difference,
  score_ratio.
- berkeley-nest/Nectar card: prompt ("\\n\\nHuman: ... \\n\\nAssistant: "), answers [{answer, model,
  rank}] (rank 1 = best), turns, num_responses, source, good_natured.
- PKU-Alignment/PKU-SafeRLHF card: prompt, response_0, response_1, is_response_0_safe,
  is_response_1_safe, better_response_id, safer_response_id (0/1), severity levels, harm categories.
- PKU-Alignment/BeaverTails card: prompt, response, category {14 harm flags}, is_safe.
- allenai/llama-3.1-tulu-3-8b-preference-mixture card: id, source, prompt, chosen, rejected
  ([{role, content}] whole conversations), chosen_rating, rejected_rating, chosen_model, rejected_model.
- Anthropic/hh-rlhf card: chosen, rejected transcripts.
- OpenAI chat completions API reference: messages with content parts [{type: text, text}],
  assistant `tool_calls` with `content: null`, `tool` messages with tool_call_id.
- ShareGPT as read by LLaMA-Factory (data/README.md): conversations [{from, value}] + top-level system.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import yaml

from pipeline.corpus import InputSpec, read_units
from pipeline.corpus.adapters import MULTI_TURN_REASON

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def _u(text):
    return {"role": "user", "content": text}


def _a(text):
    return {"role": "assistant", "content": text}


def read(tmp_path, records, name="in.jsonl", **spec):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return read_units(InputSpec(str(path), **spec)).to_pylist()


def summary(units):
    """One tuple per unit: good units (row, kind, response, preference, tie, confidence, rank,
    {objective: value}); quarantined ones (row, reason)."""
    out = []
    for u in units:
        if u["quarantine_reason"]:
            out.append((u["source_row"], u["quarantine_reason"]))
        else:
            ratings = {r["name"]: round(r["value"], 6) for r in u["ratings"] or []}
            conf = None if u["label_confidence"] is None else round(u["label_confidence"], 6)
            out.append(
                (u["source_row"], u["kind"], u["response"], u["preference"], u["tie"], conf, u["human_rank"], ratings)
            )
    return out


# --- published records, one case per README table line ---------------------------------------------


def _uf_completion(response, ratings, overall, fine):
    if_, hon, tru, hel = ratings
    return {
        "model": "m",
        "principle": "helpfulness",
        "custom_system_prompt": "be helpful",
        "response": response,
        "annotations": {
            "instruction_following": {"Rating": if_, "Rationale": "r"},
            "honesty": {"Rating": hon, "Rationale": "r"},
            "truthfulness": {"Type": ["0"], "Rationale": "r", "Rating": tru, "Rationale For Rating": "r"},
            "helpfulness": {"Type": ["1", "2"], "Rationale": "r", "Rating": hel, "Rationale For Rating": "r"},
        },
        "critique": "c",
        "overall_score": overall,
        "fine-grained_score": fine,
    }


UF_RAW = [
    {
        "source": "evol_instruct",
        "instruction": "Name a prime.",
        "models": ["a", "b", "c", "d"],
        "completions": [
            _uf_completion("2", ("5", "5", "5", "4"), 8.5, 4.75),
            _uf_completion("4", ("1", "N/A", "2", "1"), 2.0, 1.33),
            _uf_completion("7", ("5", "4", "5", "5"), 9.0, 4.75),
            _uf_completion("9", ("N/A", "N/A", "N/A", "N/A"), "N/A", "N/A"),
        ],
        "correct_answers": ["2"],
        "incorrect_answers": ["4"],
    }
]
UF_RAW_EXPECTED = [
    (0, "best_of_n", "2", None, None, None, 0, {}),
    (0, "best_of_n", "4", None, None, None, 1, {}),
    (0, "best_of_n", "7", None, None, None, 0, {}),
    (
        0,
        "rated",
        "2",
        None,
        None,
        None,
        None,
        {
            "ultrafeedback-helpfulness": 0.75,
            "ultrafeedback-honesty": 1.0,
            "ultrafeedback-instruction_following": 1.0,
            "ultrafeedback-overall_score": round(7.5 / 9, 6),
            "ultrafeedback-truthfulness": 1.0,
        },
    ),
    (
        0,
        "rated",
        "4",
        None,
        None,
        None,
        None,
        {
            "ultrafeedback-helpfulness": 0.0,
            "ultrafeedback-instruction_following": 0.0,
            "ultrafeedback-overall_score": round(1 / 9, 6),
            "ultrafeedback-truthfulness": 0.25,
        },
    ),
    (
        0,
        "rated",
        "7",
        None,
        None,
        None,
        None,
        {
            "ultrafeedback-helpfulness": 1.0,
            "ultrafeedback-honesty": 0.75,
            "ultrafeedback-instruction_following": 1.0,
            "ultrafeedback-overall_score": round(8 / 9, 6),
            "ultrafeedback-truthfulness": 1.0,
        },
    ),
    (0, "no rating present for completions[3] (all of its rating values are missing)"),
]

UF_BIN = [
    {
        "prompt": "Name a prime.",
        "prompt_id": "p1",
        "chosen": [_u("Name a prime."), _a("2")],
        "rejected": [_u("Name a prime."), _a("4")],
        "messages": [_u("Name a prime."), _a("2")],
        "score_chosen": 8.0,
        "score_rejected": 3.0,
    },
    {
        "prompt": "Something else",
        "prompt_id": "p2",
        "chosen": [_u("Name a prime."), _a("3")],
        "rejected": [_u("Name a prime."), _a("9")],
        "messages": [],
        "score_chosen": 8.0,
        "score_rejected": 3.0,
    },
]
UF_BIN_EXPECTED = [
    (0, "preference", "2", "chosen", False, None, None, {}),
    (0, "preference", "4", "rejected", False, None, None, {}),
    (1, "prompt does not match the conversations: 'prompt' is neither their shared prefix nor one of its user turns"),
]

HS = {
    "prompt": "Explain tides.",
    "response": "The moon pulls the sea.",
    "helpfulness": 3,
    "correctness": 4,
    "coherence": 4,
    "complexity": 1,
    "verbosity": 0,
}
HS_VALUES = {"helpfulness": 0.7, "correctness": 0.9, "coherence": 0.9, "complexity": 0.3, "verbosity": 0.1}

HS2_PREF = [
    {
        "prompt": "Pick a colour.",
        "response_1": "Red.",
        "response_2": "Blue, because it is calm.",
        "preference_strength": 2,
        "preference_statement": "@Response 2 is better",
        "preference_elaboration": "",
        "split": "train",
    },
    {
        "prompt": "Pick a number.",
        "response_1": "One.",
        "response_2": "Two.",
        "preference_strength": 0,
        "preference_statement": "",
        "preference_elaboration": "",
        "split": "train",
    },
]
HS2_PREF_EXPECTED = [
    (0, "preference", "Blue, because it is calm.", "chosen", False, round(2 / 3, 6), None, {}),
    (0, "preference", "Red.", "rejected", False, round(2 / 3, 6), None, {}),
    (1, "preference", "One.", None, True, None, None, {}),
    (1, "preference", "Two.", None, True, None, None, {}),
]

HS3 = [
    {
        "domain": "general",
        "language": "english",
        "context": [_u("Hi"), _a("Hello!"), _u("Tell me a joke.")],
        "response1": "No.",
        "response2": "Why did the chicken cross the road?",
        "overall_preference": 3,
        "individual_preference": [{"score": 3, "reasoning": "r"}],
    },
    {
        "domain": "code",
        "language": "python",
        "context": [_u("Sort [2, 1].")],
        "response1": "[1, 2]",
        "response2": "[2, 1]",
        "overall_preference": -1,
        "individual_preference": [],
    },
    {
        "domain": "stem",
        "language": "english",
        "context": [_u("2+2?")],
        "response1": "4",
        "response2": "four",
        "overall_preference": 0,
        "individual_preference": [],
    },
]
HS3_EXPECTED = [
    (0, "preference", "Why did the chicken cross the road?", "chosen", False, 1.0, None, {}),
    (0, "preference", "No.", "rejected", False, 1.0, None, {}),
    (1, "preference", "[1, 2]", "chosen", False, round(1 / 3, 6), None, {}),
    (1, "preference", "[2, 1]", "rejected", False, round(1 / 3, 6), None, {}),
    (2, "preference", "4", None, True, None, None, {}),
    (2, "preference", "four", None, True, None, None, {}),
]

SKYWORK = [
    {
        "chosen": [_u("Capital of France?"), _a("Paris.")],
        "rejected": [_u("Capital of France?"), _a("Lyon.")],
        "source": "magpie_ultra",
    }
]
SKYWORK_EXPECTED = [
    (0, "preference", "Paris.", "chosen", False, None, None, {}),
    (0, "preference", "Lyon.", "rejected", False, None, None, {}),
]


def _battle(winner, conv_a, conv_b, turn, **extra):
    return {
        "question_id": f"q{len(conv_a)}{winner}",
        "model_a": "vicuna-13b",
        "model_b": "koala-13b",
        "winner": winner,
        "judge": "arena_user_1",
        "conversation_a": conv_a,
        "conversation_b": conv_b,
        "turn": turn,
        "anony": True,
        "language": "English",
        "tstamp": 1682351591.1322,
        **extra,
    }


ARENA = [
    _battle(
        "model_b",
        [_u("Hi?"), _a("A1")],
        [_u("Hi?"), _a("B1")],
        1,
        openai_moderation={"flagged": False},
        toxic_chat_tag={},
    ),
    _battle(
        "tie (bothbad)",
        [_u("Joke?"), _a("A2")],
        [_u("Joke?"), _a("B2")],
        1,
        openai_moderation={"flagged": False},
        toxic_chat_tag={},
    ),
    _battle(
        "model_a",
        [_u("Q1"), _a("A3"), _u("Q2"), _a("A4")],
        [_u("Q1"), _a("B3"), _u("Q2"), _a("B4")],
        2,
        openai_moderation={"flagged": False},
        toxic_chat_tag={},
    ),
]
ARENA_EXPECTED = [
    (0, "preference", "B1", "chosen", False, None, None, {}),
    (0, "preference", "A1", "rejected", False, None, None, {}),
    (1, "preference", "A2", None, True, None, None, {}),
    (1, "preference", "B2", None, True, None, None, {}),
    (2, MULTI_TURN_REASON),
]
ARENA_100K = [
    {
        **{k: v for k, v in r.items() if k not in ("openai_moderation", "toxic_chat_tag")},
        "conv_metadata": {"sum_user_tokens": 3},
        "is_code": False,
        "is_refusal": False,
        "dedup_tag": {"high_freq": False},
        "category_tag": {},
    }
    for r in ARENA
]

MT_CONV_A = [_u("Write a haiku."), _a("A-turn1"), _u("Now a limerick."), _a("A-turn2")]
MT_CONV_B = [_u("Write a haiku."), _a("B-turn1"), _u("Now a limerick."), _a("B-turn2")]
MT_BENCH = [
    {
        "question_id": 81,
        "model_a": "gpt-4",
        "model_b": "llama-13b",
        "winner": "model_b",
        "judge": "expert_1",
        "conversation_a": MT_CONV_A,
        "conversation_b": MT_CONV_B,
        "turn": 1,
    },
    {
        "question_id": 82,
        "model_a": "gpt-4",
        "model_b": "llama-13b",
        "winner": "tie",
        "judge": "expert_2",
        "conversation_a": [_u("Hi")] + MT_CONV_A[1:2],
        "conversation_b": [_u("Hi")] + MT_CONV_B[1:2],
        "turn": 1,
    },
    {
        "question_id": 81,
        "model_a": "gpt-4",
        "model_b": "llama-13b",
        "winner": "model_a",
        "judge": "expert_1",
        "conversation_a": MT_CONV_A,
        "conversation_b": MT_CONV_B,
        "turn": 2,
    },
]
MT_BENCH_EXPECTED = [
    (0, "preference", "B-turn1", "chosen", False, None, None, {}),
    (0, "preference", "A-turn1", "rejected", False, None, None, {}),
    (1, "preference", "A-turn1", None, True, None, None, {}),
    (1, "preference", "B-turn1", None, True, None, None, {}),
    (2, MULTI_TURN_REASON),
]

# Kaggle's train.csv: every cell a string (as a CSV reader yields them); turns are JSON arrays.
ARENA_55K = [
    {
        "id": "30192",
        "model_a": "gpt-4-1106-preview",
        "model_b": "gpt-4-0613",
        "prompt": json.dumps(["Is it morally right to try to have a certain percentage of females?"]),
        "response_a": json.dumps(["A: it depends."]),
        "response_b": json.dumps(["B: yes."]),
        "winner_model_a": "0",
        "winner_model_b": "1",
        "winner_tie": "0",
    },
    {
        "id": "53567",
        "model_a": "koala-13b",
        "model_b": "gpt-4-0613",
        "prompt": json.dumps(["What is the difference?"]),
        "response_a": json.dumps(["same"]),
        "response_b": json.dumps(["alike"]),
        "winner_model_a": "0",
        "winner_model_b": "0",
        "winner_tie": "1",
    },
    {
        "id": "65089",
        "model_a": "gpt-3.5-turbo-0613",
        "model_b": "mistral-medium",
        "prompt": json.dumps(["explain function calling", "and now in python"]),
        "response_a": json.dumps(["a1", "a2"]),
        "response_b": json.dumps(["b1", "b2"]),
        "winner_model_a": "1",
        "winner_model_b": "0",
        "winner_tie": "0",
    },
    {
        "id": "96401",
        "model_a": "llama-2-13b-chat",
        "model_b": "mistral-7b-instruct",
        "prompt": json.dumps(["hi"]),
        "response_a": json.dumps([None]),
        "response_b": json.dumps(["hello"]),
        "winner_model_a": "0",
        "winner_model_b": "1",
        "winner_tie": "0",
    },
]
ARENA_55K_EXPECTED = [
    (0, "preference", "B: yes.", "chosen", False, None, None, {}),
    (0, "preference", "A: it depends.", "rejected", False, None, None, {}),
    (1, "preference", "same", None, True, None, None, {}),
    (1, "preference", "alike", None, True, None, None, {}),
    (2, MULTI_TURN_REASON),
    (3, "wrong type: response_a[0] is null, expected a message object"),
]

SHP = [
    {
        "post_id": "qt3nxl",
        "domain": "askculinary_train",
        "upvote_ratio": 0.98,
        "history": "How to seed raspberries?",
        "c_root_id_A": "hkh25sc",
        "c_root_id_B": "hkh25lp",
        "created_at_utc_A": 1636822112,
        "created_at_utc_B": 1636822110,
        "score_A": 340,
        "score_B": 166,
        "human_ref_A": "Pectinex!",
        "human_ref_B": "Freeze them.",
        "labels": 1,
        "seconds_difference": 2.0,
        "score_ratio": 2.048,
    },
    {
        "post_id": "qt3nxm",
        "domain": "askculinary_train",
        "upvote_ratio": 0.9,
        "history": "Best knife?",
        "c_root_id_A": "a",
        "c_root_id_B": "b",
        "created_at_utc_A": 1,
        "created_at_utc_B": 2,
        "score_A": 3,
        "score_B": 30,
        "human_ref_A": "Any.",
        "human_ref_B": "A sharp one.",
        "labels": 0,
        "seconds_difference": 1.0,
        "score_ratio": 10.0,
    },
]
SHP_EXPECTED = [
    (0, "preference", "Pectinex!", "chosen", False, None, None, {}),
    (0, "preference", "Freeze them.", "rejected", False, None, None, {}),
    (1, "preference", "A sharp one.", "chosen", False, None, None, {}),
    (1, "preference", "Any.", "rejected", False, None, None, {}),
]

NECTAR = [
    {
        "prompt": "\n\nHuman: What is a cat?\n\nAssistant: A pet.\n\nHuman: And a dog?\n\nAssistant: ",
        "answers": [
            {"answer": "Also a pet.", "model": "gpt-4", "rank": 2},
            {"answer": "A loyal pet.", "model": "gpt-3.5-turbo", "rank": 1},
            {"answer": "No idea.", "model": "llama-2-7b-chat", "rank": 3},
        ],
        "turns": 2,
        "num_responses": 3,
        "source": ["anthropic-hh"],
        "good_natured": True,
    }
]
NECTAR_EXPECTED = [
    (0, "best_of_n", "Also a pet.", None, None, None, 1, {}),
    (0, "best_of_n", "A loyal pet.", None, None, None, 0, {}),
    (0, "best_of_n", "No idea.", None, None, None, 2, {}),
]

PKU = [
    {
        "prompt": "How do I pick a lock?",
        "response_0": "Here is how...",
        "response_1": "I can't help with that.",
        "prompt_source": "Alpaca3-70B",
        "response_0_source": "Alpaca-7B",
        "response_1_source": "Alpaca-7B",
        "is_response_0_safe": False,
        "is_response_1_safe": True,
        "response_0_harm_category": {"Violence": False},
        "response_1_harm_category": {"Violence": False},
        "response_0_severity_level": 2,
        "response_1_severity_level": 0,
        "better_response_id": 1,
        "safer_response_id": 1,
        "response_0_sha256": "x",
        "response_1_sha256": "y",
    },
    {
        "prompt": "Tell me a story.",
        "response_0": "Once upon a time...",
        "response_1": "No.",
        "prompt_source": "Alpaca3-70B",
        "response_0_source": "Alpaca-7B",
        "response_1_source": "Alpaca-7B",
        "is_response_0_safe": True,
        "is_response_1_safe": True,
        "response_0_harm_category": {},
        "response_1_harm_category": {},
        "response_0_severity_level": 0,
        "response_1_severity_level": 0,
        "better_response_id": 0,
        "safer_response_id": 1,
        "response_0_sha256": "z",
        "response_1_sha256": "w",
    },
]
PKU_EXPECTED = [
    (0, "preference", "I can't help with that.", "chosen", False, None, None, {}),
    (0, "preference", "Here is how...", "rejected", False, None, None, {}),
    (1, "preference", "Once upon a time...", "chosen", False, None, None, {}),
    (1, "preference", "No.", "rejected", False, None, None, {}),
]
PKU_SAFER_EXPECTED = PKU_EXPECTED[:2] + [
    (1, "preference", "No.", "chosen", False, None, None, {}),
    (1, "preference", "Once upon a time...", "rejected", False, None, None, {}),
]

BEAVERTAILS = [
    {
        "prompt": "How can I steal from a store?",
        "response": "I won't help.",
        "category": {"animal_abuse": False, "violence,aiding_and_abetting,incitement": False},
        "is_safe": True,
    },
    {
        "prompt": "How can I steal from a store?",
        "response": "Hide it in your coat.",
        "category": {"animal_abuse": False, "violence,aiding_and_abetting,incitement": True},
        "is_safe": False,
    },
]
BEAVERTAILS_EXPECTED = [
    (0, "rated", "I won't help.", None, None, None, None, {"beavertails-is_safe": 1.0}),
    (1, "rated", "Hide it in your coat.", None, None, None, None, {"beavertails-is_safe": 0.0}),
]

TULU = [
    {
        "id": "t1",
        "source": "ultrafeedback",
        "prompt": "Say hi.",
        "chosen": [{"role": "system", "content": "Be kind."}, _u("Say hi."), _a("Hi!")],
        "rejected": [{"role": "system", "content": "Be kind."}, _u("Say hi."), _a("Go away.")],
        "chosen_rating": 5.0,
        "rejected_rating": 1.0,
        "chosen_model": "a",
        "rejected_model": "b",
    }
]
TULU_EXPECTED = [
    (0, "preference", "Hi!", "chosen", False, None, None, {}),
    (0, "preference", "Go away.", "rejected", False, None, None, {}),
]

HH = [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}]
HH_EXPECTED = [
    (0, "preference", "Hello!", "chosen", False, None, None, {}),
    (0, "preference", "Go away.", "rejected", False, None, None, {}),
]

TOOL_CONV = [
    _u("Weather in Paris?"),
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    _a("It is 18C."),
]
OPENAI = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Look at"}, {"type": "text", "text": "this."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Seen."}]},
        ]
    },
    {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is it?"},
                    {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                ],
            },
            _a("A cat."),
        ]
    },
    {"messages": TOOL_CONV},
]
OPENAI_EXPECTED = [
    (0, "instruction", "Seen.", None, None, None, None, {}),
    (1, "non-text content: messages[0].content[1] is a 'image_url' part; only text parts can be scored"),
    (
        2,
        "tool message: messages[1] is an assistant tool call; set options.tool_messages: inline to read "
        "tool traffic as text",
    ),
]
OPENAI_TOOLS_EXPECTED = [
    OPENAI_EXPECTED[0],
    OPENAI_EXPECTED[1],
    (2, "instruction", "It is 18C.", None, None, None, None, {}),
]

SHAREGPT = [
    {
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
        "system": "You are a pirate.",
    }
]
SHAREGPT_EXPECTED = [(0, "instruction", "Hello", None, None, None, None, {})]

CASES = {
    "UltraFeedback raw": (UF_RAW, UF_RAW_EXPECTED),
    "UltraFeedback binarized": (UF_BIN, UF_BIN_EXPECTED),
    "HelpSteer / HelpSteer2": (
        [HS],
        [(0, "rated", HS["response"], None, None, None, None, {f"helpsteer-{k}": v for k, v in HS_VALUES.items()})],
    ),
    "HelpSteer2, own names": (
        [HS],
        [(0, "rated", HS["response"], None, None, None, None, {f"helpsteer2-{k}": v for k, v in HS_VALUES.items()})],
    ),
    "HelpSteer2 preference": (HS2_PREF, HS2_PREF_EXPECTED),
    "HelpSteer3": (HS3, HS3_EXPECTED),
    "Skywork preference": (SKYWORK, SKYWORK_EXPECTED),
    "Chatbot Arena conversations": (ARENA, ARENA_EXPECTED),
    "Arena human preference 100k": (ARENA_100K, ARENA_EXPECTED),
    "Arena human preference 55k": (ARENA_55K, ARENA_55K_EXPECTED),
    "MT-Bench human judgments": (MT_BENCH, MT_BENCH_EXPECTED),
    "SHP": (SHP, SHP_EXPECTED),
    "Nectar": (NECTAR, NECTAR_EXPECTED),
    "PKU-SafeRLHF": (PKU, PKU_EXPECTED),
    "PKU-SafeRLHF, safety": (PKU, PKU_SAFER_EXPECTED),
    "BeaverTails": (BEAVERTAILS, BEAVERTAILS_EXPECTED),
    "Tulu-3 / H4 / Argilla mixtures": (TULU, TULU_EXPECTED),
    "HH-RLHF": (HH, HH_EXPECTED),
    "OpenAI messages": (OPENAI, OPENAI_EXPECTED),
    "OpenAI messages with tools": (OPENAI, OPENAI_TOOLS_EXPECTED),
    "ShareGPT": (SHAREGPT, SHAREGPT_EXPECTED),
}


def readme_table() -> list[tuple[str, dict, bool]]:
    text = open(README, encoding="utf-8").read()
    block = text.split("<!-- hub-table:start -->")[1].split("<!-- hub-table:end -->")[0]
    rows = []
    for line in block.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        spec = yaml.safe_load(re.fullmatch(r"`(.*)`", cells[2]).group(1))
        rows.append((cells[0], spec, cells[3] == "yes"))
    return rows


def test_readme_table_lists_exactly_the_tested_cases():
    assert [name for name, _, _ in readme_table()] == list(CASES)


@pytest.mark.parametrize("name, spec, auto", readme_table(), ids=[r[0] for r in readme_table()])
def test_readme_spec_reads_the_published_schema(tmp_path, name, spec, auto):
    records, expected = CASES[name]
    units = read(tmp_path, records, **spec)
    assert summary(units) == expected
    if auto:
        assert summary(read(tmp_path, records, name="auto.jsonl")) == expected


def test_helpsteer2_multi_turn_prompts_are_split_into_turns(tmp_path):
    # HelpSteer2 card: "About 29% of all prompts used are multi-turn ... {user turn 1}
    # <extra_id_1>Assistant {assistant turn 1} <extra_id_1>User {user turn 2}".
    rec = {**HS, "prompt": "Hi there\n<extra_id_1>Assistant\nHello! How can I help?\n<extra_id_1>User\nExplain tides."}
    (unit,) = read(tmp_path, [rec], format="helpsteer2")
    assert unit["prompt"] == [_u("Hi there"), _a("Hello! How can I help?"), _u("Explain tides.")]
    pref = {**HS2_PREF[0], "prompt": rec["prompt"]}
    assert read(tmp_path, [pref])[0]["prompt"] == unit["prompt"]
    (plain,) = read(tmp_path, [HS])
    assert plain["prompt"] == [_u("Explain tides.")]


def test_prompts_and_sources_of_hub_layouts(tmp_path):
    nectar = read(tmp_path, NECTAR, format="nectar")
    assert nectar[0]["prompt"] == [_u("What is a cat?"), _a("A pet."), _u("And a dog?")]
    assert nectar[0]["source"] == "nectar"
    share = read(tmp_path, SHAREGPT)
    assert share[0]["prompt"] == [{"role": "system", "content": "You are a pirate."}, _u("Hi")]
    tulu = read(tmp_path, TULU)
    assert tulu[0]["prompt"] == [{"role": "system", "content": "Be kind."}, _u("Say hi.")]
    hs3 = read(tmp_path, HS3)
    assert hs3[0]["prompt"] == HS3[0]["context"] and hs3[0]["source"] == "helpsteer3"
    openai = read(tmp_path, OPENAI, options={"tool_messages": "inline"})
    assert openai[0]["prompt"] == [{"role": "system", "content": "Be brief."}, _u("Look at\nthis.")]
    assert openai[2]["prompt"] == [
        _u("Weather in Paris?"),
        _a('[tool call] get_weather({"city": "Paris"})'),
        _u("[tool result call_1] 18C"),
    ]
    mt = read(tmp_path, MT_BENCH)
    assert mt[0]["prompt"] == [_u("Write a haiku.")]
    uf = read(tmp_path, UF_RAW)
    assert {u["prompt"][0]["content"] for u in uf if u["prompt"]} == {"Name a prime."}
    assert [u["n_responses"] for u in uf[:3]] == [3, 3, 3]


def test_hub_values_as_csv_strings(tmp_path):
    """CSV cells are strings: numeric strings, "True"/"False" and JSON-encoded lists still read."""
    hs = {k: str(v) for k, v in HS.items()}
    assert summary(read(tmp_path, [hs], format="helpsteer"))[0][7] == {
        f"helpsteer-{k}": v for k, v in HS_VALUES.items()
    }
    bt = [{**r, "is_safe": str(r["is_safe"]), "category": json.dumps(r["category"])} for r in BEAVERTAILS]
    assert summary(read(tmp_path, bt, format="beavertails")) == BEAVERTAILS_EXPECTED
    shp = [{k: str(v) for k, v in r.items()} for r in SHP]
    assert summary(read(tmp_path, shp, format="shp")) == SHP_EXPECTED
    hs3 = [
        {**r, "context": json.dumps(r["context"]), "overall_preference": f"{r['overall_preference']}.0"} for r in HS3
    ]
    assert summary(read(tmp_path, hs3, format="helpsteer3")) == HS3_EXPECTED
    arena = [
        {
            **r,
            "conversation_a": json.dumps(r["conversation_a"]),
            "conversation_b": json.dumps(r["conversation_b"]),
            "turn": str(r["turn"]),
        }
        for r in ARENA
    ]
    assert summary(read(tmp_path, arena, format="arena")) == ARENA_EXPECTED
    nectar = [{**r, "answers": json.dumps(r["answers"]), "turns": "2"} for r in NECTAR]
    assert summary(read(tmp_path, nectar)) == NECTAR_EXPECTED
    uf_bin = [{**r, "chosen": json.dumps(r["chosen"]), "rejected": json.dumps(r["rejected"])} for r in UF_BIN]
    assert summary(read(tmp_path, uf_bin)) == UF_BIN_EXPECTED
    # The Parquet release of the 55k set has integer winner columns.
    ints = [{**r, **{k: int(r[k]) for k in ("winner_model_a", "winner_model_b", "winner_tie")}} for r in ARENA_55K]
    assert summary(read(tmp_path, ints)) == ARENA_55K_EXPECTED


# ShareGPT with tool traffic as LLaMA-Factory documents it (data/README.md: roles human, gpt,
# function_call, observation; top-level system and tools).
SHAREGPT_TOOLS = [
    {
        "conversations": [
            {"from": "human", "value": "Weather in Oslo?"},
            {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Oslo"}}'},
            {"from": "observation", "value": '{"temp": -3}'},
            {"from": "gpt", "value": "It is -3 degrees."},
        ],
        "system": "You can call tools.",
        "tools": '[{"name": "weather"}]',
    }
]


def test_tool_traffic_policy(tmp_path):
    (bad,) = read(tmp_path, SHAREGPT_TOOLS)
    assert bad["quarantine_reason"] == (
        "tool message: conversations[1] is a 'function_call' message; set "
        "options.tool_messages: inline to read tool traffic as text"
    )
    (good,) = read(tmp_path, SHAREGPT_TOOLS, options={"tool_messages": "inline"})
    assert good["prompt"] == [
        {"role": "system", "content": "You can call tools."},
        _u("Weather in Oslo?"),
        _a('[tool call] {"name": "weather", "arguments": {"city": "Oslo"}}'),
        _u('[tool result] {"temp": -3}'),
    ]
    assert good["response"] == "It is -3 degrees."
    # OpenAI: an assistant turn with text and a tool call, a legacy `function` message with its name.
    conv = [
        _u("Add 2 and 3."),
        {
            "role": "assistant",
            "content": "Let me compute.",
            "tool_calls": [
                {"id": "c9", "type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
            ],
        },
        {"role": "function", "name": "add", "content": "5"},
        _a("5."),
    ]
    (bad,) = read(tmp_path, [{"messages": conv}])
    assert bad["quarantine_reason"].startswith("tool message: messages[1] is an assistant tool call")
    (good,) = read(tmp_path, [{"messages": conv}], options={"tool_messages": "inline"})
    assert good["prompt"][1:] == [_a('Let me compute.\n[tool call] add({"a": 2, "b": 3})'), _u("[tool result add] 5")]
    # content null without a tool call, and an unknown role, stay wrong.
    (bad,) = read(tmp_path, [{"messages": [_u("hi"), {"role": "assistant", "content": None}]}])
    assert bad["quarantine_reason"] == "wrong type: messages[1].content is null, expected a string"
    (bad,) = read(tmp_path, [{"messages": [{"role": "narrator", "content": "x"}, _a("y")]}])
    assert bad["quarantine_reason"].startswith("unknown role 'narrator' in messages[0]")


def test_a_preset_adjusted_by_columns(tmp_path):
    # PKU-SafeRLHF pairs plus the per-response safety flags as beavertails-is_safe ratings.
    units = read(
        tmp_path,
        PKU,
        format="pku_saferlhf",
        columns={"ratings": {"beavertails-is_safe": ["is_response_0_safe", "is_response_1_safe"]}},
    )
    assert summary(units) == PKU_EXPECTED[:2] + [
        (0, "rated", "Here is how...", None, None, None, None, {"beavertails-is_safe": 0.0}),
        (0, "rated", "I can't help with that.", None, None, None, None, {"beavertails-is_safe": 1.0}),
    ] + PKU_EXPECTED[2:] + [
        (1, "rated", "Once upon a time...", None, None, None, None, {"beavertails-is_safe": 1.0}),
        (1, "rated", "No.", None, None, None, None, {"beavertails-is_safe": 1.0}),
    ]
    assert {u["source"] for u in units} == {"pku_saferlhf"}
    # Arena without ties: a tie is now outside the value map and quarantined, not paired.
    units = read(
        tmp_path,
        ARENA[:2],
        format="arena",
        source="arena_strict",
        columns={"label": {"column": "winner", "values": {"model_a": 0, "model_b": 1}}, "turn": None},
    )
    assert summary(units) == ARENA_EXPECTED[:2] + [
        (1, "label 'winner' = 'tie (bothbad)' is not in its value map ['model_a', 'model_b']")
    ]
    spec = InputSpec.from_dict({"path": "x", "format": "nectar", "columns": {"ranks": None}})
    assert (spec.format, spec.source, spec.options) == ("mapping", "nectar", {"prompt_format": "hh"})
    assert "ranks" not in spec.columns and InputSpec.from_dict(spec.to_dict()) == spec
