"""The reward registry: the `@reward` decorator and how rewards are found by name.

A reward is found in this order:
1. rewards registered in this process: the built-ins, and any module imported so far that used `@reward`;
2. installed packages exposing the entry-point group `hybrid_align.rewards` (`name = "package.module:function"`);
3. a `module:function` path given as the name itself (e.g. in a config: `name: my_pkg.rewards:exact`).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "hybrid_align.rewards"


@dataclass
class RewardResult:
    """A score with details. `info` must be JSON-serialisable; it is logged and printed by `align rewards check`."""

    score: float
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reward:
    """A registered reward function and how to call it.

    fn: the function. Per-sample form: `fn(completion, **row_fields) -> float | RewardResult`. Batch form
        (`batched=True`): `fn(completions, **columns) -> list[float | RewardResult]`, each column a list with one
        value per completion. Either may be `async def`.
    source: where it came from, for `align rewards list` ("builtin", "module x.y", "entry point ...", "path ...").
    """

    name: str
    fn: Callable[..., Any]
    batched: bool = False
    is_async: bool = False
    description: str = ""
    source: str = ""
    check_args: Callable[[dict], None] | None = None  # raises ValueError on bad `args`, before any model loads
    prepare: Callable[[dict], Any] | None = None  # once in the trainer's process per scorer; may return a release

    def select_kwargs(self, fields: dict[str, Any]) -> dict[str, Any]:
        """The row fields this function accepts: all of them when it takes **kwargs, else those it names.

        Rows carry more columns than any one reward uses; passing only the named ones lets a reward be written as
        `def exact(completion, answer)`.
        """
        params = inspect.signature(self.fn).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return dict(fields)
        names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        return {key: value for key, value in fields.items() if key in names}


_REGISTRY: dict[str, Reward] = {}
_LOCK = threading.RLock()
_ENTRY_POINTS_LOADED = False
_BUILTINS_LOADED = False


def reward(name: str, *, batched: bool = False, description: str | None = None,
           check_args: Callable[[dict], None] | None = None, prepare: Callable[[dict], Any] | None = None
           ) -> Callable:
    """Register the decorated function as the reward `name`. The function itself is returned unchanged.

    `check_args(args)` raises ValueError when a config's `args` for it are wrong (a stage calls it before it loads
    anything); `prepare(args)` runs once in the trainer's process when a scorer is built (start a server, warm a
    cache), not in each reward worker, and may return a function the scorer's `close()` calls (stop that server).

    >>> @reward("exact_answer")
    ... def exact_answer(completion: str, answer: str) -> float:
    ...     return float(completion.strip() == answer)
    """

    def register(fn: Callable) -> Callable:
        module = getattr(fn, "__module__", "") or ""
        source = "builtin" if module.startswith("rewards.") else f"module {module}"
        registered = dataclasses.replace(_make_reward(name, fn, batched, description, source),
                                         check_args=check_args, prepare=prepare)
        with _LOCK:
            _REGISTRY[name] = registered
        fn.__reward__ = registered
        return fn

    return register


def get_reward(name: str) -> Reward:
    """The reward registered as `name`, loading entry points or importing a `module:function` path if needed."""
    _load_builtins()
    with _LOCK:
        if name in _REGISTRY:
            return _REGISTRY[name]
    _load_entry_points()
    with _LOCK:
        if name in _REGISTRY:
            return _REGISTRY[name]
    if ":" in name:
        return _load_path(name)
    known = ", ".join(sorted(_REGISTRY))
    raise KeyError(
        f"unknown reward {name!r}. Known: {known}. A reward can also be named by a `module:function` path or "
        f"installed with an entry point in the group {ENTRY_POINT_GROUP!r}."
    )


def list_rewards() -> list[Reward]:
    """Every reward that can be named without a path: built-ins, imported modules' and installed entry points."""
    _load_builtins()
    _load_entry_points()
    with _LOCK:
        return sorted(_REGISTRY.values(), key=lambda r: r.name)


def reload_entry_points() -> None:
    """Scan installed packages again (after installing a plugin into a running process)."""
    global _ENTRY_POINTS_LOADED
    with _LOCK:
        _ENTRY_POINTS_LOADED = False
    _load_entry_points()


def _make_reward(name: str, fn: Callable, batched: bool, description: str | None, source: str) -> Reward:
    doc = (inspect.getdoc(fn) or "").strip().splitlines()
    return Reward(
        name=name,
        fn=fn,
        batched=batched,
        is_async=inspect.iscoroutinefunction(fn),
        description=description if description is not None else (doc[0] if doc else ""),
        source=source,
    )


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    with _LOCK:
        _BUILTINS_LOADED = True
    importlib.import_module("rewards.builtin")


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    with _LOCK:
        if _ENTRY_POINTS_LOADED:
            return
        _ENTRY_POINTS_LOADED = True
        for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = entry.dist.name if entry.dist is not None else "?"
            try:
                _register_loaded(entry.name, entry.load(), f"entry point {dist} ({entry.value})")
            except Exception:  # one broken plugin must not hide the others
                logger.exception("cannot load reward entry point %s = %s from %s", entry.name, entry.value, dist)


def _import_here_too(module_name: str):
    """Import `module_name` from the installed packages, else from the working directory.

    Console scripts such as `align` put their own folder first on sys.path, not the working directory, so a
    `my_rewards.polite:polite` next to the user's config would not import. The working directory is appended, not
    prepended: an installed package of the same name still wins. Ray reward actors get this process's sys.path.
    """
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        here = os.getcwd()
        top = module_name.split(".")[0]
        if e.name != top or here in sys.path:  # a missing dependency inside it, or already looked there
            raise
        sys.path.append(here)
        logger.info("reward module %s imported from the working directory %s", module_name, here)
        return importlib.import_module(module_name)


def _load_path(path: str) -> Reward:
    module_name, _, attr = path.partition(":")
    try:
        fn = getattr(_import_here_too(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise KeyError(f"reward path {path!r} cannot be loaded from the installed packages or the working directory "
                       f"{os.getcwd()}: {e}") from e
    return _register_loaded(path, fn, f"path {path}")


def _register_loaded(name: str, obj: Any, source: str) -> Reward:
    """Register an object found by entry point or path under `name`; a plain function becomes a per-sample reward."""
    decorated: Reward | None = getattr(obj, "__reward__", None)
    if decorated is not None:
        registered = dataclasses.replace(decorated, name=name, source=source)
    elif callable(obj):
        registered = _make_reward(name, obj, batched=False, description=None, source=source)
    else:
        raise TypeError(f"{source} is not callable")
    with _LOCK:
        _REGISTRY[name] = registered
    return registered
