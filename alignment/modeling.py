"""Loading models and tokenizers: the embedded tiny hybrid (built from a config file), local checkpoints, hub ids.

Every model loaded here has its Mamba kernels routed by device (alignment/mamba_kernels.py): CUDA tensors run the
kernels, CPU tensors the PyTorch reference. The log says which path the model takes, so that it shows whether
training runs on the CUDA kernels or on the (slow, correct) PyTorch reference.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from alignment.chat_format import parse_chat_format, use_chat_format
from alignment.config import option
from alignment.mamba_kernels import kernel_path, route_kernels_by_device

log = logging.getLogger(__name__)

RECURRENT_LAYER_TYPES = {"mamba", "linear_attention", "mamba2", "ssm"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    """Which model to load and how."""

    name_or_path: str = option(
        "configs/tiny/model.json",
        "A model config .json (random init from `init_seed`), a local checkpoint directory, or a hub model id.",
        path="model",
    )
    tokenizer: str = option(
        "", "Tokenizer directory or hub id; empty means the same place as the model.", path="model"
    )
    dtype: str = option("float32", "Parameter dtype: float32, bfloat16 or float16.")
    init_seed: int = option(0, "Seed for random initialisation when building from a config file.")
    attn_implementation: str = option("sdpa", "Attention implementation passed to transformers (sdpa, eager, ...).")
    trust_remote_code: bool = option(False, "Allow model code from the hub repository (needed by some real models).")
    chat_format: str = option(
        "auto", "How the chat template switches reasoning and places the trace: auto (detected from renders, or the "
        "format saved with the tokenizer) or SWITCH+TRACE[+model-opens-think], e.g. keyword+inline (Nano 2), "
        "template-argument+field (Nemotron 3, Qwen3), system-prompt+inline (Llama-Nemotron); `align template` shows it.",
    )

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.chat_format != "auto":
            parse_chat_format(self.chat_format)


def load_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    source = config.tokenizer or config.name_or_path
    if source.endswith(".json"):
        raise ValueError(f"model.tokenizer must be set when model.name_or_path is a config file ({source})")
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=config.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    use_chat_format(tokenizer, source, config.chat_format)
    return tokenizer


def load_model(config: ModelConfig, device: str | torch.device = "cpu") -> PreTrainedModel:
    """The model `config` names, in `config.dtype`, made or read where it will run: no CPU copy on the way.

    A config file (.json) is a random init built on `device` itself (a 9B config initialised on the CPU and then
    moved took 4 min 41 s; built on the GPU, 1.5 s). `init_seed` fixes the weights per device type: on the CPU
    they are those of a plain CPU init, CUDA draws from its own generator. A checkpoint directory or hub id is
    loaded straight onto `device`. The log line gives the seconds either took.
    """
    dtype = DTYPES[config.dtype]
    device = torch.device(device)
    path = config.name_or_path
    started = time.perf_counter()
    if path.endswith(".json"):
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"model config file not found: {path}")
        model_config = AutoConfig.for_model(**json.loads(file.read_text()))
        model_config._attn_implementation = config.attn_implementation
        torch.manual_seed(config.init_seed)  # seeds the CPU and every CUDA generator
        with device:  # parameters and buffers are created (and initialised) on `device`
            model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
        source, made = f"random init from {path} (seed {config.init_seed})", "built"
    else:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, device_map=device, attn_implementation=config.attn_implementation,
            trust_remote_code=config.trust_remote_code,
        )
        source, made = path, "loaded"
    model.to(device)  # a no-op unless the model class left a buffer elsewhere
    route_kernels_by_device(model)  # with the `gpu` extra installed, a model on the CPU must not reach CUDA kernels
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the seconds include the kernels that filled the weights
    seconds = time.perf_counter() - started
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s: %.2fM parameters, %s, device %s, %s in %.1f s, mamba path: %s", source, n_params / 1e6,
             config.dtype, device, made, seconds, mamba_kernel_path(model))
    return model


def layer_types(model: PreTrainedModel) -> list[str]:
    config = model.config
    for attr in ("layers_block_type", "layer_types"):
        value = getattr(config, attr, None)
        if isinstance(value, list):
            return value
    return []


def is_hybrid(model: PreTrainedModel) -> bool:
    """True when the model has recurrent (Mamba / SSM / linear attention) layers."""
    return any(t in RECURRENT_LAYER_TYPES for t in layer_types(model))


def mamba_kernels_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("mamba_ssm", "causal_conv1d"))


def mamba_kernel_path(model: PreTrainedModel) -> str:
    """The Mamba implementation the model runs on its current device; routes its kernels by device on the way."""
    if not is_hybrid(model):
        return "none (no recurrent layers)"
    return kernel_path(model)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
