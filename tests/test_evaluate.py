"""Evaluation grading: the well-formed rule and the share of reference traces that fit a thinking budget."""

import math

import pytest

from envs.answers import THINK_CLOSE
from alignment.evaluate import EvalConfig, judge, markdown_report, reference_fits


def test_well_formed_needs_one_close_a_boxed_answer_and_an_end():
    ok = judge(f"12 + 3 = 15\n{THINK_CLOSE}The result is \\boxed{{15}}.", True, True, 9, 64)
    assert ok["well_formed"] and ok["boxed"] == "15"
    assert not judge(f"a{THINK_CLOSE}b{THINK_CLOSE}\\boxed{{1}}", True, True, 5, 64)["well_formed"]  # two closes
    assert not judge(f"a{THINK_CLOSE}no answer", True, True, 3, 64)["well_formed"]
    assert not judge(f"a{THINK_CLOSE}\\boxed{{1}}", True, False, 3, 64)["well_formed"]  # cut at max_new_tokens
    assert not judge(f"a{THINK_CLOSE}\\boxed{{1}}", True, True, 65, 64)["well_formed"]  # answer too long
    assert judge("\\boxed{1}", False, True, 3, 64)["well_formed"]  # reasoning off: no close at all


def test_reference_fits_counts_traces_within_budget_and_grace(tokenizer):
    def row(trace):
        return {"messages": [{"role": "user", "content": "q"},
                             {"role": "assistant", "content": "a", "reasoning_content": trace}]}

    rows = [row("1 + 2 = 3\n"), row("12 * 3 = 36\n" * 3)]  # 8 and 30 tokens
    assert [len(tokenizer(r["messages"][-1]["reasoning_content"])["input_ids"]) for r in rows] == [8, 30]
    config = EvalConfig(grace_fraction=0.0)
    assert reference_fits(tokenizer, rows, [8, 7, 30, None], config) == [0.5, 0.0, 1.0, 1.0]
    # The grace window counts: budget 28 + int(2.8) = 30 tokens fit the long trace, budget 26 + 2 do not.
    assert reference_fits(tokenizer, rows, [28, 26], EvalConfig(grace_fraction=0.1)) == [1.0, 0.5]
    assert reference_fits(tokenizer, [{"messages": [{"role": "user", "content": "q"}]}], [8], config) == [None]


def test_report_shows_the_reference_column():
    cell = {"budget": 8, "accuracy": 0.1, "well_formed": 1.0, "mean_thinking_tokens": 8.0, "mean_answer_tokens": 9.0,
            "forced_fraction": 1.0, "reference_fits": 0.25}
    summary = {"accuracy_think": 0.5, "accuracy_no_think": 0.0, "toggle_compliance": 1.0, "mean_thinking_tokens": 30.0,
               "budget_sweep": [cell, dict(cell, budget=None, reference_fits=None)]}
    report = markdown_report({"m": summary})
    assert "| 8 | 0.100 | 1.000 | - | 8.0 | 9.0 | 1.00 | 0.250 |" in report and "| unlimited |" in report
    summary["budget_sweep"][0]["accuracy_well_formed"] = 0.05
    assert "| 8 | 0.100 | 1.000 | 0.050 | 8.0 |" in markdown_report({"m": summary})


def test_a_cell_counts_correct_ill_formed_answers_in_accuracy_only(tokenizer, monkeypatch):
    """Accuracy grades the boxed answer; `accuracy_well_formed` also needs the format (one close, short answer)."""
    import alignment.evaluate as evaluate
    from alignment.rollout.generation import GenerationResult

    completions = [
        f"1 + 2 = 3\n{THINK_CLOSE}The result is \\boxed{{3}}.",  # correct, well-formed
        f"1 + 2 =\n{THINK_CLOSE}1 + 2 = 3\n{THINK_CLOSE}\\boxed{{3}}",  # correct, thinking after the close
        f"1 + 2 = 3\n{THINK_CLOSE}The result is \\boxed{{4}}.",  # wrong, well-formed
    ]

    def scripted_generate(model, prompts, *, settings, budgets, reasoning, **_):
        ids = [tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for c in completions]
        return [GenerationResult(tokens=t, forced_mask=[False] * len(t), logprobs=[-1.0] * len(t), thinking_tokens=5, forced_close=False,
                                 finished=True) for t in ids]

    monkeypatch.setattr(evaluate, "generate", scripted_generate)
    rows = [{"messages": [{"role": "user", "content": "Start with 1. Add 2. What is the result?"}], "answer": "3"}] * 3
    cell = evaluate.run_cell(None, tokenizer, rows, True, 8, EvalConfig())
    assert (cell["accuracy"], cell["well_formed"], cell["accuracy_well_formed"]) == (2 / 3, 2 / 3, 1 / 3)


