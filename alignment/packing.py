"""Sequence packing: bin tokenized samples into rows and build the tensors a packed forward needs.

A packed row holds several samples back to back, so no compute is spent on padding. Three things keep the
samples apart inside a row:

- `position_ids` restart at 0 for every sample (rotary embeddings and the attention masks of transformers),
- `seq_idx` numbers the samples inside the row (the Mamba-2 conv and scan reset their state where it changes),
- the first label of every sample is -100, so the last token of sample k never has to predict the first token
  of sample k+1 (causal-LM losses shift labels left by one: position t is scored against labels[t + 1]).

The padding tail of a row gets its own `seq_idx` and restarting `position_ids`, so it is one more (label-free)
segment and never mixes with real tokens.

`SampleCollator(mode="padded")` builds classic right-padded batches with the same keys where they make sense, so
stages switch between the two with one argument. `alignment.packed_model.enable_packed_sequences` makes a model
correct on packed rows; packing a model with recurrent layers without it is refused there.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

# Keys of a collated batch that the model's forward takes; the rest (`sample_ids`, `loss_mask`) are for the
# stage's own bookkeeping (per-sample losses and log-probs).
MODEL_INPUT_KEYS = (
    "input_ids",
    "labels",
    "attention_mask",
    "position_ids",
    "seq_idx",
    "cu_seq_lens_q",
    "cu_seq_lens_k",
    "max_length_q",
    "max_length_k",
)


def first_fit_decreasing(lengths: Sequence[int], max_tokens_per_row: int,
                         alone: Sequence[bool] | None = None) -> list[list[int]]:
    """Bin samples into rows of at most `max_tokens_per_row` tokens with first-fit-decreasing.

    Samples are placed longest first into the first row with room, a new row is opened when none has room. FFD
    uses at most 11/9 OPT + 6/9 rows, and on long-tailed length distributions it is within a row or two of
    optimal in practice. Ties are broken by sample index, so the result is deterministic.

    Args:
        lengths: token count of each sample; every length must be in [1, max_tokens_per_row].
        max_tokens_per_row: the token budget of one row.
        alone: samples that get a row of their own, never packed with another (a data source marked `pack:
            false`, as Nano 2 trained tool calling: packing had hurt it).

    Returns:
        One list of sample indices per row; every index appears exactly once, rows in order of creation, samples
        inside a row in the order they were placed (longest first).
    """
    for i, n in enumerate(lengths):
        if not 1 <= n <= max_tokens_per_row:
            raise ValueError(f"sample {i} has {n} tokens; packing needs 1..{max_tokens_per_row} (truncate first)")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []  # free tokens left in each row
    for i in order:
        if alone is not None and alone[i]:
            rows.append([i])
            room.append(0)
            continue
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_tokens_per_row - lengths[i])
    return rows


def plan_packed_batches(
    lengths: Sequence[int],
    max_tokens_per_row: int,
    rows_per_batch: int,
    seed: int | None = 0,
    alone: Sequence[bool] | None = None,
) -> list[list[int]]:
    """Group a whole dataset into batches that each fill about `rows_per_batch` packed rows.

    A DataLoader that hands the collator a fixed number of samples gets a varying number of rows per step on
    long-tailed data. Planning over the whole dataset instead gives steps of near-constant token count: pack all
    samples with FFD, shuffle the rows, and cut them into groups of `rows_per_batch`. Use the result as a
    `batch_sampler`; the collator re-packs each group and almost always gets the same rows back (FFD is not
    monotone, so in rare cases a group takes one row more).

    Args:
        lengths: token count of every sample in the dataset (after truncation to the budget).
        max_tokens_per_row: the token budget of one row, as given to the collator.
        rows_per_batch: rows per optimizer micro-step.
        seed: shuffles the order of rows (None keeps FFD order, longest rows first).
        alone: samples that get a row of their own (see `first_fit_decreasing`).

    Returns:
        A list of batches, each a list of dataset indices.
    """
    lengths = [min(n, max_tokens_per_row) for n in lengths]
    rows = first_fit_decreasing(lengths, max_tokens_per_row, alone)
    rng = random.Random(seed)
    # Rows of one sample go in batches of their own, as many rows as fill the same tokens: mixed with packed rows
    # they would be padded to a packed row's length.
    single = [row for row in rows if alone is not None and alone[row[0]]]
    packed = [row for row in rows if not (alone is not None and alone[row[0]])]
    batches = []
    for group, per_batch in ((packed, rows_per_batch),
                             (single, max(1, rows_per_batch * max_tokens_per_row //
                                          max([lengths[row[0]] for row in single], default=1)))):
        if seed is not None:
            rng.shuffle(group)
        batches += [sum(group[i : i + per_batch], []) for i in range(0, len(group), per_batch)]
    if seed is not None and single:
        rng.shuffle(batches)
    return batches


# Rows are padded to a multiple of this many tokens. Triton specialises integer arguments on divisibility by 16, so a
# row length of the other kind compiles the Mamba kernels again: at Nano-9B-v2 on an H200 the first 16-divisible row
# of a run took 9.5 s instead of 0.57 s. Aligned lengths are one kind; up to 15 pad tokens a row cost next to nothing.
ROW_MULTIPLE = 16


@dataclass
class SampleCollator:
    """Collate tokenized samples into a packed or a right-padded batch.

    Each sample is `{"input_ids": list[int], "labels": list[int]}` with labels -100 where no loss is taken (the
    prompt). Labels are not shifted: labels[t] is the target of the token at t - 1, as in transformers. A sample
    with `"pack": False` gets a packed row of its own.

    Samples longer than `max_tokens_per_row` are truncated to their first `max_tokens_per_row` tokens, in both
    modes, and counted in `num_truncated`: the budget is then a hard bound on activation memory, so one outlier
    cannot run a step out of memory, and packed and padded modes see the same tokens.

    Packed batch (R rows of T tokens, N samples):
        input_ids [R, T] int64, pad_token_id in the tail.
        labels [R, T] int64, -100 on the first token of every sample and in the tail.
        position_ids [R, T] int64, restarting at 0 for every sample and for the tail.
        seq_idx [R, T] int32, index of the sample inside its row; the tail gets the next index.
        cu_seq_lens_q, cu_seq_lens_k [S + 1] int32, segment boundaries over the flattened R * T tokens (tails
            included), the varlen-attention convention of transformers' flash-attention path.
        max_length_q, max_length_k int, the longest segment.
        sample_ids [R, T] int64, index of the sample in the input list, -1 in the tail.
        loss_mask [R, T] bool, labels != -100 (the tokens that are targets).
        sampler_logps [R, T] float32, only when the samples carry `sampler_logps` (the log-prob the sampler gave
            each token, `alignment.rollout.generation`): placed like the tokens, NaN elsewhere.

    Padded batch (one sample per row, in input order): input_ids, labels, attention_mask [N, T] int64,
    position_ids, sample_ids, loss_mask. The first label of every sample is -100 here too, which changes no loss
    (a sample's first token is never a target) and keeps `loss_mask` identical across modes.

    The varlen boundaries are named `cu_seq_lens_*` rather than `cu_seqlens`: transformers forwards extra batch
    keys to the Mamba kernels too, and there `cu_seqlens` means something else (varlen state passing, batch 1
    only), while the reference PyTorch fallback refuses it outright.
    """

    mode: Literal["packed", "padded"] = "packed"
    pad_token_id: int = 0
    max_tokens_per_row: int = 4096
    pad_to_multiple_of: int | None = ROW_MULTIPLE
    num_truncated: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.mode not in ("packed", "padded"):
            raise ValueError(f"mode must be 'packed' or 'padded', got {self.mode!r}")
        if self.max_tokens_per_row < 1:
            raise ValueError(f"max_tokens_per_row must be positive, got {self.max_tokens_per_row}")

    def __call__(self, samples: Sequence[dict]) -> dict:
        """Collate `samples` into a batch dict (see the class docstring for the keys)."""
        ids, labels = self._truncated(samples)
        if self.mode == "packed":
            rows = first_fit_decreasing([len(x) for x in ids], self.max_tokens_per_row,
                                        [s.get("pack", True) is False for s in samples])
        else:
            rows = [[i] for i in range(len(ids))]
        batch = self._build(ids, labels, rows)
        if all("sampler_logps" in s for s in samples):
            batch["sampler_logps"] = self._placed([s["sampler_logps"] for s in samples], batch["sample_ids"])
        return batch

    def _placed(self, values: list[list[float]], sample_ids: torch.Tensor) -> torch.Tensor:
        """Per-token values of each sample at its tokens' places in the batch, NaN elsewhere. [R, T]"""
        placed = torch.full(sample_ids.shape, float("nan"))
        for i, v in enumerate(values):
            where = sample_ids == i  # [R, T], one row, the sample's tokens in order
            placed[where] = torch.tensor(v[: int(where.sum())], dtype=torch.float32)
        return placed

    def _truncated(self, samples: Sequence[dict]) -> tuple[list[list[int]], list[list[int]]]:
        ids, labels = [], []
        for i, s in enumerate(samples):
            x, y = list(s["input_ids"]), list(s.get("labels", s["input_ids"]))
            if len(x) != len(y):
                raise ValueError(f"sample {i}: {len(x)} input_ids but {len(y)} labels")
            if not x:
                raise ValueError(f"sample {i} is empty")
            if len(x) > self.max_tokens_per_row:
                self.num_truncated += 1
                if self.num_truncated == 1:
                    logger.warning(
                        "truncating samples longer than max_tokens_per_row=%d (counted in num_truncated)",
                        self.max_tokens_per_row,
                    )
                x, y = x[: self.max_tokens_per_row], y[: self.max_tokens_per_row]
            # The first token of a sample is never a target of that sample; -100 also keeps the last token of the
            # previous sample in a packed row from predicting it.
            y[0] = IGNORE_INDEX
            ids.append(x)
            labels.append(y)
        return ids, labels

    def _build(self, ids: list[list[int]], labels: list[list[int]], rows: list[list[int]]) -> dict:
        R = len(rows)
        T = max(sum(len(ids[i]) for i in row) for row in rows)
        if self.pad_to_multiple_of:  # never past the budget: it bounds activation memory
            T = max(T, min(-(-T // self.pad_to_multiple_of) * self.pad_to_multiple_of, self.max_tokens_per_row))
        input_ids = torch.full((R, T), self.pad_token_id, dtype=torch.long)
        label_t = torch.full((R, T), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((R, T), dtype=torch.long)
        seq_idx = torch.zeros((R, T), dtype=torch.int32)
        sample_ids = torch.full((R, T), -1, dtype=torch.long)
        seg_lens: list[int] = []  # every segment of the flattened batch, tails included
        for r, row in enumerate(rows):
            t = 0
            for k, i in enumerate(row):
                n = len(ids[i])
                input_ids[r, t : t + n] = torch.tensor(ids[i])
                label_t[r, t : t + n] = torch.tensor(labels[i])
                position_ids[r, t : t + n] = torch.arange(n)
                seq_idx[r, t : t + n] = k
                sample_ids[r, t : t + n] = i
                seg_lens.append(n)
                t += n
            if t < T:  # the tail is a segment of its own
                position_ids[r, t:] = torch.arange(T - t)
                seq_idx[r, t:] = len(row)
                seg_lens.append(T - t)

        batch = {"input_ids": input_ids, "labels": label_t, "position_ids": position_ids}
        if self.mode == "packed":
            cu = F.pad(torch.tensor(seg_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
            batch |= {
                "seq_idx": seq_idx,
                "cu_seq_lens_q": cu,
                "cu_seq_lens_k": cu,
                "max_length_q": max(seg_lens),
                "max_length_k": max(seg_lens),
            }
        else:
            batch["attention_mask"] = (sample_ids >= 0).long()
        batch["sample_ids"] = sample_ids
        batch["loss_mask"] = label_t != IGNORE_INDEX
        return batch


def model_inputs(batch: dict) -> dict:
    """The part of a collated batch that goes to `model(**...)`.

    Packed rows also get `use_cache=False`: with a cache, transformers skips its packed-sequence detection and
    the attention layers of a row would see each other's samples; a packed row is never decoded from anyway.
    """
    inputs = {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}
    if "seq_idx" in inputs:
        inputs["use_cache"] = False
    return inputs


def per_sample_sums(
    token_logps: torch.Tensor, labels: torch.Tensor, sample_ids: torch.Tensor, num_samples: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of target-token log-probs and target-token count per sample, for packed or padded batches.

    Args:
        token_logps: [R, T-1] per-token log-probs (position t scored against labels[t + 1]), e.g. from
            `alignment.token_logprobs.model_token_logps`; 0 where there is no target.
        labels: [R, T] with -100 where no target.
        sample_ids: [R, T] sample index per token (-1 on padding), from the collator. The sample a target belongs to
            is that of the target token.
        num_samples: N, the number of samples collated.

    Returns:
        (logp_sum [N] float32, num_targets [N] int64). DPO takes the sums directly, SFT's per-sample mean NLL is
        -sums / counts.
    """
    mask = labels[:, 1:] != IGNORE_INDEX  # [R, T-1]
    owner = sample_ids[:, 1:][mask]  # [num targets]
    logp_sum = torch.zeros(num_samples, device=token_logps.device, dtype=torch.float32).index_add(
        0, owner, token_logps[mask].float()
    )
    counts = torch.zeros(num_samples, device=token_logps.device, dtype=torch.long).index_add(
        0, owner, torch.ones_like(owner)
    )
    return logp_sum, counts



def pad_packed_batch(batch: dict, rows: int, tokens_per_row: int, max_segments: int) -> dict | None:
    """A packed batch grown to a fixed shape ([rows, tokens_per_row], `max_segments` + 1 boundaries), or None.

    A CUDA graph replays fixed shapes only. Each row's extension and each extra row is a padding segment of its
    own (token 0, no target, the next seq_idx, positions from 0); unused boundaries repeat the last one (empty
    segments), and `max_length_*` becomes `tokens_per_row`, an upper bound the varlen kernel accepts. Loss and
    gradients are those of the original batch. None when it does not fit (more rows, longer rows, more segments).
    """
    R, T = batch["input_ids"].shape
    if R > rows or T > tokens_per_row:
        return None
    tail = tokens_per_row - T
    bounds = batch["cu_seq_lens_q"].tolist()
    segs: list[int] = []
    for r in range(R):  # the original segments, row by row, then the row's extension
        starts = [b for b in bounds if r * T <= b < (r + 1) * T]
        segs += [e - s for s, e in zip(starts, starts[1:] + [(r + 1) * T])] + ([tail] if tail else [])
    segs += [tokens_per_row] * (rows - R)
    if len(segs) > max_segments:
        return None

    def grow(x: torch.Tensor, fill: int | bool) -> torch.Tensor:
        out = torch.full((rows, tokens_per_row), fill, dtype=x.dtype)
        out[:R, :T] = x
        return out

    seq_idx, position_ids = grow(batch["seq_idx"], 0), grow(batch["position_ids"], 0)
    if tail:
        seq_idx[:R, T:] = batch["seq_idx"][:, -1:] + 1
        position_ids[:R, T:] = torch.arange(tail)
    position_ids[R:] = torch.arange(tokens_per_row)
    cu = torch.full((max_segments + 1,), rows * tokens_per_row, dtype=torch.int32)
    cu[0] = 0
    cu[1 : len(segs) + 1] = torch.tensor(segs, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return dict(batch) | {
        "input_ids": grow(batch["input_ids"], 0),
        "labels": grow(batch["labels"], IGNORE_INDEX),
        "position_ids": position_ids,
        "seq_idx": seq_idx,
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": tokens_per_row,
        "max_length_k": tokens_per_row,
        "sample_ids": grow(batch["sample_ids"], -1),
        "loss_mask": grow(batch["loss_mask"], False),
    }
