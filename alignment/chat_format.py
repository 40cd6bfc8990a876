"""Chat formats: how a tokenizer's own chat template switches reasoning and where it puts the trace.

Every stage goes through this module to turn conversations into tokens: SFT rows, truncated-thinking rows, DPO
pairs, GRPO and evaluation prompts. Rows carry the reasoning switch in the project's schema (`/think` or
`/no_think` in a system or user message, the last one wins, default on) and the trace in `reasoning_content`; a
`ChatFormat` translates that into what the model's template expects, found by rendering probes through it:

- the switch: a keyword in a message (Nano 2: `/think` / `/no_think`, removed by the template), the template
  argument `enable_thinking` (Nemotron 3, Qwen3), or a whole system prompt (Llama-Nemotron: `detailed thinking
  on` / `off`, read by the model, invisible to the template);
- the trace: a `reasoning_content` field the template renders (Nemotron 3, Qwen3), or inline in `content` before
  `</think>` (Nano 2 renders the final assistant `content` verbatim after its `<think>\\n` prefill);
- who opens the think block: the template's generation prompt (Nano 2, Nemotron 3) or the model (Qwen3 with
  reasoning on, Llama-Nemotron). When the model opens it, generation prompts get the opening the model would write
  (`<think>\\n`, or the empty block when off) appended, so every rollout starts inside the trace, or after it when
  reasoning is off; training rows keep it in the trained text, since the model writes it itself.
- the end-of-turn token the template closes an assistant turn with (`<SPECIAL_12>` for Nano 2, whose tokenizer's
  `eos_token` is `</s>`): generation stops there and the trained text ends there.

The tokens that carry loss are those after the template's own generation prompt, up to and including the end of
turn. `model.chat_format` forces a format when detection is wrong; the format in use is stored with the tokenizer
(`tokenizer_config.json`, key `chat_format`), so later stages reading a checkpoint use the same one.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Literal

from transformers import PreTrainedTokenizerBase

from alignment.tool_calls import ToolSyntax, detect_tool_syntax, normalized_message
from envs.answers import THINK_CLOSE, THINK_OPEN, split_thinking

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
KEYWORD_ON, KEYWORD_OFF = "/think", "/no_think"
SYSTEM_PROMPT_ON, SYSTEM_PROMPT_OFF = "detailed thinking on", "detailed thinking off"
SAVED_FORMAT_KEY = "chat_format"  # in tokenizer_config.json

Switch = Literal["keyword", "template-argument", "system-prompt"]
TracePlace = Literal["field", "inline"]
SWITCHES: dict[str, str] = {
    "keyword": "`/think` / `/no_think` in the last user message (the template reads and removes it)",
    "template-argument": "`enable_thinking=True/False` passed to the template",
    "system-prompt": f"the system message `{SYSTEM_PROMPT_ON}` / `{SYSTEM_PROMPT_OFF}` (read by the model)",
}
TRACE_PLACES: dict[str, str] = {
    "field": "the assistant message's `reasoning_content`",
    "inline": "the assistant `content`, inline before `</think>`",
}
MODEL_OPENS_THINK = "model-opens-think"
# What a model that opens its own think block writes first; for reasoning off, the empty block it writes.
MODEL_THINK_OPENING = f"{THINK_OPEN}\n"
MODEL_EMPTY_BLOCK = f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n"

# The keywords as words: `/think` inside `</think>` is not one.
_KEYWORD = {True: re.compile(r"(?<![<\w])/think(?![\w>])"), False: re.compile(r"(?<!\w)/no_think(?!\w)")}
_OPEN_AT_END = re.compile(r"<think>\s*$")
_CLOSED_AT_END = re.compile(r"<think>\s*</think>\s*$")
_LLAMA_NEMOTRON_NAME = re.compile(r"llama[-_.]?(\d[\d._]*[-_])?nemotron", re.IGNORECASE)

# Probe conversation: short, and no text that a template could confuse with its own markers.
_PROBE_SYSTEM = "You are a helpful assistant."
_PROBE_USER = "What is 2 + 3?"
_PROBE_TRACE = "2 + 3 = 5, checked: 5 - 3 = 2."
_PROBE_ANSWER = "The result is \\boxed{5}."
_PROBE_PAST_TRACE = "an earlier private thought"
_EMPTY_TRACE_PLACEHOLDER = "EMPTY-TRACE-PLACEHOLDER"


class TemplateError(ValueError):
    """The chat template cannot express what a row needs (e.g. the reasoning toggle)."""


@dataclass(frozen=True)
class ChatFormat:
    """How one tokenizer's template is driven; `detect_chat_format` builds it from probe renders."""

    switch: Switch
    trace: TracePlace
    model_opens_think: bool  # the template's reasoning-on generation prompt does not open `<think>`
    model_closes_empty_block: bool  # the template's reasoning-off prompt does not hold the empty think block
    end_of_turn: str  # the token that ends an assistant turn; generation stops at it

    @property
    def name(self) -> str:
        """The spec `model.chat_format` accepts, e.g. `keyword+inline` or `template-argument+field+model-opens-think`."""
        return f"{self.switch}+{self.trace}" + (f"+{MODEL_OPENS_THINK}" if self.model_opens_think else "")

    def describe(self) -> str:
        opener = "the model writes `<think>` itself" if self.model_opens_think else "the template prefills `<think>`"
        return (f"{self.name}: reasoning switched by {SWITCHES[self.switch]}; trace in {TRACE_PLACES[self.trace]}; "
                f"{opener}; end of turn {self.end_of_turn!r}")

    # -- template calls ----------------------------------------------------------------------------------------

    def _drive(self, messages: list[dict], reasoning: bool, tools: list[dict] | None = None) -> tuple[list[dict], dict]:
        """Switch-free messages as this template wants them for `reasoning`, and the template arguments."""
        messages = [normalized_message(m) for m in strip_switch(messages)]
        tool_kwargs = {"tools": tools} if tools else {}
        if self.switch == "keyword":
            return add_keyword(messages, reasoning), tool_kwargs
        if self.switch == "template-argument":
            return messages, {"enable_thinking": reasoning, **tool_kwargs}
        # A whole system message is the switch; other system text moves to the first user message.
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        rest = [dict(m) for m in messages if m["role"] != "system"]
        if system:
            first_user = next((m for m in rest if m["role"] == "user"), None)
            if first_user is None:
                rest.insert(0, {"role": "user", "content": system})
            else:
                first_user["content"] = f"{system}\n\n{first_user['content']}"
        switch = SYSTEM_PROMPT_ON if reasoning else SYSTEM_PROMPT_OFF
        return [{"role": "system", "content": switch}] + rest, tool_kwargs

    def template_prompt(self, tokenizer: PreTrainedTokenizerBase, messages: list[dict], reasoning: bool,
                        tools: list[dict] | None = None) -> str:
        """The template's own generation prompt for `reasoning` (what the trained text follows)."""
        driven, kwargs = self._drive(messages, reasoning, tools)
        return tokenizer.apply_chat_template(driven, tokenize=False, add_generation_prompt=True, **kwargs)

    def prefill(self, reasoning: bool) -> str:
        """Text appended to the template's prompt for generation: what the model would write before its trace."""
        if reasoning:
            return MODEL_THINK_OPENING if self.model_opens_think else ""
        return MODEL_EMPTY_BLOCK if self.model_closes_empty_block else ""

    def generation_prompt(self, tokenizer: PreTrainedTokenizerBase, messages: list[dict], reasoning: bool,
                          tools: list[dict] | None = None) -> str:
        """What a rollout or an evaluation starts from: ends inside an open trace (on) or after the empty block."""
        return self.template_prompt(tokenizer, messages, reasoning, tools) + self.prefill(reasoning)

    def answer_message(self, trace: str, answer: str, reasoning: bool, tool_calls: list | None = None) -> dict:
        """The final assistant message carrying `trace`, `answer` and any calls the way this template renders them."""
        calls = {"tool_calls": tool_calls} if tool_calls else {}
        if self.trace == "field":
            return {"role": "assistant", "content": answer, "reasoning_content": trace if reasoning else "", **calls}
        if reasoning:
            content = f"{trace.strip()}\n{THINK_CLOSE}\n\n{answer.strip()}"
            return {"role": "assistant", "content": (MODEL_THINK_OPENING if self.model_opens_think else "") + content,
                    **calls}
        return {"role": "assistant", "content": (MODEL_EMPTY_BLOCK if self.model_closes_empty_block else "") + answer,
                **calls}

    def training_texts(self, tokenizer: PreTrainedTokenizerBase, messages: list[dict],
                       reasoning: bool | None = None, tools: list[dict] | None = None) -> tuple[str, str]:
        """(prompt, trained text) of a conversation whose last message is the assistant turn to learn.

        The trace comes from `reasoning_content` or from an inline `<think>...</think>` in `content`; the turn's
        `tool_calls` are rendered by the template after its text. `reasoning` None takes the row's own switch.
        """
        if not messages or messages[-1]["role"] != "assistant":
            raise TemplateError("the last message must be the assistant turn to train on")
        if reasoning is None:
            reasoning = switch_of(messages)
        *history, final = messages
        trace, answer = final.get("reasoning_content") or "", final["content"]
        inline_trace, after = split_thinking(answer)
        if inline_trace is not None:
            trace, answer = trace or inline_trace, after
        # An empty trace with reasoning on (a trace cut at budget 0, a sample that closed at once) is what
        # generation gives after `</think>` is forced at once; templates render an empty trace as reasoning off,
        # so render a placeholder and take it out again.
        empty_trace = reasoning and not trace.strip()
        if empty_trace:
            trace = _EMPTY_TRACE_PLACEHOLDER
        prompt = self.template_prompt(tokenizer, history, reasoning, tools)
        driven, kwargs = self._drive(history, reasoning, tools)
        final_message = normalized_message(self.answer_message(trace, answer, reasoning, final.get("tool_calls")))
        full = tokenizer.apply_chat_template(driven + [final_message], tokenize=False, **kwargs)
        if not full.startswith(prompt):
            raise TemplateError(
                f"the chat template renders the reasoning-{'on' if reasoning else 'off'} answer turn differently from "
                f"its generation prompt ({prompt[-40:]!r} vs {full[len(prompt) - 40:len(prompt)]!r}), so the prompt "
                "cannot be masked"
            )
        completion = full[len(prompt):]
        if empty_trace:
            completion = completion.replace(_EMPTY_TRACE_PLACEHOLDER + "\n", "", 1).replace(_EMPTY_TRACE_PLACEHOLDER, "", 1)
        end = completion.rfind(self.end_of_turn)
        if end < 0:
            raise TemplateError(f"the rendered answer turn has no end-of-turn token {self.end_of_turn!r}")
        return prompt, completion[: end + len(self.end_of_turn)]


