"""SFT under DeepSpeed ZeRO-3: 2 processes (gloo, CPU) follow the plain single-process run with the same global batch.

ZeRO-3 shards every weight, gradient and AdamW state between the two processes and gathers them back for the
checkpoint: the losses step by step and the final weights must match the unsharded run.
"""

import importlib
import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from alignment.config import load_config
from alignment.modeling import ModelConfig, load_model
from alignment.zero import free_local_port
from tests.conftest import TINY_MODEL
from tests.test_sft import tiny_sft_config

pytest.importorskip("deepspeed")

ZERO3_FP32 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "bf16": {"enabled": "auto"}}


def _zero_rank(rank: int, world: int, port: int, config) -> None:
    from alignment.sft import run_sft

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        run_sft(config)
    finally:
        torch.distributed.destroy_process_group()


def _interrupted(rank: int, world: int, port: int, target: str, stop_at: int, run_rank, *args) -> None:
    """`run_rank(rank, world, port, *args)`, but `target` ("module.function") raises on its call number `stop_at`
    (from 0) on every worker: a crash mid-stage."""
    module_name, name = target.rsplit(".", 1)
    module = importlib.import_module(module_name)
    real, calls = getattr(module, name), []

    def failing(*call_args, **kwargs):
        if len(calls) == stop_at:
            raise RuntimeError("simulated crash")
        calls.append(1)
        return real(*call_args, **kwargs)

    setattr(module, name, failing)
    try:
        run_rank(rank, world, port, *args)
    except RuntimeError as exc:
        assert "simulated crash" in str(exc)


