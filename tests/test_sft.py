"""SFT end to end on a few steps of the tiny model: checkpoint, manifest, reload, LoRA on hybrid layers."""

import json

import pytest
import torch

from alignment.checkpoint import CorruptCheckpointError, verify_checkpoint
from alignment.config import load_config
from alignment.modeling import ModelConfig, load_model, load_tokenizer
from alignment.lora import apply_lora
from alignment.sft import SFTConfig, learning_rate, run_sft
from tests.conftest import TINY_MODEL, TINY_TOKENIZER


def tiny_sft_config(tiny_data, out, *extra):
    return load_config(SFTConfig, None, [
        f"model.name_or_path={TINY_MODEL}", f"model.tokenizer={TINY_TOKENIZER}",
        f"data.train_path={tiny_data / 'train.jsonl'}", f"data.test_path={tiny_data / 'test.jsonl'}",
        f"eval.test_path={tiny_data / 'test.jsonl'}", "eval.max_samples=4", "eval.max_new_tokens=16",
        "train.max_steps=3", "train.warmup_steps=1", "train.log_every=1", f"output_dir={out}", "device=cpu", *extra,
    ])


@pytest.mark.parametrize("packing", [True, False])
def test_sft_writes_a_checkpoint_that_reloads_to_identical_logits(tiny_data, tmp_path, packing):
    config = tiny_sft_config(tiny_data, tmp_path / "run", f"train.packing={str(packing).lower()}")
    summary = run_sft(config)
    checkpoint = tmp_path / "run" / "checkpoint"
    manifest = verify_checkpoint(checkpoint)
    assert manifest["stage"] == "sft" and manifest["metrics"]["samples"] == 4
    assert set(summary) >= {"accuracy_think", "accuracy_no_think", "toggle_compliance", "budget_sweep"}
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines[:3]] == [0, 1, 2] and all(l["loss"] > 0 for l in lines[:3])

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(checkpoint)))
    assert tokenizer.chat_template and tokenizer.eos_token == "<|end|>"
    assert manifest["packing"].startswith("packed") == packing


def test_reload_matches_live_model(tmp_path):
    from alignment.checkpoint import save_model_checkpoint

    config = ModelConfig(name_or_path=str(TINY_MODEL), tokenizer=str(TINY_TOKENIZER))
    model, tokenizer = load_model(config), load_tokenizer(config)
    with torch.no_grad():  # move the weights away from their initialisation
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    save_model_checkpoint(tmp_path / "ckpt", model, tokenizer, {"stage": "test"})
    reloaded = load_model(ModelConfig(name_or_path=str(tmp_path / "ckpt")))
    ids = torch.randint(8, 300, (2, 40))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_corrupted_checkpoint_is_detected(tmp_path):
    from alignment.checkpoint import write_checkpoint

    ckpt = write_checkpoint(tmp_path / "c", lambda d: (d / "weights.bin").write_bytes(b"x" * 100), {"stage": "t"})
    verify_checkpoint(ckpt)
    (ckpt / "weights.bin").write_bytes(b"x" * 50)
    with pytest.raises(CorruptCheckpointError, match="wrong size"):
        verify_checkpoint(ckpt)
    (ckpt / "weights.bin").write_bytes(b"y" * 100)
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        verify_checkpoint(ckpt)
    (ckpt / "manifest.json").unlink()
    with pytest.raises(CorruptCheckpointError, match="no manifest.json"):
        verify_checkpoint(ckpt)


