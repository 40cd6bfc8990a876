"""The budget study: does budget training keep accuracy at half the thinking tokens? Figures over seeds.

`make budget-study` trains, per seed, a plain SFT model, a budget-trained one (stated budgets and compressed traces,
data_recipes/truncation.py) and budget-aware GRPO on top of it, on the redundant task, and evaluates the three with
`align eval` (configs/tiny/budget/eval.yaml). `align budget-report SEED_EVAL_DIRS... --out DIR` then reads each
seed's eval.json and writes `budget_study.json`, `report.md` and `budget_curve.png` to DIR:

- per model and budget, accuracy, well-formed rate and mean thinking tokens, averaged over seeds;
- the budget B at half the budget-trained model's unlimited mean thinking length (the nearest budget evaluated);
- each model's retention at B: its accuracy at B over its own unlimited accuracy;
- the retention's difference to the plain SFT model at the same B, and the unlimited accuracy's difference.

A figure's standard error joins two parts: the evaluation's (the rows resampled, pairs kept paired: a model's two
cells, or two models on the same rows, use the same resampled rows) and the seeds' (their spread). With two seeds
the second part is itself rough; both are in budget_study.json.
"""

from __future__ import annotations

import json
import logging
import math
import random
import statistics
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

BOOTSTRAP_DRAWS = 1000
PLAIN, TRAINED = "sft-plain", "sft-budget"  # the models the acceptance figures compare (their eval labels)


def read_seeds(eval_dirs: list[str]) -> list[dict]:
    """Each seed's eval.json ({model label: summary}); every seed must hold the same models, rows and budgets."""
    seeds = []
    for directory in eval_dirs:
        path = Path(directory) / "eval.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no eval.json (run align eval with output_dir={directory})")
        seeds.append(json.loads(path.read_text()))
    first = seeds[0]
    for directory, seed in zip(eval_dirs, seeds):
        if set(seed) != set(first):
            raise ValueError(f"{directory}/eval.json has models {sorted(seed)}, {eval_dirs[0]} has {sorted(first)}")
        for name, summary in seed.items():
            if [c["budget"] for c in summary["budget_sweep"]] != [c["budget"] for c in first[name]["budget_sweep"]]:
                raise ValueError(f"{directory}/eval.json: model {name} has other budgets than {eval_dirs[0]}")
            if summary["row_ids"] != first[name]["row_ids"]:
                raise ValueError(f"{directory}/eval.json: model {name} was evaluated on other rows")
    return seeds


def estimate(per_seed: list[list[list[float]]], statistic: Callable[..., float], seed: int = 0) -> dict:
    """`statistic` of per-row arrays, averaged over seeds, with its standard error.

    per_seed[s] holds the arrays `statistic` takes for seed s (each a value per row, all on the same rows). The
    evaluation's part of the error resamples the rows (the same rows for every array: paired); the seeds' part is
    the spread of the seed values over sqrt(seeds).
    """
    rng = random.Random(seed)
    values, within = [], []
    for arrays in per_seed:
        n = len(arrays[0])
        values.append(statistic(*arrays))
        draws = []
        for _ in range(BOOTSTRAP_DRAWS):
            rows = [rng.randrange(n) for _ in range(n)]
            draws.append(statistic(*[[a[r] for r in rows] for a in arrays]))
        finite = [d for d in draws if math.isfinite(d)]  # a ratio over a resample with no correct row is undefined
        within.append(statistics.pvariance(finite) if len(finite) > 1 else float("nan"))
    k = len(values)
    within_se = math.sqrt(sum(within)) / k
    seeds_se = statistics.stdev(values) / math.sqrt(k) if k > 1 else 0.0
    return {"value": sum(values) / k, "stderr": math.hypot(within_se, seeds_se), "stderr_eval": within_se,
            "stderr_seeds": seeds_se, "per_seed": values}


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def retention(at_budget: list[float], unlimited: list[float]) -> float:
    return mean(at_budget) / mean(unlimited) if mean(unlimited) else float("nan")


def combine(seeds: list[dict]) -> dict:
    """The study's figures (see the module docstring) from each seed's eval.json."""
    models = list(seeds[0])
    budgets = [c["budget"] for c in seeds[0][models[0]]["budget_sweep"]]
    if None not in budgets:
        raise ValueError("the budget sweep needs the unlimited budget (null) beside the others")

    def cells(name: str, budget) -> list[dict]:
        return [next(c for c in seed[name]["budget_sweep"] if c["budget"] == budget) for seed in seeds]

    curves = {}
    for name in models:
        curve = []
        for budget in budgets:
            per_seed = cells(name, budget)
            curve.append({
                "budget": budget,
                "accuracy": estimate([[c["correct"]] for c in per_seed], mean),
                "well_formed": mean([c["well_formed"] for c in per_seed]),
                "well_formed_min": min(c["well_formed"] for c in per_seed),
                "mean_thinking_tokens": mean([c["mean_thinking_tokens"] for c in per_seed]),
                "reference_fits": per_seed[0].get("reference_fits"),
                "minimal_fits": per_seed[0].get("minimal_fits"),
            })
        curves[name] = curve
    result = {"seeds": len(seeds), "models": models, "budgets": budgets, "curves": curves}
    if PLAIN not in models or TRAINED not in models:
        log.warning("no %s and %s models: only the curves are reported", PLAIN, TRAINED)
        return result

    unlimited_tokens = mean([c["mean_thinking_tokens"] for c in cells(TRAINED, None)])
    finite = [b for b in budgets if b is not None]
    half = min(finite, key=lambda b: (abs(b - unlimited_tokens / 2), b))
    figures = {"unlimited_thinking_tokens": unlimited_tokens, "half": unlimited_tokens / 2, "budget": half}
    for name in models:
        figures[f"retention_{name}"] = estimate(
            [[b["correct"], u["correct"]] for b, u in zip(cells(name, half), cells(name, None))], retention)
    figures["retention_gain_over_plain"] = estimate(
        [[tb["correct"], tu["correct"], pb["correct"], pu["correct"]]
         for tb, tu, pb, pu in zip(cells(TRAINED, half), cells(TRAINED, None), cells(PLAIN, half), cells(PLAIN, None))],
        lambda tb, tu, pb, pu: retention(tb, tu) - retention(pb, pu))
    figures["unlimited_accuracy_vs_plain"] = estimate(
        [[t["correct"], p["correct"]] for t, p in zip(cells(TRAINED, None), cells(PLAIN, None))],
        lambda t, p: mean(t) - mean(p))
    figures["well_formed_min"] = {name: min(c["well_formed_min"] for c in curves[name]) for name in models}
    result["at_half"] = figures
    return result


