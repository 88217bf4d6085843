"""ATST: Audio Teacher-Student Transformer. ATST-Clip, ATST-Frame and their distillation ATST-C2F.

Li & Li, "ATST: Audio Representation Learning with Teacher-Student Transformer", Interspeech 2022
(ATST-Clip). Li, Shao & Li, "Self-supervised Audio Teacher-Student Transformer for Both Clip-level
and Frame-level Tasks", IEEE/ACM TASLP 2024 (ATST-Frame, ATST-C2F). Official code:
github.com/Audio-WestlakeU/audiossl: methods/atst/{model,transform,data,train,train_base.sh}.py,
models/atst/{atst,byol,audio_transformer}.py (ATST-Clip); methods/atstframe/{model,byol,transform,
data,audio_transformer,random_mask,embedding,README.md} (ATST-Frame); methods/atstframe/
{module_distill,train_distill}.py (C2F); utils/common.py (cosine_scheduler_step, get_params_groups).

Shared by all three: the `mel_db` frontend (64 mel bins, 1024-point window, hop 160, dB floored
80 dB below the clip's maximum, fixed min-max scaling) and the ViT with 64x4 patches (full band x
4 frames: one token per 40 ms), no qkv bias, learned positions cut to the input (`pos: learned`,
official pos_type "cut"), trunc-normal init. Heads as the official build_mlp(2, D, 4096, 256,
last_bn=False): Linear - BN - ReLU - Linear, no bias on the Linears (ours keep the hidden bias,
which the BN cancels). Teacher = EMA of the student's encoder and projector, tau cosine from its
base to 1 over the run (official cosine_scheduler_step(ema, 1, max_steps)); it starts as a copy
of the student. The official Lightning module leaves the teacher in training mode (DropPath and
BatchNorm batch statistics active in it too); so do we. Extraction and export use the teacher's
encoder, as the official evaluation (`model.teacher.encoder`; `eval_teacher: false` gives the
student, as the tiny presets do). Loss: the two directions of
2 - 2 cos averaged (official ByolLoss divides by its n_loss_terms, 2), not summed as in BYOL.
The official optimiser also raises weight decay 0.04 -> 0.4 (cosine) on the decayed group; the
trainer holds optim.weight_decay constant (see the presets).

ATST-Clip (`atst-clip`): two independent crops of a recording (data.segments 2, official 6 s
each, "different_positive"), each through its own mixup + random resize crop chain (two chains,
two mixup memories, as the official positive_transform1/2); both crops go through the student in
one batch (official MultiCropWrapper); the CLS outputs -> projector -> predictor regress the
teacher's projected CLS of the other crop. The clip embedding is [CLS, mean of the frame tokens]
of the last block (official get_intermediate_layers_chunks with avgpool; its linear evaluation
concatenates that over the last 12 blocks: `encoder.eval_blocks`, see below): the encoder's `cls_frames`.

ATST-Frame (`atst-frame`): one 10 s crop and two views of it: view 1 as it is, view 2 through
mixup + a frequency-only random resize crop (official aug_tea False, aug_stu True, freq_wrap:
RandomResizeCrop((1, 1.0), time_scale=(1.0, 1.0))), so frame t of one view is frame t of the
other. One mask per clip, shared by both views (official masks.extend([mask] * 2)): the official
"block" mask is fairseq compute_mask_indices with mask_prob 0.65, mask_length 5, min_masks 2,
static lengths, no_overlap False (mask_nooverlap's default; the paper calls it block masking),
drawn for one clip at a time: the `span` masker with require_same_masks false. The student
encodes both views with the hidden tokens replaced by a mask embedding, the teacher both views
unmasked; the masked frames of each view (in (clip, frame) order) -> projector -> predictor
regress the teacher's projected frames of the other view (symmetric, official `symmetric True`).
The clip embedding is the mean of the frames (official get_scene_embedding).
Embeddings of both (extract, probe, export) are those of the official evaluation with
`encoder.eval_blocks` N: each of the last N blocks' outputs through the final LayerNorm, side by
side (atstframe/embedding.py N_BLOCKS 12, get_intermediate_layers(n) with norm_frame per block);
training and C2F's teachers use the last block alone.

ATST-C2F (`atst-c2f`): the TASLP paper combines the two by knowledge distillation, "as audiossl
does it" in module_distill.py: the student is an ATST-Frame encoder initialised from a trained
ATST-Frame's (teacher) weights; a frozen ATST-Clip encoder is the teacher; the student's clip
embedding (mean of its last-block frames, official get_intermediate_layers(n=1, scene=True))
goes through a head (official LinearHead: affine-free BatchNorm then Linear; `head: mlp` adds the
official `project` MLP first) and is trained to match the teacher. The official recipe distils
a *fine-tuned* ATST-Clip's class logits (BCE against their sigmoid) on a labelled task; without
labels we distil the teacher's clip embedding [CLS, mean] of the same input with 2 - 2 cos (the
form left commented out in module_distill.py). Not in the official code: `frame_weight` x the
frame-wise 2 - 2 cos between the student's frames and the frozen ATST-Frame's, so that long
label-free training keeps what the frame model knew (0 gives the official objective).
Both teachers are sources (`Method.sources`, as HuBERT's label model): `method.clip_teacher` and
`method.frame_teacher` name a run folder, step folder or exported encoder of an `atst-clip` /
`atst-frame` run; their presets are recorded in the run and their weights travel in every
checkpoint. `random:PRESET` builds a random-init teacher from a preset (the tiny preset's default,
so it builds without any checkpoint; for tests only). Both teachers run in eval mode (the official
teacher stays in training mode, DropPath on) and see the student's spectrogram, so they must share
its frontend. The official optimiser (SGD, layer-wise lr decay 0.75) is not the trainer's AdamW.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from sslaudio.augment import MultiCrop, ViewChain
from sslaudio.config import ConfigError, build_component, load_preset_dict, preset_tree
from sslaudio.masking import Mask
from sslaudio.methods import losses
from sslaudio.methods.base import Method, Needs, ViewMethod, effective_dimension, embedding_signals, embedding_std
from sslaudio.methods.data2vec import frame_std
from sslaudio.methods.ema import EMAConfig, ema_update, make_teacher, momentum
from sslaudio.methods.heads import mlp
from sslaudio.registry import ENCODERS, FRONTENDS, METHODS

FRONTENDS_OK = ("mel_db", "logmel")


class _TeacherStudent(ViewMethod):
    """ATST-Clip and ATST-Frame: two views from the view sampler, the official BYOL heads, an EMA
    teacher of encoder + projector (what extraction uses, unless eval_teacher is false), the
    averaged symmetric 2 - 2 cos."""

    def __init__(self, cfg, inputs, frontend, encoder, masker=None, crops: MultiCrop | None = None):
        super().__init__(cfg, inputs, frontend, encoder, masker, crops=crops)
        self.projector = mlp([encoder.dim, cfg.proj_hidden, cfg.proj_dim], bias_last=False)
        self.predictor = mlp([cfg.proj_dim, cfg.proj_hidden, cfg.proj_dim], bias_last=False)
        self.target_encoder = make_teacher(encoder)
        self.target_projector = make_teacher(self.projector)

    def tau(self, step: int, max_steps: int) -> float:
        return momentum(self.cfg.ema, step, max_steps)

    @torch.no_grad()
    def after_step(self, step: int, max_steps: int) -> None:
        tau = self.tau(step, max_steps)
        ema_update(self.target_encoder, self.encoder, tau)
        ema_update(self.target_projector, self.projector, tau)

    def inference_encoder(self) -> nn.Module:
        return self.target_encoder if self.cfg.eval_teacher else self.encoder  # official: model.teacher.encoder

    @staticmethod
    def symmetric_loss(p1: Tensor, p2: Tensor, t1: Tensor, t2: Tensor) -> Tensor:
        """Student predictions of views 1, 2 against the teacher's other view, averaged."""
        return 0.5 * (losses.byol_loss(p1, t2) + losses.byol_loss(p2, t1))


