"""`json_schema`: the answer is JSON that validates against the row's JSON Schema."""

from __future__ import annotations

import json
from typing import Any

import jsonschema

from envs.answers import answer_part
from rewards.instruction import parse_json_answer
from rewards.registry import RewardResult, reward


@reward("json_schema")
def json_schema(completion: str, schema: dict[str, Any] | str, reasoning: str | bool | None = None) -> RewardResult:
    """1 when the answer (or its last ```json fence) is JSON valid under the row's `schema`, else 0.

    With the row's `reasoning` on, a completion that never wrote `</think>` has no answer part and scores 0.
    """
    if isinstance(schema, str):
        schema = json.loads(schema)
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)  # a broken schema is a data error, not a wrong answer
    try:
        document = parse_json_answer(answer_part(completion, reasoning))
    except ValueError as e:
        return RewardResult(0.0, {"reason": f"not JSON: {e}"})
    errors = sorted(validator_cls(schema).iter_errors(document), key=lambda e: list(e.path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.path) or "(root)"
        return RewardResult(0.0, {"reason": f"{where}: {first.message}", "errors": len(errors)})
    return RewardResult(1.0, {})