def test_pipeline_report_carries_the_reference_line(tmp_path):
    import json

    from alignment.report import write_report

    cell = {"budget": 8, "accuracy": 0.1, "well_formed": 1.0, "mean_thinking_tokens": 8.0, "mean_answer_tokens": 9.0,
            "forced_fraction": 1.0, "reference_fits": 0.25}
    summary = {"accuracy_think": 0.5, "accuracy_no_think": 0.0, "toggle_compliance": 1.0, "toggle_compliance_think": 1.0,
               "toggle_compliance_no_think": 1.0, "well_formed_think": 1.0, "mean_thinking_tokens": 30.0,
               "budget_sweep": [cell]}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "eval.json").write_text(json.dumps({"sft": summary}))
    metrics = write_report(tmp_path, ["sft"], {"sft": 1.0})
    assert metrics["stages"]["sft"]["budget_sweep"][0]["reference_fits"] == 0.25
    assert "| reference trace fits | 0.25 |" in (tmp_path / "report.md").read_text()


def test_an_unforced_close_in_the_middle_of_a_line_is_an_early_close(tokenizer, monkeypatch):
    import alignment.evaluate as evaluate
    from alignment.rollout.generation import GenerationResult

    completions = [  # (text, forced by the budget rule)
        (f"1 + 2 = 3\n{THINK_CLOSE}The result is \\boxed{{3}}.", False),  # closed at a line end
        (f"1 + 2 = 3{THINK_CLOSE}The result is \\boxed{{3}}.", False),  # closed mid-line on its own: early
        (f"{THINK_CLOSE}The result is \\boxed{{3}}.", False),  # closed before any trace: early
        (f"1 + 2{THINK_CLOSE}The result is \\boxed{{3}}.", True),  # cut mid-line by the budget rule: not early
    ]

    def scripted_generate(model, prompts, *, settings, budgets, reasoning, **_):
        results = []
        for text, forced in completions:
            t = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            results.append(GenerationResult(tokens=t, forced_mask=[False] * len(t), logprobs=[-1.0] * len(t),
                                            thinking_tokens=3, forced_close=forced, finished=True))
        return results

    monkeypatch.setattr(evaluate, "generate", scripted_generate)
    rows = [{"messages": [{"role": "user", "content": "Start with 1. Add 2. What is the result?"}], "answer": "3"}] * 4
    cell = evaluate.run_cell(None, tokenizer, rows, True, None, EvalConfig())
    assert cell["early_close_rate"] == 2 / 4
    assert evaluate.run_cell(None, tokenizer, rows, False, None, EvalConfig())["early_close_rate"] == 0