@METHODS.register("atst-clip")
class ATSTClip(_TeacherStudent):
    @dataclass
    class Config:
        proj_hidden: int = 4096
        proj_dim: int = 256
        ema: EMAConfig = field(default_factory=lambda: EMAConfig(start=0.9995, end=1.0, schedule="cosine"))
        eval_teacher: bool = True  # extraction / export use the teacher, as the official evaluation

        def __post_init__(self):
            if self.proj_hidden < 1 or self.proj_dim < 1:
                raise ConfigError("method.proj_hidden and method.proj_dim must be >= 1")

    @classmethod
    def needs(cls, cfg) -> Needs:
        return Needs(frontend=FRONTENDS_OK, encoder=("vit",), masker="none", views=True)

    def __init__(self, cfg: Config, inputs, frontend, encoder, masker=None):
        chain = list(inputs.views)
        # one chain (and mixup memory) per crop, as the official positive_transform1 / 2
        super().__init__(cfg, inputs, frontend, encoder, masker, crops=MultiCrop(global_augment=[chain, chain]))
        if encoder.cls is None:
            raise ConfigError("encoder.cls_token: ATST-Clip trains the CLS output; set encoder.cls_token: true")

    def forward(self, batch: dict, step: int, generator: torch.Generator, max_steps: int) -> dict[str, Tensor]:
        B = batch["audio"].shape[0]
        x = torch.cat(self.make_views(batch["audio"], generator))  # (2B, F, T): both crops, one pass
        p = self.predictor(self.projector(self.encoder(x).cls))  # (2B, P)
        with torch.no_grad():
            t = self.target_projector(self.target_encoder(x).cls)
        loss = self.symmetric_loss(p[:B], p[B:], t[:B], t[B:])
        return {"loss": loss, "std_student": embedding_std(p), "std_teacher": embedding_std(t),
                "student_dims": effective_dimension(p),
                "ema_tau": torch.full((), self.tau(step, max_steps), device=loss.device)}


