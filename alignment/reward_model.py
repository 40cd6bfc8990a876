"""`align rm`: a Bradley-Terry reward model on the policy's own architecture, from an SFT checkpoint.

Reads top to bottom: pairs (any schema `data_recipes/preference.py` reads) -> each side through the chat template ->
chosen and rejected sequences packed together (`seq_idx`-correct on the hybrid, as in the other stages) -> the
final hidden state at each sequence's last token (its end of turn) -> a scalar head -> the loss
-log sigmoid(r_chosen - r_rejected) -> held-out pair accuracy -> a checkpoint.

The checkpoint is the backbone as an ordinary causal-LM checkpoint (any HF loader reads it) plus the head in
`reward_head.safetensors` and `reward_model.json`; `load_reward_model` reads both and `RewardModel.score` scores
conversations. NemotronH has no sequence-classification class in transformers, so the head lives beside the model
rather than inside its config.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from alignment.checkpoint import verify_checkpoint, write_checkpoint
from alignment.config import check_paths, option, to_dict
from alignment.modeling import ModelConfig, load_model, load_tokenizer
from alignment.packing import SampleCollator, model_inputs
from alignment.trackers import TrackingConfig

log = logging.getLogger(__name__)

HEAD_FILE = "reward_head.safetensors"
HEAD_CONFIG = "reward_model.json"


@dataclass
class RMDataConfig:
    pairs_path: str = option("runs/data/tiny/preferences.jsonl", "Preference pairs (any schema of "
                             "data_recipes/preference.py: prompt/chosen/rejected, messages, HH, UltraFeedback).",
                             path="file")
    schema: str = option("auto", "Pair schema (auto detects it per row).")
    heldout_fraction: float = option(0.1, "Share of prompts held out for the pair accuracy (never trained on).")
    max_bad_fraction: float = option(0.01, "Stop when more than this fraction of the pairs file's rows is bad.")


@dataclass
class RMTrainConfig:
    max_steps: int = option(200, "Optimizer steps.")
    pairs_per_step: int = option(16, "Pairs per step (both sides packed together).")
    lr: float = option(1e-4, "Peak learning rate of the backbone and the head.")
    warmup_steps: int = option(10, "Linear warmup steps, then cosine decay.")
    max_tokens_per_row: int = option(2048, "Tokens per packed row.")
    seed: int = option(0, "Seed of the pair order and the head's initialisation.")


@dataclass
class RMConfig:
    """A Bradley-Terry reward model from a policy checkpoint."""

    model: ModelConfig = option(ModelConfig(name_or_path="runs/tiny/sft/checkpoint"), "The policy checkpoint it "
                                "starts from (its architecture and tokenizer).")
    data: RMDataConfig = option(RMDataConfig(), "Preference pairs.")
    train: RMTrainConfig = option(RMTrainConfig(), "Optimisation.")
    output_dir: str = option("runs/tiny/rm", "Where the checkpoint, metrics.jsonl and eval.json go.")
    tracking: TrackingConfig = option(TrackingConfig(), "Experiment trackers: tensorboard, wandb, mlflow, trackio.")

    def validate(self) -> None:
        if not 0 <= self.data.heldout_fraction < 1:
            raise ValueError("data.heldout_fraction must be in [0, 1)")
        if self.train.max_steps < 1 or self.train.pairs_per_step < 1:
            raise ValueError("train.max_steps and train.pairs_per_step must be >= 1")


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean of -log sigmoid(chosen - rejected), share of pairs ranked right, a tie counting half) over rewards [N]."""
    margin = chosen - rejected
    return -F.logsigmoid(margin).mean(), ((margin > 0).float() + 0.5 * (margin == 0).float()).mean()


