"""`align export`: the LoRA adapter alone loads with peft onto its base and gives the merged checkpoint's logits;
the full weights come in shards under the size limit and give the same logits; both carry the chat template and a
model card with the checkpoint's figures."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignment.checkpoint import save_model_checkpoint, write_checkpoint
from alignment.cli import main
from alignment.lora import LoraConfig, apply_lora
from alignment.modeling import ModelConfig, load_model, load_tokenizer
from tests.conftest import REPO, TINY_MODEL

TOKENIZER = str(REPO / "configs" / "tiny" / "tokenizer")


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory):
    """A base checkpoint, and a LoRA stage's checkpoint on it with adapters far from zero (a real difference)."""
    root = tmp_path_factory.mktemp("export")
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(TINY_MODEL), tokenizer=TOKENIZER))
    base_model = load_model(ModelConfig(name_or_path=str(TINY_MODEL), tokenizer=TOKENIZER, init_seed=0))

    def write(tmp):
        base_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    base = write_checkpoint(root / "base" / "checkpoint", write, {"stage": "sft"})
    model = apply_lora(load_model(ModelConfig(name_or_path=str(base))), LoraConfig(enabled=True, r=4))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    stage = root / "sft"
    checkpoint = save_model_checkpoint(stage / "checkpoint", model, tokenizer, {"stage": "sft"})
    (stage / "eval.json").write_text(json.dumps({"accuracy_think": 0.61, "accuracy_think_stderr": 0.03,
                                                 "accuracy_no_think": 0.02, "budget_sweep": []}))
    return base, checkpoint


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_the_adapter_on_its_base_gives_the_merged_models_logits(lora_checkpoint, tmp_path):
    from peft import PeftModel

    base, checkpoint = lora_checkpoint
    out = tmp_path / "adapter"
    assert main(["export", str(checkpoint), "--out", str(out), "--adapter"]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "README.md"} <= {
        p.name for p in out.iterdir()}
    assert not list(out.glob("model*.safetensors"))  # the adapter alone
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    merged = logits(AutoModelForCausalLM.from_pretrained(checkpoint), ids)
    base_logits = logits(AutoModelForCausalLM.from_pretrained(base), ids)
    adapted = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out), ids)
    assert (merged - base_logits).abs().max() > 1e-2  # the adapter changes the model
    assert (adapted - merged).abs().max() < 1e-5
    card = (out / "README.md").read_text()
    assert "PeftModel.from_pretrained" in card and "| accuracy think | 0.610 ± 0.030 |" in card

    named = tmp_path / "named"
    assert main(["export", str(checkpoint), "--out", str(named), "--adapter", "--base", "org/base-model"]) == 0
    assert json.loads((named / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/base-model"


def test_full_weights_come_in_shards_under_the_limit(lora_checkpoint, tmp_path, capsys):
    base, checkpoint = lora_checkpoint
    out = tmp_path / "full"
    assert main(["export", str(checkpoint), "--out", str(out), "--max-shard-size", "2MB"]) == 0
    shards = list(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and all(s.stat().st_size <= 2_100_000 for s in shards)
    ids = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(2))
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out), ids),
                       logits(AutoModelForCausalLM.from_pretrained(checkpoint), ids))
    assert (out / "chat_template.jinja").is_file() and "0.610" in (out / "README.md").read_text()
    assert main(["export", str(base), "--out", str(tmp_path / "x"), "--adapter"]) == 2  # no adapter kept there
    assert "only a stage trained with lora.enabled=true" in capsys.readouterr().err