@METHODS.register("atst-frame")
class ATSTFrame(_TeacherStudent):
    @dataclass
    class Config:
        proj_hidden: int = 4096
        proj_dim: int = 256
        augment: tuple[bool, bool] = (False, True)  # augment view 1, view 2: official aug_tea, aug_stu
        ema: EMAConfig = field(default_factory=lambda: EMAConfig(start=0.9996, end=1.0, schedule="cosine"))
        eval_teacher: bool = True  # extraction / export use the teacher, as the official evaluation

        def __post_init__(self):
            if self.proj_hidden < 1 or self.proj_dim < 1:
                raise ConfigError("method.proj_hidden and method.proj_dim must be >= 1")
            if not any(self.augment):
                raise ConfigError("method.augment: at least one view must be augmented, found [false, false]")

    @classmethod
    def needs(cls, cfg) -> Needs:
        return Needs(frontend=FRONTENDS_OK, encoder=("vit",), masker="replace", views=True, segments=1)

    def __init__(self, cfg: Config, inputs, frontend, encoder, masker=None):
        chain = list(inputs.views)
        crops = MultiCrop(global_augment=[chain if a else [] for a in cfg.augment])
        super().__init__(cfg, inputs, frontend, encoder, masker, crops=crops)
        if encoder.freq_grid != 1:
            raise ConfigError(f"encoder.patch: ATST-Frame masks and predicts whole frames; the patch height must be "
                              f"the {encoder.n_freq} mel bins (one token per time step), found {encoder.cfg.patch[0]}")

    def forward(self, batch: dict, step: int, generator: torch.Generator, max_steps: int) -> dict[str, Tensor]:
        B = batch["audio"].shape[0]
        x = torch.cat(self.make_views(batch["audio"], generator))  # (2B, F, T): view 1, then view 2
        # whole crops: no lengths for the encoders to check, no padding for the masker
        drawn = self.masker(self.encoder.token_grid(x.shape), B, None, generator)
        hidden = drawn.masked.to(x.device).repeat(2, 1)  # one mask per clip, shared by its two views
        out = self.encoder(x, None, mask=Mask.from_masked(hidden, "replace"))
        with torch.no_grad():
            t_tokens = self.target_encoder(x, None).tokens  # the unmasked views
        # the masked frames, view 1's rows first (the order of tokens[hidden]), gathered with
        # indices the span masker built on the host: the BatchNorm heads see exactly those rows
        # and no count is read from the device
        rows = drawn.hidden_rows()[0]
        m, n_tokens = rows.shape[0], hidden.shape[1]
        rows = torch.cat([rows, rows + B * n_tokens])
        p = self.predictor(self.projector(out.tokens.flatten(0, 1)[rows]))  # (2M, P)
        with torch.no_grad():
            t = self.target_projector(t_tokens.flatten(0, 1)[rows])
        loss = self.symmetric_loss(p[:m], p[m:], t[:m], t[m:])
        return {"loss": loss, "std_student": embedding_std(p), "std_teacher": embedding_std(t),
                "student_dims": effective_dimension(p),
                "frame_std": frame_std(out.tokens.detach(), out.padding),
                "masked_pct": torch.full((), m / max(B * n_tokens, 1), device=loss.device),
                "ema_tau": torch.full((), self.tau(step, max_steps), device=loss.device)}


