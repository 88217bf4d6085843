"""Values the config accepted at load time that crashed (or went silently wrong) later are refused
when the preset is loaded, with the dotted key in one line; a YAML syntax error names its line."""

import pytest
from typer.testing import CliRunner

from sslaudio.build import load_preset
from sslaudio.cli import app
from sslaudio.config import ConfigError


@pytest.mark.parametrize("override, key", [
    ("train.ckpt_every=0", "train.ckpt_every"),  # ZeroDivisionError at the first step
    ("train.log_every=0", "train.log_every"),
    ("train.max_nonfinite=0", "train.max_nonfinite"),
    ("seed=-1", "seed"),  # numpy's seed sequences refuse negative entries
    ("seed=18446744073709551616", "seed"),
    ("data.num_workers=-1", "data.num_workers"),
    ("data.norm_samples=0", "data.norm_samples"),
    ("optim.lr=.nan", "optim.lr"),  # nan <= 0 is False: it used to pass
    ("optim.lr=.inf", "optim.lr"),
    ("optim.lr=-.inf", "optim.lr"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("optim.weight_decay=.nan", "optim.weight_decay"),
    ("optim.betas=[1.0, 0.999]", r"optim.betas\[0\]"),
    ("optim.betas=[0.9, -0.1]", r"optim.betas\[1\]"),
    ("optim.betas=[0.9, .nan]", r"optim.betas\[1\]"),
    ("optim.eps=0", "optim.eps"),
    ("optim.eps=-1e-8", "optim.eps"),
    ("optim.warmup_steps=-1", "optim.warmup_steps"),
    ("optim.min_lr_ratio=-0.1", "optim.min_lr_ratio"),
    ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio"),
    ("optim.grad_clip=-1", "optim.grad_clip"),
    ("optim.grad_clip=.inf", "optim.grad_clip"),
    ("data.min_seconds=-0.5", "data.min_seconds"),
    ("data.clip_seconds=.nan", "data.clip_seconds"),
    ("data.clip_seconds=0", "data.clip_seconds"),
    ("data.sample_rate=10", "data.sample_rate"),
    ("data.sample_rate=0", "data.sample_rate"),
    ("data.sample_rate=100000000", "data.sample_rate"),
])
def test_out_of_range_values_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key} must be ") as info:
        load_preset("tiny/byol-a", [override])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("override", [
    "optim.grad_clip=0", "optim.warmup_steps=0", "optim.min_lr_ratio=0", "optim.min_lr_ratio=1",
    "optim.betas=[0.0, 0.0]", "optim.weight_decay=0", "data.num_workers=0", "data.min_seconds=0", "seed=0",
    "train.log_every=1", "train.ckpt_every=1", "train.max_nonfinite=1",
])
def test_the_edges_of_each_range_are_accepted(override):
    load_preset("tiny/byol-a", [override])


def test_the_highest_sample_rate_is_accepted():
    # a waveform preset: at 768 kHz the log-mel presets' 64 filters below 7.8 kHz would hold no FFT bin
    load_preset("tiny/data2vec-wave", ["data.sample_rate=768000"])


@pytest.mark.parametrize("preset, clip, encoder", [
    ("tiny/byol-a", 0.001, "audiontt"),  # a CNN with three 2x poolings: 8 log-mel frames at least
    ("tiny/byol-a", 0.05, "audiontt"),
    ("tiny/m2d", 0.1, "vit"),  # less than one 16-frame patch column
    ("tiny/data2vec-wave", 0.001, "conv_transformer"),  # shorter than the conv stack's receptive field
])
def test_a_clip_too_short_for_one_encoder_frame_is_refused(preset, clip, encoder):
    with pytest.raises(ConfigError, match=rf"^data\.clip_seconds: {clip:g} s .* gives the encoder '{encoder}' no "
                                          rf"output frame; it needs at least [0-9.]+ s$"):
        load_preset(preset, [f"data.clip_seconds={clip}"])


def test_the_shortest_clip_the_message_names_is_accepted():
    with pytest.raises(ConfigError) as info:
        load_preset("tiny/m2d", ["data.clip_seconds=0.01"])
    need = float(str(info.value).rsplit(" ", 2)[-2])
    load_preset("tiny/m2d", [f"data.clip_seconds={need}"])


def test_yaml_syntax_error_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 0\ntrain:\n  steps: 3\n   batch_size: 4\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: invalid YAML at line 4, column 14: mapping values"):
        load_preset(str(bad))
    bad.write_text("seed: 0\nviews: [\n  {name: mixup}\n  {name: rrc}\nmethod: {}\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line 4, column 3: .*\(while parsing a flow sequence "
                                          r"started at line 2\)$"):
        load_preset(str(bad))


