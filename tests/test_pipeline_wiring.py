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


def test_rm_stage_trains_from_the_policy_and_later_stages_score_with_it(tmp_path):
    from alignment.evaluate import EvalRunConfig
    from alignment.pipeline import PipelineConfig, _wire_reward_model, stage_entry
    from alignment.reward_model import RMConfig

    data_dir = tmp_path / "run" / "data"
    assert stage_entry("rm")[0] is RMConfig
    rm = load_config(RMConfig, "configs/tiny/rlhf/rm.yaml", [])
    _wire("rm", rm, tmp_path / "run", "/models/sft", data_dir)
    assert rm.model.name_or_path == "/models/sft" and Path(rm.data.pairs_path) == data_dir / "preferences.jsonl"
    grpo = load_config(GRPOConfig, "configs/tiny/rlhf/grpo.yaml", [])
    _wire("grpo", grpo, tmp_path / "run", "/models/sft", data_dir)
    _wire_reward_model(grpo, "/run/rm/checkpoint")
    assert Path(grpo.data.train_path) == data_dir / "chat_rl.jsonl"
    assert [s.args["checkpoint"] for s in grpo.rewards.routes["chat"] if s.name == "reward_model"] == \
        ["/run/rm/checkpoint"]
    assert grpo.eval.reward_model == "/run/rm/checkpoint"
    final = load_config(EvalRunConfig, "configs/tiny/eval.yaml", [])
    _wire_reward_model(final, "/run/rm/checkpoint")
    assert final.eval.reward_model == "/run/rm/checkpoint"
    assert "rm" not in load_config(PipelineConfig, None, []).stages  # opt-in, like merge
    load_config(PipelineConfig, "configs/tiny/rlhf/pipeline.yaml", [])


def test_the_fingerprint_ignores_options_left_at_their_defaults():
    """A new option, left at its default, must not rerun finished stages; a changed setting must."""
    from alignment.pipeline import _fingerprint

    base = load_config(GRPOConfig, "configs/tiny/grpo.yaml", [])
    assert _fingerprint(base, "up") == _fingerprint(load_config(GRPOConfig, "configs/tiny/grpo.yaml", [
        f"eval.reward_model={GRPOConfig().eval.reward_model}", f"loss.kl_coef={GRPOConfig().loss.kl_coef}"]), "up")
    assert _fingerprint(base, "up") != _fingerprint(load_config(GRPOConfig, "configs/tiny/grpo.yaml", [
        "train.max_steps=7"]), "up")
    assert _fingerprint(base, "up") != _fingerprint(base, "other")
    assert _fingerprint(base, "up") == _fingerprint(load_config(GRPOConfig, "configs/tiny/grpo.yaml", [
        "tracking.report_to=[]"]), "up")  # where logs go changes no result
