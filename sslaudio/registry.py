"""One registry class for frontends, encoders, maskers, augmentations and methods.

A component is a class with a nested `Config` dataclass; its constructor takes `(cfg, **deps)`.
`REGISTRY.build({"name": ..., **fields}, path)` validates the fields strictly and builds it.
"""

from __future__ import annotations

from typing import Any, Callable

from sslaudio.config import ConfigError, Preset, _did_you_mean, parse


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

    def get(self, name: str, path: str = "") -> type:
        if name not in self._items:
            where = f"{path}.name" if path else f"{self.kind} name"
            raise ConfigError(f"{where}: unknown {self.kind} '{name}'{_did_you_mean(name, self.names())}; "
                              f"known: {', '.join(self.names())}")
        return self._items[name]

    def config(self, section: dict, path: str) -> tuple[type, Any]:
        if not isinstance(section, dict) or "name" not in section:
            raise ConfigError(f"{path}: needs a 'name' (one of {', '.join(self.names())})")
        fields = dict(section)
        cls = self.get(fields.pop("name"), path)
        return cls, parse(cls.Config, fields, path)

    def build(self, section: dict, path: str, **deps: Any) -> Any:
        cls, cfg = self.config(section, path)
        return cls(cfg, **deps)


FRONTENDS = Registry("frontend")
ENCODERS = Registry("encoder")
MASKERS = Registry("masker")
AUGMENTS = Registry("augmentation")
METHODS = Registry("method")


def load_components() -> None:
    """Import every module that registers components (explicit, so registration is visible)."""
    import sslaudio.augment  # noqa: F401
    import sslaudio.encoders  # noqa: F401
    import sslaudio.frontends  # noqa: F401
    import sslaudio.masking  # noqa: F401
    import sslaudio.methods  # noqa: F401


def validate_components(preset: Preset) -> None:
    """Check every component section and the method's declared needs before anything trains."""
    load_components()
    FRONTENDS.config(preset.frontend, "frontend")
    ENCODERS.config(preset.encoder, "encoder")
    method_cls, method_cfg = METHODS.config(preset.method, "method")
    if preset.masker is not None:
        MASKERS.config(preset.masker, "masker")
    for i, aug in enumerate(preset.views or []):
        AUGMENTS.config(aug, f"views[{i}]")
    needs = method_cls.needs(method_cfg)
    name = preset.method["name"]
    if needs.masker and preset.masker is None:
        raise ConfigError(f"method '{name}' needs a 'masker' section")
    if needs.views and not preset.views:
        raise ConfigError(f"method '{name}' needs a 'views' augmentation chain")
    if needs.frontend and preset.frontend.get("name") not in needs.frontend:
        raise ConfigError(f"frontend.name: method '{name}' expects one of {list(needs.frontend)}, "
                          f"found '{preset.frontend.get('name')}'")
    if needs.segments and preset.data.segments != needs.segments:
        raise ConfigError(f"data.segments: method '{name}' with this config uses {needs.segments} "
                          f"crop(s) per file, found {preset.data.segments}")
