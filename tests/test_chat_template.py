"""The embedded tiny tokenizer's template: the project's own keyword switch with a `reasoning_content` trace."""

import pytest

from alignment.chat_format import IGNORE_INDEX, TemplateError, encode_for_training, encode_prompt, render_prompt, with_reasoning

USER = {"role": "user", "content": "Start with 3. Add 4. What is the result?"}
ANSWER = {"role": "assistant", "content": "The result is \\boxed{7}.", "reasoning_content": "3 + 4 = 7\n"}


def test_default_is_reasoning_on(tokenizer):
    assert render_prompt(tokenizer, [USER]).endswith("<|assistant|><think>\n")


@pytest.mark.parametrize(
    "messages, on",
    [
        ([{"role": "system", "content": "/no_think"}, USER], False),
        ([{"role": "system", "content": "/think"}, USER], True),
        ([{"role": "system", "content": "/think"}, dict(USER, content=USER["content"] + " /no_think")], False),
        ([{"role": "system", "content": "/no_think"}, dict(USER, content=USER["content"] + " /think")], True),
        ([dict(USER, content="/no_think then /think " + USER["content"])], True),
        ([dict(USER, content="/think then /no_think " + USER["content"])], False),
    ],
)
def test_last_switch_wins(tokenizer, messages, on):
    prompt = render_prompt(tokenizer, messages)
    assert prompt.endswith("<think>\n" if on else "<think></think>")


def test_keyword_removed_from_rendered_text(tokenizer):
    prompt = render_prompt(tokenizer, [{"role": "system", "content": "Be brief. /no_think"},
                                       dict(USER, content=USER["content"] + " /think")])
    body = prompt.rsplit("<|assistant|>", 1)[0]
    assert "/think" not in body and "/no_think" not in body
    assert "<|system|>Be brief.<|end|>" in prompt


def test_past_assistant_turns_keep_only_the_answer(tokenizer):
    past = {"role": "assistant", "content": "<think>\nsecret work\n</think>\nIt is 7."}
    prompt = render_prompt(tokenizer, [USER, past, {"role": "user", "content": "And plus 1?"}])
    assert "secret work" not in prompt
    assert "<|assistant|>It is 7.<|end|>" in prompt


def test_final_turn_renders_trace_then_answer(tokenizer):
    full = tokenizer.apply_chat_template([USER, ANSWER], tokenize=False)
    assert full.endswith("<|assistant|><think>\n3 + 4 = 7\n</think>\nThe result is \\boxed{7}.<|end|>")
    inline = dict(ANSWER, content="<think>\n3 + 4 = 7\n</think>\nThe result is \\boxed{7}.", reasoning_content=None)
    assert tokenizer.apply_chat_template([USER, inline], tokenize=False) == full


def test_reasoning_off_drops_the_trace(tokenizer):
    full = tokenizer.apply_chat_template([{"role": "system", "content": "/no_think"}, USER, ANSWER], tokenize=False)
    assert full.endswith("<|assistant|><think></think>\nThe result is \\boxed{7}.<|end|>")
    assert "3 + 4 = 7" not in full


def test_with_reasoning_overrides_row_switch(tokenizer):
    messages = [{"role": "system", "content": "/no_think"}, USER]
    assert render_prompt(tokenizer, with_reasoning(messages, True)).endswith("<think>\n")
    assert render_prompt(tokenizer, with_reasoning([USER], False)).endswith("<think></think>")
    assert tokenizer.decode(encode_prompt(tokenizer, [USER], False)).endswith("<think></think>")


@pytest.mark.parametrize("system", [None, "/no_think"])
def test_loss_mask_covers_only_the_assistant_completion(tokenizer, system):
    messages = ([{"role": "system", "content": system}] if system else []) + [USER, ANSWER]
    encoded = encode_for_training(tokenizer, messages)
    prompt_ids = encode_prompt(tokenizer, messages[:-1])
    n = len(prompt_ids)
    assert encoded["input_ids"][:n] == prompt_ids
    assert all(label == IGNORE_INDEX for label in encoded["labels"][:n])  # prompt and prefill carry no loss
    assert encoded["labels"][n:] == encoded["input_ids"][n:]
    completion = tokenizer.decode(encoded["input_ids"][n:])
    expected = ("\n" if system else "3 + 4 = 7\n</think>\n") + "The result is \\boxed{7}.<|end|>"
    assert completion == expected


def test_training_needs_a_final_assistant_turn(tokenizer):
    with pytest.raises(TemplateError):
        encode_for_training(tokenizer, [USER])
