"""With the Mamba kernels installed (the `gpu` extra), a model on the CPU never calls them.

This machine cannot install the CUDA kernels, so the tests make transformers' nemotron_h module look as it does
when it was imported with mamba-ssm and causal-conv1d installed: fake packages whose functions raise when called,
bound by transformers' own decorator (`use_kernel_func_from_hub_with_fallback`) in place of the functions the
Mamba-2 mixer calls. Every CPU path the project runs then has to finish without touching them: a plain forward, a
prefill with padding and a cache, decoding (dynamic and static), packed training, and the backward of each.
"""

from __future__ import annotations

import importlib.machinery
import logging
import subprocess
import sys
import textwrap
import types

import pytest
import torch
import torch.nn.functional as F
from transformers.integrations import hub_kernels
from transformers.models.nemotron_h import modeling_nemotron_h

from alignment import mamba_kernels
from alignment.mamba_kernels import _refused_width
from alignment.rollout.generation import GenerationSettings, generate
from alignment.modeling import ModelConfig, load_model
from alignment.packed_model import _INSTALLED_FLAG, enable_packed_sequences
from alignment.packing import SampleCollator, model_inputs
from tests.conftest import REPO
from tests.test_packing import make_samples

# What transformers looks up in each package (the names mamba-ssm 2.3 and causal-conv1d 1.7 export).
KERNELS = {
    "causal_conv1d": ["causal_conv1d_fn", "causal_conv1d_update"],
    "mamba_ssm": ["mamba_chunk_scan_combined", "mamba_split_conv1d_scan_combined", "selective_state_update"],
}
# The functions of the nemotron_h module that the mixer (and alignment.rollout.static_decode) call.
MIXER_FUNCTIONS = {
    "causal_conv1d_fn", "causal_conv1d_update", "mamba2_chunk_scan", "mamba2_selective_state_update",
    "mamba2_split_conv1d_scan_combined",
}  # fmt: skip


def cuda_kernel(name: str):
    def kernel(*args, **kwargs):
        raise AssertionError(f"CUDA kernel {name} called on CPU")

    return kernel


def _closure(fn) -> dict:
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    return {var: cell.cell_contents for var, cell in zip(code.co_freevars, cells)} if code and cells else {}


def _transformers_wrapper(fn):
    """transformers' kernel-or-reference wrapper behind a module attribute (also under our wrappers), or None."""
    for _ in range(4):
        if "torch_function" in _closure(fn):
            return fn
        fn = getattr(fn, "__wrapped__", None)
    return None


# As transformers made them at import (before any test put wrappers of ours on top).
WRAPPERS = {name: w for name, fn in vars(modeling_nemotron_h).items() if (w := _transformers_wrapper(fn)) is not None}


def install_fake_kernels(monkeypatch) -> None:
    """The nemotron_h module as imported with the kernels installed (until the test ends)."""
    for package, names in KERNELS.items():
        fake = types.ModuleType(package)
        fake.__spec__ = importlib.machinery.ModuleSpec(package, None)  # importlib.util.find_spec finds it
        for name in names:
            setattr(fake, name, cuda_kernel(name))
        monkeypatch.setitem(sys.modules, package, fake)
    bound = set()
    for name, wrapper in WRAPPERS.items():
        cells = _closure(wrapper)
        decorate = hub_kernels.use_kernel_func_from_hub_with_fallback(cells["func_name"], cells["package"])
        rebound = decorate(cells["torch_function"])
        assert _closure(rebound)["implementation"] is not cells["torch_function"], f"{name}: no stand-in bound"
        monkeypatch.setattr(modeling_nemotron_h, name, rebound)
        bound.add(name)
    assert MIXER_FUNCTIONS <= bound, f"transformers binds kernels differently now: {sorted(bound)}"
    # Where mamba-ssm really is installed its submodules stay importable past the fake package: stand in here too.
    monkeypatch.setattr(mamba_kernels, "_rms_norm_kernel", lambda: cuda_kernel("rms_norm_fn"))
    monkeypatch.setattr(modeling_nemotron_h, _INSTALLED_FLAG, False, raising=False)  # no packed overrides yet
    if hasattr(modeling_nemotron_h, "is_fast_path_available"):  # transformers before 5.17
        monkeypatch.setattr(modeling_nemotron_h, "is_fast_path_available", True)


