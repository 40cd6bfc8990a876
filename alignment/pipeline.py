"""The whole pipeline on Ray: data -> SFT -> tool SFT -> reward model -> DPO -> GRPO -> merge -> evaluation, one
command locally or on a cluster.

Each stage runs as Ray work (a task; SFT, DPO and GRPO through Ray Train when they have workers) and hands the next stage a
checkpoint directory with a manifest. Every stage records a fingerprint of its resolved config and its inputs (the
fingerprint of the stage before it) in `<run_dir>/<stage>/stage.json`, so a rerun of the same command

- skips a finished stage whose fingerprint matches and whose checkpoint is intact,
- resumes an interrupted stage from its last saved training state (see `alignment/resume.py`),
- reruns a stage (and everything after it) whose config or inputs changed.

Without a cluster address it starts a local Ray instance (dashboard off, loopback only); with `RAY_ADDRESS` or
`address=...` it joins that cluster, as `ray job submit` does.

    align pipeline configs/tiny/pipeline.yaml
    ray job submit --working-dir . -- align pipeline configs/tiny/pipeline.yaml run_dir=/shared/runs/exp1
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from alignment.checkpoint import CorruptCheckpointError, verify_checkpoint
from alignment.config import DATA_PARALLEL_STAGES, load_config, option, to_dict
from alignment.trackers import TrackingConfig, log_finished, pipeline_group
from alignment.distributed import connect_ray
from alignment.runtime import setup_logging

log = logging.getLogger(__name__)

STAGE_ORDER = ("data", "sft", "tool_sft", "rm", "dpo", "grpo", "merge", "eval")
OPTIONAL_STAGES = ("rm", "merge")  # not in the default stage list
MODEL_STAGES = ("sft", "tool_sft", "dpo", "grpo")
# tool_sft is a second SFT stage (Nano 2's SFT stage 2: tool calling), from the SFT checkpoint.
STAGE_KIND = {"tool_sft": "sft"}


@dataclass
class StageSettings:
    """One stage of the pipeline: its config file, overrides and the Ray resources it asks for."""

    config: str = option("", "YAML config of the stage (empty: the stage's defaults).")
    overrides: list = option([], "key=value overrides applied on top of the stage config.")
    num_cpus: float = option(1.0, "CPUs reserved for the stage's Ray task (per worker when workers > 1).")
    num_gpus: float = option(0.0, "GPUs reserved for the stage's Ray task (per worker).")
    num_workers: int = option(0, "SFT, DPO and GRPO: data-parallel Ray Train workers (0: a plain Ray task).")


@dataclass
class PipelineConfig:
    """Which stages run, where outputs go, and how to reach Ray."""

    stages: list = option([s for s in STAGE_ORDER if s not in OPTIONAL_STAGES],
                          "Stages to run, in pipeline order (any subset, e.g. [data, sft, grpo, eval]).")
    run_dir: str = option("runs/pipeline", "Output directory; on a cluster, a path every node can reach.")
    data: StageSettings = option(StageSettings(config="configs/tiny/data.yaml"), "Data recipe stage.")
    sft: StageSettings = option(StageSettings(config="configs/tiny/sft.yaml"), "SFT stage.")
    tool_sft: StageSettings = option(StageSettings(config="configs/tiny/tools/sft_after_math.yaml"),
                                     "A second SFT stage from the SFT checkpoint (tool conversations, math replayed).")
    rm: StageSettings = option(StageSettings(config="configs/tiny/rlhf/rm.yaml"), "A reward model (align rm) from "
                               "the policy checkpoint so far; every later stage's `reward_model` rewards and "
                               "eval.reward_model use it.")
    dpo: StageSettings = option(StageSettings(config="configs/tiny/dpo.yaml"), "DPO stage.")
    grpo: StageSettings = option(StageSettings(config="configs/tiny/grpo.yaml"), "GRPO stage.")
    merge: StageSettings = option(StageSettings(), "Merges of two earlier stages' checkpoints (merge.a, merge.b) at "
                                  "each of merge.alphas, evaluated beside them and plotted in the report.")
    eval: StageSettings = option(StageSettings(config="configs/tiny/eval.yaml"), "Final evaluation of every model.")
    address: str = option("", "Ray cluster address; empty uses RAY_ADDRESS or starts a local instance.")
    max_retries: int = option(1, "Times a failed stage task (a dead worker) is retried before the pipeline stops.")
    tracking: TrackingConfig = option(
        TrackingConfig(), "Experiment trackers of every stage whose own `tracking` is left at its default (the group: "
        "this run directory's name), and of the report (report.md, the plots, metrics.json's figures).",
    )

    def validate(self) -> None:
        unknown = [s for s in self.stages if s not in STAGE_ORDER]
        if unknown:
            raise ValueError(f"stages: unknown stage(s) {unknown}; known: {list(STAGE_ORDER)}")
        if [s for s in STAGE_ORDER if s in self.stages] != list(self.stages):
            raise ValueError(f"stages must be in pipeline order {list(STAGE_ORDER)}")
        for name in STAGE_ORDER:
            if getattr(self, name).num_workers and STAGE_KIND.get(name, name) not in DATA_PARALLEL_STAGES:
                raise ValueError(f"{name}.num_workers: only {', '.join(DATA_PARALLEL_STAGES)} run on several workers")


# ---------------------------------------------------------------------------------------------------------------
# Stage registry: how to build each stage's config, wire its inputs and outputs, and run it.


# Each stage: (module, config class, run function). Imported when used, so a subset runs without the others.
STAGES = {
    "data": ("data_recipes.synthetic_math", "MathDataConfig", "write_splits"),
    "sft": ("alignment.sft", "SFTConfig", "run_sft"),
    "dpo": ("alignment.dpo", "DPOConfig", "run_dpo"),
    "grpo": ("alignment.grpo", "GRPOConfig", "run_grpo"),
    "merge": ("alignment.merge", "MergeConfig", "run_merge"),
    "rm": ("alignment.reward_model", "RMConfig", "run_rm"),
    "eval": ("alignment.evaluate", "EvalRunConfig", "run_eval"),
}


def stage_entry(name: str) -> tuple[type, Callable]:
    module_name, config_name, run_name = STAGES[STAGE_KIND.get(name, name)]
    module = importlib.import_module(module_name)
    return getattr(module, config_name), getattr(module, run_name)


def _wire(name: str, config: Any, run_dir: Path, upstream_model: str | None, data_dir: Path | None) -> None:
    """Point a stage config at the pipeline's directories: its inputs come from the stages before it."""
    config.output_dir = str(run_dir / name)
    if name == "data":
        return
    # Ray workers may start elsewhere (another node, a job's working dir): local paths travel as absolute paths.
    def absolute(section: Any, key: str) -> None:
        value = getattr(section, key, "") if section is not None else ""
        if value and Path(value).exists():
            setattr(section, key, str(Path(value).resolve()))

    absolute(getattr(config, "model", None), "name_or_path")
    absolute(getattr(config, "model", None), "tokenizer")
    absolute(getattr(config, "train", None), "deepspeed")
    for section in (getattr(config, "data", None), getattr(config, "mining", None), getattr(config, "eval", None),
                    getattr(config, "selection", None)):
        for key in ("train_path", "test_path", "prompts_path", "validation_path", "tool_test_path",
                    "tool_prompts_path", "tool_validation_path", "pairs_path"):
            value = getattr(section, key, None) if section is not None else None
            if value and data_dir is not None:  # the same file names (train/test/rl.jsonl), from this run's data stage
                setattr(section, key, str(data_dir / Path(value).name))
            else:
                absolute(section, key)
    data = getattr(config, "data", None)
    if getattr(data, "unpacked_paths", None):
        data.unpacked_paths = [str(data_dir / Path(p).name) if data_dir is not None else
                               str(Path(p).resolve()) if Path(p).exists() else p for p in data.unpacked_paths]
    if name in ("tool_sft", "rm", "dpo", "grpo") and upstream_model is not None:
        config.model.name_or_path = upstream_model
        config.model.tokenizer = ""


