"""The pipeline's report: `metrics.json` (per-stage held-out figures), `report.md` and `report.html` with plots of
the loss and reward curves and of accuracy against thinking budget."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from alignment.eval_stats import format_gain, paired_gains, with_stderr
from alignment.evaluate import tools_report
from alignment.tracking import read_metrics

CURVES = {"sft": "loss", "tool_sft": "loss", "rm": "loss", "dpo": "loss", "grpo": "reward_mean"}
RM_KEYS = ("rm_score_think", "rm_score_think_stderr", "rm_score_no_think", "rm_score_no_think_stderr")
TOOL_KEYS = ("rows", "success_think", "success_think_stderr", "success_no_think", "success_no_think_stderr",
             "exact_calls_think", "hallucinated_think", "hallucinated_think_stderr", "hallucinated_no_think",
             "malformed_think")


def _plot_curves(run_dir: Path, stages: list[str]) -> Path | None:
    try:
        import matplotlib
    except ImportError:  # the figures stay in metrics.jsonl
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [s for s in stages if s in CURVES and read_metrics(run_dir / s / "metrics.jsonl")]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(4.5 * len(present), 3.4), squeeze=False)
    for ax, stage in zip(axes[0], present):
        rows = [r for r in read_metrics(run_dir / stage / "metrics.jsonl") if CURVES[stage] in r]
        ax.plot([r["step"] for r in rows], [r[CURVES[stage]] for r in rows], marker=".", linewidth=1)
        ax.set_title(f"{stage}: {CURVES[stage]}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = run_dir / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def stage_metrics(eval_results: dict[str, dict]) -> dict:
    """The `metrics.json` figures of every evaluated model (unlimited budget written as null)."""
    keys = ("accuracy_think", "accuracy_think_stderr", "accuracy_no_think", "accuracy_no_think_stderr",
            "toggle_compliance", "toggle_compliance_think", "toggle_compliance_no_think", "well_formed_think",
            "mean_thinking_tokens")
    gains = paired_gains(eval_results)
    return {
        name: {**{k: summary.get(k) for k in keys}, "gain_think_over_previous": gains.get(name),
               "budget_sweep": [{"budget": c["budget"], "accuracy": c["accuracy"], "well_formed": c["well_formed"],
                                 "mean_thinking_tokens": c["mean_thinking_tokens"],
                                 "mean_answer_tokens": c["mean_answer_tokens"],
                                 "reference_fits": c.get("reference_fits"),
                                 "minimal_fits": c.get("minimal_fits")} for c in summary["budget_sweep"]],
               **({"tools": {k: summary["tools"].get(k) for k in TOOL_KEYS}} if summary.get("tools") else {}),
               **({k: summary.get(k) for k in RM_KEYS} if "rm_score_think" in summary else {})}
        for name, summary in eval_results.items()
    }


def write_report(run_dir: Path, stages: list[str], timings: dict[str, float]) -> dict:
    eval_path = run_dir / "eval" / "eval.json"
    if eval_path.is_file():
        evaluated = json.loads(eval_path.read_text())
    else:  # no final evaluation stage: use each model stage's own held-out evaluation (GRPO's: the one after)
        evaluated = {s: json.loads((run_dir / s / "eval.json").read_text())
                     for s in stages if (run_dir / s / "eval.json").is_file()}
        evaluated = {s: results.get("after", results) for s, results in evaluated.items()}
    metrics = {"stages": stage_metrics(evaluated), "seconds": timings}
    tmp = run_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    tmp.replace(run_dir / "metrics.json")

    curves = _plot_curves(run_dir, stages)
    budget_plot = run_dir / "eval" / "accuracy_vs_budget.png"
    lines = ["# Pipeline report", "", f"Run directory: `{run_dir}`", "",
             "One standard error after ±, over the test rows. Gain: accuracy with reasoning on minus the stage "
             "before, paired over the same rows (a gain beyond two of its standard errors is unlikely to be noise).",
             "", "| stage | seconds | accuracy think | gain over the stage before | accuracy no-think | "
             "toggle compliance | well-formed (think) |", "|---|---|---|---|---|---|---|"]
    for stage in stages:
        m = metrics["stages"].get(stage)
        figures = (f"{with_stderr(m, 'accuracy_think')} | {format_gain(m['gain_think_over_previous'])} | "
                   f"{with_stderr(m, 'accuracy_no_think')} | "
                   f"{m['toggle_compliance']:.3f} | {m['well_formed_think']:.3f}") if m else "- | - | - | - | -"
        lines.append(f"| {stage} | {timings.get(stage, 0):.0f} | {figures} |")
    if metrics["stages"]:
        budgets = [c["budget"] for c in next(iter(metrics["stages"].values()))["budget_sweep"]]
        lines += ["", "## Accuracy (well-formed rate) across thinking budgets", "",
                  "| model | " + " | ".join("unlimited" if b is None else str(b) for b in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        for name, m in metrics["stages"].items():
            cells = " | ".join(f"{c['accuracy']:.2f} ({c['well_formed']:.2f})" for c in m["budget_sweep"])
            lines.append(f"| {name} | {cells} |")
        sweep = next(iter(metrics["stages"].values()))["budget_sweep"]
        reference, minimal = [c.get("reference_fits") for c in sweep], [c.get("minimal_fits") for c in sweep]
        if all(r is not None for r in reference):  # the most a model that needs the reference's trace can reach
            lines.append("| reference trace fits | " + " | ".join(f"{r:.2f}" for r in reference) + " |")
        if all(r is not None for r in minimal) and minimal != reference:  # with the skippable lines left out
            lines.append("| minimal trace fits | " + " | ".join(f"{r:.2f}" for r in minimal) + " |")
    lines += tools_report(evaluated)
    lines += _reward_model_report(run_dir, stages, evaluated)
    lines += _merge_sweep(run_dir, stages, evaluated)
    if curves:
        lines += ["", "## Training curves", "", f"![curves]({curves.name})"]
    if budget_plot.is_file():
        lines += ["", "## Accuracy vs thinking budget", "", "![accuracy vs budget](eval/accuracy_vs_budget.png)"]
    markdown = "\n".join(lines) + "\n"
    (run_dir / "report.md").write_text(markdown)
    (run_dir / "report.html").write_text(_html(markdown, run_dir))
    print(f"report:  {run_dir / 'report.md'} (and report.html)\nmetrics: {run_dir / 'metrics.json'}")
    return metrics


def _reward_model_report(run_dir: Path, stages: list[str], evaluated: dict[str, dict]) -> list[str]:
    """The rm stage's held-out pair accuracy (by pair kind), and the mean score it gives every model's completions."""
    lines = []
    rm_eval = run_dir / "rm" / "eval.json"
    if "rm" in stages and rm_eval.is_file():
        figures = json.loads(rm_eval.read_text())
        if figures.get("heldout"):
            lines += ["", "## Reward model", "",
                      f"Held-out pair accuracy {figures['heldout']['pair_accuracy']:.3f} over "
                      f"{figures['heldout']['pairs']} pairs (before training "
                      f"{figures['heldout_before']['pair_accuracy']:.3f})."]
            if figures.get("heldout_by_kind"):
                lines += ["", "| pair kind | pairs | accuracy |", "|---|---|---|"]
                lines += [f"| {kind} | {k['pairs']} | {k['pair_accuracy']:.3f} |"
                          for kind, k in figures["heldout_by_kind"].items()]
    scored = {name: summary for name, summary in evaluated.items() if "rm_score_think" in summary}
    if scored:
        gains = paired_gains(scored, "row_rm_score_think")
        lines += ["", "## Reward-model score of each model's completions", "",
                  "Mean score over the test prompts; gain: paired over the same prompts, against the model before.",
                  "", "| model | score think | gain over the model before | score no-think |", "|---|---|---|---|"]
        lines += [f"| {name} | {with_stderr(m, 'rm_score_think')} | {format_gain(gains.get(name))} | "
                  f"{with_stderr(m, 'rm_score_no_think')} |" for name, m in scored.items()]
    return lines


def _merge_sweep(run_dir: Path, stages: list[str], evaluated: dict[str, dict]) -> list[str]:
    """The merge stage's models against alpha: a table and `merge_sweep.png` (A at 0, the merges, B at 1)."""
    record_path = run_dir / "merge" / "stage.json"
    if "merge" not in stages or not record_path.is_file():
        return []
    from alignment.evaluate import model_label
    from alignment.merge import plot_sweep, sweep_points

    result = json.loads(record_path.read_text())["result"]
    a, b = model_label(result["a"], {}), model_label(result["b"], {})
    sweep = sweep_points(evaluated, a, b, {name: m["alpha"] for name, m in result["merges"].items()})
    if not sweep:
        return []
    keys = [k for k in sweep[0] if k not in ("alpha", "model")]
    lines = ["", f"## Merges: (1 - alpha) * {a} + alpha * {b}", "",
             "| alpha | model | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    lines += [f"| {p['alpha']:g} | {p['model']} | " + " | ".join(f"{p[k]:.3f}" for k in keys) + " |" for p in sweep]
    plot = plot_sweep(sweep, run_dir / "merge_sweep.png")
    if plot:
        lines += ["", f"![merge sweep]({plot.name})"]
    (run_dir / "merge_sweep.json").write_text(json.dumps(sweep, indent=2))
    return lines


def _html(markdown: str, run_dir: Path) -> str:
    """A self-contained HTML page: tables rendered, images inlined."""
    body, in_table = [], False
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= {"-"} for c in cells):
                continue
            if not in_table:
                body.append("<table>")
                in_table = True
                body.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cells) + "</tr>")
            else:
                body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
        elif line.startswith("![") and "](" in line:
            src = run_dir / line.split("](", 1)[1].rstrip(")")
            if src.is_file():
                data = base64.b64encode(src.read_bytes()).decode()
                body.append(f'<img src="data:image/png;base64,{data}" style="max-width:100%">')
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        body.append("</table>")
    style = "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}" \
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>Pipeline report</title><style>{style}</style>" \
           f"</head><body>{''.join(body)}</body></html>"
