#!/usr/bin/env python
"""One training step of sslaudio vs Hugging Face transformers at an identical configuration.

    python benchmarks/vs_hf.py                                   # both methods, batch 8 x 4 s, 2 threads
    python benchmarks/vs_hf.py --method data2vec --steps 10
    python benchmarks/vs_hf.py --device cuda --batch 32 --seconds 15   # bf16 autocast on both sides
    python benchmarks/vs_hf.py --batch 2 --seconds 1 --steps 2 --warmup 1  # smoke test
    python benchmarks/vs_hf.py --compile          # also sslaudio with train.compile: true (torch.compile)

Needs transformers (`pip install 'sslaudio[bench]'`). The configuration (the issue's): raw
waveform, wav2vec 2.0 conv feature extractor 7 x 512 (kernels 10,3,3,3,3,2,2, strides
5,2,2,2,2,2,2, no conv bias), 4 x 256 post-LN transformer, 4 heads, FFN 1024, span masks
p 0.65 length 10; data2vec: LayerNorm after every conv, positional conv of 5 layers x kernel 19
in 16 groups, top-4 instance-normalised teacher targets; wav2vec 2.0: GroupNorm after the first
conv, positional conv kernel 128 in 16 groups, Gumbel quantizer G 2 x V 320, codewords 256 wide,
final_dim 256, 100 distractors. Dropouts are the papers' on both sides (dropout 0.1, attention
dropout 0.1, activation dropout 0; input dropout 0 for data2vec and 0.1 for wav2vec 2.0;
wav2vec 2.0 quantizer-input dropout 0.1); LayerDrop is 0 on both sides (the papers' 0.05 would
make the step time random, and no LayerDrop at depth 4 as the tiny presets).

A step is what the trainer does: torch.manual_seed per step, a torch.Generator for the masks
(sslaudio) / numpy's global RNG seeded per step (transformers' mask and negative helpers),
forward, the loss fetched to the host (the trainer's one sync per step), backward, AdamW step
(weight decay 0.01, betas (0.9, 0.98), eps 1e-6; the trainer's fused AdamW, sslaudio.optim, on
both sides), and the EMA update (data2vec).

sslaudio: `build_method` of presets/data2vec.yaml / presets/wav2vec2.yaml with `--set`-style
overrides (printed with the results).

transformers:
- data2vec: Data2VecAudioModel as the student (masked frames replaced by its masked_spec_embed,
  masks from `_compute_mask_indices`), a deepcopy of it as the EMA teacher (eval mode, no grad)
  on the unmasked input; targets = the mean of the teacher's top-4 layer outputs
  (output_hidden_states), each instance-normalised over time; a Linear final_proj on the student's
  output at the masked frames; the data2vec regression loss (squared error summed over the
  dimensions / sqrt(D), mean over masked frames); EMA of every teacher parameter after AdamW.
- wav2vec 2.0: Wav2Vec2ForPreTraining with `mask_time_indices` from `_compute_mask_indices` and
  `sampled_negative_indices` from `_sample_negative_indices`; its loss (contrastive summed over
  masked frames + 0.1 x diversity x masked frames; shown divided by the masked-frame count).

What differs in work (same model sizes; the parameter counts are printed):
- data2vec teacher: sslaudio's teacher is the transformer only (fairseq ema_transformer_only): it
  reads the student's own projected conv features of the unmasked input and shares the student's
  positional conv, so the conv feature extractor (most of the FLOPs at 256 wide) runs once per
  step; the HF teacher is the whole model and runs the extractor a second time (forward only).
  `--hf-teacher transformer` gives HF the same structure (the student's extractor and projection
  run once, a deepcopy of the encoder as teacher on their detached output), to separate the
  structural saving from the rest. The EMA then also touches fewer tensors.
- data2vec targets: sslaudio averages the blocks' FFN outputs before the residual and final
  LayerNorm (fairseq layer_results); HF exposes the layer outputs (after the LayerNorm): the same
  cost, different values. sslaudio normalises each waveform (frontend normalize: true); HF does
  that in its feature extractor, outside the model (not timed).
- wav2vec 2.0: HF projects and quantizes every frame and scores all B x T frames against their
  100 distractors (the unmasked ones get target -100); sslaudio quantizes and scores the masked
  frames only. sslaudio adds the feature penalty (weight 10) and scales the extractor's gradient
  by feature_grad_mult 0.1 (fairseq); HF has neither (the gradient scale costs nothing).
- masks: sslaudio's span masker (fairseq's) reduces every row to the batch's smallest masked
  count (require_same_masks); HF's helper does not: at batch 8 x 4 s (199 frames) about 42 % of
  the frames are masked in sslaudio and 49 % in HF (at 1 s: 36 % and 51 %). Only the work done
  on masked frames (final_proj, loss; wav2vec 2.0 quantizer and scoring in sslaudio) depends on it.

FLOPs: torch.utils.flop_counter.FlopCounterMode around one extra (untimed) step's forward +
backward (matmuls, convolutions and attention; elementwise work is not counted). The attained
matmul rate is measured in the same run (timed torch.matmul of n x n, 2 n^3 flops each; fp32 on
the CPU, bf16 under CUDA, the dtype the steps run their matmuls in), and each implementation's
FLOP rate is shown as a fraction of it; on CUDA also as MFU against the device's bf16 dense peak
when the GPU is in a small table. After warm-up the two implementations alternate step by step
(A, B, A, B, ...), so load on a shared machine hits both alike; wall and process time per step
are means over the timed steps.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from flops import (  # benchmarks/flops.py
    bf16_peak,
    count_flops,
    default_matmul,
    matmul_rate,
    sync,
)
from torch import nn

from sslaudio import optim
from sslaudio.build import build_method, load_preset
from sslaudio.config import OptimConfig

SR = 16000
DIM, DEPTH, HEADS, FFN, TOP_K = 256, 4, 4, 1024, 4
MASK_P, MASK_LEN = 0.65, 10
BETAS, EPS, WD, LR = (0.9, 0.98), 1e-6, 0.01, 1e-4
EMA_TAU = 0.999
MAX_STEPS = 30000  # for sslaudio's schedules (EMA, Gumbel temperature)

# bf16 dense tensor-core peaks (TFLOP/s) from the vendors' data sheets; the first match wins
def sslaudio_overrides(method: str, batch: int, seconds: float) -> list[str]:
    common = [f"train.batch_size={batch}", f"data.clip_seconds={seconds}", f"encoder.dim={DIM}",
              f"encoder.depth={DEPTH}", f"encoder.heads={HEADS}", f"encoder.ffn_dim={FFN}",
              "encoder.layerdrop=0.0", "encoder.dropout=0.1", "encoder.attention_dropout=0.1",
              "encoder.activation_dropout=0.0", "encoder.layer_norm_first=false",
              f"masker.p={MASK_P}", f"masker.length={MASK_LEN}"]
    if method == "data2vec":
        return common + ["encoder.input_dropout=0.0", f"method.top_k={TOP_K}"]
    return common + ["encoder.input_dropout=0.1", "method.final_dim=256", "method.latent_groups=2",
                     "method.latent_vars=320", "method.num_negatives=100", "method.dropout_features=0.1"]


def n_params(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)


def adamw(params, device: str) -> torch.optim.Optimizer:
    """The trainer's optimizer (fused AdamW) on both sides, so the comparison is of the models."""
    return optim.adamw(params, OptimConfig(lr=LR, betas=BETAS, eps=EPS), weight_decay=WD)


