"""`code_tests`: run the row's tests in the sandbox against the program in the completion's last Python block.

Each item of a row's `tests` is either
- a Python statement (usually `assert f(2) == 4`), run after the program in the same namespace, or
- `{"input": "...", "output": "..."}`: the program is run with `input` as stdin and passes when its stdout equals
  `output` (trailing whitespace of each line and trailing blank lines ignored).

Statement tests run in one sandbox run through a small harness. The harness reads the tests and a random marker
from stdin before the program runs, so the program can read neither from its source file; it reports results on a
line that starts with the marker. (Code that inspects the harness's memory could still forge results: the harness
raises the bar, it is not a proof.)
"""

from __future__ import annotations

import json
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from envs.answers import answer_part, last_code_block
from envs.sandbox import SandboxLimits, run_program
from rewards.registry import RewardResult, reward

MAX_TESTS = 50  # Nemotron 3 caps unit tests at 50 per problem
IO_WORKERS = 4

_HARNESS = r'''
import json as _json, os as _os, signal as _signal, sys as _sys
_marker, _tests, _program, _per_test_s = _json.loads(_sys.stdin.readline())
_sys.stdin.close()
_os.close(0)
_os.open(_os.devnull, _os.O_RDONLY)  # fd 0 again, so /proc/self/fd/0 leads nowhere
_sys.stdin = open(0, closefd=False)
_write, _dumps = _os.write, _json.dumps

def _alarm(signum, frame):
    raise TimeoutError(f"test took more than {_per_test_s} s")

_signal.signal(_signal.SIGALRM, _alarm)
_namespace = {"__name__": "__main__"}
_results = []
try:
    exec(compile(_program, "solution.py", "exec"), _namespace)
except BaseException as _e:
    _results = [[False, f"program failed: {type(_e).__name__}: {_e}"[:300]]] * len(_tests)
else:
    for _test in _tests:
        _signal.setitimer(_signal.ITIMER_REAL, _per_test_s)
        try:
            exec(compile(_test, "test.py", "exec"), _namespace)
            _results.append([True, ""])
        except BaseException as _e:
            _results.append([False, f"{_test[:100]}: {type(_e).__name__}: {_e}"[:300]])
        finally:
            _signal.setitimer(_signal.ITIMER_REAL, 0)
_write(1, ("\n" + _marker + _dumps(_results) + "\n").encode())
'''


@reward("code_tests")
def code_tests(
    completion: str,
    tests: list[Any] | str,
    max_tests: int = MAX_TESTS,
    all_or_nothing: bool = False,
    per_test_s: float = 2.0,
    wall_s: float = 20.0,
    memory_mb: int = 1024,
    reasoning: str | bool | None = None,
) -> RewardResult:
    """Fraction of the row's `tests` the answer's last ```python block passes (1/0 with `all_or_nothing`).

    With the row's `reasoning` on, a completion that never wrote `</think>` has no answer part and scores 0.
    """
    if isinstance(tests, str):
        tests = json.loads(tests)
    tests = list(tests)[:max_tests]
    if not tests:
        raise ValueError("the row has no tests")
    program = last_code_block(answer_part(completion, reasoning))
    if program is None:
        return RewardResult(0.0, {"reason": "no ```python block in the answer", "passed": 0, "total": len(tests)})
    limits = SandboxLimits(wall_s=wall_s, cpu_s=max(1, int(wall_s)), memory_mb=memory_mb)
    statements = [t for t in tests if isinstance(t, str)]
    pairs = [t for t in tests if isinstance(t, dict)]
    if len(statements) + len(pairs) != len(tests):
        raise ValueError("each test must be a statement string or an {'input', 'output'} object")

    results: list[tuple[bool, str]] = []
    notes: dict[str, Any] = {}
    if statements:
        results += _run_statements(program, statements, per_test_s, limits, notes)
    if pairs:
        with ThreadPoolExecutor(max_workers=min(IO_WORKERS, len(pairs))) as pool:
            results += list(pool.map(lambda pair: _run_pair(program, pair, limits), pairs))
    passed = sum(ok for ok, _ in results)
    score = float(passed == len(results)) if all_or_nothing else passed / len(results)
    failures = [message for ok, message in results if not ok][:3]
    return RewardResult(score, {"passed": passed, "total": len(results), "failures": failures, **notes})


def _run_statements(
    program: str, tests: list[str], per_test_s: float, limits: SandboxLimits, notes: dict[str, Any]
) -> list[tuple[bool, str]]:
    marker = "@@results-" + secrets.token_hex(16) + "@@"
    stdin = json.dumps([marker, tests, program, per_test_s]) + "\n"
    run = run_program(_HARNESS, stdin=stdin, limits=limits)
    notes.update(status=run.status.value, isolated=run.isolated)
    for line in reversed(run.stdout.splitlines()):
        if line.startswith(marker):
            return [(bool(ok), message) for ok, message in json.loads(line[len(marker):])]
    reason = f"sandbox {run.status.value}: {run.stderr.strip()[-300:]}"
    return [(False, reason)] * len(tests)


def _run_pair(program: str, pair: dict[str, Any], limits: SandboxLimits) -> tuple[bool, str]:
    run = run_program(program, stdin=str(pair["input"]), limits=limits)
    if not run.ok:
        return False, f"sandbox {run.status.value}: {run.stderr.strip()[-200:]}"
    if _normalize(run.stdout) == _normalize(str(pair["output"])):
        return True, ""
    return False, f"expected {str(pair['output'])[:80]!r}, got {run.stdout[:80]!r}"


def _normalize(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines()).rstrip()