# ---------------------------------------------------------------------------------------------------------------
# The project's row switch


def switch_of(messages: list[dict]) -> bool:
    """A row's reasoning mode: the last `/think` or `/no_think` in its system and user messages; none means on."""
    reasoning = True
    for message in messages:
        if message["role"] in ("system", "user"):
            found = [(m.start(), on) for on, pattern in _KEYWORD.items() for m in pattern.finditer(message["content"])]
            if found:
                reasoning = max(found)[1]
    return reasoning


def has_keyword(text: str) -> bool:
    return any(pattern.search(text) for pattern in _KEYWORD.values())


def strip_switch(messages: list[dict]) -> list[dict]:
    """The messages without reasoning keywords; system messages that held only a keyword are dropped."""
    out = []
    for message in messages:
        if message["role"] not in ("system", "user"):
            out.append(message)
            continue
        content = _KEYWORD[True].sub("", _KEYWORD[False].sub("", message["content"])).strip()
        if message["role"] == "system" and not content:
            continue
        out.append(dict(message, content=content))
    return out


BUDGET_STATEMENT = "Think for at most {budget} tokens."
STATED_BUDGET_KEY = "stated_budget"  # in tokenizer_config.json: the model was trained with stated budgets
STATE_BUDGET_HELP = ("Write a budgeted prompt's thinking budget into it (`Think for at most N tokens.`): auto for a "
                     "model trained so (SFT with truncation.state_budget marks its tokenizer), always, or never. The "
                     "budget rule still closes the trace at the budget.")