def logged(run) -> list[tuple[float, float]]:
    """(loss, gradient norm before clipping) of every step."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["loss"], r["grad_norm"]) for r in rows if "loss" in r]


@pytest.mark.slow
def test_zero3_on_two_processes_matches_one_process(tiny_data, tmp_path):
    from alignment.sft import run_sft

    ds_config = tmp_path / "zero3.json"
    ds_config.write_text(json.dumps(ZERO3_FP32))
    steps = ("train.max_steps=4", "train.lr=1e-2")
    run_sft(tiny_sft_config(tiny_data, tmp_path / "plain", *steps, "train.grad_accum=2"))
    zero = tiny_sft_config(tiny_data, tmp_path / "zero", *steps, "train.grad_accum=1", f"train.deepspeed={ds_config}")
    mp.spawn(_zero_rank, args=(2, free_local_port(), zero), nprocs=2, join=True)

    plain, sharded = logged(tmp_path / "plain"), logged(tmp_path / "zero")
    assert len(plain) == len(sharded) == 4 and plain[0][0] != plain[-1][0]
    # Same data and update; only the order of the gradient sums differs (gloo reduce-scatter vs local accumulation).
    # The gradient norm checks the gradient's scale, which AdamW's update (and so the loss) barely depends on.
    for one, two in zip(plain, sharded):
        assert all(abs(x - y) <= 1e-4 * abs(x) for x, y in zip(one, two)), (plain, sharded)
    a = load_model(ModelConfig(name_or_path=str(tmp_path / "plain" / "checkpoint"))).state_dict()
    b = load_model(ModelConfig(name_or_path=str(tmp_path / "zero" / "checkpoint"))).state_dict()
    start = load_model(ModelConfig(name_or_path=str(TINY_MODEL))).state_dict()  # the same seeded init both runs had
    assert a.keys() == b.keys() == start.keys()
    # The weights' difference measured against how far training moved them. Not entry by entry: AdamW divides each
    # gradient entry by its own scale, so an entry whose gradient is near 0 turns a last-bit difference in the sum
    # into a visible step (3 of 36864 entries of one matrix, 1.2e-4 off after 4 steps at lr 1e-2), while a lost
    # shard or a wrong gradient scale moves the whole model.
    norm = lambda tensors: sum(t.double().square().sum() for t in tensors).sqrt().item()
    moved, apart = norm(a[k] - start[k] for k in a), norm(a[k] - b[k] for k in a)
    assert moved > 1 and apart < 1e-4 * moved, (apart, moved)


def test_deepspeed_config_is_checked(tmp_path):
    from alignment.zero import deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**ZERO3_FP32, "optimizer": {"type": "AdamW"}}))
    with pytest.raises(ValueError, match="optimizer"):
        deepspeed_config(str(path), max_grad_norm=1.0, grad_accum=2, world=2, bf16=False)
    path.write_text(json.dumps({**ZERO3_FP32, "gradient_accumulation_steps": 8}))
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        deepspeed_config(str(path), max_grad_norm=1.0, grad_accum=2, world=2, bf16=False)
    path.write_text(json.dumps({**ZERO3_FP32, "bf16": {"enabled": False}}))
    with pytest.raises(ValueError, match="bf16"):  # a bf16 model must not be trained as fp32 by DeepSpeed
        deepspeed_config(str(path), max_grad_norm=1.0, grad_accum=2, world=2, bf16=True)
    path.write_text(json.dumps({**ZERO3_FP32, "fp16": {"enabled": True}}))
    with pytest.raises(ValueError, match="fp16"):
        deepspeed_config(str(path), max_grad_norm=1.0, grad_accum=2, world=2, bf16=False)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="ds.json"):
        deepspeed_config(str(path), max_grad_norm=1.0, grad_accum=2, world=2, bf16=False)
    path.write_text(json.dumps(ZERO3_FP32))
    filled = deepspeed_config(str(path), max_grad_norm=0.5, grad_accum=2, world=4, bf16=True)
    assert filled["train_batch_size"] == 8 and filled["gradient_clipping"] == 0.5 and filled["bf16"]["enabled"]


@pytest.mark.slow
def test_zero3_resumes_from_its_sharded_state(tiny_data, tmp_path):
    """Crash after 3 of 4 steps with a state saved every 2: the rerun continues from step 2 and ends where an
    uninterrupted run ends."""
    ds_config = tmp_path / "zero3.json"
    ds_config.write_text(json.dumps(ZERO3_FP32))
    settings = ("train.max_steps=4", "train.lr=1e-2", "train.save_every=2", f"train.deepspeed={ds_config}")
    straight = tiny_sft_config(tiny_data, tmp_path / "straight", *settings)
    mp.spawn(_zero_rank, args=(2, free_local_port(), straight), nprocs=2, join=True)

    resumed = tiny_sft_config(tiny_data, tmp_path / "resumed", *settings)
    mp.spawn(_interrupted, args=(2, free_local_port(), "alignment.sft.zero_step", 3, _zero_rank, resumed), nprocs=2,
             join=True)
    state = tmp_path / "resumed" / "last"
    assert json.loads((state / "manifest.json").read_text())["step"] == 2 and (state / "shards").is_dir()
    mp.spawn(_zero_rank, args=(2, free_local_port(), resumed), nprocs=2, join=True)

    assert not state.exists()  # the finished checkpoint replaced the resumable state
    # Steps 0-2 before the crash; the rerun continues from the state saved after two steps (not from step 0) and
    # replaces the crashed attempt's record of step 2: one record per step, then the evaluation's.
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4], steps
    last_two = [value for pair in logged(tmp_path / "resumed")[-2:] for value in pair]  # steps 2 and 3, rerun
    assert last_two == pytest.approx([value for pair in logged(tmp_path / "straight")[-2:] for value in pair], rel=1e-6)
    a = load_model(ModelConfig(name_or_path=str(tmp_path / "straight" / "checkpoint"))).state_dict()
    b = load_model(ModelConfig(name_or_path=str(tmp_path / "resumed" / "checkpoint"))).state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def _grpo_rank(rank: int, world: int, port: int, data, out, extra: list[str]) -> None:
    """tests/test_grpo_workers.py's worker, with the environment DeepSpeed reads."""
    from tests.test_grpo_workers import _worker

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    _worker(rank, world, port, data, out, extra)