def markdown(study: dict) -> str:
    lines = [f"# Budget study ({study['seeds']} seeds)", ""]
    header = "| model | " + " | ".join("unlimited" if b is None else str(b) for b in study["budgets"]) + " |"
    lines += ["Accuracy (mean over seeds ± standard error) by thinking budget:", "", header,
              "|---" * (len(study["budgets"]) + 1) + "|"]
    for name, curve in study["curves"].items():
        lines.append(f"| {name} | " + " | ".join(
            f"{c['accuracy']['value']:.3f} ± {c['accuracy']['stderr']:.3f}" for c in curve) + " |")
    lines += ["", "Mean thinking tokens / well-formed rate:", "", header, "|---" * (len(study["budgets"]) + 1) + "|"]
    for name, curve in study["curves"].items():
        lines.append(f"| {name} | " + " | ".join(
            f"{c['mean_thinking_tokens']:.1f} / {c['well_formed']:.3f}" for c in curve) + " |")
    fits = study["curves"][study["models"][0]]
    lines.append("| reference trace fits | " + " | ".join(
        "-" if c["reference_fits"] is None else f"{c['reference_fits']:.3f}" for c in fits) + " |")
    lines.append("| minimal trace fits | " + " | ".join(
        "-" if c["minimal_fits"] is None else f"{c['minimal_fits']:.3f}" for c in fits) + " |")
    half = study.get("at_half")
    if half:
        lines += ["", f"At budget {half['budget']} (half of {TRAINED}'s unlimited "
                  f"{half['unlimited_thinking_tokens']:.1f} thinking tokens is {half['half']:.1f}):", ""]
        for name in study["models"]:
            e = half[f"retention_{name}"]
            lines.append(f"- {name} keeps {e['value']:.3f} ± {e['stderr']:.3f} of its unlimited accuracy"
                         if math.isfinite(e["value"]) else f"- {name}: no correct answer without a budget, so no share")
        gain, unlimited = half["retention_gain_over_plain"], half["unlimited_accuracy_vs_plain"]
        if math.isfinite(gain["value"]):
            ratio = f" ({gain['value'] / gain['stderr']:.1f} standard errors)" if gain["stderr"] > 0 else ""
            lines.append(f"- {TRAINED} keeps {gain['value']:+.3f} ± {gain['stderr']:.3f} more than {PLAIN}{ratio}")
        lines.append(f"- {TRAINED}'s unlimited accuracy minus {PLAIN}'s: {unlimited['value']:+.3f} ± "
                     f"{unlimited['stderr']:.3f}")
        lines.append("- lowest well-formed rate over the budgets: " + ", ".join(
            f"{name} {rate:.3f}" for name, rate in half["well_formed_min"].items()))
    lines += ["", "Standard errors join the evaluation's (rows resampled, paired) and the seeds' spread."]
    return "\n".join(lines) + "\n"


def plot(study: dict, path: Path) -> None:
    """Accuracy against the budget and against the thinking tokens used, with the reference lines."""
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib not installed; no plot written")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_budget, by_tokens) = plt.subplots(1, 2, figsize=(12, 4.5))
    budgets = study["budgets"]
    first = study["curves"][study["models"][0]]
    ticks = list(range(len(budgets)))
    for key, style, label in (("reference_fits", "--", "full reference trace fits"),
                              ("minimal_fits", ":", "minimal trace (steps alone) fits")):
        if all(c[key] is not None for c in first):
            by_budget.plot(ticks, [c[key] for c in first], linestyle=style, color="gray", label=label)
    for name, curve in study["curves"].items():
        accuracy = [c["accuracy"]["value"] for c in curve]
        errors = [c["accuracy"]["stderr"] for c in curve]
        by_budget.errorbar(ticks, accuracy, yerr=errors, marker="o", capsize=3, label=name)
        by_tokens.errorbar([c["mean_thinking_tokens"] for c in curve], accuracy, yerr=errors, marker="o", capsize=3,
                           label=name)
    by_budget.set_xticks(ticks, ["unl." if b is None else str(b) for b in budgets])
    by_budget.set_xlabel("thinking budget (tokens)")
    by_budget.set_ylabel("accuracy")
    by_budget.legend(fontsize=8)
    by_tokens.set_xlabel("mean thinking tokens used")
    by_tokens.set_ylabel("accuracy")
    by_tokens.legend(fontsize=8)
    fig.suptitle(f"Accuracy with a thinking budget ({study['seeds']} seeds, ± one standard error)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_budget_report(eval_dirs: list[str], out: str) -> dict:
    study = combine(read_seeds(eval_dirs))
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "budget_study.json").write_text(json.dumps(study, indent=2))
    (directory / "report.md").write_text(markdown(study))
    plot(study, directory / "budget_curve.png")
    print(f"report: {directory / 'report.md'}\nplot:   {directory / 'budget_curve.png'}")
    return study