def state_budget(messages: list[dict], budget: int | None) -> list[dict]:
    """The messages with the thinking budget written at the end of the last user message (L1-style: the model is
    told its budget), unchanged for None. Training rows (`truncation.state_budget`), evaluation
    (`eval.state_budget`) and rollouts (`rollout.state_budget`) all state it this way."""
    if budget is None:
        return messages
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is None:
        raise ValueError("a stated thinking budget needs a user message to write it in")
    message = messages[last_user]
    content = f"{message['content'].rstrip()}\n{BUDGET_STATEMENT.format(budget=budget)}"
    return messages[:last_user] + [dict(message, content=content)] + messages[last_user + 1:]


def mark_stated_budget(tokenizer: PreTrainedTokenizerBase) -> None:
    """Record on the tokenizer (and in its saved config) that the model learns budgets stated in its prompts."""
    tokenizer.init_kwargs[STATED_BUDGET_KEY] = True


def check_state_budget(choice: str) -> None:
    if choice not in ("auto", "always", "never"):
        raise ValueError(f"state_budget must be auto, always or never, got {choice!r}")


def budget_is_stated(tokenizer: PreTrainedTokenizerBase, choice: str) -> bool:
    """Whether prompts state their budget: `choice` always / never, or auto (as the tokenizer's model was trained)."""
    check_state_budget(choice)
    if choice == "auto":
        return bool((getattr(tokenizer, "init_kwargs", {}) or {}).get(STATED_BUDGET_KEY))
    return choice == "always"


