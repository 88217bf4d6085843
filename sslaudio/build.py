"""Assembly: the one module that turns a preset into components.

`load_preset(name, overrides)` reads a preset and validates it as a whole: every component
section against its registered Config, and the method's declared `Needs` (frontend, encoder,
masker mode, views, crops per file), so an impossible combination is refused before any data is
scanned or any file written. `build_method(preset)` builds frontend, encoder, masker and method;
`build_encoder(preset)` the frontend and encoder alone (for inference).
"""

from __future__ import annotations

import importlib
import json
import warnings
from typing import Callable

import torch
from torch import nn

from sslaudio.config import (
    ConfigError,
    Preset,
    build_component,
    component_config,
    load_preset_dict,
    preset_tree,
)
from sslaudio.methods.base import InputSpec, Method
from sslaudio.registry import AUGMENTS, ENCODERS, FRONTENDS, MASKERS, METHODS

# the modules whose import registers components (listed, so registration is visible)
COMPONENT_MODULES = ("sslaudio.augment", "sslaudio.frontends", "sslaudio.masking", "sslaudio.encoders",
                     "sslaudio.methods")


def load_components() -> None:
    for name in COMPONENT_MODULES:
        importlib.import_module(name)


def validate(preset: Preset) -> None:
    """Check every component section and the method's declared needs; raises ConfigError."""
    load_components()
    component_config(FRONTENDS, preset.frontend, "frontend")
    component_config(ENCODERS, preset.encoder, "encoder")
    method_cls, method_cfg = component_config(METHODS, preset.method, "method")
    masker_cfg = component_config(MASKERS, preset.masker, "masker")[1] if preset.masker is not None else None
    for i, aug in enumerate(preset.views or []):
        component_config(AUGMENTS, aug, f"views[{i}]")
    needs = method_cls.needs(method_cfg)
    name = preset.method["name"]
    frontend, encoder = preset.frontend.get("name"), preset.encoder.get("name")
    if needs.frontend and frontend not in needs.frontend:
        raise ConfigError(f"frontend.name: method '{name}' expects one of {list(needs.frontend)}, found '{frontend}'")
    if needs.encoder and encoder not in needs.encoder:
        raise ConfigError(f"encoder.name: method '{name}' needs one of {list(needs.encoder)}, found '{encoder}'")
    if needs.masker == "none" and masker_cfg is not None:
        raise ConfigError(f"masker: method '{name}' takes no masker; remove the 'masker' section")
    if needs.masker in ("keep", "replace"):
        if masker_cfg is None:
            raise ConfigError(f"method '{name}' needs a 'masker' section with mode: {needs.masker}")
        mode = getattr(masker_cfg, "mode", None)
        if mode != needs.masker:
            raise ConfigError(f"masker.mode: method '{name}' needs mode: {needs.masker}, found {mode!r}")
        # every method that takes a masker learns from the frames it hides: with none hidden it
        # trained on an empty (or zero) loss, or crashed at the first step
        reason = masker_cfg.hides_nothing()
        if reason:
            raise ConfigError(f"masker: method '{name}' learns from the frames its masker hides; {reason} hides none")
    if needs.views and not preset.views:
        raise ConfigError(f"method '{name}' needs a 'views' augmentation chain")
    if needs.segments and preset.data.segments != needs.segments:
        raise ConfigError(f"data.segments: method '{name}' with this config uses {needs.segments} "
                          f"crop(s) per file, found {preset.data.segments}")
    # a frontend is cheap to build: its own checks (f_max below Nyquist, no empty mel filter) run at load
    build_component(FRONTENDS, preset.frontend, "frontend", sample_rate=preset.data.sample_rate)
    check_clip_length(preset)


_CLIP_CHECKS: dict[str, str | None] = {}  # (frontend, encoder, rate, samples) -> error or None
MAX_SEARCH_SECONDS = 60.0  # longest input tried when looking for the encoder's shortest one
# Crops this long give every encoder here many frames (the longest need is a 16-frame ViT patch
# column, 0.15 s), so they are not checked: building a paper-scale encoder takes a second or more.
CHECKED_BELOW_SECONDS = 4.0