@pytest.mark.slow
def test_grpo_under_zero3_on_two_processes_follows_one_plain_process(tiny_data, tmp_path):
    """Rollouts from weights gathered on each worker, updates from shards, fillers where a worker has fewer rows."""
    from alignment.grpo import run_grpo
    from tests.test_grpo_workers import _config, _records

    ds_config = tmp_path / "zero3.json"
    ds_config.write_text(json.dumps(ZERO3_FP32))
    # One sample a micro-batch, 16 samples in 3 minibatches: the two workers get 3 and 2 of a 5-sample minibatch.
    one_sample_a_row = ["train.lr=1e-4", "train.rows_per_micro_batch=1", "train.max_tokens_per_row=64", "loss.minibatches=3"]
    run_grpo(_config(tiny_data, tmp_path / "plain", *one_sample_a_row))
    mp.spawn(_grpo_rank, args=(2, free_local_port(), tiny_data, tmp_path / "zero", [*one_sample_a_row,
             f"train.deepspeed={ds_config}"]), nprocs=2, join=True)

    plain, sharded = _records(tmp_path / "plain"), _records(tmp_path / "zero")
    assert [r["step"] for r in plain] == [r["step"] for r in sharded] == [0, 1, 2, 3]
    for a, b in zip(plain[:3], sharded[:3]):
        for key in ("reward_mean", "tokens_generated", "groups_kept", "samples_trained", "tokens_trained", "updates"):
            assert a[key] == pytest.approx(b[key], rel=1e-9), key  # the same rollouts, fillers not counted
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        for key in ("loss", "approx_kl_old"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (key, a[key], b[key])
    assert plain[0]["loss"] != plain[-2]["loss"] and plain[0]["grad_norm"] > 0
    assert sum(r["filler_micro_batches"] for r in sharded[:3]) > 0  # a worker had fewer micro-batches than the other
    assert (tmp_path / "plain" / "samples.jsonl").read_text() == (tmp_path / "zero" / "samples.jsonl").read_text()
    a = load_model(ModelConfig(name_or_path=str(tmp_path / "plain" / "checkpoint"))).state_dict()
    b = load_model(ModelConfig(name_or_path=str(tmp_path / "zero" / "checkpoint"))).state_dict()
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_grpo_refuses_zero_with_lora_or_a_kl_reference():
    from alignment.grpo import GRPOConfig

    with pytest.raises(ValueError, match="adapters train data parallel"):
        load_config(GRPOConfig, None, ["train.deepspeed=configs/deepspeed/zero3.json", "lora.enabled=true"])
    with pytest.raises(ValueError, match="loss.kl_coef=0"):
        load_config(GRPOConfig, None, ["train.deepspeed=configs/deepspeed/zero3.json", "loss.kl_coef=0.01"])


@pytest.mark.slow
def test_grpo_under_zero3_resumes_from_its_sharded_state(tiny_data, tmp_path):
    """Crash in step 3 of 4 with a state saved every 2: the rerun continues from step 2, as a run never stopped."""
    from tests.test_grpo_workers import _records

    ds_config = tmp_path / "zero3.json"
    ds_config.write_text(json.dumps(ZERO3_FP32))
    settings = ["train.lr=1e-4", "train.max_steps=4", "train.save_every=2", f"train.deepspeed={ds_config}"]
    mp.spawn(_grpo_rank, args=(2, free_local_port(), tiny_data, tmp_path / "straight", settings), nprocs=2, join=True)
    out = tmp_path / "resumed"
    crash = "alignment.grpo.policy_update"
    mp.spawn(_interrupted, args=(2, free_local_port(), crash, 3, _grpo_rank, tiny_data, out, settings), nprocs=2,
             join=True)
    assert [r["step"] for r in _records(out)] == [0, 1, 2] and (out / "last" / "shards").is_dir()
    # The rerun may make two updates only (steps 2 and 3): one started over would crash at its third.
    mp.spawn(_interrupted, args=(2, free_local_port(), crash, 2, _grpo_rank, tiny_data, out, settings), nprocs=2,
             join=True)

    straight, resumed = _records(tmp_path / "straight"), _records(out)
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4] and not (out / "last").exists()
    assert (out / "checkpoint").is_dir()
    for a, b in zip(straight[2:4], resumed[2:4]):  # the rerun's steps 2 and 3, from the sharded state
        assert a["reward_mean"] == b["reward_mean"] and a["tokens_generated"] == b["tokens_generated"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)


def _dpo_rank(rank: int, world: int, port: int, data, out, extra: list[str]) -> None:
    """tests/test_dpo_workers.py's worker, with the environment DeepSpeed reads."""
    from tests.test_dpo_workers import _worker

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    _worker(rank, world, port, data, out, extra)