class RewardModel(torch.nn.Module):
    """A causal LM's backbone and a scalar head read at each sequence's last token."""

    def __init__(self, lm: torch.nn.Module, head: torch.nn.Linear | None = None) -> None:
        super().__init__()
        self.lm = lm
        self.head = head if head is not None else torch.nn.Linear(lm.config.hidden_size, 1)
        if head is None:  # a zero head: every reward starts at 0, the loss at log 2
            torch.nn.init.zeros_(self.head.weight)
            torch.nn.init.zeros_(self.head.bias)

    def forward(self, batch: dict) -> torch.Tensor:
        """Rewards [N] of the N samples of a packed (or padded) collated batch, in sample order."""
        from alignment.token_logprobs import final_hidden_states

        inputs = {k: v for k, v in model_inputs(batch).items() if k != "labels"}
        hidden, _ = final_hidden_states(self.lm, inputs)  # [R, T, H]
        ids = batch["sample_ids"].reshape(-1)
        places = torch.arange(ids.numel(), device=ids.device)
        n = int(ids.max()) + 1
        last = torch.full((n,), -1, dtype=torch.long, device=ids.device)
        last = last.scatter_reduce(0, ids[ids >= 0], places[ids >= 0], reduce="amax")
        return self.head(hidden.reshape(-1, hidden.shape[-1])[last].float()).squeeze(-1)

    @torch.no_grad()
    def score(self, tokenizer, conversations: list[list[dict]], batch_size: int = 32,
              max_tokens_per_row: int = 2048) -> list[float]:
        """The reward of each conversation (its last message the response), through the chat template."""
        from alignment.chat_format import encode_for_training

        was_training = self.training
        self.eval()
        collator = SampleCollator(mode="packed", pad_token_id=tokenizer.pad_token_id,
                                  max_tokens_per_row=max_tokens_per_row)
        device = next(self.parameters()).device
        rewards: list[float] = []
        for start in range(0, len(conversations), batch_size):
            samples = [encode_for_training(tokenizer, c) for c in conversations[start:start + batch_size]]
            rewards += self(_to(collator(samples), device)).tolist()
        self.train(was_training)
        return rewards


def pair_samples(tokenizer, pairs: list[dict]) -> list[dict]:
    """Both sides of every pair through the chat template: chosen_0, rejected_0, chosen_1, ..."""
    from alignment.dpo import encode_pair

    samples = []
    for pair in pairs:
        encoded = encode_pair(tokenizer, pair)
        samples += [encoded["chosen"], encoded["rejected"]]
    return samples


def pair_accuracy(rm: RewardModel, collator: SampleCollator, samples: list[dict], device, batch_pairs: int = 32,
                  kinds: list[str] | None = None) -> dict:
    """Held-out pair accuracy, loss and mean margin of `rm` over the pairs' encoded sides; with `kinds` (one per
    pair), the same figures per kind under `by_kind` when there are several, from the same forward passes."""
    chosen, rejected = [], []
    rm.eval()
    with torch.no_grad():
        for start in range(0, len(samples), 2 * batch_pairs):
            batch = _to(collator(samples[start:start + 2 * batch_pairs]), device)
            rewards = rm(batch)
            chosen.append(rewards[0::2])
            rejected.append(rewards[1::2])
    rm.train()
    chosen_t, rejected_t = torch.cat(chosen), torch.cat(rejected)
    figures = _pair_figures(chosen_t, rejected_t)
    if kinds and len(set(kinds)) > 1:
        figures["by_kind"] = {}
        for kind in dict.fromkeys(kinds):
            members = torch.tensor([k == kind for k in kinds], device=chosen_t.device)
            figures["by_kind"][kind] = _pair_figures(chosen_t[members], rejected_t[members])
    return figures


