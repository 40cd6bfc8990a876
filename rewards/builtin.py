"""Imports the modules that register the built-in rewards."""

from rewards import code_tests, instruction, json_schema, length, math_answer, thinking, tool_use  # noqa: F401