def _wire_merge_inputs(config: Any, produced: dict[str, str]) -> None:
    """merge.a / merge.b name an earlier stage of this run (its checkpoint) or a checkpoint folder."""
    from alignment.config import ConfigError

    for key in ("a", "b"):
        value = getattr(config, key)
        if value in produced:
            setattr(config, key, produced[value])
        elif Path(value).is_dir():
            setattr(config, key, str(Path(value).resolve()))
        else:
            raise ConfigError(f"merge.{key}: {value!r} is neither a stage this pipeline ran before the merge "
                              f"({', '.join(produced) or 'none'}) nor a checkpoint folder")


def _wire_reward_model(config: Any, checkpoint: str) -> None:
    """Point a later stage at this run's reward model: its `reward_model` rewards (GRPO's, DPO mining's) and its
    evaluation's reward-model score."""
    for rewards in (getattr(config, "rewards", None), getattr(getattr(config, "mining", None), "rewards", None)):
        for _, specs in rewards.spec_lists() if rewards is not None else ():
            for spec in specs:
                if spec.name == "reward_model":
                    spec.args = {**spec.args, "checkpoint": checkpoint}
    evaluation = getattr(config, "eval", None)
    if evaluation is not None and hasattr(evaluation, "reward_model"):
        evaluation.reward_model = checkpoint


