"""Real-schema rows render through a Nano-2-format chat template with the right prefill and loss mask.

The fixture tokenizer (tests/fixtures/nano2_tokenizer) has the Nano 2 turn tokens and a template written from the
published format; its byte-level vocabulary makes decoded text equal the rendered text exactly.
"""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from alignment.chat import IGNORE_INDEX, TemplateError, encode_for_training, encode_prompt
from alignment.evaluate import prompt_messages
from data_recipes.adapters import rows_from_gsm8k, rows_from_llama_nemotron, rows_from_nemotron_post_training
from data_recipes.template_check import check_reasoning_toggle, reasoning_toggle_problems
from data_recipes.truncation import TruncationConfig, truncate_rows

HERE = Path(__file__).resolve().parent
NANO2 = HERE / "fixtures" / "nano2_tokenizer"
DATASETS = HERE / "fixtures" / "datasets"
END = "\n<SPECIAL_12>\n"


@pytest.fixture(scope="module")
def nano2():
    return AutoTokenizer.from_pretrained(NANO2)


def records(schema: str) -> list[dict]:
    return [json.loads(line) for line in (DATASETS / f"{schema}.jsonl").read_text().splitlines()]


def split_encoded(tokenizer, row: dict) -> tuple[str, str]:
    """(prompt text, completion text) of a row's training sample, checking the mask boundary on the way."""
    encoded = encode_for_training(tokenizer, row["messages"])
    ids, labels = encoded["input_ids"], encoded["labels"]
    n = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert all(label == IGNORE_INDEX for label in labels[:n])  # prompt, assistant header and prefill: no loss
    assert labels[n:] == ids[n:]  # every completion token carries loss, the end-of-turn token included
    assert ids[:n] == encode_prompt(tokenizer, row["messages"][:-1])
    assert ids[-2] == tokenizer.eos_token_id == 12
    return tokenizer.decode(ids[:n]), tokenizer.decode(ids[n:])


def test_fixture_has_the_nano2_special_tokens(nano2):
    for token, expected_id in (("<SPECIAL_10>", 10), ("<SPECIAL_11>", 11), ("<SPECIAL_12>", 12)):
        assert nano2.convert_tokens_to_ids(token) == expected_id
    assert nano2("<SPECIAL_11>Assistant\n<think></think>", add_special_tokens=False)["input_ids"][0] == 11
    assert len(nano2("<think></think>", add_special_tokens=False)["input_ids"]) == 2  # the tags are single tokens
    check_reasoning_toggle(nano2, str(NANO2))


def test_reasoning_on_row_prefills_open_think_and_trains_on_trace_then_answer(nano2):
    row = rows_from_llama_nemotron(records("llama_nemotron"))[0]
    prompt, completion = split_encoded(nano2, row)
    assert prompt == "<SPECIAL_10>System\n\n<SPECIAL_11>User\nWhat is 12 * 7?\n<SPECIAL_11>Assistant\n<think>\n"
    assert completion == "12 * 7 = 84.\nCheck: 84 / 7 = 12.\n</think>\n\nThe answer is \\boxed{84}." + END


def test_reasoning_off_row_prefills_empty_think_and_trains_on_answer_only(nano2):
    row = rows_from_nemotron_post_training(records("nemotron_post_training"))[1]
    prompt, completion = split_encoded(nano2, row)
    # The source's "/think" was replaced by the row's flag (off), and the template removes the keyword.
    assert prompt == ("<SPECIAL_10>System\nAnswer briefly.\n<SPECIAL_11>User\nCapital of France?\n"
                      "<SPECIAL_11>Assistant\n<think></think>")
    assert completion == "Paris." + END


def test_truncated_row_keeps_the_answer_after_the_cut_trace(nano2):
    (row,) = rows_from_gsm8k(records("gsm8k")[:1])
    config = TruncationConfig(fraction=1.0, min_budget=12, max_budget=12, close_marker=".\n")
    (cut,), stats = truncate_rows([row], config, nano2)
    assert stats["truncated"] == 1 and cut["metadata"]["truncated_at"] == 12
    prompt, completion = split_encoded(nano2, cut)
    assert prompt.endswith("<SPECIAL_11>Assistant\n<think>\n")
    # Byte-level vocabulary: 12 tokens are 12 characters; the cut closes the way the model card's client does.
    assert completion == "Natalia sold.\n</think>\n\nThe result is \\boxed{72}." + END


def test_multi_turn_row_drops_past_reasoning(nano2):
    row = rows_from_llama_nemotron(records("llama_nemotron"))[2]
    prompt, completion = split_encoded(nano2, row)
    assert "A greeting." not in prompt
    assert prompt == ("<SPECIAL_10>System\nYou are a friendly assistant.\n<SPECIAL_11>User\nSay hi.\n"
                      "<SPECIAL_11>Assistant\nHi!" + END + "<SPECIAL_11>User\nNow in French.\n"
                      "<SPECIAL_11>Assistant\n<think>\n")
    assert completion == "Hi in French is Salut.\n</think>\n\nSalut !" + END


def test_evaluation_prompt_follows_the_requested_mode(nano2):
    row = rows_from_nemotron_post_training(records("nemotron_post_training"))[1]  # an off row
    on = nano2.decode(encode_prompt(nano2, prompt_messages(row), reasoning=True))
    off = nano2.decode(encode_prompt(nano2, prompt_messages(row), reasoning=False))
    assert on.endswith("Capital of France?\n<SPECIAL_11>Assistant\n<think>\n")
    assert off.endswith("Capital of France?\n<SPECIAL_11>Assistant\n<think></think>")


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_plain_chatml_template_fails_the_toggle_check_with_a_clear_message(nano2):
    tokenizer = AutoTokenizer.from_pretrained(NANO2)
    tokenizer.chat_template = CHATML
    row = rows_from_nemotron_post_training(records("nemotron_post_training"))[1]
    # encode_for_training alone cannot tell: the render starts with the prompt, so the row trains silently
    # without its switch or trace. The check is what catches it.
    encode_for_training(tokenizer, row["messages"])
    with pytest.raises(TemplateError) as caught:
        check_reasoning_toggle(tokenizer, "chatml-fixture")
    message = str(caught.value)
    assert message.startswith("the chat template of chatml-fixture cannot express the reasoning toggle")
    assert "/think: the generation prompt should end with an open `<think>` block" in message
    assert "/no_think: the keyword is left in the rendered text" in message
    assert "does not render `reasoning_content`" in message


def test_template_whose_answer_turn_differs_from_its_prompt_fails_both_ways(nano2):
    tokenizer = AutoTokenizer.from_pretrained(NANO2)
    # Prefills the think block for generation but renders training answers without it: no clean mask boundary.
    tokenizer.chat_template = nano2.chat_template.replace(
        "'<SPECIAL_11>Assistant\\n<think>\\n' + trace.strip()", "'<SPECIAL_11>Assistant\\n' + trace.strip()"
    )
    assert tokenizer.chat_template != nano2.chat_template
    row = rows_from_llama_nemotron(records("llama_nemotron"))[0]
    with pytest.raises(TemplateError, match="cannot express the reasoning toggle"):
        encode_for_training(tokenizer, row["messages"])
    problems = reasoning_toggle_problems(tokenizer)
    assert problems == ["reasoning on: the conversation with the answer does not start with the generation prompt, "
                        "so the prompt and prefill cannot be masked"]