def test_a_replacement_cut_between_its_renames_is_finished(tmp_path):
    from alignment.checkpoint import read_manifest, restore_interrupted_replace, write_checkpoint

    def state(step):
        return write_checkpoint(tmp_path / "last", lambda d: (d / "w.bin").write_bytes(b"x" * step), {"step": step})

    state(1)
    assert not restore_interrupted_replace(tmp_path / "last")  # nothing to do
    # A crash after `last` moved aside and before the new state took its name: the complete new state wins.
    (tmp_path / "last").rename(tmp_path / ".last.old-7")
    state(2).rename(tmp_path / ".last.tmp-7")
    assert restore_interrupted_replace(tmp_path / "last") and read_manifest(tmp_path / "last")["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # the superseded previous state is gone
    # Without a complete new state (its manifest not yet written), the previous one comes back.
    (tmp_path / "last").rename(tmp_path / ".last.old-8")
    state(3).rename(tmp_path / ".last.tmp-8")
    (tmp_path / ".last.tmp-8" / "manifest.json").unlink()
    assert restore_interrupted_replace(tmp_path / "last") and read_manifest(tmp_path / "last")["step"] == 2
    verify_checkpoint(tmp_path / "last")


def test_lora_reaches_mamba_attention_and_mlp():
    config = ModelConfig(name_or_path=str(TINY_MODEL), tokenizer=str(TINY_TOKENIZER))
    model = apply_lora(load_model(config), load_config(SFTConfig).lora)
    ids = torch.randint(8, 300, (2, 24))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    # lora_B starts at zero, so lora_A gets no gradient on the first step; lora_B does wherever the adapter is live.
    for kind in ("mixer.in_proj", "q_proj", "v_proj", "up_proj", "down_proj"):
        hit = [n for n in grads if kind in n]
        assert hit, f"no LoRA adapter on {kind}"
        assert any(grads[n] is not None and grads[n].abs().sum() > 0 for n in hit), f"no gradient into {kind}"
    assert not any("out_proj" in n for n in grads)


def test_learning_rate_schedules():
    config = load_config(SFTConfig, None, ["train.max_steps=100", "train.warmup_steps=10", "train.lr=1.0",
                                           "train.min_lr_ratio=0.0"]).train
    assert learning_rate(0, config) == pytest.approx(0.1)
    assert learning_rate(10, config) == pytest.approx(1.0)
    assert learning_rate(99, config) < 0.01
    config.schedule = "wsd"
    assert learning_rate(50, config) == 1.0 and learning_rate(90, config) == pytest.approx(0.5)


def test_cuda_graphs_are_refused_with_the_reason():
    from alignment.packed_model import PackedPath
    from alignment.sft import TrainConfig, cuda_graphs_unusable

    cuda, kernels = torch.device("cuda"), PackedPath(mamba="cuda-kernels", attention="varlen")
    assert cuda_graphs_unusable(TrainConfig(), torch.device("cpu"), kernels, 1) == "not on CUDA"
    assert cuda_graphs_unusable(TrainConfig(), cuda, None, 1) == "packing is off"
    assert "segment-sdpa" in cuda_graphs_unusable(TrainConfig(), cuda, PackedPath("cuda-kernels", "segment-sdpa"), 1)
    assert "mamba-ssm and causal-conv1d kernels" in cuda_graphs_unusable(TrainConfig(), cuda, PackedPath("reference-seq_idx", "varlen"), 1)
    assert "data-parallel" in cuda_graphs_unusable(TrainConfig(), cuda, kernels, 2)
    assert cuda_graphs_unusable(TrainConfig(grad_accum=2), cuda, kernels, 1) == "grad_accum > 1"
    assert cuda_graphs_unusable(TrainConfig(), cuda, kernels, 1) is None


def test_sft_can_leave_the_forced_close_of_truncated_rows_untrained(tiny_data, tmp_path):
    config = tiny_sft_config(tiny_data, tmp_path / "run", "data.truncation.fraction=1.0", "data.truncation.max_budget=8",
                             "data.truncation.train_close=false", "train.max_steps=1")
    run_sft(config)
    stats = verify_checkpoint(tmp_path / "run" / "checkpoint")["data"]["truncation"]
    assert stats["truncated"] > 0 and stats["close_masked"] == stats["truncated"]


def test_sft_with_stated_budgets_marks_the_checkpoints_tokenizer(tiny_data, tmp_path):
    """Later stages and align eval state budgets for this model on their own (state_budget: auto)."""
    import json

    from alignment.chat_format import STATED_BUDGET_KEY, budget_is_stated
    from alignment.modeling import ModelConfig, load_tokenizer

    config = tiny_sft_config(tiny_data, tmp_path / "run", "data.truncation.fraction=0.5",
                             "data.truncation.state_budget=true", "train.max_steps=1")
    run_sft(config)
    checkpoint = tmp_path / "run" / "checkpoint"
    stats = verify_checkpoint(checkpoint)["data"]["truncation"]
    assert stats["budget_stated"] == stats["drawn"] > 0
    assert json.loads((checkpoint / "tokenizer_config.json").read_text())[STATED_BUDGET_KEY] is True
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(checkpoint)))
    assert budget_is_stated(tokenizer, "auto") and not budget_is_stated(tokenizer, "never")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_progress_bar_shows_the_loss_between_log_steps_without_a_sync():
    from alignment.sft import LossOnTheBar

    class Bar:
        postfix = None

        def set_postfix(self, **values):
            self.postfix = values

    bar = Bar()
    shown = LossOnTheBar(bar)
    shown.show_when_ready(torch.tensor(6.0, device="cuda"), 3, 1e-4)
    assert bar.postfix is None  # nothing copied back yet
    torch.cuda.synchronize()
    shown.show_when_ready(torch.tensor(9.0, device="cuda"), 3, 2e-4)
    assert bar.postfix == {"loss": "2.000", "lr": "1.0e-04"}  # the previous step's loss, once it has landed
