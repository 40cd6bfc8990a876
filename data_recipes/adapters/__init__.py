"""Dataset adapters: public dataset schemas -> the project's row schema (see `data_recipes/synthetic_math.py`).

Each schema has a plain function `rows_from_<schema>(records)` and a name in a registry, so a config or the command
line can say `schema: gsm8k`:

    from data_recipes.adapters import load_dataset_rows, rows_from_gsm8k
    rows = rows_from_gsm8k(records)                                   # records: list of dicts
    rows = load_dataset_rows("data/gsm8k.jsonl", "gsm8k")              # local JSONL / JSON / Parquet / directory
    rows = load_dataset_rows("openai/gsm8k", "gsm8k", split="train", name="main")   # hub, through `datasets`

Schemas: `llama_nemotron`, `nemotron_post_training` (conversation sets with a reasoning flag), `gsm8k`, `math`,
`openmathreasoning`, `aime` (math), `gpqa` (multiple choice), `mbpp`, `humaneval`, `livecodebench` (code with tests),
`openai_tools`, `xlam` (tool calling), `rows` (already converted).
Preference sets (chosen/rejected) are in `data_recipes/preference.py`.
"""

from data_recipes.adapters.base import (
    AdapterReport,
    RecordError,
    adapt,
    get_converter,
    register_schema,
    schema_names,
)
from data_recipes.adapters.choice_sets import rows_from_gpqa
from data_recipes.adapters.code_sets import rows_from_humaneval, rows_from_livecodebench, rows_from_mbpp
from data_recipes.adapters.conversation import rows_from_llama_nemotron, rows_from_nemotron_post_training
from data_recipes.adapters.loading import load_dataset_rows, load_dataset_rows_with_report, load_records
from data_recipes.adapters.math_sets import rows_from_aime, rows_from_gsm8k, rows_from_math, rows_from_openmathreasoning
from data_recipes.adapters.tool_sets import rows_from_openai_tools, rows_from_xlam

__all__ = [
    "AdapterReport",
    "RecordError",
    "adapt",
    "get_converter",
    "load_dataset_rows",
    "load_dataset_rows_with_report",
    "load_records",
    "register_schema",
    "rows_from_aime",
    "rows_from_gpqa",
    "rows_from_gsm8k",
    "rows_from_humaneval",
    "rows_from_livecodebench",
    "rows_from_llama_nemotron",
    "rows_from_math",
    "rows_from_mbpp",
    "rows_from_nemotron_post_training",
    "rows_from_openai_tools",
    "rows_from_openmathreasoning",
    "rows_from_xlam",
    "schema_names",
]