def test_k_samples_per_prompt_give_avg_maj_and_pass_at_k(tokenizer, monkeypatch):
    """Two prompts x 3 samples, scripted: avg@3, maj@3 and pass@3 by hand, with each mode's sampling settings."""
    import alignment.evaluate as evaluate
    from alignment.rollout.generation import GenerationResult

    answers = ["3", "4", "4",  # prompt 1 (answer 3): one right, the majority wrong
               "5", None, "5"]  # prompt 2 (answer 5): two right, one without an answer
    calls = []

    def scripted_generate(model, prompts, *, settings, budgets, reasoning, seed, stream_ids):
        calls.append((settings.temperature, settings.top_p, len(prompts), sorted(stream_ids)))
        results = []
        for answer in answers:
            text = f"1 + 2 = 3\n{THINK_CLOSE}" + ("no idea" if answer is None else f"\\boxed{{{answer}}}")
            t = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            results.append(GenerationResult(tokens=t, forced_mask=[False] * len(t), logprobs=[-1.0] * len(t),
                                            thinking_tokens=4, forced_close=False, finished=True))
        return results

    monkeypatch.setattr(evaluate, "generate", scripted_generate)
    rows = [{"messages": [{"role": "user", "content": "What is 1 + 2?"}], "answer": "3"},
            {"messages": [{"role": "user", "content": "What is 2 + 3?"}], "answer": "5"}]
    config = EvalConfig(samples_per_prompt=3, temperature=0.6, top_p=0.95)
    cell = evaluate.run_cell(None, tokenizer, rows, True, None, config)
    assert calls == [(0.6, 0.95, 6, list(range(6)))]  # reasoning on: the model card's sampling, 6 distinct streams
    assert cell["accuracy"] == pytest.approx((1 / 3 + 2 / 3) / 2) and cell["correct"] == pytest.approx([1 / 3, 2 / 3])
    assert cell["accuracy_stderr"] == pytest.approx(math.sqrt(((1 / 3 - 0.5) ** 2 + (2 / 3 - 0.5) ** 2) / 1 / 2))
    assert cell["maj_at_k"] == 0.5 and cell["pass_at_k"] == 1.0  # prompt 1's vote is 4; both have a right sample
    assert cell["maj_at_k_stderr"] == pytest.approx(0.5) and cell["pass_at_k_stderr"] == 0.0
    evaluate.run_cell(None, tokenizer, rows, False, None, config)
    assert calls[-1][:2] == (0.0, 1.0)  # reasoning off: greedy, as the model card recommends


def test_the_tokens_per_correct_answer_are_all_generated_tokens_over_the_correct_samples(tokenizer, monkeypatch):
    import alignment.evaluate as evaluate
    from alignment.rollout.generation import GenerationResult

    def scripted_generate(model, prompts, *, settings, budgets, reasoning, **_):
        results = []
        for answer in ("3", "4"):
            t = tokenizer(f"x\n{THINK_CLOSE}\\boxed{{{answer}}}", add_special_tokens=False)["input_ids"]
            results.append(GenerationResult(tokens=t + [tokenizer.eos_token_id], forced_mask=[False] * (len(t) + 1),
                                            logprobs=[-1.0] * (len(t) + 1), thinking_tokens=2, forced_close=False,
                                            finished=True))
        return results

    monkeypatch.setattr(evaluate, "generate", scripted_generate)
    rows = [{"messages": [{"role": "user", "content": "What is 1 + 2?"}], "answer": "3"}]
    cell = evaluate.run_cell(None, tokenizer, rows, True, None, EvalConfig(samples_per_prompt=2, temperature=1.0))
    # Both samples' tokens (2 trace tokens and the answer part each) over the one correct sample.
    assert cell["accuracy"] == 0.5 and cell["tokens_per_correct"] == pytest.approx(2 * (2 + cell["mean_answer_tokens"]))


def test_k_greedy_samples_are_refused():
    with pytest.raises(ValueError, match="k equal greedy"):
        EvalConfig(samples_per_prompt=4).validate()


def test_the_report_adds_the_sampled_figures_when_k_is_above_one():
    cell = {"budget": None, "accuracy": 0.5, "well_formed": 1.0, "mean_thinking_tokens": 8.0, "mean_answer_tokens": 9.0,
            "forced_fraction": 0.0}
    summary = {"accuracy_think": 0.5, "accuracy_think_stderr": 0.1, "accuracy_no_think": 0.25,
               "toggle_compliance": 1.0, "mean_thinking_tokens": 8.0, "budget_sweep": [cell], "samples_per_prompt": 8,
               "accuracy_think_sampling_stderr": 0.02, "maj_at_k_think": 0.6, "maj_at_k_think_stderr": 0.1,
               "pass_at_k_think": 0.9, "pass_at_k_think_stderr": 0.05, "tokens_per_correct_think": 40.0}
    report = markdown_report({"sft": summary})
    assert "| sft | 8 | 0.500 ± 0.100 (0.020) | 0.600 ± 0.100 | 0.900 ± 0.050 | 0.250 | 40.0 |" in report
    assert "maj@k" not in markdown_report({"sft": {**summary, "samples_per_prompt": 1}})


