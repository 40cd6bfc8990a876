"""The pipeline on Ray: skip/rerun by fingerprint, resume after a kill, `ray job submit`, 1 vs 2 workers.

These start Ray and train for a few steps, so they are marked slow (`make test-slow`, run by CI).
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

SMALL = [
    "data.overrides=[task.train_size=96,task.test_size=8,task.validation_size=4,tools.train_size=24,tools.test_size=4,"
    "tools.validation_size=2,tools.rl_size=4]",
    "eval.overrides=[eval.max_samples=4,eval.max_new_tokens=24,'eval.budgets=[0,null]',eval.tool_max_samples=4,"
    "eval.tool_test_path=runs/data/tiny/tools_test.jsonl]",
]


def sft_overrides(*extra: str) -> str:
    return "sft.overrides=[" + ",".join(["eval.max_samples=4", "eval.max_new_tokens=16", "eval.tool_max_samples=4",
                                         *extra]) + "]"


def align(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_DISABLE_USAGE_STATS="1", RAY_ADDRESS="")
    return subprocess.run([sys.executable, "-m", "alignment.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600, **kwargs)


def pipeline(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    result = align("pipeline", "configs/tiny/pipeline.yaml", f"run_dir={run_dir}", *SMALL, *overrides)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


TOOL_SFT = "tool_sft.overrides=[train.max_steps=2,eval.max_samples=4,eval.max_new_tokens=16,eval.tool_max_samples=4]"
MERGE = "merge.overrides=[b=tool_sft,'alphas=[0.5]']"


def test_rerun_skips_finished_stages_and_reruns_changed_ones(tmp_path):
    stages = "stages=[data,sft,tool_sft,merge,eval]"
    pipeline(tmp_path, stages, sft_overrides("train.max_steps=2"), TOOL_SFT, MERGE)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["stages"]) == {"sft", "tool_sft", "alpha-0.5"}  # the merge is evaluated beside the stages
    report = (tmp_path / "report.md").read_text()
    assert "## Merges: (1 - alpha) * sft + alpha * tool_sft" in report and (tmp_path / "merge_sweep.png").is_file()
    sweep = metrics["stages"]["sft"]["budget_sweep"]
    assert [c["budget"] for c in sweep] == [0, None] and all(0 <= c["accuracy"] <= 1 for c in sweep)
    assert metrics["stages"]["tool_sft"]["tools"]["rows"] == 4  # the tool episodes of every model
    assert (tmp_path / "report.md").is_file() and (tmp_path / "report.html").stat().st_size > 1000
    assert "## Tool calling" in (tmp_path / "report.md").read_text()
    manifest = json.loads((tmp_path / "tool_sft" / "checkpoint" / "manifest.json").read_text())
    assert manifest["config"]["model"]["name_or_path"] == str(tmp_path / "sft" / "checkpoint")  # trained on from SFT

    again = pipeline(tmp_path, stages, sft_overrides("train.max_steps=2"), TOOL_SFT, MERGE)
    log = again.stdout + again.stderr
    for stage in ("data", "sft", "tool_sft", "merge", "eval"):
        assert f"{stage}: finished earlier with the same config and inputs; skipped" in log

    changed = pipeline(tmp_path, stages, sft_overrides("train.max_steps=3"), TOOL_SFT, MERGE)
    log = changed.stdout + changed.stderr
    assert "data: finished earlier" in log
    for stage in ("sft", "tool_sft", "merge", "eval"):  # a changed stage reruns, and so does what follows
        assert f"{stage}: running" in log


def test_corrupted_checkpoint_is_not_reused(tmp_path):
    stages = "stages=[data,sft]"
    pipeline(tmp_path, stages, sft_overrides("train.max_steps=2"))
    weights = tmp_path / "sft" / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # as if a write had been cut short
    rerun = pipeline(tmp_path, stages, sft_overrides("train.max_steps=2"))
    log = rerun.stdout + rerun.stderr
    assert "checkpoint unusable" in log and "sft: running" in log
    from alignment.checkpoint import verify_checkpoint

    verify_checkpoint(tmp_path / "sft" / "checkpoint")  # written again, whole


def test_killed_pipeline_resumes_from_last_checkpoint(tmp_path):
    args = [sys.executable, "-m", "alignment.cli", "pipeline", "configs/tiny/pipeline.yaml", f"run_dir={tmp_path}",
            "stages=[data,sft]", *SMALL, sft_overrides("train.max_steps=60", "train.save_every=5")]
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_DISABLE_USAGE_STATS="1", RAY_ADDRESS="")
    driver = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    state = tmp_path / "sft" / "last" / "manifest.json"
    deadline = time.time() + 300
    while not state.exists() and time.time() < deadline and driver.poll() is None:
        time.sleep(0.2)
    assert state.exists(), "no training state was saved before the deadline"
    os.killpg(driver.pid, signal.SIGKILL)  # the driver, its local Ray and the stage worker
    driver.wait()
    saved_step = json.loads(state.read_text())["step"]
    assert 0 < saved_step < 60 and not (tmp_path / "sft" / "checkpoint").exists()

    rerun = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, log[-3000:]
    assert "data: finished earlier with the same config and inputs; skipped" in log
    resumed = [int(line.split("resumed from step ")[1].split()[0]) for line in log.splitlines() if "resumed from step" in line]
    assert resumed and resumed[0] >= saved_step
    steps = [json.loads(l)["step"] for l in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 60 and 59 in steps  # trained to the end, then the final evaluation row
    assert steps == sorted(set(steps))  # one record per step: the killed attempt's steps past the state were dropped


def test_two_workers_match_one_worker(tmp_path):
    """Ray Train data parallel: 2 workers x 1 micro-batch == 1 worker x 2 micro-batches, step by step; the same with
    the 2 workers under DeepSpeed ZeRO-3 (as configs/nano9b/pipeline_full.yaml runs full fine-tuning)."""
    zero3 = tmp_path / "zero3.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}}))
    losses = {}
    for name, workers, accum, extra in (("one", 1, 2, []), ("ddp", 2, 1, []),
                                         ("zero3", 2, 1, [f"train.deepspeed={zero3}"])):
        run = tmp_path / name
        pipeline(run, "stages=[data,sft]", f"sft.num_workers={workers}", "sft.num_cpus=1",
                 sft_overrides("train.max_steps=4", f"train.grad_accum={accum}", "train.log_every=1", *extra))
        rows = [json.loads(l) for l in (run / "sft" / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [(r["loss"], r["grad_norm"]) for r in rows if "loss" in r]
    assert len(losses["one"]) == len(losses["ddp"]) == len(losses["zero3"]) == 4
    # Same data, same update; only the order of the gradient sums differs (gloo all-reduce vs local accumulation).
    for one, ddp, zero in zip(losses["one"], losses["ddp"], losses["zero3"]):
        assert all(abs(x - y) <= 1e-4 * abs(x) for x, y in zip(one, ddp)), losses
        assert all(abs(x - y) <= 1e-4 * abs(x) for x, y in zip(one, zero)), losses
    assert losses["one"][0][0] != losses["one"][-1][0]  # the model did train


def test_ray_job_submit_runs_the_pipeline(tmp_path):
    """README, "Running on a Ray cluster", line by line: its environment, token, head and job submission. Changed:
    the head gets ports of its own (another local Ray may hold the defaults), `python` is this interpreter, and the
    job writes to a temporary run_dir at small sizes."""
    from tests.test_readme import shell_blocks

    block = next(b for b in shell_blocks() if any(line.startswith("ray job submit") for line in b))
    env = dict(os.environ, RAY_DISABLE_USAGE_STATS="1", OMP_NUM_THREADS="1")
    env.pop("RAY_AUTH_MODE", None)
    env.pop("RAY_ADDRESS", None)
    for line in block:
        if line.startswith("export "):
            key, value = line.removeprefix("export ").split("=", 1)
            env[key] = value
    assert env.get("RAY_AUTH_MODE") == "token"
    ray = str(Path(sys.executable).with_name("ray"))
    token, start, submit_line = (next(line for line in block if line.startswith(prefix))
                                 for prefix in ("ray get-auth-token", "ray start", "ray job submit"))
    subprocess.run([ray, *shlex.split(token)[1:]], env=env, capture_output=True, timeout=60, check=True)
    # --block keeps `ray start` in the foreground; terminating it stops this head's processes only (`ray stop`
    # would stop every Ray instance of the user on this machine, e.g. a pipeline running beside the tests).
    assert "--block" in start
    head = subprocess.Popen(
        [ray, *shlex.split(start)[1:], "--node-ip-address=127.0.0.1", "--port=6391", "--dashboard-port=8276",
         "--include-dashboard=true", "--num-cpus=2", "--disable-usage-stats",
         "--dashboard-agent-listen-port=52399"],  # not the default 52365, which another local Ray may hold
        env=env, stdout=(tmp_path / "ray_head.log").open("w"), stderr=subprocess.STDOUT,
    )
    try:
        ready = None
        for _ in range(90):  # the job agent comes up after the head; a loaded machine takes a while
            ready = subprocess.run([ray, "job", "list", "--address", "http://127.0.0.1:8276"], env=env,
                                   capture_output=True, text=True, timeout=60)
            if ready.returncode == 0 or head.poll() is not None:
                break
            time.sleep(2)
        assert head.poll() is None and ready.returncode == 0, (ready.stderr or "")[-2000:]
        argv = [a.replace("127.0.0.1:8265", "127.0.0.1:8276") for a in shlex.split(submit_line)]
        argv = [ray, *argv[1:]]
        argv[argv.index("python")] = sys.executable
        run_dir = next(a for a in argv if a.startswith("run_dir="))
        argv[argv.index(run_dir)] = f"run_dir={tmp_path}"
        submit = subprocess.run([*argv, "stages=[data,sft]", *SMALL, sft_overrides("train.max_steps=2")],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "succeeded" in submit.stdout + submit.stderr
    finally:
        head.terminate()
        try:
            head.wait(timeout=120)
        except subprocess.TimeoutExpired:
            head.kill()
    from alignment.checkpoint import verify_checkpoint

    assert verify_checkpoint(tmp_path / "sft" / "checkpoint")["stage"] == "sft"
    assert json.loads((tmp_path / "metrics.json").read_text())["stages"]["sft"]["accuracy_think"] >= 0


def test_grpo_on_two_ray_train_workers_matches_one(tmp_path):
    """`grpo.num_workers`: the stage on 2 Ray Train workers (gloo) takes the steps it takes on 1."""
    grpo = ("grpo.overrides=[rollout.prompts_per_step=4,rollout.group_size=4,rollout.max_new_tokens=8,"
            "rollout.decode=continuous,loss.overlong=keep,train.max_steps=2,cpu_threads=1,eval.max_samples=4,"
            "eval.max_new_tokens=16,'eval.budgets=[null]','rewards.rewards=[{name: length}]']")  # length: has variance
    records = {}
    for workers in (1, 2):
        run = tmp_path / f"workers{workers}"
        pipeline(run, "stages=[data,sft,grpo]", sft_overrides("train.max_steps=2"), grpo,
                 f"grpo.num_workers={workers}", "grpo.num_cpus=1")
        records[workers] = [json.loads(l) for l in (run / "grpo" / "metrics.jsonl").read_text().splitlines()][:2]
    for one, two in zip(records[1], records[2]):
        assert one["tokens_generated"] == two["tokens_generated"] and one["reward_mean"] == two["reward_mean"]
        assert abs(one["grad_norm"] - two["grad_norm"]) <= 1e-4 * one["grad_norm"] and one["grad_norm"] > 0
        assert abs(one["loss"] - two["loss"]) <= 1e-4 * abs(one["loss"]) + 1e-6  # see test_grpo_workers.py
