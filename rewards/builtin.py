"""Imports the modules that register the built-in rewards."""

from rewards import (code_tests, instruction, json_schema, length, math_answer, reward_model, thinking,  # noqa: F401
                     tool_use)