def test_a_sampled_evaluation_of_a_model_reaches_the_report_with_its_errors(tokenizer):
    """evaluate_model on the tiny model with k = 2: every sampled figure is in the summary, each with its error."""
    from alignment.evaluate import evaluate_model
    from alignment.modeling import ModelConfig, load_model
    from tests.conftest import TINY_MODEL

    model = load_model(ModelConfig(name_or_path=str(TINY_MODEL)))
    rows = [{"messages": [{"role": "user", "content": "What is 1 + 2?"}], "answer": "3"},
            {"messages": [{"role": "user", "content": "What is 2 + 3?"}], "answer": "5"}]
    config = EvalConfig(samples_per_prompt=2, temperature=1.0, max_new_tokens=6, budgets=[None, 2],
                        decode="continuous")
    summary = evaluate_model(model, tokenizer, rows, config)
    for mode in ("think", "no_think"):
        for key in ("maj_at_k", "pass_at_k"):
            assert 0 <= summary[f"{key}_{mode}"] <= 1 and f"{key}_{mode}_stderr" in summary
        assert f"accuracy_{mode}_sampling_stderr" in summary
    assert all("pass_at_k_stderr" in cell for cell in summary["budget_sweep"])
    line = next(line for line in markdown_report({"tiny": summary}).splitlines() if line.startswith("| tiny | 2 |"))
    assert line.count("±") == 4  # avg@k, maj@k and pass@k with reasoning on, avg@k off


def test_the_efficiency_frontier_orders_the_budgets_by_what_they_cost():
    from alignment.evaluate import efficiency_points

    sweep = [{"budget": None, "accuracy": 0.6, "accuracy_stderr": 0.03, "mean_thinking_tokens": 40.0,
              "mean_answer_tokens": 10.0},
             {"budget": 8, "accuracy": 0.1, "accuracy_stderr": 0.02, "mean_thinking_tokens": 8.0,
              "mean_answer_tokens": 12.0},
             {"budget": 32, "accuracy": 0.4, "mean_thinking_tokens": 30.0, "mean_answer_tokens": 10.0}]
    assert efficiency_points({"budget_sweep": sweep}) == [(20.0, 0.1, 0.02, "8"), (40.0, 0.4, 0.0, "32"),
                                                           (50.0, 0.6, 0.03, "unlimited")]


@pytest.mark.parametrize("choice, marked, stated", [("always", False, True), ("never", True, False),
                                                    ("auto", False, False), ("auto", True, True)])
def test_state_budget_writes_each_cells_budget_into_its_prompts(tokenizer, monkeypatch, choice, marked, stated):
    """With stated budgets (always, or auto for a tokenizer SFT marked) a budgeted reasoning-on cell's prompts say
    its budget; other cells' prompts do not."""
    import copy

    from alignment.chat_format import mark_stated_budget

    tokenizer = copy.deepcopy(tokenizer)
    if marked:
        mark_stated_budget(tokenizer)
    import alignment.evaluate as evaluate
    from alignment.chat_format import BUDGET_STATEMENT
    from alignment.rollout.generation import GenerationResult

    seen = []

    def scripted_generate(model, prompts, *, settings, budgets, reasoning, **_):
        seen.extend(zip(map(tokenizer.decode, prompts), budgets, reasoning))
        ids = tokenizer("3\n</think>\\boxed{3}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return [GenerationResult(tokens=ids, forced_mask=[False] * len(ids), logprobs=[-1.0] * len(ids),
                                 thinking_tokens=2, forced_close=False, finished=True) for _ in prompts]

    monkeypatch.setattr(evaluate, "generate", scripted_generate)
    rows = [{"messages": [{"role": "user", "content": "Start with 1. Add 2. What is the result?"}], "answer": "3"}] * 2
    cells = [(True, None), (False, None), (True, 8), (True, 32)]
    evaluate.run_cells(None, tokenizer, rows, cells, EvalConfig(state_budget=choice))
    assert len(seen) == 8
    for text, budget, reasoning in seen:
        for other in (8, 32):
            said = BUDGET_STATEMENT.format(budget=other) in text
            assert said == (stated and reasoning and budget == other)
