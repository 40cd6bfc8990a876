"""LoRA adapters computed in the model's dtype: float32 weights, no float32 copies of the activations."""

import pytest
import torch

from alignment.config import ConfigError, load_config
from alignment.lora import InputDtypeLinear, apply_lora
from alignment.modeling import ModelConfig, load_model
from alignment.sft import SFTConfig
from tests.conftest import TINY_MODEL


def adapted(dtype: str, compute_dtype: str, seed: int = 0):
    torch.manual_seed(seed)
    lora = load_config(SFTConfig, None, ["lora.enabled=true", f"lora.compute_dtype={compute_dtype}"]).lora
    model = apply_lora(load_model(ModelConfig(name_or_path=str(TINY_MODEL), dtype=dtype)), lora)
    for name, param in model.named_parameters():  # non-zero B, so the adapters change the output
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model


def adapter_inputs(model) -> set[torch.dtype]:
    """The dtypes the adapters' first matmuls receive in one forward."""
    seen = set()
    hooks = [m.register_forward_pre_hook(lambda _m, args: seen.add(args[0].dtype))
             for name, m in model.named_modules() if name.endswith("lora_A.default")]
    model(input_ids=torch.randint(5, 300, (2, 24)))
    for hook in hooks:
        hook.remove()
    return seen


def test_in_float32_both_ways_give_the_same_outputs_and_gradients():
    ids = torch.randint(5, 300, (2, 24))
    results = []
    for compute_dtype in ("model", "float32"):
        model = adapted("float32", compute_dtype)
        loss = model(input_ids=ids).logits.float().pow(2).mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b) and grads_a.keys() == grads_b.keys()
    assert all(torch.allclose(grads_a[n], grads_b[n], atol=1e-7, rtol=1e-6) for n in grads_a)


def test_in_bf16_the_adapters_run_in_bf16_on_float32_weights():
    model = adapted("bfloat16", "model")
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert adapter_inputs(model) == {torch.bfloat16}  # no float32 copy of the activations
    assert adapter_inputs(adapted("bfloat16", "float32")) == {torch.float32}  # peft's way casts every input

    layer = next(m for n, m in model.named_modules() if n.endswith("layers.0.mixer.in_proj"))
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    slow = layer.base_layer(x) + (x @ A.to(torch.bfloat16).T) @ B.to(torch.bfloat16).T * layer.scaling["default"]
    assert torch.equal(layer(x), slow)  # the same bf16 products, written out
    layer(x).float().sum().backward()
    assert A.grad.dtype == torch.float32 and A.grad.abs().sum() > 0


def test_both_ways_agree_in_bf16_within_its_precision():
    ids = torch.randint(5, 300, (2, 24))
    fast, peft_way = (adapted("bfloat16", c)(input_ids=ids).logits.float() for c in ("model", "float32"))
    assert (fast - peft_way).abs().max() < 0.05 * peft_way.abs().max()


def test_merging_folds_the_adapters_into_the_weights():
    model = adapted("float32", "model")
    ids = torch.randint(5, 300, (2, 24))
    live = model(input_ids=ids).logits
    assert any(isinstance(m, InputDtypeLinear) for m in model.modules())
    merged = model.merge_and_unload()
    assert torch.allclose(merged(input_ids=ids).logits, live, atol=1e-5)


def test_an_unknown_compute_dtype_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="compute_dtype"):
        load_config(SFTConfig, None, ["lora.compute_dtype=half"])
