"""How the pipeline points each stage at the run's own data and upstream model (no Ray needed)."""

from pathlib import Path

from alignment.config import load_config
from alignment.dpo import DPOConfig
from alignment.grpo import GRPOConfig
from alignment.pipeline import _wire


def test_stages_read_the_runs_data_files_by_name(tmp_path):
    data_dir = tmp_path / "run" / "data"
    dpo = load_config(DPOConfig, "configs/tiny/dpo.yaml", [])
    _wire("dpo", dpo, tmp_path / "run", "/models/sft", data_dir)
    assert Path(dpo.mining.prompts_path) == data_dir / "rl.jsonl"  # fresh prompts stay fresh prompts
    assert Path(dpo.eval.test_path) == data_dir / "test.jsonl"
    tools = load_config(DPOConfig, "configs/tiny/tools/dpo.yaml", [])
    _wire("dpo", tools, tmp_path / "run", "/models/sft", data_dir)
    assert Path(tools.mining.tool_prompts_path) == data_dir / "tools_rl.jsonl"
    assert Path(tools.eval.tool_test_path) == data_dir / "tools_test.jsonl"
    from alignment.sft import SFTConfig

    sft = load_config(SFTConfig, "configs/tiny/tools/sft.yaml", [])
    _wire("sft", sft, tmp_path / "run", None, data_dir)
    assert sft.data.unpacked_paths == [str(data_dir / "tools_train.jsonl")]
    assert dpo.model.name_or_path == "/models/sft" and dpo.output_dir == str(tmp_path / "run" / "dpo")

    grpo = load_config(GRPOConfig, "configs/tiny/grpo.yaml", ["data.train_path=somewhere/train.jsonl"])
    _wire("grpo", grpo, tmp_path / "run", "/models/dpo", data_dir)
    assert Path(grpo.data.train_path) == data_dir / "train.jsonl"


def test_without_a_data_stage_local_paths_travel_as_absolute_paths(tmp_path):
    """Ray Train workers start in their own directory: relative paths would point nowhere there."""
    from alignment.sft import SFTConfig

    sft = load_config(SFTConfig, "configs/tiny/sft.yaml", ["train.deepspeed=configs/deepspeed/zero3.json",
                                                           "data.train_path=configs/tiny/data.yaml"])
    _wire("sft", sft, tmp_path / "run", None, None)
    assert sft.train.deepspeed == str(Path("configs/deepspeed/zero3.json").resolve())
    assert sft.data.train_path == str(Path("configs/tiny/data.yaml").resolve())  # any existing file will do
    assert sft.model.name_or_path == str(Path("configs/tiny/model.json").resolve())


def test_tool_sft_stage_starts_from_the_sft_checkpoint_and_reads_the_runs_tool_rows(tmp_path):
    from alignment.pipeline import PipelineConfig, stage_entry
    from alignment.sft import SFTConfig

    data_dir = tmp_path / "run" / "data"
    assert stage_entry("tool_sft")[0] is SFTConfig
    tool_sft = load_config(SFTConfig, "configs/tiny/tools/sft_after_math.yaml", [])
    _wire("tool_sft", tool_sft, tmp_path / "run", "/models/sft", data_dir)
    assert tool_sft.model.name_or_path == "/models/sft" and tool_sft.output_dir == str(tmp_path / "run" / "tool_sft")
    assert tool_sft.data.unpacked_paths == [str(data_dir / "tools_train.jsonl")]
    assert Path(tool_sft.data.train_path) == data_dir / "train.jsonl"  # math replayed beside the tool rows
    load_config(PipelineConfig, None, ["stages=[data,sft,tool_sft,dpo]", "tool_sft.num_workers=2"])  # an SFT stage
