"""Chat formats as the real models ship them: detection, every row kind through each format, loss masks.

The fixture tokenizers in tests/fixtures/chat_formats behave like the real templates (written from the published
facts); their byte-level vocabularies make decoded text equal the rendered text exactly.
"""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from alignment.chat_format import (
    IGNORE_INDEX, TemplateError, chat_format_of, completion_text, detect_chat_format, encode_for_training,
    encode_prompt, render_prompt, stop_token_ids, switch_of, use_chat_format, with_reasoning,
)
from alignment.dpo import completion_message
from alignment.evaluate import prompt_messages
from data_recipes.adapters import rows_from_gsm8k, rows_from_llama_nemotron, rows_from_nemotron_post_training
from data_recipes.truncation import TruncationConfig, truncate_rows

HERE = Path(__file__).resolve().parent
FORMATS = HERE / "fixtures" / "chat_formats"
DATASETS = HERE / "fixtures" / "datasets"
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
USER = {"role": "user", "content": "What is 2+2?"}
EXPECTED_FORMAT = {
    "nano2": "keyword+inline",
    "nemotron3": "template-argument+field",
    "llama_nemotron": "system-prompt+inline+model-opens-think",
}
END_OF_TURN = {"nano2": "\n<SPECIAL_12>", "nemotron3": "<|im_end|>", "llama_nemotron": "<|eot_id|>"}


def fixture(name: str):
    return AutoTokenizer.from_pretrained(FORMATS / name)


@pytest.fixture(scope="module", params=list(EXPECTED_FORMAT))
def named(request):
    return request.param, fixture(request.param)


def records(schema: str) -> list[dict]:
    return [json.loads(line) for line in (DATASETS / f"{schema}.jsonl").read_text().splitlines()]


def own_prompt(name: str, tokenizer, messages: list[dict], reasoning: bool) -> str:
    """The generation prompt the way each model's documentation asks for a mode, straight from its template."""
    if name == "nano2":
        switch = [{"role": "system", "content": ("/think" if reasoning else "/no_think")}]
        if messages and messages[0]["role"] == "system":
            switch = [dict(messages[0], content=messages[0]["content"] + (" /think" if reasoning else " /no_think"))]
            messages = messages[1:]
        return tokenizer.apply_chat_template(switch + messages, tokenize=False, add_generation_prompt=True)
    if name == "nemotron3":
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=reasoning)
    raise ValueError(name)


def split_encoded(tokenizer, messages: list[dict]) -> tuple[str, str]:
    """(prompt, trained text) of a training sample, checking the loss mask token by token on the way."""
    encoded = encode_for_training(tokenizer, messages)
    ids, labels = encoded["input_ids"], encoded["labels"]
    assert len(ids) == len(labels)
    n = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert all(label == IGNORE_INDEX for label in labels[:n])  # prompt, header and template prefill: no loss
    assert labels[n:] == ids[n:]  # every trained token carries loss, up to and including the end of turn
    assert ids[-1] in stop_token_ids(tokenizer)  # and the sample ends on the token generation stops at
    return tokenizer.decode(ids[:n]), tokenizer.decode(ids[n:])


# ---------------------------------------------------------------------------------------------------------------
# The fixtures render what the real templates render


def test_nano2_fixture_renders_the_published_strings():
    tok = fixture("nano2")
    on = tok.apply_chat_template([SYSTEM, USER], tokenize=False, add_generation_prompt=True)
    off = tok.apply_chat_template([SYSTEM, dict(USER, content="What is 2+2? /no_think")], tokenize=False,
                                  add_generation_prompt=True)
    assert on == ("<SPECIAL_10>System\nYou are a helpful assistant.\n<SPECIAL_11>User\nWhat is 2+2?\n"
                  "<SPECIAL_11>Assistant\n<think>\n")
    assert off == ("<SPECIAL_10>System\nYou are a helpful assistant.\n<SPECIAL_11>User\nWhat is 2+2?\n"
                   "<SPECIAL_11>Assistant\n<think></think>")
    hello = tok.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True)
    assert hello == "<SPECIAL_10>System\n\n<SPECIAL_11>User\nHello\n<SPECIAL_11>Assistant\n<think>\n"
    answer = {"role": "assistant", "content": "2 + 2 = 4."}
    full = tok.apply_chat_template([SYSTEM, USER, answer], tokenize=False)
    assert full.endswith("<SPECIAL_11>Assistant\n<think>\n2 + 2 = 4.\n<SPECIAL_12>\n")
    # reasoning_content is never read: the real template drops a trace given in that field.
    assert tok.apply_chat_template([SYSTEM, USER, dict(answer, reasoning_content="secret")], tokenize=False) == full
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    assert tok.convert_tokens_to_ids("<SPECIAL_12>") == 12


