"""Multi-turn tool episodes: the model writes a turn, its calls run against the row's world, the results go back as
`tool` messages, and the model writes the next turn, until a turn has no call (the answer) or `max_turns`.

All episodes advance together: turn t of every live episode is one `generate` call, so the decoder's slots stay full
and each prompt is prefilled once for its samples. Each turn's prompt is the template's generation prompt for the
conversation so far (`tools=` included), exactly what a training row of that turn is built from
(`chat_format.encode_row_for_training`), and each turn keeps its prompt ids and the generated tokens with the
sampler's log-probs: GRPO trains on the turns as they were sampled, DPO mining pairs them.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

from alignment.chat_format import completion_text, encode_prompt
from alignment.rollout.generation import GenerationResult, GenerationSettings, generate
from envs.tool_env import EpisodeOutcome, execute, offered_names, replay, turn_message

log = logging.getLogger(__name__)


@dataclass
class EpisodeTurn:
    prompt_ids: list[int]
    result: GenerationResult
    text: str  # the generated turn as text, without its end-of-turn token


@dataclass
class Episode:
    row: dict
    reasoning: bool
    messages: list[dict]  # the conversation so far: the prompt, then each turn and its tool results
    state: dict  # the world, changed by the calls executed so far
    turns: list[EpisodeTurn] = field(default_factory=list)
    ended: str = ""  # answer, malformed, cut (max_new_tokens reached), max_turns

    @property
    def turn_texts(self) -> list[str]:
        return [t.text for t in self.turns]

    def outcome(self) -> EpisodeOutcome:
        """The graded episode (`envs.tool_env.replay` of its turns, what the `tool_state` reward scores)."""
        return replay(self.row, self.turn_texts)


def episode_prompt(row: dict) -> list[dict]:
    """The conversation an episode starts from: the row's messages before its first assistant turn."""
    messages = []
    for message in row["messages"]:
        if message["role"] == "assistant":
            break
        messages.append(message)
    return messages


def run_episodes(model, tokenizer, rows: list[dict], reasoning: list[bool], settings: GenerationSettings,
                 max_turns: int = 4, seed: int | None = None, stream_offset: int = 0,
                 places: list[int] | None = None) -> list[Episode]:
    """One episode per (row, reasoning) pair, all run to their end. Episode i's turn t draws from random stream
    `stream_offset + places[i] * max_turns + t` (`places` defaults to 0, 1, ...), so an episode does not depend on
    which others run beside it: GRPO passes each sample's place in the whole batch, the same on any worker count."""
    if len(rows) != len(reasoning):
        raise ValueError(f"{len(rows)} rows but {len(reasoning)} reasoning flags")
    places = list(range(len(rows))) if places is None else places
    episodes = [Episode(row, on, episode_prompt(row), copy.deepcopy((row.get("metadata") or {}).get("initial_state")
                                                                       or {}))
                for row, on in zip(rows, reasoning)]
    live = list(range(len(episodes)))
    for turn in range(max_turns):
        if not live:
            break
        prompts = [encode_prompt(tokenizer, episodes[i].messages, episodes[i].reasoning, episodes[i].row.get("tools"))
                   for i in live]
        results = generate(model, prompts, settings=settings, reasoning=[episodes[i].reasoning for i in live],
                           seed=seed, stream_ids=[stream_offset + places[i] * max_turns + turn for i in live])
        still_live = []
        for i, prompt, result in zip(live, prompts, results):
            episode = episodes[i]
            text = completion_text(tokenizer, result.tokens)
            message, parsed = turn_message(text, episode.row.get("tools"))
            episode.turns.append(EpisodeTurn(prompt, result, text))
            episode.messages.append(message)
            if not result.finished:
                episode.ended = "cut"
            elif parsed.malformed:
                episode.ended = "malformed"
            elif not parsed.calls:
                episode.ended = "answer"
            else:
                offered = offered_names(episode.row)
                episode.messages += [execute(call, episode.state, offered).message() for call in parsed.calls]
                still_live.append(i)
        live = still_live
        log.info("tool episodes: turn %d done, %d of %d still calling tools", turn + 1, len(live), len(episodes))
    for i in live:
        episodes[i].ended = "max_turns"
    return episodes