def add_keyword(messages: list[dict], reasoning: bool) -> list[dict]:
    """Messages with the keyword at the end of the last user message (so it wins), else in a system message."""
    keyword = KEYWORD_ON if reasoning else KEYWORD_OFF
    out = [dict(m) for m in messages]
    for message in reversed(out):
        if message["role"] == "user":
            message["content"] = f"{message['content']} {keyword}"
            return out
    return [{"role": "system", "content": keyword}] + out


def with_reasoning(messages: list[dict], reasoning: bool | None) -> list[dict]:
    """Messages whose row switch says `reasoning` (the project's schema: keywords); None leaves them as they are."""
    return messages if reasoning is None else add_keyword(strip_switch(messages), reasoning)


# ---------------------------------------------------------------------------------------------------------------
# Detection


def parse_chat_format(spec: str) -> tuple[Switch, TracePlace, bool | None]:
    """`switch+trace[+model-opens-think]` -> parts; the opener is None when the spec leaves it to detection."""
    parts = spec.split("+")
    if len(parts) not in (2, 3) or parts[0] not in SWITCHES or parts[1] not in TRACE_PLACES or (
            len(parts) == 3 and parts[2] != MODEL_OPENS_THINK):
        raise ValueError(
            f"chat_format must be `auto` or SWITCH+TRACE[+{MODEL_OPENS_THINK}] with SWITCH one of {list(SWITCHES)} and "
            f"TRACE one of {list(TRACE_PLACES)} (e.g. `keyword+inline` for Nano 2, `template-argument+field` for "
            f"Nemotron 3, `system-prompt+inline` for Llama-Nemotron); got {spec!r}"
        )
    return parts[0], parts[1], (True if len(parts) == 3 else None)  # type: ignore[return-value]


def _render(tokenizer, messages: list[dict], generation: bool, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation, **kwargs)