def test_nemotron3_fixture_renders_the_published_strings():
    tok = fixture("nemotron3")
    on = tok.apply_chat_template([USER], tokenize=False, add_generation_prompt=True)
    off = tok.apply_chat_template([USER], tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert on == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert off == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think></think>"
    kept = tok.apply_chat_template([dict(USER, content="What is 2+2? /no_think")], tokenize=False,
                                   add_generation_prompt=True)
    assert "/no_think" in kept and kept.endswith("<think>\n")  # keywords are neither read nor removed
    answer = {"role": "assistant", "content": "4.", "reasoning_content": "2 + 2 = 4"}
    assert tok.apply_chat_template([USER, answer], tokenize=False).endswith(
        "<|im_start|>assistant\n<think>\n2 + 2 = 4\n</think>\n4.<|im_end|>\n")
    assert tok.apply_chat_template([USER, dict(answer, reasoning_content="")], tokenize=False).endswith(
        "<|im_start|>assistant\n<think></think>4.<|im_end|>\n")


# ---------------------------------------------------------------------------------------------------------------
# Detection


def test_each_fixture_is_detected_as_its_format(named):
    name, tok = named
    assert detect_chat_format(tok, name).name == EXPECTED_FORMAT[name]


def test_the_embedded_tiny_template_is_the_keyword_format_with_a_trace_field(tokenizer):
    assert detect_chat_format(tokenizer).name == "keyword+field"


# Qwen3 (dense) as its model card describes it: `enable_thinking`, `reasoning_content`, and with reasoning on a
# prompt that ends at the assistant header, so the model opens `<think>` itself.
QWEN3_STYLE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{%- set trace = m['reasoning_content'] if m['reasoning_content'] is string else '' -%}"
    "{%- if loop.last -%}{{- '<|im_start|>assistant\\n<think>\\n' + trace.strip('\\n') + '\\n</think>\\n\\n' + "
    "m['content'] + '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>assistant\\n' + m['content'] + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- else -%}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and not enable_thinking -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)


def test_a_template_whose_model_opens_the_think_block_gets_the_opening_as_prefill():
    tok = fixture("nemotron3")
    tok.chat_template = QWEN3_STYLE
    chat_format = use_chat_format(tok, "qwen3-style")
    assert chat_format.name == "template-argument+field+model-opens-think"
    # Generation starts inside the trace, as for every other format; the model's own opening is trained.
    assert render_prompt(tok, [USER], True).endswith("<|im_start|>assistant\n<think>\n")
    assert render_prompt(tok, [USER], False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    prompt, trained = split_encoded(tok, [USER, {"role": "assistant", "content": "4.", "reasoning_content": "2+2=4"}])
    assert prompt.endswith("<|im_start|>assistant\n") and trained == "<think>\n2+2=4\n</think>\n\n4.<|im_end|>"


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_a_template_without_any_switch_is_refused_naming_the_key_that_forces_one():
    tok = fixture("nemotron3")
    tok.chat_template = CHATML
    with pytest.raises(TemplateError, match="has no reasoning switch") as caught:
        detect_chat_format(tok, "chatml-fixture")
    assert "model.chat_format: system-prompt+inline" in str(caught.value)


def test_a_forced_format_the_template_cannot_render_is_refused_with_every_problem():
    with pytest.raises(TemplateError) as caught:
        detect_chat_format(fixture("nemotron3"), "nemotron3", forced="keyword+field")
    message = str(caught.value)
    assert message.startswith("the chat template of nemotron3 cannot express the reasoning toggle as keyword+field")
    assert "reasoning on: a `/think` / `/no_think` keyword is left in the text the model sees" in message
    assert "reasoning off: the chat template renders the reasoning-off answer turn differently" in message


def test_forcing_the_system_prompt_format_drives_a_plain_llama_template():
    tok = fixture("llama_nemotron")
    tok.name_or_path = "runs/tokenizers/mine"  # no name to go by: detection alone cannot tell
    with pytest.raises(TemplateError, match="has no reasoning switch"):
        detect_chat_format(tok, "mine")
    assert detect_chat_format(tok, "mine", forced="system-prompt+inline").name == EXPECTED_FORMAT["llama_nemotron"]


def test_the_format_in_use_is_saved_with_the_tokenizer(tmp_path):
    tok = fixture("llama_nemotron")
    use_chat_format(tok, "fixture")
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)  # its path no longer says what model it is
    assert chat_format_of(reloaded).name == EXPECTED_FORMAT["llama_nemotron"]


def test_stop_tokens_are_the_end_of_turn_then_the_eos():
    assert stop_token_ids(fixture("nano2")) == [12, 2]  # <SPECIAL_12> ends a chat turn; </s> is the base eos
    tok = fixture("nemotron3")
    assert stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]
    ids = tok("The answer.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert completion_text(tok, ids) == "The answer."


# ---------------------------------------------------------------------------------------------------------------
# Every row kind through each format


def trace_answer_row(trace: str, answer: str, reasoning: bool, system: str | None = "Be brief.") -> list[dict]:
    head = [{"role": "system", "content": system + ("" if reasoning else " /no_think")}] if system else []
    return head + [{"role": "user", "content": "Start with 3. Add 4."},
                   {"role": "assistant", "content": answer, "reasoning_content": trace if reasoning else ""}]


def test_reasoning_on_trains_trace_close_answer_end(named):
    name, tok = named
    row = trace_answer_row("3 + 4 = 7.\nCheck: 7 - 4 = 3.\n", "The result is \\boxed{7}.", True)
    prompt, trained = split_encoded(tok, row)
    opening = "<think>\n" if name == "llama_nemotron" else ""  # that model writes its own opening
    close = {"nano2": "\n</think>\n\n", "nemotron3": "\n</think>\n", "llama_nemotron": "\n</think>\n\n"}[name]
    assert trained == opening + "3 + 4 = 7.\nCheck: 7 - 4 = 3." + close + "The result is \\boxed{7}." + END_OF_TURN[name]
    assert render_prompt(tok, row[:-1]).endswith("<think>\n")
    if name != "llama_nemotron":
        assert prompt == own_prompt(name, tok, [{"role": "system", "content": "Be brief."}, row[1]], True)


def test_reasoning_off_trains_the_answer_and_end_only(named):
    name, tok = named
    row = trace_answer_row("", "The result is \\boxed{7}.", False)
    prompt, trained = split_encoded(tok, row)
    empty = "<think>\n\n</think>\n\n" if name == "llama_nemotron" else ""
    assert trained == empty + "The result is \\boxed{7}." + END_OF_TURN[name]
    assert render_prompt(tok, row[:-1]).endswith("</think>" if name != "llama_nemotron" else "</think>\n\n")
    if name != "llama_nemotron":
        assert prompt == own_prompt(name, tok, [{"role": "system", "content": "Be brief."}, row[1]], False)
    assert "/no_think" not in prompt and "/think" not in prompt.replace("</think>", "")


def test_generation_prompts_equal_the_templates_own_renderings(named):
    name, tok = named
    messages = [SYSTEM, USER]
    for reasoning in (True, False):
        ours = tok.decode(encode_prompt(tok, messages, reasoning))
        if name == "llama_nemotron":
            switch = "detailed thinking on" if reasoning else "detailed thinking off"
            theirs = tok.apply_chat_template([{"role": "system", "content": switch},
                                              dict(USER, content=f"{SYSTEM['content']}\n\n{USER['content']}")],
                                             tokenize=False, add_generation_prompt=True)
            assert ours == theirs + ("<think>\n" if reasoning else "<think>\n\n</think>\n\n")
        else:
            assert ours == own_prompt(name, tok, messages, reasoning)


def test_truncated_thinking_row_keeps_the_answer_after_the_cut(named):
    name, tok = named
    (row,) = rows_from_gsm8k(records("gsm8k")[:1])
    config = TruncationConfig(fraction=1.0, min_budget=12, max_budget=12, close_marker=".\n")
    (cut,), stats = truncate_rows([row], config, tok)
    assert stats["truncated"] == 1 and cut["metadata"]["truncated_at"] == 12
    prompt, trained = split_encoded(tok, cut["messages"])
    # Byte-level vocabulary: 12 tokens are 12 characters; the cut closes the way the model card's client does.
    opening = "<think>\n" if name == "llama_nemotron" else ""
    close = "\n</think>\n" if name == "nemotron3" else "\n</think>\n\n"
    assert trained == opening + "Natalia sold." + close + "The result is \\boxed{72}." + END_OF_TURN[name]


def test_real_schema_rows_render_through_each_format(named):
    name, tok = named
    on = rows_from_llama_nemotron(records("llama_nemotron"))[0]
    _, trained = split_encoded(tok, on["messages"])
    assert "12 * 7 = 84.\nCheck: 84 / 7 = 12." in trained and trained.endswith("\\boxed{84}." + END_OF_TURN[name])
    off = rows_from_nemotron_post_training(records("nemotron_post_training"))[1]
    prompt, trained = split_encoded(tok, off["messages"])
    assert trained.endswith("Paris." + END_OF_TURN[name]) and "Paris" not in prompt
    multi = rows_from_llama_nemotron(records("llama_nemotron"))[2]
    prompt, trained = split_encoded(tok, multi["messages"])
    assert "Hi in French is Salut." in trained and "Say hi." in prompt


def test_dpo_sides_render_from_sampled_text(named):
    name, tok = named
    prompt = with_reasoning([USER], True)
    chosen = completion_message("2 + 2 = 4\n</think>\n\nIt is \\boxed{4}.", reasoning=True)
    rejected = completion_message("2 + 2 = 5 and then", reasoning=True)  # never closed: not a clean trace
    _, trained = split_encoded(tok, prompt + [chosen])
    assert "2 + 2 = 4" in trained and trained.endswith("It is \\boxed{4}." + END_OF_TURN[name])
    _, trained = split_encoded(tok, prompt + [rejected])
    assert "2 + 2 = 5 and then" in trained and "</think>" in trained  # an unclosed sample trains as an answer


def test_an_empty_trace_with_reasoning_on_trains_the_close_then_the_answer(named):
    name, tok = named  # a trace cut at budget 0: generation forces `</think>` right after the prefill
    prompt, trained = split_encoded(tok, with_reasoning([USER], True) + [
        {"role": "assistant", "content": "4.", "reasoning_content": ""}])
    opening = "<think>\n" if name == "llama_nemotron" else ""
    assert prompt.endswith("<think>\n" if name != "llama_nemotron" else "\n\n")
    assert trained == opening + "</think>\n" + ("" if name == "nemotron3" else "\n") + "4." + END_OF_TURN[name]


def test_evaluation_and_rollout_prompts_follow_the_requested_mode(named):
    name, tok = named
    row = rows_from_nemotron_post_training(records("nemotron_post_training"))[1]  # an off row
    on = tok.decode(encode_prompt(tok, prompt_messages(row), reasoning=True))
    off = tok.decode(encode_prompt(tok, prompt_messages(row), reasoning=False))
    assert on.endswith("<think>\n") and off.rstrip("\n").endswith("</think>")
    assert switch_of(row["messages"]) is False and tok.decode(encode_prompt(tok, row["messages"][:-1])) == off


def test_the_row_switch_is_the_last_keyword():
    assert switch_of([{"role": "system", "content": "/no_think"}, {"role": "user", "content": "x /think"}])
    assert not switch_of([{"role": "user", "content": "/think then /no_think x"}])
    assert switch_of([{"role": "user", "content": "what does </think> mean?"}])  # a tag is not a keyword


# ---------------------------------------------------------------------------------------------------------------
# `align template`


def align_template(capsys, *args) -> tuple[int, str, str]:
    from alignment.cli import main

    code = main(["template", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("name", ["nano2", "nemotron3"])
def test_align_template_json_shows_the_templates_own_prompts_and_the_trained_text(capsys, name):
    code, out, _ = align_template(capsys, FORMATS / name, "--json")
    shown = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and shown["format"] == EXPECTED_FORMAT[name] and set(shown["cases"]) == {"on", "off", "truncated"}
    tok = fixture(name)
    history = [SYSTEM, {"role": "user", "content": "What is 2 + 3?"}]
    for case, reasoning in (("on", True), ("off", False), ("truncated", True)):
        assert shown["cases"][case] == {"prompt": own_prompt(name, tok, history, reasoning),
                                        "trained": shown["cases"][case]["trained"]}
    on, off, cut = (shown["cases"][c]["trained"] for c in ("on", "off", "truncated"))
    end = END_OF_TURN[name]
    assert on.startswith("2 + 3 = 5.\nCheck: 5 - 3 = 2, so the sum is right.\n</think>\n") and on.endswith(
        "The result is \\boxed{5}." + end)
    assert off == "The result is \\boxed{5}." + end
    assert cut.startswith("2 + 3 = 5.") and len(cut) < len(on) and cut.endswith("</think>\n" + (
        "\n" if name == "nano2" else "") + "The result is \\boxed{5}." + end)


def test_align_template_marks_the_trained_part_and_reads_a_messages_file(capsys, tmp_path):
    messages = [{"role": "user", "content": "Name a prime."},
                {"role": "assistant", "content": "Seven.", "reasoning_content": "7 has no divisors but 1 and 7."}]
    path = tmp_path / "messages.json"
    path.write_text(json.dumps(messages))
    code, out, _ = align_template(capsys, FORMATS / "nemotron3", "--messages", path)
    assert code == 0 and "chat format: template-argument+field" in out
    assert "\u27e6Seven.<|im_end|>\u27e7" in out  # reasoning off: the answer and end of turn carry loss
    assert "\u27e67 has no divisors but 1 and 7.\u23ce\n</think>\u23ce\nSeven.<|im_end|>\u27e7" in out


def test_align_template_names_the_file_of_bad_messages(capsys, tmp_path):
    path = tmp_path / "messages.json"
    path.write_text(json.dumps([{"role": "user", "content": "no answer turn"}]))
    code, _, err = align_template(capsys, FORMATS / "nano2", "--messages", path)
    assert code == 2 and f"--messages {path}: the last message must be the assistant turn" in err
