"""Registries by name: plain dicts from the string a user types ("grpo", "k3") to a pure function.

A registry is just a `dict`; these two helpers add the only rules it needs: a name is registered once,
and an unknown name fails with the list of valid ones (so a typo in a config is a one-line fix).
"""

from collections.abc import Callable
from typing import Any


def register(registry: dict, name: str) -> Callable[[Callable], Callable]:
    """Decorator that adds the function to `registry` under `name` and returns it unchanged.
    Registering `name` twice raises ValueError (a silent overwrite would swap the math under a user)."""

    def decorator(fn: Callable) -> Callable:
        if name in registry:
            raise ValueError(f"{name!r} is already registered (to {registry[name].__name__})")
        registry[name] = fn
        return fn

    return decorator


def lookup(registry: dict, name: str, what: str) -> Any:
    """Return registry[name]; raise ValueError naming `what` and the sorted valid names if it is missing."""
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; choose one of {sorted(registry)}")
    return registry[name]