class Impl:
    """One side: `step(i)` = a full training step; `fwd_bwd(i)` = its forward + backward only
    (for the FLOP count); `params` (M) and the last step's loss terms."""

    name: str
    params: int
    overrides: list[str] = []

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def step(self, i: int) -> None:
        loss = self.loss(i)
        self.opt.zero_grad(set_to_none=True)
        self.last["loss"] = float(loss.detach())  # the trainer's one host sync per step
        loss.backward()
        self.opt.step()
        self.after_step(i)

    def fwd_bwd(self, i: int) -> None:
        loss = self.loss(i)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.zero_grad(set_to_none=True)

    def after_step(self, i: int) -> None:
        pass


class SslaudioImpl(Impl):
    def __init__(self, method: str, audio: torch.Tensor, device: str, amp, compile: bool = False) -> None:
        super().__init__()
        self.name = "sslaudio" + (" (train.compile)" if compile else "")
        self.overrides = sslaudio_overrides(method, audio.shape[0], audio.shape[-1] / SR)
        preset = load_preset(method, self.overrides)
        torch.manual_seed(0)
        self.method = build_method(preset).to(device).train()
        self.opt = adamw(self.method.param_groups(WD), device)
        self.batch, self.device, self.amp = {"audio": audio[:, None]}, device, amp
        self.params = n_params(self.method)
        # as the trainer with train.compile: true; FLOPs are counted on the eager method (the
        # counter does not see inside compiled kernels)
        self.compiled = torch.compile(self.method) if compile else None
        self.counting = False

    def loss(self, i: int) -> torch.Tensor:
        torch.manual_seed(1000 + i)
        gen = torch.Generator(self.device).manual_seed(2000 + i)
        step = self.method if self.compiled is None or self.counting else self.compiled
        with self.amp():
            out = step(self.batch, i, gen, MAX_STEPS)
        for k in ("contrastive", "diversity", "feature_pen", "masked_pct"):
            if k in out:
                self.last[k] = float(out[k])
        return out["loss"]

    def after_step(self, i: int) -> None:
        self.method.after_step(i, MAX_STEPS)


