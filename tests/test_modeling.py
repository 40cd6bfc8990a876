"""load_model: random init built on its device (same weights as a plain CPU init), dtype, timing, checkpoint loads."""

import json
import logging

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from alignment.modeling import ModelConfig, load_model
from tests.conftest import TINY_MODEL


def plain_cpu_init(seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The weights of the old path: seed, build on the CPU (then move)."""
    model_config = AutoConfig.for_model(**json.loads(TINY_MODEL.read_text()))
    model_config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(model_config, dtype=dtype).state_dict()


@pytest.mark.parametrize("seed,dtype", [(0, "float32"), (3, "bfloat16")])
def test_random_init_on_cpu_equals_the_plain_cpu_init(seed, dtype):
    expected = plain_cpu_init(seed, getattr(torch, dtype))
    got = load_model(ModelConfig(name_or_path=str(TINY_MODEL), dtype=dtype, init_seed=seed), "cpu").state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def test_random_init_is_built_under_the_device_and_dtype_asked_for():
    """The meta device stands in for a GPU here: nothing is made on the CPU and moved."""
    model = load_model(ModelConfig(name_or_path=str(TINY_MODEL), dtype="bfloat16"), "meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_log_line_gives_the_build_and_load_seconds(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="alignment.modeling"):
        model = load_model(ModelConfig(name_or_path=str(TINY_MODEL)))
    assert any("built in" in r.getMessage() and " s, mamba path" in r.getMessage() for r in caplog.records)
    model.save_pretrained(tmp_path / "ckpt")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="alignment.modeling"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "ckpt")))
    assert any("loaded in" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_checkpoint_round_trip_on_cpu(tmp_path, dtype):
    model = load_model(ModelConfig(name_or_path=str(TINY_MODEL), init_seed=1))
    with torch.no_grad():  # away from any initialisation, so a fresh init could not pass for a load
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(tmp_path / "ckpt")
    reloaded = load_model(ModelConfig(name_or_path=str(tmp_path / "ckpt"), dtype=dtype), "cpu")
    assert {p.device.type for p in reloaded.parameters()} == {"cpu"}
    assert {p.dtype for p in reloaded.parameters()} == {getattr(torch, dtype)}
    saved, loaded = model.state_dict(), reloaded.state_dict()
    assert saved.keys() == loaded.keys()
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor.to(getattr(torch, dtype))), name


@pytest.mark.parametrize("name,published_b", [("model_nano9b_v2.json", 8.89), ("model_nemotron_h_8b.json", 8.10)])
def test_real_architecture_configs_have_the_published_parameter_counts(name, published_b):
    """configs/nano9b/model_*.json (random init of the real architectures, bench/bench_scale.py) built on meta."""
    path = TINY_MODEL.parents[1] / "nano9b" / name
    model = load_model(ModelConfig(name_or_path=str(path), dtype="bfloat16"), "meta")
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == published_b
    assert model.config.vocab_size == 131072 and not model.config.tie_word_embeddings


@pytest.mark.parametrize("path", sorted(str(p.relative_to(TINY_MODEL.parents[2])) for p in
                                        TINY_MODEL.parents[1].glob("*/model*.json")))
def test_a_model_config_says_whether_its_embeddings_are_tied_as_built(path):
    """transformers builds NemotronH with its own lm_head whatever the flag says; a config claiming a tie would make
    peft untie it in the saved config at the first LoRA merge, with a warning, and mislead a reader."""
    model = load_model(ModelConfig(name_or_path=str(TINY_MODEL.parents[2] / path), dtype="bfloat16"), "meta")
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.config.tie_word_embeddings == tied, path