def check_clip_length(preset: Preset) -> None:
    """data.clip_seconds must give the encoder at least one output frame. A crop shorter than
    CHECKED_BELOW_SECONDS is checked by running the frontend and the encoder (built at random
    init, the global RNG untouched) on silence of its length, or of 0.25 s when it is longer
    (frames only grow with the input); the verdict is cached per frontend, encoder, rate and
    length."""
    sr, clip = preset.data.sample_rate, preset.data.clip_seconds
    if clip >= CHECKED_BELOW_SECONDS:
        return
    samples = int(round(clip * sr))
    key = json.dumps([preset.frontend, preset.encoder, sr, samples], sort_keys=True, default=str)
    if key not in _CLIP_CHECKS:
        _CLIP_CHECKS[key] = _clip_problem(preset, samples)
    if _CLIP_CHECKS[key] is not None:
        raise ConfigError(_CLIP_CHECKS[key])


def _clip_problem(preset: Preset, samples: int) -> str | None:
    sr = preset.data.sample_rate
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        frontend, encoder = build_encoder(preset)
        frontend.eval()
        encoder.eval()

        def frames(n: int) -> int:
            try:
                x, lengths = frontend(torch.zeros(1, n), torch.tensor([n]))
                return int(encoder.to_frames(encoder(x, lengths))[1][0])
            except Exception:  # too short for a conv kernel, a patch, a pooling stage ...
                return 0

        if frames(min(samples, sr // 4)) > 0 or (samples > sr // 4 and frames(samples) > 0):
            return None
        good = shortest_length(lambda n: frames(n) > 0, max(2 * samples, 1), int(MAX_SEARCH_SECONDS * sr))
    if good is None:
        return None  # fails at every length: not a length problem; building the method says what
    return (f"data.clip_seconds: {preset.data.clip_seconds:g} s ({samples} samples at {sr} Hz) gives the encoder "
            f"'{preset.encoder.get('name')}' no output frame; it needs at least {good / sr:.4g} s")


def shortest_length(works: Callable[[int], bool], start: int, limit: int) -> int | None:
    """The smallest n >= 1 with works(n), for a `works` that holds from some length on (an encoder
    gives frames for every input at least that long): doubling from `start`, then bisection. None
    when nothing up to `limit` works."""
    lo, hi = 0, max(1, start)  # lo fails (or is empty), hi is tried
    while not works(hi):
        if hi > limit:
            return None
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if works(mid) else (mid, hi)
    return hi


def preset_from_dict(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> Preset:
    """Defaults <- preset dict <- `--set` overrides, validated as a whole."""
    preset = preset_tree(data, overrides)
    validate(preset)
    return preset


def load_preset(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Preset:
    """A preset name (`tiny/m2d`) or YAML file, with `--set` overrides, validated as a whole."""
    return preset_from_dict(load_preset_dict(name_or_path), overrides)


def input_spec(preset: Preset) -> InputSpec:
    """What the method knows of its input: sample rate, crop length, crops per file, view chain."""
    return InputSpec(sample_rate=preset.data.sample_rate,
                     clip_samples=int(round(preset.data.clip_seconds * preset.data.sample_rate)),
                     segments=preset.data.segments, views=tuple(preset.views or ()))


def build_encoder(preset: Preset) -> tuple[nn.Module, nn.Module]:
    """Frontend and encoder of a validated preset."""
    load_components()
    frontend = build_component(FRONTENDS, preset.frontend, "frontend", sample_rate=preset.data.sample_rate)
    return frontend, build_component(ENCODERS, preset.encoder, "encoder", frontend=frontend)


def build_method(preset: Preset) -> Method:
    """Frontend, encoder, masker and method of a validated preset; the frontend and encoder of
    each source the method reads (`Method.sources`), built from the preset recorded for it."""
    frontend, encoder = build_encoder(preset)
    masker = build_component(MASKERS, preset.masker, "masker") if preset.masker else None
    method_cls, method_cfg = component_config(METHODS, preset.method, "method")
    extra = {}
    names = method_cls.sources(method_cfg)
    if names:
        extra["sources"] = {}
        for name, spec in names.items():
            recorded = preset.method.get(f"{name}_preset")
            if not recorded:
                raise ConfigError(f"method.{name}_preset: the preset of {spec} is not recorded (the trainer "
                                  f"fills it in from the checkpoint)")
            extra["sources"][name] = build_encoder(preset_from_dict(recorded))
    return build_component(METHODS, preset.method, "method", inputs=input_spec(preset), frontend=frontend,
                           encoder=encoder, masker=masker, **extra)
