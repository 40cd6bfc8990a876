"""Sandbox throughput: executions per second for a trivial program and for a typical test-suite program.

    python bench/bench_sandbox.py [--runs 100] [--workers 1 2 4]

The test-suite program is what the `code_tests` reward runs: a generated task's solution and its asserts, through
the test harness. Each figure is runs / wall time with `workers` runs in flight at once (threads, each waiting on
its own sandboxed process).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from envs.code_tasks import generate_code_tasks  # noqa: E402
from envs.sandbox import Sandbox, SandboxStatus, run_program  # noqa: E402
from rewards.code_tests import _HARNESS  # noqa: E402

TRIVIAL = "print('ok')\n"


def test_suite_program(n_tests: int = 10) -> tuple[str, str]:
    """(program, stdin) of one harness run: a reference solution and n_tests asserts."""
    row = generate_code_tasks(1, seed=0)[0]
    tests = (row["tests"] * n_tests)[:n_tests]
    return _HARNESS, json.dumps(["@@bench@@", tests, row["solution"], 2.0]) + "\n"


def rate(code: str, stdin: str | None, runs: int, workers: int) -> float:
    def one(_: int) -> None:
        result = run_program(code, stdin=stdin)
        if result.status is not SandboxStatus.OK:
            raise RuntimeError(f"benchmark program failed: {result.status.value}: {result.stderr[-300:]}")

    one(0)  # warm up (isolation probe, page cache)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, range(runs)))
    return runs / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100, help="executions per measurement")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1], help="runs in flight")
    args = parser.parse_args()

    isolated, python, reason = Sandbox()._check()
    print(f"machine: {os.cpu_count()} CPU cores; sandbox: {'bwrap (isolated)' if isolated else 'UNISOLATED: ' + reason}; "
          f"python: {python}")
    suite_code, suite_stdin = test_suite_program()
    for label, code, stdin in [("trivial program", TRIVIAL, None), ("test-suite program (10 asserts)", suite_code,
                                                                  suite_stdin)]:
        for workers in args.workers:
            print(f"{label:34s} workers={workers}: {rate(code, stdin, args.runs, workers):7.1f} executions/s")


if __name__ == "__main__":
    main()