def hf_common() -> dict:
    return dict(hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=FFN,
                hidden_act="gelu", hidden_dropout=0.1, attention_dropout=0.1, activation_dropout=0.0,
                layerdrop=0.0, conv_dim=(512,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2),
                conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_bias=False, num_conv_pos_embedding_groups=16,
                mask_time_prob=MASK_P, mask_time_length=MASK_LEN, mask_feature_prob=0.0)


class HFData2Vec(Impl):
    def __init__(self, tf, audio: torch.Tensor, device: str, amp, teacher: str) -> None:
        super().__init__()
        from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices
        self.compute_mask = _compute_mask_indices
        self.name = "transformers" + (" (teacher: transformer only)" if teacher == "transformer" else "")
        cfg = tf.Data2VecAudioConfig(**hf_common(), num_conv_pos_embeddings=5, conv_pos_kernel_size=19,
                                     feat_proj_dropout=0.0, mask_time_min_masks=1)
        torch.manual_seed(0)
        self.student = tf.Data2VecAudioModel(cfg).to(device).train()
        self.final_proj = nn.Linear(DIM, DIM).to(device)
        self.teacher_mode = teacher
        self.teacher = copy.deepcopy(self.student if teacher == "full" else self.student.encoder).eval()
        self.teacher.requires_grad_(False)
        self.t_params = list(self.teacher.parameters())
        src = self.student if teacher == "full" else self.student.encoder
        self.s_params = list(src.parameters())
        self.layer_out: list[torch.Tensor] = []
        if teacher == "transformer":  # collect the teacher's layer outputs
            for layer in self.teacher.layers:
                layer.register_forward_hook(lambda m, a, o: self.layer_out.append(o[0] if isinstance(o, tuple) else o))
        self.opt = adamw([*self.student.parameters(), *self.final_proj.parameters()], device)
        self.audio, self.device, self.amp = audio, device, amp
        self.frames = int(self.student._get_feat_extract_output_lengths(audio.shape[-1]))
        self.params = n_params(self.student, self.final_proj)

    def loss(self, i: int) -> torch.Tensor:
        torch.manual_seed(1000 + i)
        np.random.seed(i)
        B = self.audio.shape[0]
        mask = torch.from_numpy(self.compute_mask((B, self.frames), MASK_P, MASK_LEN, min_masks=1)).to(self.device)
        with self.amp():
            if self.teacher_mode == "full":
                with torch.no_grad():
                    layers = self.teacher(self.audio, output_hidden_states=True).hidden_states[-TOP_K:]
                x = self.student(self.audio, mask_time_indices=mask).last_hidden_state
            else:  # the student's extractor + projection once; the teacher encoder reads them unmasked
                feats = self.student.feature_extractor(self.audio).transpose(1, 2)
                h, _ = self.student.feature_projection(feats)
                self.layer_out.clear()
                with torch.no_grad():
                    self.teacher(h.detach())
                layers = self.layer_out[-TOP_K:]
                h = torch.where(mask[..., None], self.student.masked_spec_embed.to(h.dtype), h)
                x = self.student.encoder(h).last_hidden_state
            with torch.no_grad():  # data2vec targets: instance norm over time per layer, then the mean
                y = sum(F.instance_norm(t.float().transpose(1, 2)).transpose(1, 2) for t in layers) / len(layers)
            pred = self.final_proj(x[mask])
        target = y[mask]
        self.last["masked_pct"] = float(mask.float().mean())
        return ((pred.float() - target) ** 2).sum(-1).mean() / math.sqrt(DIM)

    @torch.no_grad()
    def after_step(self, i: int) -> None:
        torch._foreach_mul_(self.t_params, EMA_TAU)
        torch._foreach_add_(self.t_params, [p.detach() for p in self.s_params], alpha=1.0 - EMA_TAU)