def _detect_switch(tokenizer, source: str) -> Switch:
    user = {"role": "user", "content": _PROBE_USER}
    on = _render(tokenizer, add_keyword([user], True), True)
    off = _render(tokenizer, add_keyword([user], False), True)
    if on != off and _CLOSED_AT_END.search(off) and not has_keyword(off) and not has_keyword(on):
        return "keyword"
    on = _render(tokenizer, [user], True, enable_thinking=True)
    off = _render(tokenizer, [user], True, enable_thinking=False)
    if on != off and _CLOSED_AT_END.search(off):
        return "template-argument"
    # The template has no switch of its own. A Llama-Nemotron model reads one from its system prompt; only the
    # name can tell (a saved checkpoint keeps the format it was trained with, see use_chat_format).
    if _LLAMA_NEMOTRON_NAME.search(getattr(tokenizer, "name_or_path", "") or ""):
        return "system-prompt"
    raise TemplateError(
        f"the chat template of {source} has no reasoning switch: neither `/think` / `/no_think` in a message nor "
        "`enable_thinking=False` gives a generation prompt ending in an empty `<think></think>` block. If the model "
        f"switches through its system prompt (Llama-Nemotron: `{SYSTEM_PROMPT_ON}` / `off`), set "
        "`model.chat_format: system-prompt+inline`; a template without any think handling cannot train the toggle"
    )


def _end_of_turn(tokenizer, suffix: str, source: str) -> str:
    """The first special token the template writes after an answer: the token that ends the turn."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    special = [i for i in ids if i in added and added[i].special] or [i for i in ids if i in added]
    if special:
        return tokenizer.convert_ids_to_tokens(special[0])
    if tokenizer.eos_token and tokenizer.eos_token in suffix:
        return tokenizer.eos_token
    raise TemplateError(f"the chat template of {source} ends an answer with {suffix!r}, which holds no special token "
                        "to stop generation at")


def detect_chat_format(tokenizer: PreTrainedTokenizerBase, source: str = "the tokenizer",
                       forced: str = "auto") -> ChatFormat:
    """Find how the template switches reasoning and places the trace, and check that every mode renders cleanly.

    `forced` (`model.chat_format`) fixes the switch and the trace place; what remains is still read from renders.
    Raises `TemplateError` naming every problem when the template cannot express the toggle.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(f"the tokenizer at {source} has no chat template; the reasoning toggle needs one")
    user = {"role": "user", "content": _PROBE_USER}
    try:
        if forced != "auto":
            switch, trace, opens = parse_chat_format(forced)
        else:
            switch, trace, opens = _detect_switch(tokenizer, source), "field", None
        probe = ChatFormat(switch, trace, False, False, end_of_turn="")
        on_prompt = probe.template_prompt(tokenizer, [user], True)
        off_prompt = probe.template_prompt(tokenizer, [user], False)
        if _CLOSED_AT_END.search(on_prompt):
            raise TemplateError(f"the chat template of {source} closes the think block with reasoning on "
                                f"(its prompt ends with {on_prompt[-30:]!r}), so it ignores the {switch} switch")
        model_opens = bool(opens) or not _OPEN_AT_END.search(on_prompt)
        model_closes = not _CLOSED_AT_END.search(off_prompt)
        driven, kwargs = probe._drive([user], False)
        off_full = _render(tokenizer, driven + [{"role": "assistant", "content": _PROBE_ANSWER}], False, **kwargs)
        if _PROBE_ANSWER not in off_full:
            raise TemplateError(f"the chat template of {source} does not render the assistant answer")
        end = _end_of_turn(tokenizer, off_full[off_full.rindex(_PROBE_ANSWER) + len(_PROBE_ANSWER):], source)
        if forced == "auto":  # trace place: a rendered `reasoning_content`, else inline
            field_format = ChatFormat(switch, "field", model_opens, model_closes, end)
            try:
                _, completion = field_format.training_texts(tokenizer, [user, _probe_answer()], True)
                trace = "field" if _PROBE_TRACE in completion else "inline"
            except TemplateError:
                trace = "inline"
    except TemplateError:
        raise
    except Exception as exc:  # a template that fails to render is a finding, whatever its error type
        raise TemplateError(f"the chat template of {source} failed on a probe conversation "
                            f"({type(exc).__name__}: {exc})") from exc
    chat_format = ChatFormat(switch, trace, model_opens, model_closes, end)
    problems = format_problems(tokenizer, chat_format)
    if problems:
        raise TemplateError(f"the chat template of {source} cannot express the reasoning toggle as "
                            f"{chat_format.name}: " + "; ".join(problems))
    return chat_format


