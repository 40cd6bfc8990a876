"""`align merge`: alpha 0 and 1 give the inputs back bit for bit, 0.5 the hand average, shard by shard within one
model's size plus one shard of memory; checkpoints of different architectures are refused."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignment.checkpoint import verify_checkpoint, write_checkpoint
from alignment.cli import main
from alignment.merge import MergeError, merge_checkpoints
from alignment.modeling import ModelConfig, load_model, load_tokenizer
from tests.conftest import REPO, TINY_MODEL


def weights(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors |= load_file(shard)
    return tensors


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """Two tiny hybrids of different initialisations, each saved in several shards."""
    root = tmp_path_factory.mktemp("merge")
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(TINY_MODEL), tokenizer=str(REPO / "configs/tiny/tokenizer")))
    paths = []
    for seed in (0, 1):
        model = load_model(ModelConfig(name_or_path=str(TINY_MODEL), tokenizer=str(REPO / "configs/tiny/tokenizer"),
                                       init_seed=seed))

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp, max_shard_size="2MB")
            tokenizer.save_pretrained(tmp)

        paths.append(write_checkpoint(root / f"seed{seed}", write, {"stage": "sft", "fingerprint": f"fp{seed}"}))
    assert len(list(paths[0].glob("*.safetensors"))) > 1  # the merge really goes shard by shard
    return paths


def test_alpha_0_and_1_give_the_inputs_back_bit_for_bit_and_half_is_the_average(two_checkpoints, tmp_path):
    a, b = two_checkpoints
    w_a, w_b = weights(a), weights(b)
    assert any(not torch.equal(w_a[k], w_b[k]) for k in w_a)
    for alpha, expected in ((0.0, w_a), (1.0, w_b)):
        merged = weights(merge_checkpoints(a, b, alpha, tmp_path / f"alpha{alpha}"))
        assert merged.keys() == expected.keys()
        assert all(torch.equal(merged[k], expected[k]) and merged[k].dtype == expected[k].dtype for k in merged)
    half = merge_checkpoints(a, b, 0.5, tmp_path / "half")
    merged = weights(half)
    for name, value in merged.items():
        assert torch.equal(value, (w_a[name] + w_b[name]) / 2), name
    manifest = verify_checkpoint(half)
    assert manifest["alpha"] == 0.5 and manifest["inputs"] == {"a": str(a.resolve()), "b": str(b.resolve())}
    assert manifest["input_fingerprints"] == {"a": "fp0", "b": "fp1"}
    assert (half / "chat_template.jinja").is_file() or (half / "tokenizer_config.json").is_file()
    model = load_model(ModelConfig(name_or_path=str(half)))  # an ordinary checkpoint for every stage
    state = model.state_dict()
    name = next(k for k in merged if k in state)
    assert torch.equal(state[name], merged[name])


def test_different_architectures_and_bad_alphas_are_refused(two_checkpoints, tmp_path, capsys):
    a, _ = two_checkpoints
    other = tmp_path / "other"
    other.mkdir()
    for path in a.iterdir():
        (other / path.name).write_bytes(path.read_bytes())
    config = json.loads((other / "config.json").read_text())
    config["intermediate_size"] = config["intermediate_size"] * 2
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(MergeError, match="intermediate_size"):
        merge_checkpoints(a, other, 0.5, tmp_path / "out")
    assert main(["merge", str(a), str(a), "--alpha", "1.5", "--out", str(tmp_path / "out")]) == 2
    assert "must be in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_merge_memory_stays_under_one_model_plus_one_shard():
    """Measured by bench/merge_memory.py on two synthetic 8-shard float32 checkpoints of 64 MiB each: loading both
    inputs whole would take twice the model's size."""
    result = subprocess.run([sys.executable, "bench/merge_memory.py", "--shards", "8", "--shard-mb", "8"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["model_mb"] == 64
    assert figures["peak_over_model_plus_shard"] < 1, figures


def test_the_pipeline_report_plots_the_merges_against_alpha(tmp_path):
    """The report's merge table and plot: A at 0, the merges by alpha, B at 1, from the eval stage's figures."""
    from alignment.report import write_report

    def summary(accuracy):
        cell = {"budget": 16, "accuracy": accuracy / 2, "well_formed": 1.0, "mean_thinking_tokens": 8.0,
                "mean_answer_tokens": 9.0}
        return {"accuracy_think": accuracy, "accuracy_no_think": 0.0, "toggle_compliance": 1.0,
                "well_formed_think": 1.0, "mean_thinking_tokens": 30.0, "budget_sweep": [cell]}

    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "eval.json").write_text(json.dumps(
        {"sft": summary(0.5), "grpo": summary(0.7), "alpha-0.25": summary(0.55), "alpha-0.5": summary(0.65)}))
    (tmp_path / "merge").mkdir()
    merges = {f"alpha-{x:g}": {"checkpoint": str(tmp_path / "merge" / f"alpha-{x:g}" / "checkpoint"), "alpha": x}
              for x in (0.5, 0.25)}
    (tmp_path / "merge" / "stage.json").write_text(json.dumps({"result": {
        "a": str(tmp_path / "sft" / "checkpoint"), "b": str(tmp_path / "grpo" / "checkpoint"), "merges": merges}}))
    write_report(tmp_path, ["sft", "grpo", "merge"], {})
    report = (tmp_path / "report.md").read_text()
    assert "## Merges: (1 - alpha) * sft + alpha * grpo" in report
    assert "| 0 | sft | 0.500 | 0.000 | 0.250 |" in report and "| 1 | grpo | 0.700 | 0.000 | 0.350 |" in report
    sweep = json.loads((tmp_path / "merge_sweep.json").read_text())
    assert [(p["alpha"], p["model"]) for p in sweep] == [(0, "sft"), (0.25, "alpha-0.25"), (0.5, "alpha-0.5"),
                                                         (1, "grpo")]
    assert (tmp_path / "merge_sweep.png").stat().st_size > 1000


def test_merge_stage_inputs_name_earlier_stages_or_folders(two_checkpoints, tmp_path):
    from alignment.config import ConfigError, load_config
    from alignment.merge import MergeConfig, run_merge
    from alignment.pipeline import _wire_merge_inputs

    config = load_config(MergeConfig, None, ["a=sft", f"b={two_checkpoints[1]}", "alphas=[0.5]",
                                             f"output_dir={tmp_path}"])
    _wire_merge_inputs(config, {"sft": str(two_checkpoints[0])})
    assert config.a == str(two_checkpoints[0]) and config.b == str(two_checkpoints[1].resolve())
    result = run_merge(config)
    assert result["merges"]["alpha-0.5"]["checkpoint"] == str(tmp_path / "alpha-0.5" / "checkpoint")
    verify_checkpoint(tmp_path / "alpha-0.5" / "checkpoint")
    with pytest.raises(ConfigError, match="merge.b: 'grpo' is neither a stage"):
        _wire_merge_inputs(load_config(MergeConfig, None, ["a=sft"]), {"sft": str(two_checkpoints[0])})
    with pytest.raises(ConfigError, match="merge.alphas .* strictly between 0 and 1"):
        load_config(MergeConfig, None, ["alphas=[0,0.5]"])


def test_a_sweep_merges_at_each_alpha_and_evaluates_the_inputs_and_merges(two_checkpoints, tiny_data, tmp_path):
    a, b = two_checkpoints
    out = tmp_path / "sweep"
    assert main(["merge", str(a), str(b), "--alphas", "0.5", "--out", str(out), "--eval-config",
                 "configs/tiny/eval.yaml", f"eval.test_path={tiny_data / 'test.jsonl'}", "eval.max_samples=2",
                 "eval.max_new_tokens=8", "eval.budgets=[null]", "eval.tool_test_path="]) == 0
    sweep = json.loads((out / "merge_sweep.json").read_text())
    assert [(p["alpha"], p["model"]) for p in sweep] == [(0, "seed0"), (0.5, "alpha-0.5"), (1, "seed1")]
    assert all(0 <= p["accuracy_think"] <= 1 for p in sweep) and (out / "merge_sweep.png").is_file()
    assert verify_checkpoint(out / "alpha-0.5")["alpha"] == 0.5
