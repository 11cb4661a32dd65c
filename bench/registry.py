"""Decorator registries for methods, tasks and suites.

A new method is one file under ``methods/`` with ``@register_method("name")`` plus one import line in
``methods/__init__.py``; a new task likewise under ``tasks/``. Lookups of unknown names raise
``BenchError`` listing the valid ones.
"""
from __future__ import annotations

from typing import Callable, TypeVar

from bench.errors import BenchError

T = TypeVar("T")

METHODS: dict[str, type] = {}
TASKS: dict[str, type] = {}
# suite name -> task names; "all" is computed. Tasks add themselves to their family's suite.
SUITES: dict[str, list[str]] = {"lra": [], "lm": [], "glue": [], "mt": [], "summarization": [], "kernels": []}


def _register(table: dict[str, type], kind: str, name: str) -> Callable[[T], T]:
    def decorator(cls: T) -> T:
        if name in table and table[name] is not cls:
            raise ValueError(f"{kind} {name!r} registered twice ({table[name].__module__} and {cls.__module__})")
        table[name] = cls
        cls.name = name  # type: ignore[attr-defined]
        return cls

    return decorator


def register_method(name: str):
    """Class decorator: make a ``bench.method.Method`` subclass available as ``--methods name``."""
    return _register(METHODS, "method", name)


def register_task(name: str, suite: str | None = None):
    """Class decorator: make a ``bench.task.Task`` subclass available as ``--tasks name``.

    ``suite`` adds it to that suite (e.g. ``lra``); ``python run_all.py --suite lra`` runs them all.
    """
    inner = _register(TASKS, "task", name)

    def decorator(cls: T) -> T:
        inner(cls)
        if suite is not None:
            SUITES.setdefault(suite, [])
            if name not in SUITES[suite]:
                SUITES[suite].append(name)
        cls.suite = suite  # type: ignore[attr-defined]
        return cls

    return decorator


def load_all() -> None:
    """Import the packages whose modules register methods and tasks."""
    import methods  # noqa: F401
    import tasks  # noqa: F401


def _lookup(table: dict[str, type], kind: str, name: str) -> type:
    load_all()
    if name not in table:
        raise BenchError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(table))}")
    return table[name]


def get_method(name: str) -> type:
    return _lookup(METHODS, "method", name)


def get_task(name: str) -> type:
    return _lookup(TASKS, "task", name)


def suite_tasks(suite: str) -> list[str]:
    load_all()
    if suite == "all":
        return [t for s in sorted(SUITES) if s != "kernels" for t in SUITES[s]]
    if suite not in SUITES:
        raise BenchError(f"unknown suite {suite!r}; valid suites: {', '.join(sorted([*SUITES, 'all']))}")
    return list(SUITES[suite])