def tiny(seed: int = 0):
    return load_model(ModelConfig(init_seed=seed), "cpu")


def batch_with_padding() -> dict:
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 384, (3, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :5] = 0  # left padding, as generation prefills
    attention_mask[1, :2] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def forward_and_grads(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    logits = model(**batch).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten())
    loss.backward()
    return logits.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def test_the_stand_ins_are_what_transformers_calls(monkeypatch):
    """The simulation itself: without routing, transformers sends CPU tensors to the (fake) kernels."""
    install_fake_kernels(monkeypatch)
    x, w = torch.randn(1, 8, 5), torch.randn(8, 4)
    with pytest.raises(AssertionError, match="CUDA kernel causal_conv1d_fn called on CPU"):
        modeling_nemotron_h.causal_conv1d_fn(x, w, None, activation="silu")


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])  # train, no cache: the fused branch
def test_forward_and_backward_take_the_pytorch_path(monkeypatch, training):
    batch = {"input_ids": batch_with_padding()["input_ids"], "use_cache": False}
    expected = tiny().train(training)
    want, want_grads = forward_and_grads(expected, batch)
    install_fake_kernels(monkeypatch)
    model = tiny().train(training)
    got, grads = forward_and_grads(model, batch)
    torch.testing.assert_close(got, want)
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=lambda text, name=name: f"{name}: {text}")


@torch.no_grad()
def test_prefill_with_padding_and_a_cache_then_a_decode_step(monkeypatch):
    batch = batch_with_padding()
    step = {"input_ids": torch.tensor([[7], [8], [9]])}
    step["attention_mask"] = F.pad(batch["attention_mask"], (0, 1), value=1)  # [3, 13]

    def run(model):
        out = model(**batch, use_cache=True)
        return out.logits, model(**step, past_key_values=out.past_key_values, use_cache=True).logits

    want = run(tiny().eval())
    install_fake_kernels(monkeypatch)
    got = run(tiny().eval())
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_generation_takes_the_pytorch_path(monkeypatch, decode):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]  # different lengths: left padding
    settings = GenerationSettings(max_new_tokens=6, eos_token_ids=[4], pad_token_id=0, batch_size=3, decode=decode)
    want = generate(tiny().eval(), prompts, settings=settings, reasoning=[False] * 3)
    install_fake_kernels(monkeypatch)
    got = generate(tiny().eval(), prompts, settings=settings, reasoning=[False] * 3)
    assert [r.tokens for r in got] == [r.tokens for r in want]


def test_packed_training_step_takes_the_pytorch_path(monkeypatch):
    samples = make_samples([3, 17, 9, 30, 2], seed=3)
    batch = SampleCollator(mode="packed", pad_token_id=0, max_tokens_per_row=40)(samples)

    def run(model):
        assert enable_packed_sequences(model).mamba == "reference-seq_idx"
        model.train()
        logits = model(**model_inputs(batch)).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    want_loss, want_grads = run(tiny())
    install_fake_kernels(monkeypatch)
    loss, grads = run(tiny())
    torch.testing.assert_close(loss, want_loss)
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=lambda text, name=name: f"{name}: {text}")


