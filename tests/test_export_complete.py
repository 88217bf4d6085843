"""`sslaudio export` outputs beyond the clip embedding: frames, frame times and per-layer frames
for every registered encoder in every installed format, the model card, the example that runs the
ONNX model without torch, and the one-line errors."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from sslaudio.atomic import TEMP_NAME
from sslaudio.build import build_encoder, load_preset
from sslaudio.cli import app
from sslaudio.export import FORMATS, card_path, export
from sslaudio.inference import EncoderBundle, load_encoder
from tests.test_methods import EXPORTS

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))
INSTALLED = [f for f in FORMATS if f != "onnx" or HAS_ONNX]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def bundle_for(name, overrides=()):
    p = load_preset(name, list(overrides))
    torch.manual_seed(p.seed)
    bundle = EncoderBundle(*build_encoder(p), p).eval()
    return bundle


def run_exported(path: Path, fmt: str, audio: torch.Tensor) -> dict[str, np.ndarray]:
    if fmt == "torchscript":
        m = torch.jit.load(str(path))
        with torch.no_grad():
            clip = m(audio)
            outs = {k: v.numpy() for k, v in m.embed(audio).items()}
        assert np.array_equal(clip.numpy(), outs["embedding"])  # forward: the clip embedding, as before
        assert list(outs) == list(m.output_names)
        return outs
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {"audio": audio.numpy()})))


@pytest.mark.parametrize("name,overrides,dim,hop", EXPORTS, ids=["+".join([n, *o]) for n, o, _, _ in EXPORTS])
@pytest.mark.parametrize("fmt", INSTALLED)
def test_every_encoder_exports_frames_times_and_layers(name, overrides, dim, hop, fmt, tmp_path):
    bundle = bundle_for(name, overrides)
    out = tmp_path / f"m.{fmt}"
    r = export(bundle, fmt, out, layers=[-1])
    depth = len(bundle.encoder(*bundle._probe_input(), return_layers=True).layers)
    last = f"layer_{depth - 1}"
    assert r["outputs"] == f"embedding, frames, frame_times, {last}"
    assert set(r["parity"]) == {"embedding", "frames", "frame_times", last}
    # the file on its own, on a batch and length neither the trace nor the export check used
    audio = 0.1 * torch.randn(1, int(0.61 * bundle.sample_rate), generator=torch.Generator().manual_seed(5))
    got = run_exported(out, fmt, audio)
    assert list(got) == ["embedding", "frames", "frame_times", last]
    with torch.no_grad():
        clip, frames, _ = bundle.embed(audio)
        bundle.set_layer(-1)
        _, layer_frames, _ = bundle.embed(audio)
    times = bundle.encoder.frame_times(frames.shape[1]).numpy()
    assert got["frames"].shape == (1, frames.shape[1], dim) and got["embedding"].shape == (1, dim)
    assert got["frame_times"].dtype == np.float64 and got["frame_times"].shape == times.shape
    np.testing.assert_allclose(got["frame_times"], times, rtol=0, atol=1e-9)
    np.testing.assert_allclose(got["embedding"], clip.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(got["frames"], frames.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(got[last], layer_frames.numpy(), rtol=0, atol=1e-4)
    card = json.loads(card_path(out).read_text())
    assert card["samples_per_frame"] == hop and card["frame_dim"] == dim
    assert [o["name"] for o in card["outputs"]] == list(got)


def test_model_card_and_cli_layers(tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "sub" / "m2d.onnx"
    r = invoke("export", "random:tiny/m2d", "--format", "onnx", "--out", out, "--layers", "0,-1,0")
    assert r.exit_code == 0, r.output
    card = json.loads((tmp_path / "sub" / "m2d.onnx.json").read_text())
    assert card["preset"] == "tiny/m2d" and card["source"] == "random:tiny/m2d" and card["method"] == "m2d"
    assert card["sample_rate"] == 16000 and card["frame_rate"] == 16000 / 2560
    assert card["embedding_dim"] == card["frame_dim"] == 3200 and card["layers"] == [0, 4]  # 5 hidden states
    assert card["inputs"] == [{"name": "audio", "dtype": "float32", "shape": ["batch", "samples"]}]
    assert [(o["name"], o["shape"]) for o in card["outputs"]] == [
        ("embedding", ["batch", 3200]), ("frames", ["batch", "frames", 3200]), ("frame_times", ["frames"]),
        ("layer_0", ["batch", "frames", 640]), ("layer_4", ["batch", "frames", 640])]
    assert set(card["dynamic_axes"]) == {"batch", "samples", "frames"}
    v = card["versions"]
    assert v["opset"] == 18 and {"sslaudio", "torch", "onnx", "onnxruntime"} <= set(v)
    diffs = card["parity"]["max_abs_diff"]
    assert set(diffs) == {"embedding", "frames", "frame_times", "layer_0", "layer_4"}
    assert all(0 <= d < 1e-3 for d in diffs.values())
    import hashlib

    assert card["model"] == {"file": "m2d.onnx", "format": "onnx", "sha256": hashlib.sha256(out.read_bytes()).hexdigest()}
    assert not [p for p in out.parent.iterdir() if TEMP_NAME.match(p.name)]  # atomic: no temp files left


def test_torchscript_keeps_the_clip_embedding_forward(tmp_path):
    bundle = load_encoder("random:tiny/apc")
    export(bundle, "torchscript", tmp_path / "m.pt")
    m = torch.jit.load(str(tmp_path / "m.pt"))
    assert m(torch.randn(2, 8000) * 0.1).shape == (2, 128)
    out = m.embed((torch.randn(1, 4000) * 3000).to(torch.int16))
    assert list(out) == ["embedding", "frames", "frame_times"] and out["frames"].shape == (1, 26, 128)
    card = json.loads(card_path(tmp_path / "m.pt").read_text())
    assert card["inputs"][0]["dtype"] == "float32 | int16" and "opset" not in card["versions"]


BLOCK_TORCH = """
import importlib.abc, runpy, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch.") or name.startswith("sslaudio"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
try:
    import torch  # noqa
