"""One registry class for frontends, encoders, maskers, augmentations and methods.

A component is a class with a nested `Config` dataclass; its constructor takes `(cfg, **deps)`.
`@ENCODERS.register("vit")` records it under a name; `config.build_component(ENCODERS, section,
path, **deps)` parses a preset section strictly against its Config and builds it. This module
depends on nothing else in sslaudio.
"""

from __future__ import annotations

import difflib
from typing import Callable


class UnknownComponent(LookupError):
    """A name no component is registered under."""

    def __str__(self) -> str:  # LookupError would quote the message
        return str(self.args[0])


def did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, type] = {}

    def register(self, name: str) -> Callable[[type], type]:
        def deco(cls: type) -> type:
            if name in self._items:
                raise RuntimeError(f"{self.kind} '{name}' registered twice")
            if not hasattr(cls, "Config"):
                raise RuntimeError(f"{self.kind} '{name}' has no Config dataclass")
            cls.registry_name = name
            self._items[name] = cls
            return cls

        return deco

    def names(self) -> list[str]:
        return sorted(self._items)

    def get(self, name: str) -> type:
        if name not in self._items:
            raise UnknownComponent(f"unknown {self.kind} '{name}'{did_you_mean(name, self.names())}; "
                                   f"known: {', '.join(self.names())}")
        return self._items[name]


FRONTENDS = Registry("frontend")
ENCODERS = Registry("encoder")
MASKERS = Registry("masker")
AUGMENTS = Registry("augmentation")
METHODS = Registry("method")
