"""Chat templating, prompt-end detection, system prompt and overflow policies (SmolLM2 tokenizer)."""

import copy

import pytest

from pipeline.embed import (
    BackboneSpec,
    TemplateError,
    TemplatePolicy,
    load_tokenizer,
    tokenize_conversation,
    tokenize_many,
)
from pipeline.embed.templating import NOT_A_PREFIX

DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(BackboneSpec("smollm2"))


def with_template(tokenizer, template: str):
    custom = copy.deepcopy(tokenizer)
    custom.chat_template = template
    return custom


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


HI = [{"role": "user", "content": "Hi there"}]


@pytest.mark.parametrize(
    "policy, expected_prefix",
    [
        ("template_default", DEFAULT_SYSTEM),
        ("none", ""),
        ("Answer in one word.", "<|im_start|>system\nAnswer in one word.<|im_end|>\n"),
    ],
)
def test_system_prompt_policies_render_as_documented(tok, policy, expected_prefix):
    r = tokenize_conversation(tok, HI, "Hello!", TemplatePolicy(system_prompt=policy))
    expected_prompt = expected_prefix + "<|im_start|>user\nHi there<|im_end|>\n"
    expected = expected_prompt + "<|im_start|>assistant\nHello!<|im_end|>\n"
    assert r.input_ids == ids(tok, expected)
    assert tok.decode(r.input_ids) == expected
    assert r.prompt_end == len(ids(tok, expected_prompt)) - 1
    assert (r.prompt_tokens, r.total_tokens, r.truncated) == (r.prompt_end + 1, len(r.input_ids), False)
    assert r.prompt_input_ids is None


@pytest.mark.parametrize("policy", ["template_default", "none", "Answer in one word."])
def test_conversation_own_system_message_is_kept(tok, policy):
    prompt = [{"role": "system", "content": "You are a pirate."}] + HI
    r = tokenize_conversation(tok, prompt, "Arr!", TemplatePolicy(system_prompt=policy))
    assert tok.decode(r.input_ids) == (
        "<|im_start|>system\nYou are a pirate.<|im_end|>\n<|im_start|>user\nHi there"
        "<|im_end|>\n<|im_start|>assistant\nArr!<|im_end|>\n"
    )


def test_none_policy_keeps_a_start_of_text_bos(tok):
    # A Llama-3-like layout: the BOS is written once before all turns and a default system turn is
    # injected. "none" must drop the system turn but keep that BOS.
    template = (
        "{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|im_end|>system:default<|im_end|>{% endif %}"
        "{% for m in messages %}<|im_end|>{{ m['role'] }}:{{ m['content'] }}<|im_end|>{% endfor %}"
    )
    custom = with_template(tok, template)
    r = tokenize_conversation(custom, HI, "Hello!", TemplatePolicy(system_prompt="none"))
    assert (
        tok.decode(r.input_ids) == "<|im_start|><|im_end|>user:Hi there<|im_end|><|im_end|>assistant:Hello!<|im_end|>"
    )
    default = tokenize_conversation(custom, HI, "Hello!", TemplatePolicy())
    assert "system:default" in tok.decode(default.input_ids)


def test_none_policy_refused_when_system_is_not_a_separate_block(tok):
    # Gemma-like: the system text is folded into the first user turn.
    template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{% set sys = m['content'] %}{% else %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    )
    custom = with_template(
        tok,
        "{% set ns = namespace(s='') %}"
        + template.replace("{% set sys = m['content'] %}", "{% set ns.s = m['content'] %}"),
    )
    with pytest.raises(TemplateError, match="system_prompt='none' is not supported"):
        tokenize_conversation(custom, HI, "Hello!", TemplatePolicy(system_prompt="none"))


