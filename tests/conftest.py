import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY_TOKENIZER = REPO / "configs" / "tiny" / "tokenizer"
TINY_MODEL = REPO / "configs" / "tiny" / "model.json"


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_TOKENIZER)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small synthetic dataset written in the real row schema."""
    from data_recipes.synthetic_math import MathDataConfig, MathTaskConfig, write_splits

    out = tmp_path_factory.mktemp("data")
    write_splits(MathDataConfig(task=MathTaskConfig(train_size=64, validation_size=8, test_size=16), output_dir=str(out)))
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    with path.open("wb") as handle:
        for row in rows:
            handle.write(row if isinstance(row, bytes) else (json.dumps(row) + "\n").encode())
    return path


@pytest.fixture(autouse=True)
def _few_threads():
    # Two cores: tests that build small models are faster without thread contention between them.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def killed_on_call(function, n: int):
    """`function`, except that its n-th call raises KeyboardInterrupt: a run killed mid-stage."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt("killed")
        return function(*args, **kwargs)

    return wrapper
