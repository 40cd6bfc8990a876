"""Every config file under configs/ loads: stage configs through the typed loader, the others as YAML/JSON."""

from pathlib import Path

import pytest
import yaml

from alignment.config import load_config
from alignment.sft import SFTConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SFT_CONFIGS = sorted(CONFIGS.rglob("sft*.yaml"))
# Other stages' configs load through their classes (module, class name) when the stage module is present.
STAGE_CONFIGS = {"dpo": ("alignment.dpo", "DPOConfig"), "grpo": ("alignment.grpo", "GRPOConfig"),
                 "pipeline": ("alignment.pipeline", "PipelineConfig"), "eval": ("alignment.evaluate", "EvalRunConfig"),
                 "data": ("data_recipes.synthetic_math", "MathDataConfig")}
OTHER_YAML = sorted(set(CONFIGS.rglob("*.yaml")) - set(SFT_CONFIGS))


def test_the_real_model_configs_are_found():
    names = {str(p.relative_to(CONFIGS)) for p in SFT_CONFIGS}
    assert {"nano9b/sft.yaml", "nano9b/sft_lora.yaml", "qwen/sft.yaml", "tiny/sft.yaml"} <= names


@pytest.mark.parametrize("path", SFT_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_sft_config_loads(path):
    config = load_config(SFTConfig, path)
    if "nano9b" in path.parts:
        assert config.model.dtype == "bfloat16"
        assert config.train.lr == (1e-4 if config.lora.enabled else 5e-6)


@pytest.mark.parametrize("path", OTHER_YAML, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_other_config_parses_or_loads(path):
    assert isinstance(yaml.safe_load(path.read_text()), dict)
    stage = path.stem.split("_")[0]  # grpo_full.yaml, pipeline_full.yaml and data_redundant.yaml too
    if stage in STAGE_CONFIGS:
        module_name, class_name = STAGE_CONFIGS[stage]
        module = pytest.importorskip(module_name)
        load_config(getattr(module, class_name), path)


def test_deepspeed_config_is_zero3_and_follows_the_stage():
    from alignment.zero import deepspeed_config

    path = str(CONFIGS / "deepspeed" / "zero3.json")
    config = deepspeed_config(path, max_grad_norm=1.0, grad_accum=32, world=8, bf16=True)
    assert config["zero_optimization"]["stage"] == 3 and config["bf16"]["enabled"] is True
    assert config["train_batch_size"] == 256 and config["gradient_accumulation_steps"] == 32
    assert deepspeed_config(path, max_grad_norm=1.0, grad_accum=1, world=1, bf16=False)["bf16"]["enabled"] is False
