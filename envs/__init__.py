"""Task environments (prompts and grading), answer extraction, and the sandbox for model-written code.

- `envs.base.Environment`: a row -> prompt messages, and a completion -> scores through `rewards`.
- `envs.math_env.MathEnv`, `envs.code_env.CodeEnv`, `envs.instruction_env.InstructionEnv`.
- `envs.code_tasks.generate_code_tasks`: the synthetic code task family of the tiny default.
- `envs.sandbox.run_program`: run a Python program in a contained process.
"""
