"""Rendering conversations through the tokenizer's chat template, and tokens + loss mask for training.

The template owns the reasoning toggle (see `data_recipes/tiny_tokenizer.py` for the rules); this module only asks
it for the prompt (with the assistant prefill) and the full conversation, and takes the difference as the part the
model is trained on. Tokenizing the two parts separately keeps the boundary exact: no prompt token carries loss.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


class TemplateError(ValueError):
    """The chat template cannot express what a row needs (e.g. the reasoning toggle)."""


def with_reasoning(messages: list[dict], reasoning: bool | None) -> list[dict]:
    """Messages with the reasoning switch set: the keyword goes at the end of the last user message, so it wins.

    `None` leaves the messages as they are (the row's own switch, or the template's default: on).
    """
    if reasoning is None:
        return messages
    keyword = "/think" if reasoning else "/no_think"
    out = [dict(m) for m in messages]
    for message in reversed(out):
        if message["role"] == "user":
            message["content"] = f"{message['content']} {keyword}"
            return out
    return [{"role": "system", "content": keyword}] + out


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> str:
    """The text the model sees before it starts writing: conversation + assistant header + think prefill."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict], reasoning: bool | None = None) -> list[int]:
    return tokenizer(render_prompt(tokenizer, with_reasoning(messages, reasoning)), add_special_tokens=False)["input_ids"]


def encode_for_training(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> dict[str, list[int]]:
    """Token ids and labels for a conversation whose last message is the assistant turn to learn.

    Labels are IGNORE_INDEX on the prompt, including the assistant header and the think prefill.
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise TemplateError("the last message must be the assistant turn to train on")
    prompt = render_prompt(tokenizer, messages[:-1])
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise TemplateError(
            "the chat template renders the assistant turn differently from its generation prompt, so the "
            "prefill cannot be masked; it cannot express the reasoning toggle this pipeline needs"
        )
    completion = full[len(prompt):]
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return {
        "input_ids": prompt_ids + completion_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids,
    }
