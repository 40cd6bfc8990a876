"""`align export CHECKPOINT --out DIR`: a checkpoint as it is served.

- Full weights (the default): the merged model in safetensors shards of at most `--max-shard-size`.
- `--adapter`: the LoRA adapter alone (PEFT's `adapter_config.json` + `adapter_model.safetensors`, what `peft` and
  serving engines that take LoRA adapters load), naming its base model (`--base` replaces the local path the stage
  trained from with the name users load it by, e.g. a hub id).

Either way with the tokenizer and the model's own chat template, and a model card (`README.md`) holding the
checkpoint's held-out figures (its stage's `eval.json`, or `--eval`).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from alignment.checkpoint import ADAPTER_DIR, verify_checkpoint, write_checkpoint

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "generation_config.json")


class ExportError(ValueError):
    """A checkpoint that cannot be exported as asked."""


def export_checkpoint(checkpoint: str | Path, out: str | Path, adapter: bool = False, base: str | None = None,
                      max_shard_size: str = "5GB", eval_path: str | Path | None = None) -> Path:
    """Write the export of `checkpoint` at `out` (atomically); returns its path."""
    checkpoint = Path(checkpoint)
    manifest = verify_checkpoint(checkpoint)
    eval_path = Path(eval_path) if eval_path else checkpoint.parent / "eval.json"
    figures = _eval_figures(eval_path) if eval_path.is_file() else None
    if adapter and not (checkpoint / ADAPTER_DIR / "adapter_config.json").is_file():
        raise ExportError(f"{checkpoint}: no {ADAPTER_DIR}/adapter_config.json; only a stage trained with "
                          "lora.enabled=true keeps its adapter (export the full weights instead)")

    def write(tmp: Path) -> None:
        if adapter:
            for path in (checkpoint / ADAPTER_DIR).iterdir():
                shutil.copy2(path, tmp / path.name)
            adapter_config = json.loads((tmp / "adapter_config.json").read_text())
            if base:
                adapter_config["base_model_name_or_path"] = base
                (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
            base_name = adapter_config.get("base_model_name_or_path") or "(not recorded)"
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype="auto")
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
            base_name = None
        for name in TOKENIZER_FILES:
            if (checkpoint / name).is_file():
                shutil.copy2(checkpoint / name, tmp / name)
        (tmp / "README.md").write_text(model_card(checkpoint, manifest, figures, base_name))

    path = write_checkpoint(out, write, {"stage": "export", "source": str(checkpoint.resolve()),
                                         "kind": "adapter" if adapter else "full", "base": base,
                                         "max_shard_size": None if adapter else max_shard_size})
    log.info("export: %s of %s -> %s", "adapter" if adapter else "full weights", checkpoint, path)
    return path


def _eval_figures(path: Path) -> dict:
    """The figures of a stage's eval.json (GRPO's: the model after training)."""
    results = json.loads(path.read_text())
    results = results.get("after", results)
    if "accuracy_think" not in results and len(results) == 1:  # `align eval`: {model name: summary}
        results = next(iter(results.values()))
    return results


def model_card(checkpoint: Path, manifest: dict, figures: dict | None, base: str | None) -> str:
    """The model card: what the checkpoint is, how to load it, and its held-out figures."""
    from alignment.evaluate import model_label

    stage = manifest.get("stage", "?")
    lines = ["---", "library_name: " + ("peft" if base else "transformers"), "tags: [hybrid-align]"]
    if base:
        lines.append(f"base_model: {base}")
    lines += ["---", "", f"# {model_label(str(checkpoint), {})}", "",
              f"Exported from a hybrid-align `{stage}` checkpoint ({manifest.get('created', 'date not recorded')}).", ""]
    if base:
        lines += ["A LoRA adapter; load it onto its base model:", "", "```python",
                  "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
                  f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "PATH")',
                  "```", ""]
    lines += ["The chat template is the model's own (`chat_template.jinja`): reasoning on by default, off with "
              "`/no_think` in the system or user message where the template reads it.", ""]
    if figures:
        lines += ["## Held-out evaluation", "", "| measure | value |", "|---|---|"]
        for key in ("accuracy_think", "accuracy_no_think", "toggle_compliance", "well_formed_think"):
            if figures.get(key) is not None:
                stderr = figures.get(f"{key}_stderr")
                lines.append(f"| {key.replace('_', ' ')} | {figures[key]:.3f}"
                             + (f" ± {stderr:.3f}" if stderr is not None else "") + " |")
        for cell in figures.get("budget_sweep", []):
            if cell.get("budget") is not None:
                lines.append(f"| accuracy at thinking budget {cell['budget']} | {cell['accuracy']:.3f} |")
        tools = figures.get("tools") or {}
        for key in ("success_think", "hallucinated_think"):
            if key in tools:
                lines.append(f"| tool episodes: {key.replace('_', ' ')} | {tools[key]:.3f} |")
        lines.append("")
    else:
        lines += ["No evaluation was found beside the checkpoint (`--eval EVAL_JSON` names one).", ""]
    return "\n".join(lines) + "\n"