def test_prompt_not_a_prefix_is_quarantined_not_guessed(tok):
    # This template marks the final message differently, so the prompt-only rendering (whose last
    # message is the user turn) is not a prefix of the conversation rendering.
    template = (
        "{% for m in messages %}{% if loop.last %}<|im_start|>final {{ m['role'] }}\n{% else %}"
        "<|im_start|>{{ m['role'] }}\n{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    custom = with_template(tok, template)
    with pytest.raises(TemplateError) as err:
        tokenize_conversation(custom, HI, "Hello!", TemplatePolicy())
    assert err.value.reason == NOT_A_PREFIX


def long_conversation():
    turns = [
        ("user", "first question " + "alpha " * 60),
        ("assistant", "first answer " + "beta " * 60),
        ("user", "second question " + "gamma " * 60),
        ("assistant", "second answer " + "delta " * 60),
        ("user", "last question please"),
    ]
    return [{"role": r, "content": c} for r, c in turns], "the final response " + "omega " * 20


def test_truncation_drops_oldest_turns_and_keeps_last_user_turn_and_response(tok):
    prompt, response = long_conversation()
    full = tokenize_conversation(tok, prompt, response, TemplatePolicy(max_tokens=4096))
    assert not full.truncated and full.tokens_before_truncation == full.total_tokens
    last_two = tokenize_conversation(tok, prompt[2:], response, TemplatePolicy())
    only_last = tokenize_conversation(tok, prompt[4:], response, TemplatePolicy())
    # A cap between the two shortened renderings: only the last user turn fits with the response.
    cap = (only_last.total_tokens + last_two.total_tokens) // 2
    r = tokenize_conversation(tok, prompt, response, TemplatePolicy(max_tokens=cap))
    assert r.truncated and r.tokens_before_truncation == full.total_tokens
    assert r.input_ids == only_last.input_ids and r.prompt_end == only_last.prompt_end
    text = tok.decode(r.input_ids)
    assert "last question please" in text and text.endswith(response + "<|im_end|>\n") and "alpha" not in text
    assert text.startswith(DEFAULT_SYSTEM)  # the template's system turn is not "oldest prompt turn"
    # A cap that fits two user turns keeps the latest two.
    r2 = tokenize_conversation(tok, prompt, response, TemplatePolicy(max_tokens=last_two.total_tokens))
    assert r2.input_ids == last_two.input_ids and r2.truncated


def test_truncation_keeps_the_conversation_system_message(tok):
    prompt, response = long_conversation()
    prompt = [{"role": "system", "content": "Be kind."}] + prompt
    only_last = tokenize_conversation(tok, [prompt[0], prompt[-1]], response, TemplatePolicy())
    r = tokenize_conversation(tok, prompt, response, TemplatePolicy(max_tokens=only_last.total_tokens))
    assert r.input_ids == only_last.input_ids and r.truncated


def test_overflow_quarantine_and_unfixable_overflow(tok):
    prompt, response = long_conversation()
    with pytest.raises(TemplateError, match="more than max_tokens=100") as err:
        tokenize_conversation(tok, prompt, response, TemplatePolicy(max_tokens=100, overflow="quarantine"))
    assert err.value.reason.startswith("conversation has ")
    with pytest.raises(TemplateError, match="even with only the last user turn"):
        tokenize_conversation(tok, prompt, response, TemplatePolicy(max_tokens=40))


def test_tokenize_many_matches_one_by_one_and_keeps_errors_in_place(tok):
    prompt, response = long_conversation()
    prompts = [HI, prompt, [{"content": "no role"}], HI]
    responses = ["Hello!", response, "x", "Bye."]
    policy = TemplatePolicy(max_tokens=150, overflow="quarantine")
    results = tokenize_many(tok, prompts, responses, policy)
    assert [type(r).__name__ for r in results] == [
        "TokenizedConversation",
        "TemplateError",
        "TemplateError",
        "TokenizedConversation",
    ]
    assert results[2].reason == "message without a role"
    assert results[0] == tokenize_conversation(tok, HI, "Hello!", policy)
    assert results[3] == tokenize_conversation(tok, HI, "Bye.", policy)


def test_encoder_rendering_is_plain_role_lines():
    enc = load_tokenizer(BackboneSpec("minilm"))
    prompt = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hey"},
        {"role": "user", "content": "How are you?"},
    ]
    r = tokenize_conversation(enc, prompt, "Fine.", TemplatePolicy(), kind="encoder")
    assert r.input_ids == enc("user: Hi there\nassistant: Hey\nuser: How are you?\nassistant: Fine.")["input_ids"]
    assert r.prompt_input_ids == enc("user: Hi there\nassistant: Hey\nuser: How are you?")["input_ids"]
    assert r.prompt_end == -1 and not r.truncated
    # Capped at the model's length (256 for all-MiniLM-L6-v2), whatever max_tokens says.
    long = tokenize_conversation(
        enc, [{"role": "user", "content": "word " * 400}], "ok", TemplatePolicy(max_tokens=4096), kind="encoder"
    )
    assert long.total_tokens == 256 and long.truncated and long.tokens_before_truncation > 400
    # The response survives: the prompt loses its start instead (the end is nearest the response).
    answer = enc("assistant: ok", add_special_tokens=False)["input_ids"]
    prompt_ids = enc("user: " + "word " * 400, add_special_tokens=False)["input_ids"]
    cls, sep = enc.cls_token_id, enc.sep_token_id
    assert long.input_ids == [cls] + prompt_ids[-(254 - len(answer)) :] + answer + [sep]
    assert long.response_tokens == len(answer) and long.prompt_tokens == 256 - len(answer)
    assert long.prompt_input_ids == [cls] + prompt_ids[-254:] + [sep]
    # A response longer than the cap on its own keeps its start and no prompt.
    huge = tokenize_conversation(
        enc, [{"role": "user", "content": "Q?"}], "tok " * 400, TemplatePolicy(), kind="encoder"
    )
    assert huge.input_ids == [cls] + enc("assistant: " + "tok " * 400, add_special_tokens=False)["input_ids"][:254] + [
        sep
    ]
    assert huge.response_tokens == 254 and huge.truncated


def test_policy_validation():
    with pytest.raises(ValueError):
        TemplatePolicy(overflow="drop")
    with pytest.raises(ValueError):
        TemplatePolicy.from_dict({"max_tokens": 10, "colour": "red"})
    assert TemplatePolicy.from_dict({"system_prompt": "none"}) == TemplatePolicy(system_prompt="none")