def _track(config: Any, pipeline: TrackingConfig, run_dir: Path) -> None:
    """Hand the pipeline's trackers to a stage left at the default, and group the stage with the pipeline's run."""
    if not hasattr(config, "tracking"):
        return
    if to_dict(config.tracking) == to_dict(TrackingConfig()):
        config.tracking = dataclasses.replace(pipeline)
    if not config.tracking.group:
        config.tracking.group = pipeline_group(pipeline, run_dir)


def _fingerprint(config: Any, upstream: str) -> str:
    """A hash of the settings that differ from the config class's defaults (so that a new option, left at its
    default, does not rerun finished stages) and of the stage's inputs."""
    settings = _changed(to_dict(config), to_dict(type(config)()))
    settings.pop("tracking", None)  # where logs go changes no result
    text = json.dumps(settings, sort_keys=True, default=str) + upstream
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _changed(values: dict, defaults: dict) -> dict:
    """The entries of `values` that differ from `defaults`, recursing into sections."""
    changed = {}
    for key, value in values.items():
        default = defaults.get(key, _MISSING)
        if isinstance(value, dict) and isinstance(default, dict):
            if inner := _changed(value, default):
                changed[key] = inner
        elif value != default:
            changed[key] = value
    for key in defaults.keys() - values.keys():  # an entry of a default mapping taken out (a default route)
        changed[key] = "<removed>"
    return changed


_MISSING = object()


def _finished(stage_dir: Path, fingerprint: str, has_checkpoint: bool) -> dict | None:
    """The stage record when the stage already finished with this fingerprint and its outputs are intact."""
    record_path = stage_dir / "stage.json"
    if not record_path.is_file():
        return None
    record = json.loads(record_path.read_text())
    if record.get("fingerprint") != fingerprint:
        return None
    if has_checkpoint:
        try:
            verify_checkpoint(stage_dir / "checkpoint")
        except CorruptCheckpointError as exc:
            log.warning("%s: checkpoint unusable (%s); rerunning the stage", stage_dir.name, exc)
            return None
    return record


def _run_stage_body(name: str, config: Any, settings: StageSettings, checkpoints: list[str]) -> Any:
    """Runs inside the Ray task: the stage itself (with workers, through Ray Train)."""
    setup_logging()
    _use_assigned_cpus()
    run = stage_entry(name)[1]
    if settings.num_workers > 0:
        from alignment.distributed import run_data_parallel

        return run_data_parallel(run, config, settings.num_workers, use_gpu=settings.num_gpus > 0,
                                 cpus_per_worker=settings.num_cpus, name=name)
    return run(checkpoints, config) if name == "eval" else run(config)


