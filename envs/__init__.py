"""Task environments (prompts and grading), answer extraction, and the sandbox for model-written code.

- `envs.base.Environment`: a row -> prompt messages, and a completion -> scores through `rewards`.
- `envs.math_env.MathEnv`, `envs.code_env.CodeEnv`, `envs.instruction_env.InstructionEnv`.
- `envs.code_tasks.generate_code_tasks`: the synthetic code task family of the tiny default.
- `envs.sandbox.run_program`: run a Python program in a contained process.
- `task_environments()`: the environment of each task name; it turns a row without chat `messages` into a
  prompt.
"""

from __future__ import annotations

import functools


@functools.cache
def task_environments() -> dict:
    """{task name: environment}. Imported on first use, so reading chat rows does not pull in the reward stack."""
    from envs.code_env import CodeEnv
    from envs.instruction_env import InstructionEnv
    from envs.math_env import MathEnv

    return {env.task: env for env in (MathEnv(), CodeEnv(), InstructionEnv())}