TEACHERS = {"clip_teacher": ("atst-clip", "ATST-Clip"), "frame_teacher": ("atst-frame", "ATST-Frame")}


def random_teacher(spec: str) -> tuple[nn.Module, nn.Module, dict]:
    """`random:PRESET` -> (frontend, encoder, preset dict) at random init (tests, smoke runs)."""
    p = preset_tree(load_preset_dict(spec[len("random:"):]))
    frontend = build_component(FRONTENDS, p.frontend, "frontend", sample_rate=p.data.sample_rate)
    return frontend, build_component(ENCODERS, p.encoder, "encoder", frontend=frontend), p.to_dict()


def _no_drop_path(cfg):
    return dataclasses.replace(cfg, drop_path=0.0) if hasattr(cfg, "drop_path") else cfg


@METHODS.register("atst-c2f")
class ATSTC2F(Method):
    @dataclass
    class Config:
        clip_teacher: str = ""  # run folder / step folder / encoder file of an atst-clip run
        frame_teacher: str = ""  # ... of an atst-frame run: the teacher and the student's start
        clip_teacher_preset: dict | None = None  # recorded by the trainer
        frame_teacher_preset: dict | None = None
        head: Literal["linear", "mlp"] = "linear"  # official LinearHead; mlp: official `project`
        proj_hidden: int = 4096
        frame_weight: float = 1.0  # ours (0: the official clip-only distillation)

        def __post_init__(self):
            if self.head not in ("linear", "mlp"):
                raise ConfigError(f"method.head: {self.head!r} is not one of ['linear', 'mlp']")
            if self.proj_hidden < 1:
                raise ConfigError(f"method.proj_hidden must be >= 1, found {self.proj_hidden}")
            if not self.frame_weight >= 0:
                raise ConfigError(f"method.frame_weight must be >= 0, found {self.frame_weight}")

    @classmethod
    def needs(cls, cfg) -> Needs:
        return Needs(frontend=FRONTENDS_OK, encoder=("vit",), masker="none", segments=1)

    @classmethod
    def sources(cls, cfg) -> dict[str, str]:
        out = {}
        for key, (_, kind) in TEACHERS.items():
            spec = getattr(cfg, key)
            if not spec:
                raise ConfigError(f"method.{key}: ATST-C2F distils a trained {kind} model; give its run folder or "
                                  f"checkpoint (--set method.{key}=RUN)")
            if not spec.startswith("random:"):
                out[key] = spec
        return out

    def __init__(self, cfg: Config, inputs, frontend, encoder, masker=None, sources=None):
        super().__init__(cfg, inputs, frontend, encoder, masker)
        sources = sources or {}
        for key, (name, kind) in TEACHERS.items():
            spec = getattr(cfg, key)
            if spec.startswith("random:"):
                t_frontend, t_encoder, preset = random_teacher(spec)
            else:
                t_frontend, t_encoder = sources[key]
                preset = getattr(cfg, f"{key}_preset") or {}
            found = (preset.get("method") or {}).get("name")
            if found != name:
                raise ConfigError(f"method.{key}: {spec} is a '{found}' model, not an {kind} one ('{name}')")
            if type(t_frontend) is not type(frontend) or t_frontend.cfg != frontend.cfg or \
                    int(t_frontend.sample_rate) != int(frontend.sample_rate):
                raise ConfigError(f"method.{key}: {spec} reads another frontend than this preset's; both teachers "
                                  f"see the student's spectrogram, so give this preset the teachers' frontend section")
            teacher = nn.ModuleDict({"frontend": t_frontend, "encoder": t_encoder})
            for p in teacher.parameters():
                p.requires_grad_(False)
            setattr(self, key, teacher)
        student, start = encoder, self.frame_teacher["encoder"]
        if type(start) is not type(student) or _no_drop_path(start.cfg) != _no_drop_path(student.cfg):
            raise ConfigError(f"encoder: the student starts from the weights of {cfg.frame_teacher}, so it needs that "
                              f"model's encoder section (drop_path may differ)")
        target_dim = int(self.clip_teacher["encoder"].frame_dim)
        head = [nn.BatchNorm1d(encoder.frame_dim, affine=False), nn.Linear(encoder.frame_dim, target_dim)]
        if cfg.head == "mlp":
            d = encoder.frame_dim
            head = [mlp([d, cfg.proj_hidden, d], bias_last=False), nn.BatchNorm1d(d, affine=False), nn.Linear(d, target_dim)]
        self.head = nn.Sequential(*head)
        nn.init.normal_(self.head[-1].weight, std=0.01)  # official LinearHead
        nn.init.zeros_(self.head[-1].bias)
        self.augment = ViewChain(list(inputs.views), self.spec_shape()) if inputs.views else None
        self._source_ids: dict[str, str] = {}

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip_teacher.eval()  # fixed targets: no DropPath in the frozen teachers
        self.frame_teacher.eval()
        return self

    def prepare(self, audio: Tensor, sample=None) -> None:
        """The student starts as the ATST-Frame teacher (official: student.load_state_dict(frame_encoder))."""
        super().prepare(audio)
        self.encoder.load_state_dict(self.frame_teacher["encoder"].state_dict())

    def run_info(self) -> dict:
        info = {}
        for key in TEACHERS:
            if key not in self._source_ids:
                h = hashlib.sha256()
                for name, t in sorted(getattr(self, key).state_dict().items()):
                    h.update(name.encode())
                    h.update(t.detach().cpu().contiguous().numpy().tobytes())
                self._source_ids[key] = h.hexdigest()
            info[key] = getattr(self.cfg, key)
            info[f"{key}_sha256"] = self._source_ids[key]
        return info

    def forward(self, batch: dict, step: int, generator: torch.Generator, max_steps: int) -> dict[str, Tensor]:
        x = self.features(batch["audio"][:, 0])  # (B, F, T)
        if self.augment is not None:
            with torch.no_grad():
                x = self.augment(x, generator)
        lengths = None  # whole crops: no padding
        with torch.no_grad():
            clip_enc = self.clip_teacher["encoder"]
            target = clip_enc.pool(clip_enc(x, lengths))  # (B, C): the teacher's clip embedding
            frame_target = self.frame_teacher["encoder"](x, lengths).tokens if self.cfg.frame_weight > 0 else None
        out = self.encoder(x, lengths)
        scene = self.encoder.pool(out)  # (B, D): mean of the student's frames
        clip_loss = losses.byol_loss(self.head(scene), target)
        flat = out.tokens.reshape(-1, out.tokens.shape[-1])  # every frame is valid (no lengths)
        frame_loss = losses.byol_loss(flat, frame_target.reshape(flat.shape)) if frame_target is not None \
            else torch.zeros((), device=x.device)
        loss = clip_loss + self.cfg.frame_weight * frame_loss
        return {"loss": loss, "clip_loss": clip_loss.detach(), "frame_loss": frame_loss.detach(),
                **embedding_signals(scene),
                "frame_std": frame_std(out.tokens.detach(), out.padding)}