@pytest.mark.slow
def test_dpo_under_zero3_on_two_processes_follows_one_plain_process(tiny_data, tmp_path):
    """Two rounds of mined pairs: mining and reference log-probs from gathered weights, updates from shards, a fresh
    AdamW each round, fillers where a worker has fewer micro-batches (5 pairs a step, one a micro-batch: 3 and 2)."""
    from alignment.dpo import run_dpo
    from tests.test_dpo_workers import _config

    ds_config = tmp_path / "zero3.json"
    ds_config.write_text(json.dumps(ZERO3_FP32))
    # lr 1e-4, not the workers test's 1e-3: a fresh AdamW moves a weight by ~lr whatever its gradient, so an entry
    # whose gradient is float noise (a cancelling sum) steps by lr with the sign of that noise, and the two sides'
    # different summation orders then differ by ~lr there (8.6e-4 at 1e-3; the losses agree either way).
    settings = ["train.lr=1e-4", "train.pairs_per_micro_batch=1"]
    run_dpo(_config(tiny_data, tmp_path / "plain", *settings))
    mp.spawn(_dpo_rank, args=(2, free_local_port(), tiny_data, tmp_path / "zero", [*settings,
             f"train.deepspeed={ds_config}"]), nprocs=2, join=True)

    for round_file in ("round1.jsonl", "round2.jsonl"):  # the same pairs, mined from the same policy
        plain, sharded = [(tmp_path / run / "pairs" / round_file).read_text() for run in ("plain", "zero")]
        assert plain == sharded and plain
    records = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
                if "dpo_loss" in line] for run in ("plain", "zero")]
    assert len(records[0]) == len(records[1]) == 4  # 2 rounds x 2 steps
    for a, b in zip(*records):
        for key in ("loss", "dpo_loss", "sft_loss", "grad_norm", "chosen_logps", "reward_margin"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), (key, a[key], b[key])
    assert records[0][1]["reward_margin"] != 0  # it did train
    # The weights agree where their gradients are not noise: Adam's noise-sign steps above leave single entries up
    # to ~lr apart, so the checkpoints are compared by what they compute.
    plain, sharded = (load_model(ModelConfig(name_or_path=str(tmp_path / run / "checkpoint"))) for run in ("plain", "zero"))
    tokens = torch.arange(1, 41)[None]
    with torch.no_grad():
        a, b = plain(tokens).logits, sharded(tokens).logits
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * a.abs().max().item())


def test_dpo_refuses_zero_with_lora():
    from alignment.dpo import DPOConfig

    with pytest.raises(ValueError, match="adapters train data parallel"):
        load_config(DPOConfig, None, ["train.deepspeed=configs/deepspeed/zero3.json", "lora.enabled=true"])


@pytest.mark.slow
def test_dpo_under_zero3_resumes_after_its_last_round(tiny_data, tmp_path):
    """Crash in round 2 of 2: the rerun loads the sharded state of round 1 and trains round 2 only, as a run never
    stopped."""
    from tests.test_grpo_workers import _records

    ds_config = tmp_path / "zero3.json"
    ds_config.write_text(json.dumps(ZERO3_FP32))
    settings = ["train.lr=1e-4", f"train.deepspeed={ds_config}"]
    mp.spawn(_dpo_rank, args=(2, free_local_port(), tiny_data, tmp_path / "straight", settings), nprocs=2, join=True)
    out = tmp_path / "resumed"
    crash = "alignment.dpo.train_round"
    mp.spawn(_interrupted, args=(2, free_local_port(), crash, 1, _dpo_rank, tiny_data, out, settings), nprocs=2,
             join=True)
    assert (out / "last" / "shards").is_dir() and not (out / "checkpoint").exists()
    # The rerun may train one round only: one that started over would crash in its second.
    mp.spawn(_interrupted, args=(2, free_local_port(), crash, 1, _dpo_rank, tiny_data, out, settings), nprocs=2,
             join=True)

    assert (out / "checkpoint").is_dir() and not (out / "last").exists()
    straight, resumed = ([r for r in _records(run) if "dpo_loss" in r] for run in (tmp_path / "straight", out))
    assert [r["step"] for r in resumed] == [r["step"] for r in straight] and len(straight) == 4
    for a, b in zip(straight, resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)


def test_dpo_and_grpo_read_their_deepspeed_settings_and_refuse_a_chunked_loss_under_zero3():
    from types import SimpleNamespace

    from alignment.config import ConfigError
    from alignment.zero import full_weight_settings

    def train(**keys):
        return SimpleNamespace(**{"deepspeed": "configs/deepspeed/zero3.json", "max_grad_norm": 1.0,
                                  "loss_chunk_tokens": 0, **keys})

    assert full_weight_settings(train(deepspeed=""), world=2, bf16=True) is None
    settings = full_weight_settings(train(), world=2, bf16=True)
    assert settings["gradient_accumulation_steps"] == 1 and settings["train_batch_size"] == 2
    with pytest.raises(ConfigError, match="train.loss_chunk_tokens must be 0 here: ZeRO-3"):
        full_weight_settings(train(loss_chunk_tokens=2048), world=2, bf16=True)