class HFWav2Vec2(Impl):
    def __init__(self, tf, audio: torch.Tensor, device: str, amp) -> None:
        super().__init__()
        from transformers.models.wav2vec2.modeling_wav2vec2 import (
            _compute_mask_indices,
            _sample_negative_indices,
        )
        self.compute_mask, self.sample_neg = _compute_mask_indices, _sample_negative_indices
        self.name = "transformers"
        cfg = tf.Wav2Vec2Config(**hf_common(), feat_extract_norm="group", num_conv_pos_embeddings=128,
                                do_stable_layer_norm=False, feat_proj_dropout=0.1, feat_quantizer_dropout=0.1,
                                mask_time_min_masks=2, num_codevector_groups=2, num_codevectors_per_group=320,
                                codevector_dim=256, proj_codevector_dim=256, num_negatives=100,
                                contrastive_logits_temperature=0.1, diversity_loss_weight=0.1)
        torch.manual_seed(0)
        self.model = tf.Wav2Vec2ForPreTraining(cfg).to(device).train()
        self.model.set_gumbel_temperature(2.0)  # fairseq / sslaudio at step 0
        self.opt = adamw(self.model.parameters(), device)
        self.audio, self.device, self.amp = audio, device, amp
        self.frames = int(self.model._get_feat_extract_output_lengths(audio.shape[-1]))
        self.params = n_params(self.model)

    def loss(self, i: int) -> torch.Tensor:
        torch.manual_seed(1000 + i)
        np.random.seed(i)
        B = self.audio.shape[0]
        mask_np = self.compute_mask((B, self.frames), MASK_P, MASK_LEN, min_masks=2)
        neg = self.sample_neg((B, self.frames), 100, mask_np)
        mask = torch.from_numpy(mask_np).to(self.device)
        with self.amp():
            out = self.model(self.audio, mask_time_indices=mask,
                             sampled_negative_indices=torch.from_numpy(neg).to(self.device))
        m = float(mask.sum())
        self.last.update(contrastive=float(out.contrastive_loss.detach()) / m,
                         diversity=float(out.diversity_loss.detach()) / m,
                         masked_pct=m / mask.numel())
        return out.loss

    def step(self, i: int) -> None:
        super().step(i)
        self.last["loss"] /= self.last["masked_pct"] * self.audio.shape[0] * self.frames  # per masked frame


def count_impl_flops(impl: Impl, i: int) -> int:
    impl.counting = True
    try:
        return count_flops(lambda: impl.fwd_bwd(i))
    finally:
        impl.counting = False