def _pair_figures(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    loss, accuracy = bradley_terry_loss(chosen, rejected)
    return {"pairs": len(chosen), "pair_accuracy": float(accuracy), "loss": float(loss),
            "mean_margin": float((chosen - rejected).mean())}


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def run_rm(config: RMConfig) -> dict:
    from alignment.dpo import split_heldout
    from alignment.packed_model import enable_packed_sequences
    from alignment.runtime import pick_device, setup_logging
    from alignment.sft import TrainConfig, learning_rate
    from alignment.tracking import MetricsLogger
    from data_recipes.preference import read_pairs
    from tqdm.auto import tqdm

    setup_logging()
    check_paths(config)
    config.validate()
    out = Path(config.output_dir)

    # Pairs, split by prompt, through the chat template.
    pairs, report = read_pairs(config.data.pairs_path, config.data.schema, config.data.max_bad_fraction)
    train_pairs, heldout_pairs = split_heldout(pairs, config.data.heldout_fraction, config.train.seed)
    log.info("reward model: %d train / %d held-out pairs from %s", len(train_pairs), len(heldout_pairs),
             config.data.pairs_path)

    # Model: the policy's backbone and a zero head.
    device = pick_device("auto")
    tokenizer = load_tokenizer(config.model)
    torch.manual_seed(config.train.seed)
    lm = load_model(config.model, device)
    packed = enable_packed_sequences(lm)
    log.info("packed sequences: %s", packed)
    rm = RewardModel(lm).to(device)
    rm.train()
    collator = SampleCollator(mode="packed", pad_token_id=tokenizer.pad_token_id,
                              max_tokens_per_row=config.train.max_tokens_per_row)
    train_samples, heldout_samples = pair_samples(tokenizer, train_pairs), pair_samples(tokenizer, heldout_pairs)
    before = pair_accuracy(rm, collator, heldout_samples, device) if heldout_samples else None

    # Train.
    optimizer = torch.optim.AdamW(rm.parameters(), lr=config.train.lr)
    schedule = TrainConfig(max_steps=config.train.max_steps, lr=config.train.lr,
                           warmup_steps=config.train.warmup_steps, schedule="cosine")
    metrics = MetricsLogger(out, "rm", tracking=config.tracking, run_config=to_dict(config))
    order = random.Random(config.train.seed)
    started = time.time()
    progress = tqdm(range(config.train.max_steps), desc="rm", unit="step", dynamic_ncols=True)
    for step in progress:
        chosen_ids = order.sample(range(len(train_pairs)), min(config.train.pairs_per_step, len(train_pairs)))
        batch = _to(collator([train_samples[2 * i + side] for i in chosen_ids for side in (0, 1)]), device)
        rewards = rm(batch)
        loss, accuracy = bradley_terry_loss(rewards[0::2], rewards[1::2])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, schedule)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(rm.parameters(), 1.0)
        optimizer.step()
        metrics.log(step + 1, loss=loss.item(), pair_accuracy=accuracy.item(), lr=optimizer.param_groups[0]["lr"])
        progress.set_postfix(loss=f"{float(loss):.3f}", acc=f"{float(accuracy):.2f}")
    train_seconds = time.time() - started

    # Held-out pairs, then the checkpoint.
    kinds = [str(pair.get("metadata", {}).get("kind", "")) for pair in heldout_pairs]  # synthetic pairs carry one
    after = pair_accuracy(rm, collator, heldout_samples, device, kinds=kinds) if heldout_samples else None
    by_kind = after.pop("by_kind", {}) if after else {}
    results = {"heldout_before": before, "heldout": after, "heldout_by_kind": by_kind, "train_pairs": len(train_pairs),
               "train_seconds": round(train_seconds, 1), "data": report.summary()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(results, indent=2))
    metrics.close()
    checkpoint = save_reward_model(out / "checkpoint", rm, tokenizer,
                                   {"stage": "rm", "config": to_dict(config), "metrics": results})
    if after:
        print(f"held-out pair accuracy {after['pair_accuracy']:.3f} over {after['pairs']} pairs "
              f"(before training {before['pair_accuracy']:.3f}) | train {train_seconds:.0f}s\ncheckpoint: {checkpoint}")
        for kind, figures in by_kind.items():
            print(f"  {kind}: {figures['pair_accuracy']:.3f} over {figures['pairs']} pairs")
    return results


def save_reward_model(directory: str | Path, rm: RewardModel, tokenizer, manifest: dict) -> Path:
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        rm.lm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_file({"weight": rm.head.weight.detach().cpu().contiguous(), "bias": rm.head.bias.detach().cpu()},
                  tmp / HEAD_FILE)
        (tmp / HEAD_CONFIG).write_text(json.dumps({"head": HEAD_FILE, "read_at": "the last token of the sequence",
                                                   "hidden_size": rm.head.in_features}, indent=2))

    return write_checkpoint(directory, write, manifest)


def check_reward_model_dir(directory: str | Path, key: str = "") -> None:
    """ConfigError (naming `key`) unless `directory` is an `align rm` checkpoint folder."""
    from alignment.config import ConfigError, relative_to_cwd

    where = f"`{key}`: " if key else ""
    path = Path(directory)
    if not path.is_dir():
        raise ConfigError(f"{where}no such reward-model checkpoint folder: {directory}{relative_to_cwd(path)}")
    if not (path / HEAD_CONFIG).is_file():
        raise ConfigError(f"{where}{directory} has no {HEAD_CONFIG}: not a reward-model checkpoint (align rm "
                          "writes one)")


def load_reward_model(directory: str | Path, device: str | torch.device = "cpu") -> tuple[RewardModel, object]:
    """(reward model, tokenizer) of an `align rm` checkpoint."""
    from safetensors.torch import load_file

    directory = Path(directory)
    verify_checkpoint(directory)
    if not (directory / HEAD_CONFIG).is_file():
        raise FileNotFoundError(f"{directory}: no {HEAD_CONFIG}; not a reward-model checkpoint (align rm writes one)")
    from alignment.packed_model import enable_packed_sequences

    model_config = ModelConfig(name_or_path=str(directory))
    lm = load_model(model_config, device)
    enable_packed_sequences(lm)  # `score` packs conversations as training did
    head_state = load_file(directory / HEAD_FILE)
    head = torch.nn.Linear(head_state["weight"].shape[1], 1)
    head.load_state_dict(head_state)
    return RewardModel(lm, head).to(device).eval(), load_tokenizer(model_config)
