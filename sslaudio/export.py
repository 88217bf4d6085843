"""Deployable encoders: waveform batch (B, S) -> clip embeddings (B, D), frontend included.

TorchScript accepts float32 or int16 (scaled by 1/32768) waveforms; ONNX takes float32. Both are
checked against the PyTorch module on random audio of a length other than the one traced.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from sslaudio.atomic import atomic_write
from sslaudio.inference import EncoderBundle


class ExportError(Exception):
    """The export tool chain is missing or the exported model disagrees with PyTorch."""


class ClipEncoder(nn.Module):
    def __init__(self, bundle: EncoderBundle):
        super().__init__()
        self.frontend = copy.deepcopy(bundle.frontend)
        self.encoder = bundle.encoder
        if hasattr(self.frontend, "use_conv_stft"):
            self.frontend.use_conv_stft()

    def forward(self, audio: Tensor) -> Tensor:
        x, _ = self.frontend(audio.float())
        return self.encoder.pool(self.encoder(x))


class _AcceptInt16(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, audio: Tensor) -> Tensor:
        if audio.dtype == torch.int16:
            audio = audio.to(torch.float32) / 32768.0
        return self.inner(audio.to(torch.float32))


def export(bundle: EncoderBundle, fmt: str, out: Path, seconds: float = 1.0) -> dict:
    """Write the model to `out` atomically and return {"max_abs_diff", "dim", ...}."""
    with warnings.catch_warnings():
        # torch.jit's deprecation notices and the tracer's constant-shape notes are expected: the
        # check in _export runs the exported model on another batch and length instead
        warnings.simplefilter("ignore")
        return _export(bundle, fmt, out, seconds)


def _export(bundle: EncoderBundle, fmt: str, out: Path, seconds: float) -> dict:
    model = ClipEncoder(bundle).eval()
    sr = bundle.sample_rate
    g = torch.Generator().manual_seed(0)
    example = 0.1 * torch.randn(2, int(seconds * sr), generator=g)
    check = 0.1 * torch.randn(3, int(1.37 * seconds * sr), generator=g)  # other batch and length
    with torch.no_grad():  # the reference is the PyTorch path extraction uses (torch.stft)
        ref = bundle.encoder.pool(bundle(check))
    if not bool(torch.isfinite(ref).all()):  # NaN weights would otherwise pass as "disagrees"
        raise ExportError("the encoder's embeddings of random audio are not finite (NaN / inf weights?); "
                          "nothing written")
    diff = None

    def write(tmp: str) -> None:  # an ExportError here leaves `out` as it was
        nonlocal diff
        if fmt == "torchscript":
            with torch.no_grad():
                traced = torch.jit.trace(model, example, check_trace=False)
            scripted = torch.jit.script(_AcceptInt16(traced))
            scripted.save(tmp)
            loaded = torch.jit.load(tmp)
            with torch.no_grad():
                got = loaded(check)
                got16 = loaded((check * 32767).round().clamp(-32768, 32767).to(torch.int16))
            diff = float((got - ref).abs().max())
            if not torch.isfinite(got16).all():
                raise ExportError("int16 input produced non-finite output")
        elif fmt == "onnx":
            try:
                import onnxruntime as ort
            except ImportError:
                raise ExportError("ONNX export needs onnx and onnxruntime: pip install 'sslaudio[export]'") from None
            _onnx_export(model, example, tmp)
            sess = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
            got = sess.run(None, {sess.get_inputs()[0].name: check.numpy()})[0]
            diff = float(np.abs(got - ref.numpy()).max())
        else:
            raise ExportError(f"unknown format '{fmt}' (torchscript or onnx)")
        tol = 1e-3 * max(1.0, float(ref.abs().max()))
        if not diff <= tol:
            raise ExportError(f"exported model disagrees with PyTorch: max abs diff {diff:.3g} > {tol:.3g}")

    atomic_write(out, write)
    return {"format": fmt, "out": str(out), "dim": int(ref.shape[1]), "max_abs_diff": diff,
            "checked_on": list(check.shape)}


def _onnx_export(model: nn.Module, example: Tensor, path: str) -> None:
    kwargs = dict(input_names=["audio"], output_names=["embedding"], opset_version=18,
                  dynamic_axes={"audio": {0: "batch", 1: "samples"}, "embedding": {0: "batch"}})
    try:  # the TorchScript-based exporter handles our data-dependent checks as constants
        torch.onnx.export(model, (example,), path, dynamo=False, **kwargs)
    except TypeError:  # torch without the `dynamo` argument
        torch.onnx.export(model, (example,), path, **kwargs)
