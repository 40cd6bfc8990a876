"""`reward_model`: the score a trained reward model (`align rm`) gives each completion, after the row's prompt.

    rewards:
      routes:
        chat:
          - {name: reward_model, weight: 1.0, args: {checkpoint: runs/rlhf/rm/checkpoint, normalize: group,
                                                     num_gpus: 0.25}}
          - {name: length, weight: 0.2, args: {part: answer}}

Where the model runs (`serve`):
- `actor` (the default): one Ray actor per checkpoint holds the model on its own share of the machine (`num_cpus`,
  `num_gpus`; with a GPU share it runs on that GPU). The trainer starts it when it builds its scorer and waits until
  it is up; every reward worker and data-parallel rank of the Ray job finds it by name and sends it whole batches.
  Without a running Ray instance the trainer starts a local one.
- `process`: each process that scores (each Ray reward worker, or the trainer in `mode: inprocess`) loads its own
  copy on `device`; no Ray needed.

`normalize: group` centres and scales the scores within each group of completions of one prompt (rows sharing an
`id`, as GRPO's are), so that its weight against a verifiable reward means the same whatever the reward model's
scale.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path
from typing import Any

from rewards.length import prompt_groups
from rewards.registry import RewardResult, reward

log = logging.getLogger(__name__)

SERVE_MODES = ("actor", "process")
START_TIMEOUT_S = 600.0  # a reward-model actor that cannot be placed (no free CPU or GPU share) fails after this


@functools.lru_cache(maxsize=2)
def load_cached(checkpoint: str, device: str):
    """`alignment.reward_model.load_reward_model`, once per process for each checkpoint and device."""
    from alignment.reward_model import load_reward_model

    return load_reward_model(checkpoint, device)


class RewardModelServer:
    """A Ray actor holding one reward model on its share of the machine; scores batches of conversations."""

    def __init__(self, checkpoint: str, num_cpus: float, num_gpus: float) -> None:
        import torch

        if num_cpus >= 1:
            torch.set_num_threads(int(num_cpus))
        self.device = "cuda" if num_gpus > 0 else "cpu"  # Ray shows the actor only the GPU it was given
        self.rm, self.tokenizer = load_cached(checkpoint, self.device)

    def ready(self) -> str:
        return self.device

    def score(self, conversations: list[list[dict]], batch_size: int) -> list[float]:
        return self.rm.score(self.tokenizer, conversations, batch_size=batch_size)


def _actor_name(checkpoint: str, num_cpus: float, num_gpus: float) -> str:
    key = f"{Path(checkpoint).resolve()}|{num_cpus}|{num_gpus}"
    return "reward_model-" + hashlib.sha256(key.encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=4)
def server(checkpoint: str, num_cpus: float = 1.0, num_gpus: float = 0.0):
    """The Ray actor serving `checkpoint` with these shares: started by the first caller of the Ray job, found by
    name by every other process of it. The handle is kept for the process's life (Ray ends an actor none holds)."""
    import ray

    from rewards.ray_pool import ensure_ray

    ensure_ray()
    return ray.remote(RewardModelServer).options(
        name=_actor_name(checkpoint, num_cpus, num_gpus), get_if_exists=True, num_cpus=num_cpus, num_gpus=num_gpus,
    ).remote(str(Path(checkpoint).resolve()), num_cpus, num_gpus)


def check_args(args: dict) -> None:
    """Fail before any model loads when the checkpoint is missing or a setting is wrong."""
    from alignment.reward_model import check_reward_model_dir

    if not args.get("checkpoint"):
        raise ValueError("needs `checkpoint`: an `align rm` checkpoint folder")
    check_reward_model_dir(args["checkpoint"])
    if args.get("normalize", "none") not in ("none", "group"):
        raise ValueError(f"normalize must be 'none' or 'group', got {args['normalize']!r}")
    if args.get("serve", "actor") not in SERVE_MODES:
        raise ValueError(f"serve must be one of {list(SERVE_MODES)}, got {args['serve']!r}")
    for key in ("num_cpus", "num_gpus"):
        if not isinstance(args.get(key, 0), (int, float)) or args.get(key, 0) < 0:
            raise ValueError(f"{key} must be a number >= 0, got {args[key]!r}")


def prepare(args: dict):
    """In the trainer's process: start the actor and wait until its model is loaded, so the first reward call's
    timeout does not include the load, and an actor Ray cannot place fails here, saying what it asked for. Returns
    what ends it when the scorer closes: its CPU or GPU share would otherwise stay taken from the stages after."""
    if args.get("serve", "actor") != "actor":
        return None
    import ray

    num_cpus, num_gpus = float(args.get("num_cpus", 1.0)), float(args.get("num_gpus", 0.0))
    actor = server(args["checkpoint"], num_cpus, num_gpus)
    try:
        device = ray.get(actor.ready.remote(), timeout=START_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError as exc:
        raise RuntimeError(
            f"reward_model: the actor serving {args['checkpoint']} did not start in {START_TIMEOUT_S:.0f} s; it asks "
            f"num_cpus={num_cpus}, num_gpus={num_gpus} and Ray has {ray.available_resources()} free "
            "(lower the reward's num_cpus/num_gpus args, or the stage's own share)") from exc
    log.info("reward model %s served by a Ray actor on %s (num_cpus=%s, num_gpus=%s)", args["checkpoint"], device,
             num_cpus, num_gpus)

    def release() -> None:
        ray.kill(actor, no_restart=True)
        server.cache_clear()

    return release


@reward("reward_model", batched=True, check_args=check_args, prepare=prepare)
def reward_model(completions: list[str], messages: list[list[dict]], checkpoint: str, normalize: str = "none",
                 serve: str = "actor", num_cpus: float = 1.0, num_gpus: float = 0.0, device: str = "cpu",
                 batch_size: int = 32, id: list[Any] | None = None, reasoning: list[Any] | None = None,
                 **_: Any) -> list[RewardResult]:
    """The reward model's score of each completion as the assistant turn after its row's prompt (`messages`)."""
    from alignment.dpo import completion_message

    thinks = [r != "off" for r in reasoning] if reasoning else [True] * len(completions)
    conversations = [  # a row's reference answer, when it carries one, is not part of the prompt
        (m[:-1] if m[-1]["role"] == "assistant" else m) + [completion_message(c, on)]
        for c, m, on in zip(completions, messages, thinks)
    ]
    if serve == "actor":
        import ray

        shares = (checkpoint, float(num_cpus), float(num_gpus))
        try:
            raw = ray.get(server(*shares).score.remote(conversations, batch_size))
        except ray.exceptions.RayActorError:  # it died (its node went away): start it again, once
            server.cache_clear()
            raw = ray.get(server(*shares).score.remote(conversations, batch_size))
    else:
        rm, tokenizer = load_cached(checkpoint, device)
        raw = rm.score(tokenizer, conversations, batch_size=batch_size)
    scores = list(raw)
    if normalize == "group":
        for members in prompt_groups(id, len(completions)):
            mean = sum(raw[i] for i in members) / len(members)
            std = (sum((raw[i] - mean) ** 2 for i in members) / len(members)) ** 0.5
            for i in members:
                scores[i] = (raw[i] - mean) / std if std > 1e-6 else 0.0
    return [RewardResult(s, {"raw": r}) for s, r in zip(scores, raw)]