def _probe_answer() -> dict:
    return {"role": "assistant", "content": _PROBE_ANSWER, "reasoning_content": _PROBE_TRACE}


def format_problems(tokenizer: PreTrainedTokenizerBase, chat_format: ChatFormat) -> list[str]:
    """What goes wrong when `chat_format` drives this template; empty when every mode renders as it should."""
    problems = []
    history = [{"role": "system", "content": _PROBE_SYSTEM}, {"role": "user", "content": _PROBE_USER}]
    for reasoning in (True, False):
        mode = "on" if reasoning else "off"
        try:
            prompt = chat_format.generation_prompt(tokenizer, history, reasoning)
            _, completion = chat_format.training_texts(tokenizer, history + [_probe_answer()], reasoning)
        except TemplateError as exc:
            problems.append(f"reasoning {mode}: {exc}")
            continue
        except Exception as exc:
            problems.append(f"reasoning {mode}: rendering failed ({type(exc).__name__}: {exc})")
            continue
        if reasoning and not (_OPEN_AT_END.search(prompt) and not _CLOSED_AT_END.search(prompt)):
            problems.append(f"reasoning on: the generation prompt ends with {prompt[-30:]!r}, not an open `<think>`")
        if not reasoning and not _CLOSED_AT_END.search(prompt):
            problems.append(f"reasoning off: the generation prompt ends with {prompt[-30:]!r}, not an empty think block")
        if has_keyword(prompt):
            problems.append(f"reasoning {mode}: a `/think` / `/no_think` keyword is left in the text the model sees")
        at_trace, at_close, at_answer = (completion.find(s) for s in (_PROBE_TRACE, THINK_CLOSE, _PROBE_ANSWER))
        if reasoning and not 0 <= at_trace < at_close < at_answer:
            problems.append(f"reasoning on: the trained text is not trace, `</think>`, answer (got {completion[:80]!r})")
        if not reasoning and (_PROBE_TRACE in prompt + completion or _PROBE_ANSWER not in completion):
            problems.append(f"reasoning off: the trained text is not the answer alone (got {completion[:80]!r})")
    return problems


def past_reasoning_kept(tokenizer: PreTrainedTokenizerBase, chat_format: ChatFormat) -> bool:
    """True when an earlier assistant turn keeps its trace in the prompt (the real models drop it)."""
    past = {"role": "assistant", "content": f"<think>\n{_PROBE_PAST_TRACE}\n</think>\nIt is 5."}
    messages = [{"role": "user", "content": _PROBE_USER}, past, {"role": "user", "content": "And 5 + 1?"}]
    return _PROBE_PAST_TRACE in chat_format.generation_prompt(tokenizer, messages, True)


# ---------------------------------------------------------------------------------------------------------------
# What the stages call


def use_chat_format(tokenizer: PreTrainedTokenizerBase, source: str = "the tokenizer",
                    forced: str = "auto") -> ChatFormat:
    """Detect (or force) the format, remember it on the tokenizer and in its saved config, and log it."""
    saved = (getattr(tokenizer, "init_kwargs", {}) or {}).get(SAVED_FORMAT_KEY)
    chosen = forced if forced != "auto" else (saved or "auto")
    chat_format = detect_chat_format(tokenizer, source, chosen)
    tokenizer.init_kwargs[SAVED_FORMAT_KEY] = chat_format.name
    tokenizer._chat_format = chat_format  # noqa: SLF001 - a cache on the object that owns the template
    how = "forced by model.chat_format" if forced != "auto" else "saved with the tokenizer" if saved else "detected"
    log.info("chat format (%s): %s", how, chat_format.describe())
    if past_reasoning_kept(tokenizer, chat_format):
        log.warning("the chat template of %s keeps the reasoning of earlier assistant turns in the prompt", source)
    return chat_format


