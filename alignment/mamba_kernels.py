"""Which Mamba kernel a call runs: the CUDA kernels for CUDA tensors, the PyTorch reference for every other device.

transformers (5.17 through 5.24) binds the Mamba-2 mixer's functions (`causal_conv1d_fn`, `causal_conv1d_update`,
`mamba2_chunk_scan`, `mamba2_selective_state_update`, `mamba2_split_conv1d_scan_combined`) once, when the modeling
module is imported: `use_kernel_func_from_hub_with_fallback` wraps each PyTorch function and, if causal-conv1d /
mamba-ssm import, sends every call to the kernel whatever device its tensors are on. With the `gpu` extra installed,
a model on the CPU (CPU evaluation, the CPU tests on a GPU machine) therefore hands CPU tensors to CUDA kernels.

`route_kernels_by_device(model)` puts a dispatcher in place of each such function in the model's modeling modules.
It decides per call, from the device of the call's first tensor: CUDA goes to transformers' function (the kernel
when installed), anything else to the PyTorch function it wraps. Per call rather than per model, so a model moved
between the CPU and a GPU takes the right path on both. Without the kernels nothing is replaced.

The routing lives in the modeling module, so it holds for every model of its classes. NemotronH, the family this
project trains, is routed when this module is imported (alignment.modeling, packed_model and static_decode import
it): a NemotronH model built with transformers' own constructors, as tests do, is covered before its first
forward. `load_model`, `enable_packed_sequences` and `StaticDecoder` also route the models they get, which covers
other hybrid families.

Two more changes of NemotronH's calls, at the same import, for CUDA tensors only:
- `frozen_outproj_outside` over the fused training kernel (`mamba2_split_conv1d_scan_combined`): the mixer hands it
  `out_proj`'s weight, and mamba-ssm's backward then always computes that weight's gradient and recomputes the
  gated-norm output for it. With LoRA the weight is frozen, so the wrapper keeps the projection out of the kernel
  and autograd skips the gradient nobody reads.
- `rms_norm_kernel_on_cuda` as the RMSNorm's forward: mamba-ssm's fused RMSNorm instead of six float32 elementwise
  ops. `transformers_kernel_calls` takes both off for a block of code.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

KERNEL_DEVICE_TYPES = ("cuda",)  # where mamba-ssm and causal-conv1d run (ROCm builds report "cuda" too)
PACKED_KWARGS = ("seq_idx", "cu_seqlens")  # only a kernel (or alignment.packed_model) keeps packed samples apart
_ROUTED = "_routed_by_device"  # marks a dispatcher, so routing twice leaves the first one in place


@dataclass(frozen=True)
class KernelBinding:
    """A function transformers bound to a kernel package, as found in a modeling module."""

    name: str  # its name in the modeling module, e.g. "causal_conv1d_fn"
    package: str  # where transformers looked for the kernel: "causal_conv1d", "mamba_ssm"
    kernel: Callable | None  # what transformers calls; None when the package did not import (the reference then)
    reference: Callable  # the PyTorch function


def _binding(name: str, fn: object) -> KernelBinding | None:
    """The binding behind `fn` if it is transformers' kernel-or-reference wrapper, else None.

    The wrapper is a closure over `torch_function` (the reference) and `implementation` (what it calls); both names
    are the same in transformers 5.17 through 5.24. Anything else (a dispatcher of ours, a plain function) is None.
    """
    code, closure = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is None or not closure or not {"torch_function", "implementation"} <= set(code.co_freevars):
        return None
    try:
        cells = {var: cell.cell_contents for var, cell in zip(code.co_freevars, closure)}
    except ValueError:  # an empty cell: not a finished wrapper
        return None
    reference, implementation = cells["torch_function"], cells["implementation"]
    if not callable(reference):
        return None
    kernel = None if implementation is reference else implementation
    return KernelBinding(name, str(cells.get("package", "?")), kernel, reference)


def _unwrap(name: str, fn: object) -> tuple[KernelBinding | None, int, bool]:
    """(binding, depth, routed) of a module attribute: the kernel binding found by following `__wrapped__` (at
    `depth` 0 when the attribute is transformers' wrapper itself), and whether one of our dispatchers is on the way.

    Other wrappers may sit on top (alignment.packed_model's seq_idx overrides set `__wrapped__` too).
    """
    routed = False
    for depth in range(8):  # a short chain; a cycle of `__wrapped__` must not hang us
        binding = _binding(name, fn)
        if binding is not None:
            return binding, depth, routed
        routed = routed or getattr(fn, _ROUTED, False)
        fn = getattr(fn, "__wrapped__", None)
        if fn is None:
            break
    return None, 0, False


def _call_reference(reference: Callable, name: str) -> Callable:
    """`reference` called with the keyword arguments it takes, as transformers' wrapper does."""
    params = inspect.signature(reference).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

    def call(*args, **kwargs):
        packed = [k for k in PACKED_KWARGS if kwargs.get(k) is not None]
        if packed:  # the reference would ignore them and let one sample's state run into the next
            raise ValueError(
                f"`{name}` got {', '.join(packed)} on its PyTorch path, which cannot keep packed samples apart: call "
                "alignment.packed_model.enable_packed_sequences(model) first, or move the model to CUDA with the "
                "Mamba kernels installed."
            )
        if not takes_any:
            kwargs = {k: v for k, v in kwargs.items() if k in params}
        return reference(*args, **kwargs)

    return call


def causal_conv1d_takes_stride(stride: int) -> bool:
    """Whether causal-conv1d accepts a channel-last input with this stride (it needs multiples of 8).

    The Mamba-2 mixer hands the conv a channel-last view into its in_proj output (directly, with `seq_idx` always,
    or inside the fused kernel), whose strides follow the in_proj width: the width must be a multiple of 8
    (mamba_num_heads a multiple of 8). The real Nemotron-H sizes are (Nano-9B-v2: 22656); the embedded tiny
    hybrid's 422 is not.
    """
    return stride % 8 == 0


def _refused_width(name: str, first: torch.Tensor) -> int | None:
    """The in_proj width when causal-conv1d would refuse this call's input layout (the call then runs the
    reference), else None."""
    if name == "mamba2_split_conv1d_scan_combined":  # first: the whole in_proj output [b, t, width]
        return None if causal_conv1d_takes_stride(first.shape[-1]) else first.shape[-1]
    if name == "causal_conv1d_fn" and first.dim() == 3 and first.stride(1) == 1 and first.stride(2) > 1:
        accepted = causal_conv1d_takes_stride(first.stride(0)) and causal_conv1d_takes_stride(first.stride(2))
        return None if accepted else first.stride(2)
    return None


_LAYOUT_WARNED: set[str] = set()


def _dispatcher(bound: Callable, binding: KernelBinding) -> Callable:
    """Call `bound` (transformers' wrapper) for CUDA tensors and the PyTorch reference for all others."""
    reference = _call_reference(binding.reference, binding.name)

    @functools.wraps(binding.reference)
    def routed(*args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if first is None or first.device.type not in KERNEL_DEVICE_TYPES:
            return reference(*args, **kwargs)
        if (width := _refused_width(binding.name, first)) is not None:
            if binding.name not in _LAYOUT_WARNED:
                _LAYOUT_WARNED.add(binding.name)
                log.warning("%s: causal-conv1d needs a Mamba in_proj width that is a multiple of 8, this one is %d: "
                            "the PyTorch reference runs instead", binding.name, width)
            return reference(*args, **kwargs)
        return bound(*args, **kwargs)

    routed.__wrapped__ = bound  # what `_unwrap` follows to the binding
    setattr(routed, _ROUTED, True)
    return routed


def route_module(module: ModuleType) -> list[KernelBinding]:
    """Route every kernel-bound function of `module` by device (idempotent); return the bindings found."""
    bindings, routed_now = [], []
    for name, fn in list(vars(module).items()):
        binding, depth, routed = _unwrap(name, fn)
        if binding is None:
            continue
        bindings.append(binding)
        if routed or binding.kernel is None:  # no kernel: transformers' wrapper runs the reference everywhere
            continue
        if depth == 0:
            setattr(module, name, _dispatcher(fn, binding))
            routed_now.append(name)
        else:
            log.warning("%s.%s wraps a kernel-bound function that cannot be routed by device: CPU calls may reach "
                        "the %s kernel", module.__name__, name, _distribution(binding.package))
    if routed_now:
        log.info("%s: kernels for CUDA tensors, the PyTorch reference for others: %s", module.__name__,
                 ", ".join(sorted(routed_now)))
    return bindings


def _distribution(package: str) -> str:
    return package.replace("_", "-")  # mamba_ssm -> mamba-ssm, as pip and the `gpu` extra name it


def _modeling_modules(model: nn.Module) -> list[ModuleType]:
    """The transformers modules that define the model's submodule classes (where the mixers look their functions up)."""
    names = {type(m).__module__ for m in model.modules()}
    return [sys.modules[n] for n in sorted(names) if n.startswith("transformers") and n in sys.modules]


def route_kernels_by_device(model: nn.Module) -> list[KernelBinding]:
    """Make every kernel-bound function the model's layers call choose kernel or reference per call, by device.

    Returns the bindings found (empty for a model without them, e.g. a pure transformer). Safe to call again, and
    on other models of the same classes (the routing lives in the modeling module).
    """
    return [b for module in _modeling_modules(model) for b in route_module(module)]


def kernel_path(model: nn.Module) -> str:
    """Which implementation the model's Mamba functions run where its parameters are now (routing them first)."""
    bindings = route_kernels_by_device(model)
    if not bindings:
        return "unknown (no kernel-bound functions in its modeling code for alignment/mamba_kernels.py to route)"
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    kernels = sorted({_distribution(b.package) for b in bindings if b.kernel is not None})
    if device.type in KERNEL_DEVICE_TYPES and kernels:
        missing = sorted({_distribution(b.package) for b in bindings if b.kernel is None})
        return f"cuda-kernels ({' + '.join(kernels)}{'; PyTorch for ' + ', '.join(missing) if missing else ''})"
    if kernels:
        return f"pytorch-reference (model on {device.type}; the {' + '.join(kernels)} kernels run CUDA tensors only)"
    return "pytorch-reference (slow, correct; install the `gpu` extra on CUDA machines)"


FUSED_TRAINING_KERNEL = "mamba2_split_conv1d_scan_combined"
_OUTPROJ_OUTSIDE = "_frozen_outproj_outside"  # marks the wrapper, so installing twice keeps one


def frozen_outproj_outside(fused: Callable) -> Callable:
    """`fused` (the mixer's fused conv + scan + gated norm + out_proj) with a frozen out_proj applied outside it.

    mamba-ssm's backward computes the out_proj weight gradient (2 x tokens x d_inner x hidden FLOPs per layer, ~7% of
    a Nano-9B-v2 LoRA step) and recomputes the normalised output for it, whether or not the weight requires grad.
    Called without the weight, the kernel returns that output and `F.linear` does the projection: the same forward
    (the kernel's own last step is this `F.linear`), an activation gradient only. A trainable out_proj (full
    fine-tuning) goes through the kernel unchanged. `fused` returning None (no kernel: the mixer's unfused path)
    passes through.
    """

    @functools.wraps(fused, updated=())  # not the dispatcher's marks: this is another wrapper
    def mamba2_split_conv1d_scan_combined(*args, outproj_weight=None, outproj_bias=None, **kwargs):
        trainable = any(t is not None and t.requires_grad for t in (outproj_weight, outproj_bias))
        if outproj_weight is None or trainable or not torch.is_grad_enabled():
            return fused(*args, outproj_weight=outproj_weight, outproj_bias=outproj_bias, **kwargs)
        out = fused(*args, **kwargs)
        if out is None:
            return None
        if isinstance(out, tuple):  # return_final_states=True: (output, final states)
            return (F.linear(out[0], outproj_weight, outproj_bias), *out[1:])
        return F.linear(out, outproj_weight, outproj_bias)

    mamba2_split_conv1d_scan_combined.__wrapped__ = fused
    setattr(mamba2_split_conv1d_scan_combined, _OUTPROJ_OUTSIDE, True)
    return mamba2_split_conv1d_scan_combined


def _wrap_once(owner: object, name: str, wrap: Callable[[Callable], Callable], mark: str) -> bool:
    """Replace `owner.name` by `wrap(owner.name)` unless a wrapper carrying `mark` is there; False if there is none."""
    current = getattr(owner, name, None) if owner is not None else None
    if current is None:
        return False
    if not getattr(current, mark, False):
        setattr(owner, name, wrap(current))
    return True


@contextlib.contextmanager
def _unwrapped(owner: object, name: str, mark: str) -> Iterator[None]:
    """Inside: `owner.name` is what the wrapper carrying `mark` wraps (nothing changes without that wrapper)."""
    current = getattr(owner, name, None) if owner is not None else None
    if not getattr(current, mark, False):
        yield
        return
    setattr(owner, name, current.__wrapped__)
    try:
        yield
    finally:
        setattr(owner, name, current)


def keep_frozen_outproj_outside(module: ModuleType) -> bool:
    """Put `frozen_outproj_outside` over the module's fused training kernel (idempotent); False if it has none."""
    return _wrap_once(module, FUSED_TRAINING_KERNEL, frozen_outproj_outside, _OUTPROJ_OUTSIDE)


RMS_NORM_CLASS = "NemotronHRMSNorm"
_NORM_KERNEL = "_rms_norm_kernel_on_cuda"


@functools.cache
def _rms_norm_kernel() -> Callable | None:
    """mamba-ssm's fused RMSNorm (Triton, forward and backward), or None where mamba-ssm is not installed."""
    try:
        from mamba_ssm.ops.triton.layer_norm import rms_norm_fn
    except ImportError:
        return None
    return rms_norm_fn


def rms_norm_kernel_on_cuda(reference: Callable) -> Callable:
    """An RMSNorm `forward` that runs mamba-ssm's fused kernel for CUDA tensors and `reference` for others.

    transformers' NemotronH RMSNorm is six elementwise ops over a float32 copy of the hidden states, and autograd
    keeps [tokens, hidden] float32 tensors per norm for the backward (57 norms in Nano-9B-v2). The kernel computes
    in float32 in one pass (statistics and the weight multiply, one rounding to the input dtype at the end) and keeps
    only the input and the per-row inverse RMS; tests/test_kernel_calls.py compares it with transformers' norm.
    """

    @functools.wraps(reference)
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        kernel = _rms_norm_kernel() if hidden_states.device.type in KERNEL_DEVICE_TYPES else None
        if kernel is None:
            return reference(self, hidden_states)
        return kernel(hidden_states, self.weight, None, eps=self.variance_epsilon)

    setattr(forward, _NORM_KERNEL, True)
    return forward


def fuse_rms_norms(module: ModuleType) -> bool:
    """Give the module's RMSNorm class `rms_norm_kernel_on_cuda` (idempotent); False if it has no such class."""
    return _wrap_once(getattr(module, RMS_NORM_CLASS, None), "forward", rms_norm_kernel_on_cuda, _NORM_KERNEL)


@contextlib.contextmanager
def transformers_kernel_calls(module: ModuleType) -> Iterator[None]:
    """Inside: the module runs as transformers wrote it, without `frozen_outproj_outside` and the fused RMSNorm
    (baselines such as TRL as it runs elsewhere, and the tests that compare both ways)."""
    with _unwrapped(module, FUSED_TRAINING_KERNEL, _OUTPROJ_OUTSIDE), \
            _unwrapped(getattr(module, RMS_NORM_CLASS, None), "forward", _NORM_KERNEL):
        yield


def _route_nemotron_h() -> None:
    try:
        module = importlib.import_module("transformers.models.nemotron_h.modeling_nemotron_h")
    except ImportError:  # a transformers without NemotronH: nothing of ours to route
        return
    route_module(module)
    keep_frozen_outproj_outside(module)
    fuse_rms_norms(module)


_route_nemotron_h()