def test_packed_rows_are_refused_on_the_pytorch_path_until_packing_is_enabled(monkeypatch):
    """The reference conv and scan ignore seq_idx; without enable_packed_sequences that must not go unnoticed."""
    install_fake_kernels(monkeypatch)
    model = tiny().eval()
    input_ids = torch.randint(5, 384, (1, 10))
    seq_idx = torch.tensor([[0] * 4 + [1] * 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="cannot keep packed samples apart"):
        model(input_ids=input_ids, seq_idx=seq_idx)


def test_tensors_on_a_kernel_device_still_reach_the_kernels(monkeypatch):
    """The routing's other side, without a GPU: declare the CPU a kernel device and the stand-ins are called."""
    install_fake_kernels(monkeypatch)
    model = tiny().eval()
    monkeypatch.setattr(mamba_kernels, "KERNEL_DEVICE_TYPES", ("cpu",))
    with pytest.raises(AssertionError, match="CUDA kernel .* called on CPU"):
        model(input_ids=torch.tensor([[5, 6, 7]]))


def test_the_log_says_which_path_runs(monkeypatch, caplog):
    install_fake_kernels(monkeypatch)
    with caplog.at_level(logging.INFO):
        model = tiny()
    line = next(r.getMessage() for r in caplog.records if "mamba path" in r.getMessage())
    assert "pytorch-reference (model on cpu; the causal-conv1d + mamba-ssm kernels run CUDA tensors only)" in line
    routed = next(r.getMessage() for r in caplog.records if r.name == "alignment.mamba_kernels")
    assert all(name in routed for name in MIXER_FUNCTIONS)
    assert mamba_kernels.kernel_path(model.to("meta")).startswith("pytorch-reference (model on meta")


def test_kernels_bound_at_import_are_routed_for_a_model_built_by_transformers_alone():
    """As on a machine with the gpu extra: the fake packages exist before transformers imports nemotron_h, and the
    model comes from transformers' own constructor (as in tests), never through load_model."""
    script = textwrap.dedent(f"""
        import importlib.machinery, sys, types
        for package, names in {KERNELS!r}.items():
            fake = types.ModuleType(package)
            fake.__spec__ = importlib.machinery.ModuleSpec(package, None)
            for name in names:
                def kernel(*args, _name=name, **kwargs):
                    raise AssertionError(f"CUDA kernel {{_name}} called on CPU")
                setattr(fake, name, kernel)
            sys.modules[package] = fake
        import torch
        from transformers import NemotronHConfig, NemotronHForCausalLM
        from alignment.rollout.generation import GenerationSettings, generate
        torch.manual_seed(0)
        model = NemotronHForCausalLM(NemotronHConfig(
            vocab_size=100, hidden_size=64, hybrid_override_pattern="M*M-", num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, intermediate_size=128, mamba_num_heads=4, mamba_head_dim=16,
            n_groups=1, ssm_state_size=16, chunk_size=8, conv_kernel=4))
        model(torch.tensor([[5, 6, 7, 8]]), use_cache=False).logits.sum().backward()  # training mode: fused branch
        settings = GenerationSettings(max_new_tokens=3, eos_token_ids=[1], decode="dynamic")
        print(generate(model.eval(), [[5, 6, 7], [8, 9]], settings=settings, reasoning=[False, False])[0].tokens)
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def test_widths_causal_conv1d_refuses_are_sent_to_the_reference():
    """Its channel-last layout needs strides that are multiples of 8: the tiny hybrid's in_proj width 422 is not."""
    def conv_input(width: int) -> torch.Tensor:  # what the mixer passes: a transposed view into the in_proj output
        return torch.zeros(2, 5, width)[..., :width - 6].transpose(1, 2)

    assert _refused_width("causal_conv1d_fn", conv_input(422)) == 422
    assert _refused_width("causal_conv1d_fn", conv_input(22656)) is None  # Nano-9B-v2
    assert _refused_width("causal_conv1d_fn", torch.zeros(2, 422, 5)) is None  # channel-first: any width
    assert _refused_width("mamba2_split_conv1d_scan_combined", torch.zeros(2, 5, 422)) == 422
    assert _refused_width("mamba2_split_conv1d_scan_combined", torch.zeros(2, 5, 22656)) is None
    assert _refused_width("mamba2_chunk_scan", conv_input(422)) is None  # only the conv input is checked
