"""The selector registry: token selectors by name (timm's `@register_model`, for selectors).

A selector decides which tokens of one scale reach the LLM (`uhrbat.selectors.base.Selector`).
Names are listed without importing torch (`selector_names()` reads the module table below), so
the CLI's choices, `--help`, the server's validation, chat and the docs all read this registry;
`get_selector(name)` imports the module that defines it on first use.

Adding a selector is one module and one registration:

```python
# src/uhrbat/selectors/my_selector.py
from uhrbat.selectors import register_selector
from uhrbat.selectors.base import SelectorBase

@register_selector("mine")
class MySelector(SelectorBase):  # defaults: no grouping step, no masks
    def select(self, tokens, relevance, budget, options, groups=None, mask=None):
        return my_function(tokens.embeds, relevance, budget)  # -> uhrbat.compression.types.Selection
```

and one line `"mine": "uhrbat.selectors.my_selector"` in `_MODULES`.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from uhrbat.errors import ConfigError

if TYPE_CHECKING:
    from uhrbat.selectors.base import Selector

__all__ = ["get_selector", "register_selector", "selector_names"]

#: name -> module that registers it (imported lazily; nothing here imports torch).
_MODULES: dict[str, str] = {
    "kmeans": "uhrbat.selectors.builtin",
    "segments": "uhrbat.selectors.builtin",
    "topk": "uhrbat.selectors.builtin",
    "divprune": "uhrbat.selectors.diversity",
    "dpp": "uhrbat.selectors.diversity",
}
_REGISTERED: dict[str, Selector] = {}
_LOCK = threading.Lock()


def register_selector(name: str) -> Callable[[type], type]:
    """Class decorator: register an instance of the class under `name` (its `name` attribute)."""

    def wrap(cls: type) -> type:
        with _LOCK:
            if name in _REGISTERED:
                raise ConfigError(f"selector {name!r} is registered twice")
            instance = cls()
            instance.name = name
            _REGISTERED[name] = instance
        return cls

    return wrap


def selector_names() -> tuple[str, ...]:
    """Every selector name, in registration-table order (no module is imported)."""
    return tuple(dict.fromkeys([*_MODULES, *_REGISTERED]))


def check_selector_name(name: Any) -> str:
    """`name` if it is a registered selector, else `ConfigError` listing the names."""
    names = selector_names()
    if not isinstance(name, str) or name not in names:
        raise ConfigError(f"selector must be one of {', '.join(names)}, got {name!r}")
    return name


def get_selector(name: str) -> Selector:
    """The registered selector `name` (its module is imported on first use)."""
    check_selector_name(name)
    if name not in _REGISTERED:
        importlib.import_module(_MODULES[name])
    got = _REGISTERED.get(name)
    if got is None:
        raise ConfigError(f"module {_MODULES[name]} does not register selector {name!r}")
    return got
