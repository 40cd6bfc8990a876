"""Configs fail at load with the key and the file named."""

import pytest

from alignment.cli import main
from alignment.config import ConfigError, load_config
from alignment.sft import SFTConfig


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_and_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1.0e-4\n  max_steps: 5\n")
    config = load_config(SFTConfig, path, ["train.max_steps=7", "eval.budgets=[0, 8, null]", "lora.enabled=true"])
    assert config.train.lr == 1e-4 and config.train.max_steps == 7
    assert config.eval.budgets == [0, 8, None] and config.lora.enabled is True
    assert config.model.name_or_path == "configs/tiny/model.json"  # untouched default


def test_int_and_exponent_forms_are_accepted_for_float(tmp_path):
    assert load_config(SFTConfig, write(tmp_path, "train:\n  lr: 1\n")).train.lr == 1.0
    assert load_config(SFTConfig, write(tmp_path, "train:\n  lr: 1e-4\n"), ["train.min_lr_ratio=5e-2"]).train.lr == 1e-4


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("train:\n  lrr: 0.1\n", [], "unknown key `train.lrr` (did you mean `train.lr`?)"),
        ("train:\n  max_steps: many\n", [], "`train.max_steps` expects int, got 'many'"),
        ("train: 3\n", [], "`train` is a section"),
        ("", ["train.packing=maybe"], "`train.packing` expects true/false"),
        ("", ["train.schedule=linear"], "`train.schedule` must be one of"),
        ("", ["train.max_steps=0"], "max_steps, batch_size and grad_accum must be at least 1"),
        ("- a list\n", [], "top level must be a mapping"),
        ("", ["nokey"], "not of the form key=value"),
    ],
)
def test_bad_config_names_key_and_file(tmp_path, text, overrides, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(SFTConfig, path, overrides)
    assert message in str(info.value)
    if not overrides:
        assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(SFTConfig, tmp_path / "nope.yaml")


def test_cli_reports_config_errors(tmp_path, capsys):
    assert main(["sft", str(write(tmp_path, "bogus: 1\n"))]) == 2
    assert "unknown key `bogus`" in capsys.readouterr().err


def test_sft_help_lists_every_field(capsys):
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    text = capsys.readouterr().out
    for key in ("train.lr", "lora.target_modules", "data.truncation.fraction", "model.name_or_path", "eval.budgets"):
        assert key in text
    assert "Peak learning rate" in text


def test_eval_accepts_overrides_after_the_config_option(tmp_path, capsys):
    # `align eval CKPT --config FILE key=value`: the override must reach the config, not argparse.
    assert main(["eval", str(tmp_path / "ckpt"), "--config", str(tmp_path / "missing.yaml"), "output_dir=x"]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_help_lists_the_allowed_values_of_a_choice():
    from alignment.config import describe_fields
    from alignment.sft import SFTConfig

    rows = {key: type_name for key, type_name, _, _ in describe_fields(SFTConfig)}
    assert rows["data.truncation.budget_mode"] == "one of 'tokens', 'fraction'"


# Paths a config names are checked before a stage builds anything; the CLI prints bad input without a traceback.


def test_a_missing_data_file_fails_at_once_naming_its_key_and_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "runs" / "sft"
    code = main(["sft", "configs/tiny/sft.yaml", f"data.train_path={tmp_path / 'nope.jsonl'}", f"output_dir={out}"])
    err = capsys.readouterr().err
    assert code == 2 and f"`data.train_path`: no such file: {tmp_path / 'nope.jsonl'}" in err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()


def test_a_failed_run_removes_the_empty_folder_it_made_and_keeps_an_existing_one(tmp_path, capsys):
    bad, test = tmp_path / "bad.jsonl", tmp_path / "test.jsonl"
    bad.write_text("not json\n")
    test.write_text('{"prompt": "1+1?", "answer": "2"}\n')
    args = ["sft", "configs/tiny/sft.yaml", f"data.train_path={bad}", f"data.test_path={test}", "data.max_bad_fraction=0",
            "data.unpacked_paths=[]", "eval.tool_test_path="]
    assert main(args + [f"output_dir={tmp_path / 'new' / 'sft'}"]) == 2
    assert "1 of 1 rows are bad" in capsys.readouterr().err and not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    assert main(args + [f"output_dir={tmp_path / 'old' / 'sft'}"]) == 2
    assert (tmp_path / "old").is_dir()


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ConfigError, match="data.train_path"):
        main(["--debug", "sft", "configs/tiny/sft.yaml", f"data.train_path={tmp_path / 'nope.jsonl'}"])


def test_a_model_name_that_is_no_local_folder_is_tried_once_on_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    from alignment.config import check_paths

    calls = []

    def unreachable(repo_id, timeout):
        calls.append((repo_id, timeout))
        raise ConnectionError("no route to the hub")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    config = load_config(SFTConfig, None, ["model.name_or_path=my-modle"])
    with pytest.raises(ConfigError) as info:
        check_paths(config)
    message = str(info.value)
    assert "`model.name_or_path`: 'my-modle' is not a local folder" in message
    assert "ConnectionError: no route to the hub" in message and len(calls) == 1 and calls[0][1] <= 10
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="not in the local hub cache, and HF_HUB_OFFLINE is set"):
        check_paths(config)
    assert len(calls) == 1  # offline: no request at all