def run_pair(impls: list[Impl], steps: int, warmup: int, device: str) -> dict[str, dict]:
    for i in range(warmup):
        for impl in impls:
            impl.step(i)
    times = {impl.name: [0.0, 0.0] for impl in impls}
    for i in range(warmup, warmup + steps):
        for impl in impls:  # A, B, A, B, ...
            sync(device)
            w, c = time.perf_counter(), time.process_time()
            impl.step(i)
            sync(device)
            times[impl.name][0] += time.perf_counter() - w
            times[impl.name][1] += time.process_time() - c
    flops = {impl.name: count_impl_flops(impl, warmup + steps) for impl in impls}
    return {impl.name: {"wall": times[impl.name][0] / steps, "cpu": times[impl.name][1] / steps,
                        "flops": flops[impl.name], "params": impl.params, "last": dict(impl.last)}
            for impl in impls}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=["data2vec", "wav2vec2", "both"], default="both")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per implementation")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--hf-teacher", choices=["full", "transformer"], default="full",
                    help="data2vec on the HF side: the teacher is a copy of the whole model (default) "
                         "or of its transformer only, on the student's conv features (as sslaudio)")
    ap.add_argument("--compile", action="store_true", help="also time sslaudio with train.compile: true "
                    "(torch.compile of the method step), alternating with the other two")
    ap.add_argument("--matmul-n", type=int, default=0, help="matmul size for the attained rate "
                    "(0: 2048 on the CPU, 8192 on CUDA)")
    a = ap.parse_args()
    try:
        import transformers as tf
    except ImportError:
        sys.exit("benchmarks/vs_hf.py needs transformers: pip install 'sslaudio[bench]'")

    torch.set_num_threads(a.threads)
    dev = a.device
    cuda = dev.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def amp():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)

    mm_n, mm_dtype = default_matmul(dev)
    mm_n = a.matmul_n or mm_n
    mm_rate = matmul_rate(mm_n, 5, dev, mm_dtype)
    peak = bf16_peak(dev)
    torch.manual_seed(0)
    audio = torch.randn(a.batch, int(round(a.seconds * SR)), device=dev) * 0.1

    print(f"# sslaudio vs transformers {tf.__version__}: one training step, torch {torch.__version__}")
    print(f"device {dev}{' (' + torch.cuda.get_device_name(torch.device(dev)) + ', bf16 autocast)' if cuda else ''}, "
          f"{torch.get_num_threads()} thread(s), batch {a.batch} x {a.seconds:g} s, {a.steps} timed steps "
          f"per implementation after {a.warmup} warm-up, alternating")
    print(f"attained matmul rate: {mm_rate / 1e9:.1f} GFLOP/s ({mm_n} x {mm_n} {str(mm_dtype)[6:]})"
          + (f"; bf16 dense peak {peak / 1e12:.0f} TFLOP/s" if peak else "") + "\n")

    methods = ["data2vec", "wav2vec2"] if a.method == "both" else [a.method]
    summary = []
    for method in methods:
        ours = SslaudioImpl(method, audio, dev, amp)
        theirs = (HFData2Vec(tf, audio, dev, amp, a.hf_teacher) if method == "data2vec"
                  else HFWav2Vec2(tf, audio, dev, amp))
        compiled = [SslaudioImpl(method, audio, dev, amp, compile=True)] if a.compile else []
        res = run_pair([ours, theirs, *compiled], a.steps, a.warmup, dev)
        print(f"## {method}\n")
        print(f"sslaudio: preset {method} with --set " + " ".join(ours.overrides) + "\n")
        print("| implementation | params (M) | wall s/step | process s/step | GFLOP/step (fwd+bwd) "
              "| GFLOP/s | of matmul rate |" + (" MFU |" if peak else "") + " last loss | terms |")
        print("|---|---|---|---|---|---|---|" + ("---|" if peak else "") + "---|---|")
        for name, r in res.items():
            rate = r["flops"] / r["wall"]
            terms = ", ".join(f"{k} {v:.3g}" for k, v in r["last"].items() if k != "loss")
            print(f"| {name} | {r['params'] / 1e6:.2f} | {r['wall']:.3f} | {r['cpu']:.3f} | "
                  f"{r['flops'] / 1e9:.1f} | {rate / 1e9:.1f} | {rate / mm_rate:.3f} |"
                  + (f" {rate / peak:.4f} |" if peak else "") + f" {r['last']['loss']:.4g} | {terms} |")
        h = res[theirs.name]
        for impl in (ours, *compiled):
            s = res[impl.name]
            summary.append((f"{method}, {impl.name}", s["wall"] / h["wall"], s["cpu"] / h["cpu"], s["flops"] / h["flops"]))
        print()
        del ours, theirs, compiled
    print("## ratio sslaudio / transformers\n")
    print("| method, implementation | wall | process time | FLOPs |")
    print("|---|---|---|---|")
    for method, w, c, f in summary:
        print(f"| {method} | {w:.3f} | {c:.3f} | {f:.3f} |")
    print("\n(transformers' wav2vec 2.0 loss is summed over masked frames; shown per masked frame. "
          "data2vec losses: squared error summed over dims / sqrt(D), mean over masked frames.)")


if __name__ == "__main__":
    main()
