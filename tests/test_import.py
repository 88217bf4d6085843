"""`sslaudio import`: tiny random transformers wav2vec 2.0 / HuBERT / data2vec-audio models,
saved to a folder, imported through the CLI and compared with transformers on one item and on a
padded batch; refusals are one line with exit code 2. No network."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from sslaudio.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(r) -> str:
    assert r.exit_code == 2, r.output
    lines = [x for x in r.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    return lines[0]


# -- refusals that need no transformers --------------------------------------------------------

def test_refuses_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "whisper", "hidden_size": 32}))
    msg = one_line_error(invoke("import", tmp_path, "--out", tmp_path / "run"))
    assert "whisper" in msg and "wav2vec2" in msg
    assert not (tmp_path / "run").exists()


def test_refuses_corrupt_config_and_missing_folder(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    assert "config.json" in one_line_error(invoke("import", tmp_path, "--out", tmp_path / "run"))
    assert "nowhere: no such file or folder" in one_line_error(invoke("import", tmp_path / "nowhere", "--out",
                                                                     tmp_path / "run"))


def test_refuses_pickled_code_in_bin(tmp_path):
    """pytorch_model.bin is read with weights_only=True: a pickle of anything but tensors is refused."""
    import collections

    cfg = {"model_type": "wav2vec2", "conv_dim": [8], "conv_kernel": [10], "conv_stride": [5], "hidden_size": 8,
           "num_hidden_layers": 1, "num_attention_heads": 1, "intermediate_size": 8,
           "num_conv_pos_embeddings": 4, "num_conv_pos_embedding_groups": 1}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    torch.save({"w": collections.Counter()}, tmp_path / "pytorch_model.bin")
    msg = one_line_error(invoke("import", tmp_path, "--out", tmp_path / "run"))
    assert "pytorch_model.bin" in msg
    assert not (tmp_path / "run" / "export").exists()


def test_official_padding_is_off_by_default():
    from sslaudio.build import load_preset
    from sslaudio.encoders.conv_transformer import ConvTransformer

    assert ConvTransformer.Config().official_padding is False
    for name in ("wav2vec2", "hubert", "data2vec"):
        assert "official_padding" not in load_preset(name).encoder


# -- conversions checked against transformers --------------------------------------------------

try:
    import transformers
except ImportError:  # the tests above still run
    transformers = None
needs_transformers = pytest.mark.skipif(
    transformers is None, reason="transformers is not installed (pip install -e '.[test-import]')")

COMMON = {"conv_dim": (16, 24), "conv_kernel": (10, 3), "conv_stride": (5, 2), "hidden_size": 32,
          "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
          "num_conv_pos_embedding_groups": 4}
VARIANTS = {  # name: (model class, config)
    "wav2vec2-group": ("Wav2Vec2Model", lambda: transformers.Wav2Vec2Config(
        **COMMON, num_conv_pos_embeddings=16, feat_extract_norm="group")),
    "wav2vec2-layer-stable": ("Wav2Vec2Model", lambda: transformers.Wav2Vec2Config(
        **COMMON, num_conv_pos_embeddings=15, feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)),
    "hubert-group": ("HubertModel", lambda: transformers.HubertConfig(
        **COMMON, num_conv_pos_embeddings=16, feat_extract_norm="group")),
    "data2vec-audio": ("Data2VecAudioModel", lambda: transformers.Data2VecAudioConfig(
        **COMMON, num_conv_pos_embeddings=2, conv_pos_kernel_size=4)),
}


def make_source(tmp_path, variant: str, bin_file: bool = False):
    cls, cfg = VARIANTS[variant]
    torch.manual_seed(0)
    model = getattr(transformers, cls)(cfg()).eval()
    with torch.no_grad():  # move every LayerNorm / bias off its trivial init
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    src = tmp_path / variant
    model.save_pretrained(src)
    if bin_file:  # the older format, read with torch.load(weights_only=True)
        from safetensors.torch import load_file

        state = load_file(src / "model.safetensors")
        pos = "encoder.pos_conv_embed.conv."  # as older checkpoints name the weight norm
        for new, old in (("parametrizations.weight.original0", "weight_g"),
                         ("parametrizations.weight.original1", "weight_v")):
            if pos + new in state:
                state[pos + old] = state.pop(pos + new)
        assert pos + "weight_g" in state
        torch.save(state, src / "pytorch_model.bin")
        (src / "model.safetensors").unlink()
    return src, model


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def outputs(encoder, model, wav, lengths):
    with torch.no_grad():
        out = encoder(wav, lengths)
        mask = (torch.arange(wav.shape[1])[None] < lengths[:, None]).long()
        ref = model(wav, attention_mask=mask).last_hidden_state
    fl = out.lengths.tolist()
    return (torch.cat([out.tokens[i, :t] for i, t in enumerate(fl)]),
            torch.cat([ref[i, :t] for i, t in enumerate(fl)]))


@needs_transformers
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_import_matches_transformers(tmp_path, variant):
    from sslaudio.inference import load_encoder

    src, model = make_source(tmp_path, variant, bin_file=variant == "hubert-group")
    run = tmp_path / "run"
    r = invoke("import", src, "--out", run)
    assert r.exit_code == 0, r.output
    summary = json.loads((run / "import.json").read_text())
    assert summary["parity"] == "ok" and summary["padded_max_rel"] <= 1e-5, summary

    bundle = load_encoder(str(run))  # a run folder with only export/encoder.safetensors
    assert bundle.preset.encoder["official_padding"] is True
    g = torch.Generator().manual_seed(1)
    wav = torch.randn(3, 4000, generator=g) * 0.1
    lengths = torch.tensor([4000, 2500, 1234])
    for i, n in enumerate(lengths.tolist()):
        wav[i, n:] = 0.0
    ours, ref = outputs(bundle.encoder, model, wav[:1], lengths[:1])  # one item
    assert rel_diff(ours, ref) <= 1e-5
    ours, ref = outputs(bundle.encoder, model, wav, lengths)  # a padded batch
    assert rel_diff(ours, ref) <= 1e-5

    if variant != "wav2vec2-layer-stable":  # sslaudio's own padding differs on padded batches
        from sslaudio.build import build_encoder, preset_from_dict

        d = bundle.preset.to_dict()
        d["encoder"]["official_padding"] = False
        _, own = build_encoder(preset_from_dict(d))
        own.load_state_dict(bundle.encoder.state_dict())
        ours, ref = outputs(own.eval(), model, wav, lengths)
        assert rel_diff(ours, ref) > 1e-4


@needs_transformers
def test_imported_run_extracts(tmp_path, audio_dir):
    src, _ = make_source(tmp_path, "data2vec-audio")
    run = tmp_path / "run"
    assert invoke("import", src, "--out", run).exit_code == 0
    r = invoke("extract", run, audio_dir, "--out", tmp_path / "feats", "--frames")
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "feats").rglob("*.safetensors"))) == 8
    # a second import into the same folder needs --force
    assert "--force" in one_line_error(invoke("import", src, "--out", run))
    assert invoke("import", src, "--out", run, "--force").exit_code == 0


@needs_transformers
def test_refuses_mismatch_and_writes_nothing(tmp_path, monkeypatch):
    from sslaudio import importers

    src, _ = make_source(tmp_path, "wav2vec2-group")
    monkeypatch.setattr(importers, "MAX_REL_DIFF", 0.0)  # any float rounding now counts as a mismatch
    msg = one_line_error(invoke("import", src, "--out", tmp_path / "run"))
    assert "differs from transformers" in msg
    assert not (tmp_path / "run" / "export" / "encoder.safetensors").exists()


@needs_transformers
def test_refuses_weights_that_do_not_fit_the_config(tmp_path):
    src, _ = make_source(tmp_path, "wav2vec2-group")
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (src / "config.json").write_text(json.dumps(cfg))
    msg = one_line_error(invoke("import", src, "--out", tmp_path / "run"))
    assert "shape" in msg


@needs_transformers
def test_without_transformers_the_summary_says_unchecked(tmp_path, monkeypatch):
    from sslaudio import importers

    src, _ = make_source(tmp_path, "hubert-group")
    monkeypatch.setattr(importers, "_reference_model", lambda *a: None)
    r = invoke("import", src, "--out", tmp_path / "run")
    assert r.exit_code == 0, r.output
    assert "not checked" in json.loads((tmp_path / "run" / "import.json").read_text())["parity"]
