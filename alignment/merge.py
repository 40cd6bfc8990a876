"""Checkpoint merging: `align merge CKPT_A CKPT_B --alpha A --out DIR` writes (1 - A) * w_A + A * w_B, the linear
interpolation Nano 2 uses to merge a reasoning-strong and a chat-strong checkpoint (A about 0.5); mergekit has no
`nemotron_h` architecture.

Shard by shard: each of A's weight files is read, merged with the same tensors of B and written before the next one
is opened, and each input file is closed after use, so a 9B merge holds about one shard of each input and one of
output, never two models. Alpha 0 and 1 copy A's and B's tensors as they are (bit for bit); other alphas are computed
in float32 and cast back to A's dtype. The output is a checkpoint like the stages' (written atomically, with a
manifest recording both inputs and alpha); its config, tokenizer and chat template are A's.

`--alphas 0.25,0.5,0.75 --eval-config configs/tiny/eval.yaml` merges at each alpha and evaluates the inputs and
every merge with `align eval`, plotting accuracy (reasoning on, off, each budget) against alpha.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from alignment.checkpoint import CorruptCheckpointError, read_manifest, write_checkpoint
from alignment.config import option

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# config.json keys that say nothing about the architecture (written by whichever run saved the checkpoint).
CONFIG_NOISE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"}


class MergeError(ValueError):
    """Two checkpoints that cannot be merged, or a bad alpha."""


def weight_files(directory: Path) -> dict[str, str]:
    """Tensor name -> the safetensors file (relative to `directory`) that holds it."""
    from safetensors import safe_open

    if (directory / INDEX).is_file():
        return dict(json.loads((directory / INDEX).read_text())["weight_map"])
    if (directory / SINGLE).is_file():
        with safe_open(directory / SINGLE, framework="pt") as handle:
            return {name: SINGLE for name in handle.keys()}
    raise MergeError(f"{directory}: no {SINGLE} or {INDEX}; merge takes full-weight safetensors checkpoints")


def _shapes(directory: Path, files: dict[str, str]) -> dict[str, list[int]]:
    from safetensors import safe_open

    shapes = {}
    for file in sorted(set(files.values())):
        with safe_open(directory / file, framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = list(handle.get_slice(name).get_shape())
    return shapes


def check_mergeable(a: Path, b: Path) -> tuple[dict[str, str], dict[str, str]]:
    """The weight maps of A and B, after checking they are one architecture: the same config (up to keys that
    describe the saving run), the same tensor names and shapes."""
    for directory in (a, b):
        if not (directory / "config.json").is_file():
            raise MergeError(f"{directory}: no config.json; not a model checkpoint")
    config_a, config_b = (
        {k: v for k, v in json.loads((d / "config.json").read_text()).items() if k not in CONFIG_NOISE} for d in (a, b))
    differing = sorted(k for k in config_a.keys() | config_b.keys() if config_a.get(k) != config_b.get(k))
    if differing:
        shown = ", ".join(f"{k}: {config_a.get(k)!r} vs {config_b.get(k)!r}" for k in differing[:3])
        raise MergeError(f"{a} and {b} are different architectures (config.json differs in {shown})")
    files_a, files_b = weight_files(a), weight_files(b)
    if files_a.keys() != files_b.keys():
        only = sorted(files_a.keys() ^ files_b.keys())
        raise MergeError(f"{a} and {b} hold different tensors ({len(only)} in one only, e.g. {only[0]})")
    shapes_a, shapes_b = _shapes(a, files_a), _shapes(b, files_b)
    for name in sorted(files_a):
        if shapes_a[name] != shapes_b[name]:
            raise MergeError(f"tensor {name}: shape {shapes_a[name]} in {a} but {shapes_b[name]} in {b}")
    return files_a, files_b


def interpolate(w_a: torch.Tensor, w_b: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - alpha) * w_a + alpha * w_b in A's dtype; alpha 0 and 1 return the input itself, bit for bit."""
    if alpha == 0:
        return w_a
    if alpha == 1:
        return w_b.to(w_a.dtype)
    if not w_a.is_floating_point():  # integer buffers (positions, counters) are not weights to average
        return w_a
    return ((1 - alpha) * w_a.float() + alpha * w_b.float()).to(w_a.dtype)