except ImportError:
    pass
else:
    raise SystemExit("torch was importable")
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_onnx_example_runs_without_torch(tmp_path):
    pytest.importorskip("onnxruntime")
    bundle = load_encoder("random:tiny/byol-a")
    model = tmp_path / "byola.onnx"
    export(bundle, "onnx", model, layers=[0])
    wav = tmp_path / "clip.wav"
    t = np.arange(int(0.9 * 16000)) / 16000
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 97 * t)], axis=1)
    sf.write(str(wav), stereo, 16000, subtype="PCM_16")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    p = subprocess.run([sys.executable, "-c", BLOCK_TORCH, str(ROOT / "examples" / "onnx_without_torch.py"),
                        str(model), str(wav), "--save", str(tmp_path / "out.npz")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120, check=False)
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout)
    assert summary["outputs"]["embedding"] == [1, 512] and summary["sample_rate"] == 16000
    got = np.load(tmp_path / "out.npz")
    data, _ = sf.read(str(wav), dtype="float32", always_2d=True)
    with torch.no_grad():
        clip, frames, _ = bundle.embed(torch.from_numpy(data.mean(axis=1, dtype=np.float32))[None])
        bundle.set_layer(0)
        _, layer0, _ = bundle.embed(torch.from_numpy(data.mean(axis=1, dtype=np.float32))[None])
    np.testing.assert_allclose(got["embedding"], clip.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(got["frames"], frames.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(got["layer_0"], layer0.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(got["frame_times"], bundle.encoder.frame_times(frames.shape[1]).numpy(), atol=1e-9)


@pytest.mark.parametrize("args, text", [
    (["--format", "tflite"], "unknown format 'tflite'"),
    (["--format", "onnx", "--opset", "13"], "--opset 13"),
    (["--layers", "last"], "--layers 'last'"),
    (["--layers", "7"], "--layers 7: this encoder has 1 layer(s)"),
    (["--out", "."], "is a folder"),
])
def test_bad_export_requests_are_one_line(args, text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["export", "random:tiny/byol-a", *args]
    if "--out" not in args:
        argv += ["--out", "m.bin"]
    r = invoke(*argv)
    assert r.exit_code == 2 and text in r.output, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_onnx_export_without_onnxruntime_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    r = invoke("export", "random:tiny/byol-a", "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert r.exit_code == 2 and "pip install onnx onnxruntime" in r.output
    assert len(r.output.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []
