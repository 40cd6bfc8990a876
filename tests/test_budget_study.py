"""The budget study's figures over seeds (alignment/budget_study.py), on hand-made eval.json files."""

from __future__ import annotations

import json

import pytest

from alignment.budget_study import combine, read_seeds, write_budget_report


def cell(budget, correct, tokens, well_formed=1.0):
    return {"budget": budget, "correct": correct, "accuracy": sum(correct) / len(correct), "well_formed": well_formed,
            "mean_thinking_tokens": tokens, "reference_fits": None if budget is None else 0.1,
            "minimal_fits": None if budget is None else 0.5}


def summary(unlimited, at_16, at_32, tokens):
    return {"row_ids": list(range(len(unlimited))),
            "budget_sweep": [cell(16, at_16, 16.0), cell(32, at_32, 30.0, 0.99), cell(None, unlimited, tokens)]}


def seeds():
    # 10 rows; the trained model thinks 60 tokens unlimited (half: 30, nearest budget 32)
    plain_u, plain_32 = [1] * 6 + [0] * 4, [1] * 2 + [0] * 8
    trained_u, trained_32 = [1] * 6 + [0] * 4, [1] * 5 + [0] * 5
    seed0 = {"sft-plain": summary(plain_u, [0] * 10, plain_32, 50.0),
             "sft-budget": summary(trained_u, [1] + [0] * 9, trained_32, 60.0)}
    seed1 = {"sft-plain": summary([1] * 5 + [0] * 5, [0] * 10, [1] * 1 + [0] * 9, 52.0),
             "sft-budget": summary([1] * 5 + [0] * 5, [0] * 10, [1] * 5 + [0] * 5, 64.0)}
    return [seed0, seed1]


def test_the_figures_at_half_the_thinking_length():
    study = combine(seeds())
    half = study["at_half"]
    assert half["unlimited_thinking_tokens"] == 62.0 and half["budget"] == 32  # 31 is nearest 32
    trained = half["retention_sft-budget"]
    assert trained["per_seed"] == pytest.approx([5 / 6, 1.0]) and trained["value"] == pytest.approx(11 / 12)
    plain = half["retention_sft-plain"]
    assert plain["per_seed"] == pytest.approx([2 / 6, 1 / 5])
    gain = half["retention_gain_over_plain"]
    assert gain["value"] == pytest.approx(11 / 12 - (2 / 6 + 1 / 5) / 2)
    assert gain["stderr"] > 0 and gain["stderr"] == pytest.approx((gain["stderr_eval"] ** 2 + gain["stderr_seeds"] ** 2) ** 0.5)
    assert half["unlimited_accuracy_vs_plain"]["value"] == pytest.approx(0.0)
    assert half["well_formed_min"] == {"sft-plain": 0.99, "sft-budget": 0.99}
    curve = study["curves"]["sft-budget"]
    assert [c["accuracy"]["value"] for c in curve] == pytest.approx([0.05, 0.5, 0.55])
    assert curve[1]["mean_thinking_tokens"] == 30.0 and curve[1]["minimal_fits"] == 0.5


def test_the_report_and_plot_are_written(tmp_path):
    dirs = []
    for i, seed in enumerate(seeds()):
        (tmp_path / f"s{i}").mkdir()
        (tmp_path / f"s{i}" / "eval.json").write_text(json.dumps(seed))
        dirs.append(str(tmp_path / f"s{i}"))
    write_budget_report(dirs, str(tmp_path / "out"))
    report = (tmp_path / "out" / "report.md").read_text()
    assert "At budget 32" in report and "sft-budget keeps 0.917" in report
    assert (tmp_path / "out" / "budget_curve.png").stat().st_size > 0
    assert json.loads((tmp_path / "out" / "budget_study.json").read_text())["seeds"] == 2


def test_seeds_must_match(tmp_path):
    a, b = seeds()
    del b["sft-plain"]
    for name, seed in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval.json").write_text(json.dumps(seed))
    with pytest.raises(ValueError, match="has models"):
        read_seeds([str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(FileNotFoundError, match="no eval.json"):
        read_seeds([str(tmp_path / "missing")])


def test_a_model_with_no_correct_unlimited_answer_has_no_share():
    from alignment.budget_study import markdown

    seed = seeds()[0]
    seed["sft-plain"] = summary([0] * 10, [0] * 10, [0] * 10, 50.0)
    report = markdown(combine([seed]))
    assert "sft-plain: no correct answer without a budget, so no share" in report
    assert "nan" not in report
