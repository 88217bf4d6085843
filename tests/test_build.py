"""Assembly (sslaudio/build.py): a method's declared needs are checked when the preset is loaded,
and an impossible combination is refused before any data is scanned or any file is written."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from sslaudio.build import build_method, input_spec, load_preset
from sslaudio.cli import app
from sslaudio.config import ConfigError


@pytest.mark.parametrize("preset, overrides, match", [
    ("tiny/m2d", ["encoder={name: audiontt}"], r"encoder.name: method 'm2d' needs one of \['vit'\]"),
    ("tiny/m2d", ["masker.mode=replace"], r"masker.mode: method 'm2d' needs mode: keep"),
    ("tiny/m2d", ["masker=null"], r"method 'm2d' needs a 'masker' section with mode: keep"),
    ("tiny/data2vec", ["masker.mode=keep"], r"needs mode: replace"),
    ("tiny/apc", ["masker={name: random, ratio: 0.5}"], r"method 'apc' takes no masker"),
    ("tiny/cpc", ["frontend={name: logmel}"], r"frontend.name: method 'cpc' expects one of \['waveform'\]"),
    ("tiny/mockingjay", ["encoder={name: rnn}"], r"encoder.name: method 'mockingjay' needs one of"),
    ("tiny/byol-a", ["data.segments=2"], r"data.segments"),
])
def test_needs_are_checked_when_the_preset_loads(preset, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_preset(preset, overrides)


def test_the_method_gets_its_input_spec_not_the_preset():
    p = load_preset("tiny/byol", ["data.segments=2", "data.clip_seconds=0.5"])
    spec = input_spec(p)
    assert (spec.sample_rate, spec.clip_samples, spec.segments) == (16000, 8000, 2)
    assert list(spec.views) == p.views
    m = build_method(p)
    assert m.inputs == spec and not hasattr(m, "preset")


def test_pretrain_refuses_an_impossible_combination_before_touching_data_or_the_run(tmp_path):
    run = tmp_path / "run"
    # a constructor-level check (top_k above the encoder depth); DATA does not even exist
    r = CliRunner().invoke(app, ["pretrain", str(tmp_path / "no-such-data"), "--preset", "tiny/data2vec",
                                 "--out", str(run), "--set", "method.top_k=99", "--quiet"])
    assert r.exit_code == 2 and "top_k" in r.output, r.output
    assert not run.exists()