def _use_assigned_cpus() -> None:
    """Give torch as many threads as CPUs this task holds. Ray sets OMP_NUM_THREADS when it starts a worker, from
    the first task's CPUs, and reuses the worker: without this SFT (2 CPUs) ran on the data stage's single thread."""
    import ray
    import torch

    cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 0))
    if cpus >= 1:
        os.environ["OMP_NUM_THREADS"] = str(cpus)
        torch.set_num_threads(cpus)


def run_pipeline(config: PipelineConfig) -> dict:
    setup_logging()
    run_dir = Path(config.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    ray = connect_ray(config.address)
    upstream_fp, upstream_model, data_dir, reward_model = "", None, None, None
    produced: dict[str, str] = {}
    timings: dict[str, float] = {}
    selected = [s for s in STAGE_ORDER if s in config.stages]
    for index, name in enumerate(selected, start=1):
        settings: StageSettings = getattr(config, name)
        stage_config = load_config(stage_entry(name)[0], settings.config or None, list(settings.overrides))
        _wire(name, stage_config, run_dir, upstream_model, data_dir)
        if name == "merge":
            _wire_merge_inputs(stage_config, produced)
        if reward_model is not None:
            _wire_reward_model(stage_config, reward_model)
        _track(stage_config, config.tracking, run_dir)
        checkpoints = list(produced.values()) if name == "eval" else []
        if name == "eval":
            upstream_fp += json.dumps(produced)
        fingerprint = _fingerprint(stage_config, upstream_fp)
        stage_dir = run_dir / name
        record = _finished(stage_dir, fingerprint, has_checkpoint=name in (*MODEL_STAGES, "rm"))
        if record is not None:
            log.info("[%d/%d] %s: finished earlier with the same config and inputs; skipped", index, len(selected), name)
        else:
            log.info("[%d/%d] %s: running", index, len(selected), name)
            started = time.time()
            task = ray.remote(_run_stage_body).options(
                num_cpus=settings.num_cpus if settings.num_workers == 0 else 0,
                num_gpus=settings.num_gpus if settings.num_workers == 0 else 0,
                max_retries=config.max_retries, retry_exceptions=False,
            )
            result = ray.get(task.remote(name, stage_config, settings, checkpoints))
            record = {"stage": name, "fingerprint": fingerprint, "seconds": round(time.time() - started, 1),
                      "result": _jsonable(result)}
            stage_dir.mkdir(parents=True, exist_ok=True)
            tmp = stage_dir / "stage.json.tmp"
            tmp.write_text(json.dumps(record, indent=2))
            tmp.replace(stage_dir / "stage.json")
            log.info("[%d/%d] %s: done in %.0fs", index, len(selected), name, record["seconds"])
        timings[name] = record["seconds"]
        upstream_fp = fingerprint
        if name == "data":
            data_dir = stage_dir
        if name == "rm":  # not a policy: later stages train on from the one before it, and score with it
            reward_model = str(stage_dir / "checkpoint")
        if name in MODEL_STAGES:
            upstream_model = str(stage_dir / "checkpoint")
            produced[name] = upstream_model
        if name == "merge":  # evaluated beside the stages' models; later stages train on from grpo, not a merge
            produced |= {label: m["checkpoint"] for label, m in record["result"]["merges"].items()}
    from alignment.report import write_report

    metrics = write_report(run_dir, selected, timings)
    track_report(config, run_dir, metrics)
    return metrics


def track_report(config: PipelineConfig, run_dir: Path, metrics: dict) -> None:
    """The report's own tracker run, in the pipeline's group: every model's figures, stage times, report, plots."""
    figures = {f"{stage}/{key}": value for stage, stage_figures in metrics["stages"].items()
               for key, value in stage_figures.items()}
    figures |= {f"seconds/{stage}": seconds for stage, seconds in metrics["seconds"].items()}
    log_finished(dataclasses.replace(config.tracking, group=pipeline_group(config.tracking, run_dir)), "pipeline",
                 run_dir, to_dict(config), figures,
                 [run_dir / name for name in ("report.md", "metrics.json", "curves.png", "eval/accuracy_vs_budget.png")])


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(value)
