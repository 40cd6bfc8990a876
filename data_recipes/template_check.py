"""Does a tokenizer's chat template express the reasoning toggle the pipeline relies on? Checked by rendering probes.

`alignment.chat.encode_for_training` only notices a template whose training render does not start with its
generation prompt. A plain template (ChatML without think handling) passes that test and silently trains every row
without its trace and without the toggle. Call `check_reasoning_toggle(tokenizer)` once after loading a tokenizer
to fail early instead; it checks, on a short probe conversation, that

- `/think` gives a generation prompt ending in an open think block (`<think>` + whitespace),
- `/no_think` gives one ending in an empty, closed block (`<think>`, whitespace, `</think>`, whitespace),
- the keyword itself is not left in the rendered text,
- the conversation with the answer starts with the generation prompt (so the prompt and prefill can be masked),
- with reasoning on, the answer turn renders the row's `reasoning_content`, then `</think>`, then the answer;
  with reasoning off, the trace is not rendered,
- an earlier assistant turn keeps only its text after `</think>`.
"""

from __future__ import annotations

import re

from transformers import PreTrainedTokenizerBase

from alignment.chat import TemplateError, render_prompt, with_reasoning

_USER = {"role": "user", "content": "What is 2 + 3?"}
_TRACE = "2 + 3 = 5\n"
_ANSWER = "The result is \\boxed{5}."
_PAST_TRACE = "an earlier private thought"
_OPEN_AT_END = re.compile(r"<think>\s*$")
_CLOSED_AT_END = re.compile(r"<think>\s*</think>\s*$")


def reasoning_toggle_problems(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """What the template gets wrong about the reasoning toggle; empty when it expresses it."""
    if not getattr(tokenizer, "chat_template", None):
        return ["the tokenizer has no chat template"]
    problems: list[str] = []
    answer_turn = {"role": "assistant", "content": _ANSWER, "reasoning_content": _TRACE}
    for reasoning in (True, False):
        mode, keyword = ("on", "/think") if reasoning else ("off", "/no_think")
        messages = with_reasoning([_USER], reasoning)
        try:
            prompt = render_prompt(tokenizer, messages)
            full = tokenizer.apply_chat_template(messages + [answer_turn], tokenize=False)
        except Exception as exc:  # a template error is a finding here, whatever its type
            problems.append(f"reasoning {mode}: rendering failed ({type(exc).__name__}: {exc})")
            continue
        expected = _OPEN_AT_END if reasoning else _CLOSED_AT_END
        if not expected.search(prompt) or (reasoning and _CLOSED_AT_END.search(prompt)):
            want = "an open `<think>` block" if reasoning else "an empty `<think></think>` block"
            problems.append(f"{keyword}: the generation prompt should end with {want}, it ends with {prompt[-30:]!r}")
        if keyword in prompt:
            problems.append(f"{keyword}: the keyword is left in the rendered text")
        if not full.startswith(prompt):
            problems.append(f"reasoning {mode}: the conversation with the answer does not start with the generation "
                            "prompt, so the prompt and prefill cannot be masked")
            continue
        completion = full[len(prompt):]
        at_trace, at_close, at_answer = (completion.find(s) for s in (_TRACE.strip(), "</think>", _ANSWER))
        if reasoning and not 0 <= at_trace < at_close < at_answer:
            problems.append("reasoning on: the answer turn does not render `reasoning_content`, `</think>`, then the "
                            f"answer (got {completion[:80]!r})")
        if not reasoning and _TRACE.strip() in full:
            problems.append("reasoning off: the trace is rendered although reasoning is off")
        if _ANSWER not in completion:
            problems.append(f"reasoning {mode}: the answer is not rendered after the prompt")
    past = {"role": "assistant", "content": f"<think>\n{_PAST_TRACE}\n</think>\nIt is 5."}
    try:
        history = render_prompt(tokenizer, [_USER, past, {"role": "user", "content": "And 5 + 1?"}])
        if _PAST_TRACE in history:
            problems.append("an earlier assistant turn keeps its reasoning; only the text after `</think>` should stay")
    except Exception as exc:
        problems.append(f"rendering a conversation with an earlier assistant turn failed ({type(exc).__name__}: {exc})")
    return problems


def check_reasoning_toggle(tokenizer: PreTrainedTokenizerBase, source: str = "the tokenizer") -> None:
    """Raise `TemplateError` naming every problem when the chat template cannot express the reasoning toggle."""
    problems = reasoning_toggle_problems(tokenizer)
    if problems:
        raise TemplateError(
            f"the chat template of {source} cannot express the reasoning toggle: " + "; ".join(problems)
            + ". The pipeline needs a template that reads `/think` / `/no_think`, prefills `<think>\\n` or "
            "`<think></think>`, and renders `reasoning_content` in the final answer turn (see "
            "tests/fixtures/nano2_tokenizer/chat_template.jinja for the Nano 2 format)."
        )
