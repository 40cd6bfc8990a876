"""Where a model or tokenizer comes from: a config .json, a local folder, or a hub id, decided once and quickly.

transformers tries a name that is not a local folder as a hub id and retries the connection for the best part of a
minute before it fails. `check_model_source` decides before anything loads: a local folder or file is used as it
is; anything else is looked up once as a hub id (the local cache first, then one request with a short timeout), and
a failure names the config key and both readings of the name.
"""

from __future__ import annotations

from pathlib import Path

from alignment.config import ConfigError, relative_to_cwd

HUB_TIMEOUT_S = 10.0


def check_model_source(value: str, key: str) -> None:
    local = Path(value).expanduser()
    if value.endswith(".json"):
        if not local.is_file():
            raise ConfigError(f"`{key}`: no such model config file: {value}{relative_to_cwd(local)}")
        return
    if local.is_dir():
        return
    if local.exists():
        raise ConfigError(f"`{key}`: {value} is a file; a model is a checkpoint folder, a config .json or a hub id")
    problem = _hub_problem(value)
    if problem:
        raise ConfigError(f"`{key}`: {value!r} is not a local folder (no {local.resolve()}), "
                          f"and as a hub id: {problem}")


def _hub_problem(repo_id: str) -> str | None:
    """None if `repo_id` can be loaded as a hub id (it is in the local cache, or the hub answers for it)."""
    import huggingface_hub
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return "not a valid one (the form is `org/name`)"
    for filename in ("config.json", "tokenizer_config.json"):
        if isinstance(huggingface_hub.try_to_load_from_cache(repo_id, filename), str):
            return None
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return "not in the local hub cache, and HF_HUB_OFFLINE is set"
    try:
        huggingface_hub.model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - any failure of the one lookup is reported, with its kind
        first_line = (str(exc).strip().splitlines() or [""])[0]
        return f"the hub lookup failed ({type(exc).__name__}: {first_line[:200]})"
    return None
