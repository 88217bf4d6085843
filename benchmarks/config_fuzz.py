"""Set every number of every tiny preset's components to edge values and report the settings that
end in anything but a one-line config error or a finite training step.

For each tiny preset, each int and float field of its frontend, encoder, method (nested sections
included), masker and views is set to 0 and -1 (floats also to 1 and 2 for the masker and views,
whose fractions live in [0, 1]), one at a time. The preset is loaded, the method built and one
training step run on random audio (batch 4). A setting passes when the loader refuses it with a
ConfigError (the CLI prints one line) or the step gives a finite loss; the table lists the rest:
LOAD (the loader raised something else: a traceback for the user), STEP (the build or the step
did) and NaN (a non-finite loss: the run would skip every step). The thirty-eighth session's
config checks were found this way. All 29 tiny presets, 1360 settings: 39 s on the 2-core CPU
with nothing else running (2026-12-07); after those checks the table is empty.

    python benchmarks/config_fuzz.py                          # every tiny preset
    python benchmarks/config_fuzz.py tiny/m2d tiny/hubert     # some
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
import warnings

import torch

from sslaudio.build import build_method, load_components, load_preset
from sslaudio.config import ConfigError, list_presets
from sslaudio.registry import AUGMENTS, ENCODERS, FRONTENDS, MASKERS, METHODS


def number_fields(cls: type, prefix: str):
    """(dotted key, int or float) for every number field of dataclass `cls`, nested ones included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from number_fields(tp, f"{prefix}.{f.name}")
        elif tp in (int, float):
            yield f"{prefix}.{f.name}", tp


def settings(name: str):
    p = load_preset(name)
    sections = [(FRONTENDS.get(p.frontend["name"]).Config, "frontend", False),
                (ENCODERS.get(p.encoder["name"]).Config, "encoder", False),
                (METHODS.get(p.method["name"]).Config, "method", False)]
    if p.masker is not None:
        sections.append((MASKERS.get(p.masker["name"]).Config, "masker", True))
    for i, view in enumerate(p.views or []):
        sections.append((AUGMENTS.get(view["name"]).Config, f"views.{i}", True))
    for cls, prefix, fractions in sections:
        for key, tp in number_fields(cls, prefix):
            values = [0, -1] if tp is int else [0.0, -1.0] + ([1.0, 2.0] if fractions else [])
            for v in values:
                yield f"{key}={v}"


def one_step(name: str, override: str) -> str | None:
    """None when the setting is refused with a ConfigError or trains one finite step, else the
    outcome and the error."""
    overrides = [override, "train.batch_size=4"]
    try:
        p = load_preset(name, overrides)
    except ConfigError:
        return None
    except Exception as e:  # noqa: BLE001 (the point is to catch what the loader lets through)
        return f"LOAD  {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    try:
        torch.manual_seed(0)
        m = build_method(p)
        samples = int(round(p.data.clip_seconds * p.data.sample_rate))
        g = torch.Generator().manual_seed(0)
        audio = torch.randn(4, p.data.segments, samples, generator=g) * 0.1
        more = torch.randn(8, samples, generator=g) * 0.1
        m.prepare(audio[:, 0], lambda count, batch: iter(more[:count].split(batch)))
        out = m({"audio": audio}, 0, torch.Generator().manual_seed(1), 10)
        out["loss"].backward()
    except ConfigError:
        return None
    except Exception as e:  # noqa: BLE001
        return f"STEP  {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return None if torch.isfinite(out["loss"]) else "NaN   non-finite loss"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("presets", nargs="*", help="tiny presets (default: all)")
    args = ap.parse_args()
    load_components()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    names = args.presets or [n for n in list_presets() if n.startswith("tiny/")]
    for name in names:  # a misspelt preset is one line before any work, not a traceback midway
        try:
            load_preset(name)
        except ConfigError as e:
            ap.error(str(e))
    tried, bad = 0, []
    for name in names:
        for override in settings(name):
            tried += 1
            outcome = one_step(name, override)
            if outcome:
                bad.append((name, override, outcome))
                print(f"{name:24s} {override:40s} {outcome}", flush=True)
    print(f"\n{tried} settings on {len(names)} presets; {len(bad)} ended in a traceback or a non-finite loss")


if __name__ == "__main__":
    main()
