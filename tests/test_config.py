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
