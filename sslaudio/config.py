"""Strict configuration: dataclass trees from YAML, `--set a.b=c` overrides, an identity hash.

Every component owns a small `Config` dataclass. `parse(cls, data, path)` turns a plain dict into
that dataclass and refuses unknown keys (suggesting the closest valid name) and values of the
wrong type, naming the dotted path at fault; `build_component(registry, section, path, **deps)`
does the same for a component section and builds the registered class. Errors are `ConfigError`,
which the CLI prints as one line with exit code 2. The preset tree read here is checked as a whole
(components and the method's needs) by `sslaudio.build.load_preset`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user-facing configuration error (exit code 2)."""


def _did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_type(value: Any, tp: Any, path: str) -> Any:
    """Validate (and gently coerce int->float, list->tuple) `value` against annotation `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, found {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{path}: expected {len(args)} values, found {len(value)}")
            return tuple(_check_type(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [_check_type(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, found {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return parse(tp, value, path)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '1e-4' (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, found {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, found {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, found {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, found {value!r}")
        return value
    return value


def parse(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from a dict, strictly. `path` is the dotted location for errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, found {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise ConfigError(f"unknown key '{where}'{_did_you_mean(str(key), list(fields))}")
        kwargs[key] = _check_type(value, hints[key], where)
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None
    # no setting means anything at NaN or infinity, and a field without its own range check (a
    # temperature, a loss weight) would otherwise train on NaN: refused after the component's own
    # checks, so that their messages, which name the bounds, come first
    for key, value in kwargs.items():
        _refuse_nonfinite(value, f"{path}.{key}" if path else str(key))
    return obj


def _refuse_nonfinite(value: Any, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, found {value!r}")
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _refuse_nonfinite(v, f"{where}[{i}]")


def component_config(registry: Any, section: Any, path: str) -> tuple[type, Any]:
    """A component section {name: ..., **fields} -> (the class `registry` holds under that name,
    its Config parsed strictly from the fields)."""
    if not isinstance(section, dict) or "name" not in section:
        raise ConfigError(f"{path}: needs a 'name' (one of {', '.join(registry.names())})")
    fields = dict(section)
    try:
        cls = registry.get(fields.pop("name"))
    except LookupError as e:
        raise ConfigError(f"{path}.name: {e}") from None
    return cls, parse(cls.Config, fields, path)


def build_component(registry: Any, section: Any, path: str, **deps: Any) -> Any:
    """Parse a component section (see `component_config`) and build it with `deps`."""
    cls, cfg = component_config(registry, section, path)
    return cls(cfg, **deps)


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain dict/list (tuples become lists) for YAML/JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------------------------------------
# The preset tree. `frontend`, `encoder`, `masker`, `method` stay plain dicts here: their own
# registry validates them against the component's Config when it builds the component.


def check_range(key: str, value: Any, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> None:
    """Refuse a non-finite number or one outside [low, high] (open ends with low_open / high_open),
    naming the dotted `key`: `optim.lr must be > 0, found nan`."""
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {_num(low)}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {_num(high)}")
    need = " and ".join(bounds) or "a finite number"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (isinstance(value, int) or math.isfinite(value))
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        finite = bounds and isinstance(value, float) and not math.isfinite(value)
        raise ConfigError(f"{key} must be {'finite and ' if finite else ''}{need}, found {value!r}")


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


# the sample rates a preset may declare: telephone speech to high-resolution audio
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 768000


@dataclass
class DataConfig:
    sample_rate: int = 16000
    clip_seconds: float = 0.95  # training crop length
    min_seconds: float = 0.1  # shorter files are skipped with a warning
    segments: int = 1  # waveform crops per file per step (2: "different segments are positives")
    num_workers: int = 2
    norm_samples: int = 256  # crops used to estimate the frontend's normalisation statistics

    def __post_init__(self):
        check_range("data.sample_rate", self.sample_rate, low=MIN_SAMPLE_RATE, high=MAX_SAMPLE_RATE)
        check_range("data.clip_seconds", self.clip_seconds, low=0, low_open=True)  # one encoder frame: build.validate
        check_range("data.min_seconds", self.min_seconds, low=0)
        check_range("data.segments", self.segments, low=1)
        check_range("data.num_workers", self.num_workers, low=0)
        check_range("data.norm_samples", self.norm_samples, low=1)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: typing.Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0  # cosine ends at lr * min_lr_ratio
    grad_clip: float = 0.0  # 0 disables clipping
    # weight decay follows a cosine from weight_decay to this over the run (DINO, ATST: 0.04 -> 0.4);
    # None: constant. Only the parameter groups that decay at all (weight_decay > 0) follow it.
    weight_decay_end: float | None = None

    def __post_init__(self):
        check_range("optim.lr", self.lr, low=0, low_open=True)
        check_range("optim.weight_decay", self.weight_decay, low=0)
        if self.weight_decay_end is not None:
            check_range("optim.weight_decay_end", self.weight_decay_end, low=0)
        for i, b in enumerate(self.betas):
            check_range(f"optim.betas[{i}]", b, low=0, high=1, high_open=True)
        check_range("optim.eps", self.eps, low=0, low_open=True)
        check_range("optim.warmup_steps", self.warmup_steps, low=0)
        check_range("optim.min_lr_ratio", self.min_lr_ratio, low=0, high=1)
        check_range("optim.grad_clip", self.grad_clip, low=0)


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32
    precision: typing.Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 2
    max_nonfinite: int = 5  # consecutive non-finite losses before stopping (exit 3)
    # under torchrun: ddp (DistributedDataParallel: the gradient all-reduce overlaps backward),
    # allreduce (one flat all-reduce after backward: the way out for a method DDP cannot wrap),
    # fsdp (FSDP2 fully_shard: parameters, gradients and optimizer state sharded over processes)
    parallel: typing.Literal["ddp", "allreduce", "fsdp"] = "ddp"
    # micro-batches per process and step (batch_size stays the global batch); batch statistics
    # (BatchNorm, in-batch negatives) then see micro-batches
    grad_accum: int = 1
    compile: bool = False  # torch.compile of the method's step
    activation_checkpointing: bool = False  # recompute the activations of deep transformers in backward

    def __post_init__(self):
        for key in ("steps", "batch_size", "log_every", "ckpt_every", "keep_last", "max_nonfinite", "grad_accum"):
            check_range(f"train.{key}", getattr(self, key), low=1)


@dataclass
class Preset:
    seed: int = 0
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    frontend: dict = field(default_factory=lambda: {"name": "logmel"})
    encoder: dict = field(default_factory=dict)
    masker: dict | None = None
    views: list | None = None  # augmentation chain (list of {name: ..., ...}) for view-based methods
    method: dict = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        check_range("seed", self.seed, low=0, high=2**63, high_open=True)

    def to_dict(self) -> dict:
        return to_dict(self)

    def identity(self) -> str:
        """Short hash of everything that changes the trained weights (not logging cadence)."""
        d = self.to_dict()
        d.pop("description", None)
        for k in ("log_every", "ckpt_every", "keep_last"):
            d["train"].pop(k, None)
        d["data"].pop("num_workers", None)
        if d["optim"].get("weight_decay_end") is None:  # runs from before the option keep their identity
            d["optim"].pop("weight_decay_end", None)
        # how the step is computed, not what it computes: the same weights up to rounding
        for k in ("parallel", "compile", "activation_checkpointing"):
            d["train"].pop(k, None)
        if d["train"].get("grad_accum") == 1:  # micro-batches change batch statistics: part of the identity
            d["train"].pop("grad_accum", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


PRESET_DIRS = [Path(__file__).resolve().parent.parent / "presets", Path(__file__).resolve().parent / "presets"]


def preset_dir() -> Path:
    for d in PRESET_DIRS:
        if d.is_dir():
            return d
    raise ConfigError("cannot find the presets folder (reinstall sslaudio)")


def list_presets() -> list[str]:
    root = preset_dir()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def _set_path(d: dict, dotted: str, value: Any) -> None:
    """Set d[a][b]... from 'a.b.c'; list items as 'views[0].ratio' or 'views.0.ratio'."""
    keys: list[Any] = []
    for part in dotted.split("."):
        name, _, rest = part.partition("[")
        if name:
            keys.append(int(name) if name.isdigit() else name)
        for idx in rest.replace("]", " ").split("[") if rest else []:
            if not idx.strip().isdigit():
                raise ConfigError(f"--set {dotted}: bad list index in '{part}'")
            keys.append(int(idx))
    cur: Any = d
    for i, k in enumerate(keys[:-1]):
        where = ".".join(map(str, keys[: i + 1]))
        if isinstance(k, int):
            if not isinstance(cur, list) or k >= len(cur):
                raise ConfigError(f"--set {dotted}: '{where}' is not an item of a list")
        elif not isinstance(cur, dict):
            raise ConfigError(f"--set {dotted}: '{where}' is not a section")
        elif cur.get(k) is None:
            cur[k] = {}
        cur = cur[k]
    last = keys[-1]
    if isinstance(last, int):
        if not isinstance(cur, list) or last >= len(cur):
            raise ConfigError(f"--set {dotted}: no list item {last}")
    elif not isinstance(cur, dict):
        raise ConfigError(f"--set {dotted}: the parent of '{last}' is not a section")
    cur[last] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'train.steps=100' -> ('train.steps', 100); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set expects key.path=value, found '{text}'")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key.path=value, found '{text}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def load_preset_dict(name_or_path: str) -> dict:
    p = Path(name_or_path)
    if not (p.suffix in (".yaml", ".yml") and p.is_file()):
        p = preset_dir() / f"{name_or_path}.yaml"
        if not p.is_file():
            names = list_presets()
            raise ConfigError(f"unknown preset '{name_or_path}'{_did_you_mean(name_or_path, names)}; "
                              f"see 'sslaudio presets'")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: {yaml_error(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a preset must be a YAML mapping")
    return data


def yaml_error(e: yaml.YAMLError) -> str:
    """One line for a YAML error: where (line and column, 1-based) and what."""
    mark, context, cmark = (getattr(e, a, None) for a in ("problem_mark", "context", "context_mark"))
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    if context:
        started = f" started at line {cmark.line + 1}" if cmark is not None and mark is not None \
            and cmark.line != mark.line else ""
        what += f" ({context}{started})"
    mark = mark or cmark
    if mark is None:
        return f"invalid YAML ({what})"
    return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {what}"


def preset_tree(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> Preset:
    """Defaults <- preset dict <- `--set` overrides, the top-level tree parsed strictly (component
    sections are checked by `sslaudio.build.validate`)."""
    data = copy.deepcopy(data)
    for text in overrides:
        key, value = parse_override(text)
        _set_path(data, key, value)
    return parse(Preset, data)


def dump_yaml(preset: Preset) -> str:
    return yaml.safe_dump(preset.to_dict(), sort_keys=False)