@pytest.mark.parametrize("args, text", [
    (["--set", "train.ckpt_every=0"], "error: train.ckpt_every must be >= 1, found 0"),
    (["--set", "optim.lr=.nan"], "error: optim.lr must be finite and > 0, found nan"),
    (["--set", "data.clip_seconds=0.001"], "error: data.clip_seconds: 0.001 s (16 samples at 16000 Hz) gives the "
                                           "encoder 'audiontt' no output frame; it needs at least"),
    (["--set", "method.proj_dim=0"], "error: method: every head width must be >= 1, found [512, 1024, 0]"),
    (["--set", "views.1.freq_scale=[1.5,0.6]"], "error: views.rrc.freq_scale[1] must be >= 1.5, found 0.6"),
])
def test_the_cli_prints_one_line_and_exits_2(args, text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["pretrain", ".", "--preset", "tiny/byol-a", "--out", "run", *args])
    assert r.exit_code == 2 and "Traceback" not in r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(text), r.output
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_the_clip_check_leaves_the_global_rng_alone():
    import torch

    torch.manual_seed(0)
    want = torch.rand(4)
    torch.manual_seed(0)
    load_preset("tiny/byol-a", ["data.clip_seconds=0.4321"])  # a length no other test checks: built now
    assert torch.equal(torch.rand(4), want)


NONFINITE = [
    # fields without a range check of their own: each trained on NaN (every step skipped as non-finite,
    # or a random encoder exported after a short run) until the loader refused any non-finite number
    ("tiny/simclr", "method.temperature=.nan", r"method\.temperature must be a finite number, found nan"),
    ("tiny/barlow-twins", "method.lambd=.inf", r"method\.lambd must be a finite number, found inf"),
    ("tiny/vicreg", "method.sim_coeff=.nan", r"method\.sim_coeff must be a finite number, found nan"),
    ("tiny/mockingjay", "method.noise_std=.nan", r"method\.noise_std must be a finite number, found nan"),
    ("tiny/dino", "method.teacher_temp=-.inf", r"method\.teacher_temp must be .*found -inf"),
]


@pytest.mark.parametrize("preset, override, text", NONFINITE + [
    # each reached torch as a traceback when the model was built or stepped, or gave a NaN loss (found
    # by benchmarks/config_fuzz.py: every number of every tiny preset's components at 0 and -1)
    ("tiny/byol-a-v2", "encoder.mlp_hidden=-1", r"encoder\.mlp_hidden must be >= 1, found -1"),
    ("tiny/byol-a", "encoder.dropout=-1.0", r"encoder\.dropout must be >= 0 and < 1, found -1\.0"),
    ("tiny/m2d", "encoder.dim=0", r"encoder\.dim must be >= 1, found 0"),
    ("tiny/mockingjay", "encoder.dim=0", r"encoder\.dim must be >= 1, found 0"),
    ("tiny/wav2vec2-wave", "encoder.dim=0", r"encoder\.dim must be >= 1, found 0"),
    ("tiny/data2vec-wave", "encoder.pos_conv_groups=0", r"encoder\.pos_conv_groups must be >= 1, found 0"),
    ("tiny/m2d", "method.pred_dim=0", r"method\.pred_dim must be >= 1, found 0"),
    ("tiny/atst-frame", "encoder.norm_eps=-1.0", r"encoder\.norm_eps must be > 0, found -1\.0"),  # a NaN loss
    ("tiny/m2d", "method.pred_mlp_ratio=-1.0", r"method\.pred_mlp_ratio must be > 0, found -1\.0"),
    ("tiny/byol-a", "frontend.win_length=-1", r"frontend\.win_length must be >= 0, found -1"),
    ("tiny/byol-a", "frontend.f_max=0.0", r"frontend\.f_max must be > 60, found 0\.0"),
    ("tiny/byol-a", "frontend.f_min=100000.0", r"frontend\.f_max must be > 100000, found 7800\.0"),
    ("tiny/apc", "frontend.f_min=-1.0", r"frontend\.f_min must be >= 0, found -1\.0"),  # trained on it
    ("tiny/deepcluster", "frontend.eps=-1.0", r"frontend\.eps must be > 0, found -1\.0"),
    ("tiny/m2d", "masker.ratio=0.0", r"masker: method 'm2d' learns from the frames its masker hides; masker\.ratio 0 "
                                     r"hides none"),  # the others trained on an empty loss
    ("tiny/data2vec2", "masker.adjust=-1.0", r"masker\.adjust must be >= -0\.2, found -1\.0"),
])
def test_values_that_trained_on_nan_or_crashed_the_build_are_refused(preset, override, text):
    with pytest.raises(ConfigError, match=rf"^{text}$"):
        load_preset(preset, [override])


@pytest.mark.parametrize("preset, override", [case[:2] for case in NONFINITE])
def test_a_finite_value_of_each_of_those_keys_loads(preset, override):
    load_preset(preset, [override.split("=")[0] + "=0.5"])