def test_paths_a_setting_leaves_unread_are_not_checked(tmp_path):
    from alignment.config import check_paths
    from alignment.dpo import DPOConfig

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("")
    config = load_config(DPOConfig, None, [
        "model.name_or_path=configs/tiny/model.json", "model.tokenizer=configs/tiny/tokenizer", "pairs.source=dataset",
        f"pairs.dataset_path={pairs}", "mining.prompts_path=/nowhere/rl.jsonl", "eval.test_path=configs/tiny/dpo.yaml",
    ])
    check_paths(config)  # mining.prompts_path is not read when the pairs come from a file
    with pytest.raises(ConfigError, match="`mining.prompts_path`: no such file: /nowhere/rl.jsonl"):
        check_paths(load_config(DPOConfig, None, ["model.name_or_path=configs/tiny/model.json",
                                                  "mining.prompts_path=/nowhere/rl.jsonl"]))


def test_pipeline_overrides_below_a_stage_reach_that_stage_config():
    from alignment.cli import split_stage_overrides

    own, stages = split_stage_overrides([
        "run_dir=/tmp/x", "sft.num_workers=2", "sft.train.max_steps=5", "grpo.eval.budgets=[0,16,null]",
        "sft.overrides=[lora.enabled=true]",
    ])
    assert own == ["run_dir=/tmp/x", "sft.num_workers=2", "sft.overrides=[lora.enabled=true]"]
    assert stages == {"sft": ["train.max_steps=5"], "grpo": ["eval.budgets=[0,16,null]"]}


def test_an_unknown_reward_fails_before_the_model_loads_naming_its_key(tmp_path, capsys, monkeypatch):
    from alignment import grpo

    monkeypatch.setattr(grpo, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    train, test = tmp_path / "rl.jsonl", tmp_path / "test.jsonl"
    train.write_text('{"prompt": "1+1?", "answer": "2"}\n')
    test.write_text('{"prompt": "2+2?", "answer": "4"}\n')
    code = main(["grpo", "configs/tiny/grpo.yaml", "model.name_or_path=configs/tiny/model.json",
                 "model.tokenizer=configs/tiny/tokenizer", f"data.train_path={train}", f"eval.test_path={test}",
                 "rewards.rewards=[{name: math}, {name: my_rewardz.polite:polite}]", f"output_dir={tmp_path / 'g'}"])
    err = capsys.readouterr().err
    assert code == 2 and "rewards.rewards[1].name: reward path 'my_rewardz.polite:polite' cannot be loaded" in err