def merge_checkpoints(a: str | Path, b: str | Path, alpha: float, out: str | Path) -> Path:
    """Write the merge of checkpoints `a` and `b` at `alpha` as a checkpoint at `out`; returns its path."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    a, b = Path(a), Path(b)
    if not 0 <= alpha <= 1:
        raise MergeError(f"--alpha {alpha}: must be in [0, 1] (0 gives {a}, 1 gives {b})")
    files_a, files_b = check_mergeable(a, b)

    def write(tmp: Path) -> None:
        for shard in sorted(set(files_a.values())):
            names = sorted(n for n, f in files_a.items() if f == shard)
            merged: dict[str, torch.Tensor] = {}
            with safe_open(a / shard, framework="pt") as handle_a:
                metadata = handle_a.metadata()
                for b_file in sorted({files_b[n] for n in names}):
                    with safe_open(b / b_file, framework="pt") as handle_b:  # closed (unmapped) after its tensors
                        for name in (n for n in names if files_b[n] == b_file):
                            merged[name] = interpolate(handle_a.get_tensor(name), handle_b.get_tensor(name), alpha)
            save_file(merged, tmp / shard, metadata=metadata)
            log.info("merge: %s (%d tensors) written", shard, len(merged))
            del merged
            gc.collect()
        for path in sorted(a.iterdir()):  # config, tokenizer, chat template, the index: A's
            if path.is_file() and path.suffix != ".safetensors" and path.name != "manifest.json":
                shutil.copy2(path, tmp / path.name)

    manifest = {"stage": "merge", "alpha": alpha,
                "inputs": {"a": str(a.resolve()), "b": str(b.resolve())},
                "input_fingerprints": {"a": _fingerprint(a), "b": _fingerprint(b)},
                "formula": "(1 - alpha) * a + alpha * b"}
    path = write_checkpoint(out, write, manifest)
    log.info("merge: (1 - %g) * %s + %g * %s -> %s", alpha, a, alpha, b, path)
    return path


def _fingerprint(directory: Path) -> str | None:
    """The input checkpoint's own manifest fingerprint, when it has one (a stage's checkpoint)."""
    try:
        return read_manifest(directory).get("fingerprint")
    except CorruptCheckpointError:  # a plain HF folder, not one of our checkpoints
        return None


@dataclass
class MergeConfig:
    """The pipeline's merge stage: two earlier stages' checkpoints (or checkpoint paths) merged at each alpha; the
    eval stage then evaluates every merge beside the stages' models, and the report plots them against alpha."""

    a: str = option("sft", "Checkpoint A: an earlier stage of the pipeline (sft, tool_sft, dpo, grpo) or a path.")
    b: str = option("grpo", "Checkpoint B, of the same architecture: a stage or a path.")
    alphas: list = option([0.25, 0.5, 0.75], "Weights of B, each in (0, 1): one merge each, "
                                             "<output_dir>/alpha-<alpha>/checkpoint.")
    output_dir: str = option("runs/merge", "Where the merges go.")

    def validate(self) -> None:
        if not self.alphas or not all(isinstance(x, (int, float)) and 0 < x < 1 for x in self.alphas):
            raise MergeError(f"merge.alphas {self.alphas}: one or more numbers strictly between 0 and 1 (0 and 1 "
                             "are the inputs themselves, evaluated as their own stages)")


def run_merge(config: MergeConfig) -> dict:
    """Every merge of the stage; returns the inputs and, per merge, its checkpoint and alpha."""
    from alignment.runtime import setup_logging

    setup_logging()
    config.validate()
    merges = {}
    for alpha in sorted(set(config.alphas)):
        path = merge_checkpoints(config.a, config.b, alpha, Path(config.output_dir) / f"alpha-{alpha:g}" / "checkpoint")
        merges[f"alpha-{alpha:g}"] = {"checkpoint": str(path), "alpha": alpha}
    return {"a": str(config.a), "b": str(config.b), "merges": merges}


def sweep_points(results: dict[str, dict], a: str, b: str, merges: dict[str, float]) -> list[dict]:
    """Each model's figures by alpha: A (`a`, its name in `results`) at 0, the merges, B at 1."""
    order = [(0.0, a)] + sorted((alpha, name) for name, alpha in merges.items()) + [(1.0, b)]
    return [{"alpha": alpha, "model": name, **_figures(results[name])} for alpha, name in order if name in results]


def merge_sweep(a: str | Path, b: str | Path, alphas: list[float], out: str | Path, eval_config: str | None,
                eval_overrides: list[str]) -> dict:
    """Merge at each alpha into `out/alpha-<a>`, evaluate A, every merge and B in one `align eval`, and plot
    accuracy against alpha (`out/merge_sweep.png`, figures in `out/merge_sweep.json`)."""
    from alignment.config import load_config
    from alignment.evaluate import EvalRunConfig, run_eval

    out = Path(out)
    config = load_config(EvalRunConfig, eval_config, [*eval_overrides, f"output_dir={out / 'eval'}"])
    if config.sets:
        raise MergeError("merge --alphas evaluates on eval.test_path; leave `sets` out of its eval config")
    inner = sorted(x for x in set(alphas) if 0 < x < 1)
    merged = [str(merge_checkpoints(a, b, x, out / f"alpha-{x:g}")) for x in inner]
    results = run_eval([str(a), *merged, str(b)], config)
    names = list(results)  # in the order given, each named by its folder
    sweep = sweep_points(results, names[0], names[-1], dict(zip(names[1:-1], inner)))
    (out / "merge_sweep.json").write_text(json.dumps(sweep, indent=2))
    plot_sweep(sweep, out / "merge_sweep.png")
    return {"sweep": sweep, "plot": str(out / "merge_sweep.png")}


def _figures(summary: dict) -> dict:
    figures = {"accuracy_think": summary["accuracy_think"], "accuracy_no_think": summary["accuracy_no_think"]}
    for cell in summary.get("budget_sweep", []):
        if cell["budget"] is not None:
            figures[f"accuracy_budget_{cell['budget']}"] = cell["accuracy"]
    if summary.get("tools"):
        figures["tool_success_think"] = summary["tools"]["success_think"]
    return figures


def plot_sweep(sweep: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib
    except ImportError:  # the figures stay in the JSON
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    alphas = [p["alpha"] for p in sweep]
    for key in [k for k in sweep[0] if k.startswith(("accuracy", "tool_success"))]:
        label = key.replace("accuracy_", "").replace("_", " ")
        ax.plot(alphas, [p[key] for p in sweep], marker="o", label=label)
    ax.set_xlabel("alpha: (1 - alpha) * A + alpha * B")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