def chat_format_of(tokenizer: PreTrainedTokenizerBase) -> ChatFormat:
    """The format in use for this tokenizer (detected on first use when it was not loaded by `load_tokenizer`)."""
    cached = getattr(tokenizer, "_chat_format", None)
    return cached if cached is not None else use_chat_format(tokenizer, getattr(tokenizer, "name_or_path", "") or
                                                             "the tokenizer")


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict], reasoning: bool | None = None,
                  tools: list[dict] | None = None) -> str:
    """The text a rollout starts from; `reasoning` None takes the messages' own switch."""
    reasoning = switch_of(messages) if reasoning is None else reasoning
    return chat_format_of(tokenizer).generation_prompt(tokenizer, messages, reasoning, tools)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict], reasoning: bool | None = None,
                  tools: list[dict] | None = None) -> list[int]:
    return tokenizer(render_prompt(tokenizer, messages, reasoning, tools), add_special_tokens=False)["input_ids"]


def encode_for_training(tokenizer: PreTrainedTokenizerBase, messages: list[dict],
                        reasoning: bool | None = None, tools: list[dict] | None = None) -> dict[str, list[int]]:
    """Token ids and labels for a conversation whose last message is the assistant turn to learn.

    Labels are IGNORE_INDEX on the template's prompt (assistant header and any think prefill included). Tokenizing
    the two parts separately keeps the boundary exact: no prompt token carries loss.
    """
    prompt, completion = chat_format_of(tokenizer).training_texts(tokenizer, messages, reasoning, tools)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return {"input_ids": prompt_ids + completion_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids}


def is_tool_conversation(row: dict) -> bool:
    return bool(row.get("tools")) or any(m.get("tool_calls") or m["role"] == "tool" for m in row["messages"])


def encode_row_for_training(tokenizer: PreTrainedTokenizerBase, row: dict) -> list[dict[str, list[int]]]:
    """The samples of a training row: its final assistant turn; for a tool conversation, every assistant turn.

    Each turn of a tool conversation is one sample: the template's prompt for the history before it (as the model
    sees it at that step of an episode, whatever the template keeps of earlier traces) and the turn, calls included.
    """
    if not is_tool_conversation(row):
        return [encode_for_training(tokenizer, row["messages"])]
    messages, reasoning = row["messages"], switch_of(row["messages"])
    return [encode_for_training(tokenizer, messages[: i + 1], reasoning, row.get("tools"))
            for i, m in enumerate(messages) if m["role"] == "assistant"]


def tool_syntax_of(tokenizer: PreTrainedTokenizerBase) -> ToolSyntax:
    """The syntax this tokenizer's template writes tool calls in (detected once, by rendering a probe call)."""
    cached = getattr(tokenizer, "_tool_syntax", None)
    if cached is None:
        chat_format = chat_format_of(tokenizer)

        def render_turn(tools: list[dict], message: dict) -> str:
            user = {"role": "user", "content": _PROBE_USER}
            return chat_format.training_texts(tokenizer, [user, message], False, tools)[1]

        cached = detect_tool_syntax(tokenizer, render_turn, getattr(tokenizer, "name_or_path", "") or "the tokenizer")
        tokenizer._tool_syntax = cached  # noqa: SLF001 - a cache on the object that owns the template
        log.info("tool calls: %s syntax", cached.name)
    return cached


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Tokens that end a sample: the format's end of turn, and the tokenizer's eos when that differs."""
    ids = [tokenizer.convert_tokens_to_ids(chat_format_of(tokenizer).end_of_turn)]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def completion_text(tokenizer: PreTrainedTokenizerBase, tokens: list[int]) -> str:
    """A generated sample as text, without the token that ended it."""
    text = tokenizer.decode(tokens, skip_special_tokens=False)
    for token in (chat_format_of(tokenizer).end_of_turn, tokenizer.eos_token):
        if token and text.endswith(token):
            return text[: -len(token)]
    return text

