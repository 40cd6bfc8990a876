"""GRPO step time: our stage (`alignment.grpo.run_grpo`) vs TRL's GRPOTrainer with its defaults, same model, prompts
and reward.

The model is a random-init hybrid (24 blocks: 8 Mamba-2, 4 attention, 12 MLP, hidden 1024, 230M parameters with
a 32k vocabulary and untied embeddings, bf16). A random model rarely writes its end-of-turn token, so nearly every completion runs to
`--max-new-tokens`: the worst case for a step, and the same work for both sides. The reward is cheap and
deterministic (a parity of the completion text) so that it has variance inside groups and takes no time of note.

Both sides do one optimizer step per rollout batch of `--prompts` x `--group-size` completions. Ours: packed learner
pass, budget-aware generation, no dynamic sampling or overlong filtering (they would change the work done, TRL has
neither by default). TRL: GRPOConfig defaults (transformers generate, padded learner, loss_type "dapo"), with only the
batch geometry set to match (`per_device_train_batch_size` x `gradient_accumulation_steps` = one rollout batch).

Reported per side: mean step time over the steps after the first (warm-up), its split into generate / reward /
learn, completion tokens generated per second and (prompt + completion) tokens trained per second.

Long-tailed lengths (`--lengths longtail`): each sample ends with the end-of-turn token at a planned length drawn
log-uniform in [`--min-new-tokens`, `--max-new-tokens`], keyed by its prompt and how many samples of that prompt
came before, so every side decodes the same lengths. `--decodes cuda-graph,continuous` runs our stage once per
rollout.decode path (TRL is skipped then): the step time of the static batch as the GPU ran it before continuous
batching (`cuda-graph`: the static step replayed as a CUDA graph; `static` is the same step eager, the CPU's) against
continuous batching.
`--warmup-tokens N` ends the warm-up step's samples after N tokens, so that on a 9B model it compiles and captures
without costing a full step.

    python bench/bench_grpo.py --size tiny                  # CPU check, under a minute
    python bench/bench_grpo.py --device cuda                # the GPU benchmark: 64 prompts x 8, 1024 new tokens
    python bench/bench_grpo.py --device cuda --skip-trl     # ours only
    python bench/bench_grpo.py --device cuda --model-json configs/nano9b/model_nano9b_v2.json --lengths longtail \
        --max-new-tokens 2048 --decodes cuda-graph,continuous --set lora.enabled=true --set train.loss_chunk_tokens=2048 \
        --set train.activation_checkpointing=true --set rollout.batch_size=256   # a 9B GRPO step, both engines
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from alignment.config import load_config  # noqa: E402
from alignment.grpo import GRPOConfig, run_grpo  # noqa: E402
from alignment.tracking import read_metrics  # noqa: E402
from rewards import reward  # noqa: E402

SIZES = {
    # blocks, hidden, vocab, prompts, group size, max new tokens, generation batch, learner row tokens
    "full": dict(layers=24, hidden=1024, vocab=32768, prompts=64, group_size=8, max_new_tokens=1024,
                 gen_batch=512, row_tokens=16384),
    "tiny": dict(layers=6, hidden=64, vocab=1024, prompts=4, group_size=4, max_new_tokens=16,
                 gen_batch=16, row_tokens=512),
}


@reward("bench_parity")
def bench_parity(completion: str) -> float:
    """1 when the completion text has an even number of characters: variance in every group, no cost."""
    return float(len(completion) % 2 == 0)


def trl_parity(completions, **kwargs) -> list[float]:
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [bench_parity(t) for t in texts]


def build_model_dir(args, out: Path) -> Path:
    """A random-init hybrid and a tokenizer (the tiny one, grown to the vocabulary with filler tokens) on disk.

    With `--model-json` only the tokenizer is written: the stage builds that architecture itself, on the device (a
    CPU init of 9B parameters takes minutes)."""
    from transformers import AutoTokenizer, NemotronHConfig, NemotronHForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(REPO / "configs" / "tiny" / "tokenizer")
    if args.model_json:  # the architecture's own sizes, not the 24-block default's (results.json records them)
        architecture = json.loads(Path(args.model_json).read_text())
        args.vocab, args.hidden = architecture["vocab_size"], architecture["hidden_size"]
        args.layers = len(architecture.get("hybrid_override_pattern", "")) or architecture.get("num_hidden_layers")
    # Filler tokens make every id the random model can sample decodable, so rewards see real text.
    tokenizer.add_tokens([f"<w{i}>" for i in range(args.vocab - len(tokenizer))])
    if args.model_json:
        tokenizer.save_pretrained(out / "tokenizer")
        return out / "tokenizer"
    unit = "M-*-M-"  # 8 Mamba-2, 4 attention, 12 MLP in 24 blocks
    config = NemotronHConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, num_hidden_layers=args.layers,
        hybrid_override_pattern=(unit * (args.layers // len(unit) + 1))[: args.layers],
        num_attention_heads=max(args.hidden // 64, 1), num_key_value_heads=max(args.hidden // 256, 1), head_dim=64,
        intermediate_size=4 * args.hidden, mamba_num_heads=max(args.hidden // 32, 1), mamba_head_dim=64,
        n_groups=1, ssm_state_size=64, conv_kernel=4, chunk_size=128,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False, use_cache=True,
    )
    torch.manual_seed(0)
    model = NemotronHForCausalLM(config).to(torch.bfloat16 if args.dtype == "bfloat16" else torch.float32)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, {args.layers} blocks, "
          f"hidden {args.hidden}, vocab {len(tokenizer)}, {args.dtype}")
    path = out / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_prompts(args, out: Path) -> Path:
    from alignment.data import write_rows
    from data_recipes.synthetic_math import MathTaskConfig, generate_splits

    n = args.prompts * (args.steps + 1)
    rows = generate_splits(MathTaskConfig(train_size=n, validation_size=0, test_size=1, seed=0))
    write_rows(out / "train.jsonl", rows["train"])
    write_rows(out / "test.jsonl", rows["test"])
    return out


def profile_generation_call(out: Path, call: int) -> None:
    """Profile the stage's `call`-th `generate` call: Python functions by cumulative time, time spent in garbage
    collection and CUDA allocator retries, to explain where generation time goes inside the stage."""
    import cProfile
    import gc
    import io
    import pstats

    import alignment.grpo as grpo

    original, calls = grpo.generate, [0]

    def profiled(*args, **kwargs):
        calls[0] += 1
        if calls[0] != call:
            return original(*args, **kwargs)
        gc_time, started = [0.0], [0.0]

        def on_gc(phase, info):
            if phase == "start":
                started[0] = time.perf_counter()
            else:
                gc_time[0] += time.perf_counter() - started[0]

        def allocator() -> dict:
            stats = torch.cuda.memory_stats() if torch.cuda.is_available() else {}
            return {k: stats.get(k, 0) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free")}

        before = allocator()
        gc.callbacks.append(on_gc)
        profiler = cProfile.Profile()
        t0 = time.perf_counter()
        try:
            return profiler.runcall(original, *args, **kwargs)
        finally:
            wall = time.perf_counter() - t0
            gc.callbacks.remove(on_gc)
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(45)
            during = {k: v - before[k] for k, v in allocator().items()}
            summary = f"generate wall {wall:.2f} s, gc {gc_time[0]:.2f} s, gc tracked objects {len(gc.get_objects())}, " \
                      f"allocator during the call {during}\n"
            print(summary, flush=True)
            (out / "grpo_generate_profile.txt").write_text(summary + text.getvalue())

    grpo.generate = profiled


@contextlib.contextmanager
def planned_lengths(low: int, high: int, seed: int = 0, short_first: int = 0, short_length: int = 0):
    """Samples end at log-uniform planned lengths (see the docstring): a random-init model's stand-in for real,
    long-tailed completions. The same prompts in the same order get the same lengths on every side. The first
    `short_first` samples end after `short_length` tokens instead: a warm-up step that compiles and captures what
    the timed steps use without generating as much."""
    from alignment.rollout import generation

    seen: dict[tuple[int, ...], int] = {}
    created = itertools.count()
    original_init, original_step = generation._Sample.__init__, generation._Sample.step

    def init(sample, prompt, *rest, **kwargs):
        original_init(sample, prompt, *rest, **kwargs)
        key = tuple(prompt)
        seen[key] = seen.get(key, -1) + 1
        draw = random.Random(hash((seed, key, seen[key])) & 0xFFFFFFFF).uniform(math.log(low), math.log(high))
        sample.planned = short_length if next(created) < short_first else int(round(math.exp(draw)))

    def step(sample, model_choice, choice_logprob):
        if len(sample.tokens) + 1 >= sample.planned and sample.settings.eos_token_ids and not sample.pending:
            model_choice = sample.settings.eos_token_ids[0]
        return original_step(sample, model_choice, choice_logprob)

    generation._Sample.__init__, generation._Sample.step = init, step
    try:
        yield
    finally:
        generation._Sample.__init__, generation._Sample.step = original_init, original_step


def run_ours(args, model_dir: Path, data: Path, out: Path, decode: str = "auto") -> dict:
    steps = args.steps + args.profile_generate  # the profiled step comes last and is not timed
    if args.profile_generate:
        profile_generation_call(out, steps)
    config = load_config(GRPOConfig, None, [
        *([f"model.name_or_path={Path(args.model_json).resolve()}", f"model.tokenizer={model_dir}"]
          if args.model_json else [f"model.name_or_path={model_dir}"]),
        f"model.dtype={args.dtype}",
        f"data.train_path={data / 'train.jsonl'}", f"eval.test_path={data / 'test.jsonl'}",
        f"rollout.prompts_per_step={args.prompts}", f"rollout.group_size={args.group_size}",
        f"rollout.max_new_tokens={args.max_new_tokens}", f"rollout.batch_size={args.gen_batch}",
        "rollout.temperature=1.0", "rollout.top_p=1.0",
        "loss.minibatches=1", "loss.epochs=1", "loss.overlong=keep",
        "sampling.dynamic_sampling=false", "sampling.drop_solved=false",
        f"train.max_steps={steps}", "train.lr=1.0e-6", f"train.max_tokens_per_row={args.row_tokens}",
        "train.rows_per_micro_batch=1", "train.sample_every=1000",
        "rewards.rewards=[{name: bench_parity}]", "rewards.mode=inprocess",
        "eval.max_samples=1", "eval.max_new_tokens=1", "eval.budgets=[]", "evaluate_before=false",
        f"rollout.decode={decode}", f"output_dir={out / ('ours-' + decode)}", f"device={args.device}",
        f"cpu_threads={args.threads}", *args.set,
    ])
    short_first = args.prompts * args.group_size if args.warmup_tokens else 0  # the warm-up step's samples
    with planned_lengths(args.min_new_tokens, args.max_new_tokens, short_first=short_first,
                         short_length=args.warmup_tokens) if args.lengths == "longtail" else contextlib.nullcontext():
        run_grpo(config)
    steps = [m for m in read_metrics(out / f"ours-{decode}" / "metrics.jsonl") if "time_step" in m][1 : args.steps]
    return summarise(
        step=[m["time_step"] for m in steps], generate=[m["time_generate"] for m in steps],
        reward=[m["time_reward"] for m in steps], learn=[m["time_learn"] for m in steps],
        generated=[m["tokens_generated"] for m in steps], trained=[m["tokens_trained"] for m in steps],
    )


def run_trl(args, model_dir: Path, data: Path, out: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig as TRLConfig, GRPOTrainer

    from alignment.data import read_rows
    from alignment.evaluate import prompt_messages

    rows, _ = read_rows(data / "train.jsonl", "prompt")
    dataset = Dataset.from_list([{"prompt": prompt_messages(r)} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    times: dict[str, list[float]] = {"step": [], "generate": [], "reward": [], "generated": [], "trained": []}
    current = {"generate": 0.0, "reward": 0.0, "generated": 0, "trained": 0}

    def timed_reward(prompts, completions, completion_ids, **kwargs):
        start = time.perf_counter()
        scores = trl_parity(completions)
        current["reward"] += time.perf_counter() - start
        current["generated"] += sum(len(c) for c in completion_ids)
        return scores

    timed_reward.__name__ = "bench_parity"

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            sync(args.device)
            current.update(generate=0.0, reward=0.0, generated=0, trained=0, start=time.perf_counter())

        def on_step_end(self, *a, **k):
            sync(args.device)
            times["step"].append(time.perf_counter() - current["start"])
            for key in ("generate", "reward", "generated", "trained"):
                times[key].append(current[key])
            # Per-step times so far, so a run cut off mid-way still leaves the TRL side's figures.
            (out / "trl_steps.json").write_text(json.dumps(times, indent=2))

    trl_args = TRLConfig(
        output_dir=str(out / "trl"), max_steps=args.steps, learning_rate=1e-6, logging_steps=1, save_strategy="no",
        report_to="none", num_generations=args.group_size, max_completion_length=args.max_new_tokens,
        # One optimizer step per rollout batch of prompts x group_size completions, as ours.
        per_device_train_batch_size=min(8, args.prompts * args.group_size),
        gradient_accumulation_steps=args.prompts * args.group_size // min(8, args.prompts * args.group_size),
        bf16=args.dtype == "bfloat16", use_cpu=args.device == "cpu", temperature=1.0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=timed_reward, args=trl_args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[StepTimer()])
    generate = trainer.model.generate

    def timed_generate(*a, **k):
        sync(args.device)
        start = time.perf_counter()
        result = generate(*a, **k)
        sync(args.device)
        current["generate"] += time.perf_counter() - start
        # Prompt + completion tokens the learner trains on (padding excluded, as on our side).
        current["trained"] += int((result != tokenizer.pad_token_id).sum())
        return result

    trainer.model.generate = timed_generate
    trainer.train()
    steps = slice(1, None)
    return summarise(
        step=times["step"][steps], generate=times["generate"][steps], reward=times["reward"][steps],
        learn=[s - g - r for s, g, r in zip(times["step"], times["generate"], times["reward"])][steps],
        generated=times["generated"][steps], trained=times["trained"][steps],
    )


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def summarise(step, generate, reward, learn, generated, trained) -> dict:
    mean = statistics.fmean
    return {
        "steps_measured": len(step), "step_s": mean(step), "generate_s": mean(generate), "reward_s": mean(reward),
        "learn_s": mean(learn), "generated_tokens_per_s": sum(generated) / sum(generate),
        "trained_tokens_per_s": sum(trained) / sum(learn),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="full", help="full: the GPU benchmark; tiny: a CPU check")
    parser.add_argument("--steps", type=int, default=3, help="rollout steps per side; the first is warm-up")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="bfloat16 (default on GPU) or float32 (default on CPU)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0 keeps torch's default)")
    parser.add_argument("--skip-trl", action="store_true", help="measure our stage only")
    parser.add_argument("--profile-generate", action="store_true",
                        help="profile the generate call of one extra step of ours (not timed)")
    parser.add_argument("--out", default="runs/bench/grpo", help="where results.json and the runs go")
    parser.add_argument("--lengths", choices=["model", "longtail"], default="model",
                        help="model: what the model writes (a random model: nearly always the cap); longtail: planned")
    parser.add_argument("--min-new-tokens", type=int, default=None, help="longtail's shortest (--max-new-tokens / 32)")
    parser.add_argument("--warmup-tokens", type=int, default=0,
                        help="longtail: the warm-up step's samples end after this many tokens (0: planned as the rest)")
    parser.add_argument("--decodes", default="auto", help="comma-separated rollout.decode paths of our stage")
    parser.add_argument("--model-json", help="an architecture's config JSON instead of the 24-block model, e.g. "
                                             "configs/nano9b/model_nano9b_v2.json (built on the device)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a GRPO config override for our stage, e.g. --set lora.enabled=true (repeatable)")
    for key in SIZES["full"]:
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"override the size's {key}")
    args = parser.parse_args()
    for key, value in SIZES[args.size].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is warm-up)")
    if args.device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    args.min_new_tokens = args.min_new_tokens or max(1, args.max_new_tokens // 32)
    args.decodes = args.decodes.split(",")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        tmp = Path(tmp)
        model_dir, data = build_model_dir(args, tmp), write_prompts(args, tmp)
        results = {"setup": {k: v for k, v in vars(args).items()}, "decodes": {}}
        for decode in args.decodes:
            results["decodes"][decode] = run_ours(args, model_dir, data, out, decode)
            (out / "results.json").write_text(json.dumps(results, indent=2))  # so far, in case a side is cut off
            print(f"ours, decode={decode}: {json.dumps(results['decodes'][decode])}", flush=True)
        results["ours"] = results["decodes"][args.decodes[0]]
        results["trl"] = None
        if args.model_json and not args.skip_trl:  # the architecture is built by our stage on the device
            print("--model-json: no saved model for TRL's GRPOTrainer to load; skipping its side")
        elif len(args.decodes) == 1 and not args.skip_trl:  # decode paths side by side: ours only
            try:
                import trl  # noqa: F401
            except ImportError:
                print("TRL not importable: skipping the GRPOTrainer side")
            else:
                results["trl"] = run_trl(args, model_dir, data, out)
    if args.device.startswith("cuda"):
        results["setup"]["gpu"] = torch.cuda.get_device_name()

    rows = [(f"ours, {d}", r) for d, r in results["decodes"].items()] + \
        ([("trl GRPOTrainer", results["trl"])] if results["trl"] else [])
    print(f"\n{args.prompts} prompts x {args.group_size} completions, up to {args.max_new_tokens} new tokens, "
          f"{args.device}, {args.dtype}")
    print(f"{'':18}{'step s':>9}{'generate':>10}{'reward':>9}{'learn':>9}{'gen tok/s':>11}{'train tok/s':>12}")
    for name, r in rows:
        print(f"{name:18}{r['step_s']:9.2f}{r['generate_s']:10.2f}{r['reward_s']:9.3f}{r['learn_s']:9.2f}"
              f"{r['generated_tokens_per_s']:11.0f}{r['trained_tokens_per_s']:12.0f}")
    if results["trl"]:
        results["speedup_step"] = results["trl"]["step_s"] / results["ours"]["step_s"]
        print(f"speed-up (TRL step time / ours): {results['speedup_step']:.2f}x")
    if len(args.decodes) > 1:
        first, last = (results["decodes"][d]["step_s"] for d in (args.decodes[0], args.decodes[-1]))
        results["speedup_step_decodes"] = first / last
        print(f"speed-up ({args.decodes[0]} step time / {args.decodes[-1]}): {first / last:.2f}x")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
