"""DINO: self-distillation with no labels, on multi-crop log-mel views.

Caron, Touvron, Misra, Jégou, Mairal, Bojanowski, Joulin. "Emerging Properties in Self-Supervised
Vision Transformers", ICCV 2021. Official code: github.com/facebookresearch/dino (main_dino.py
`DINOLoss`, `train_one_epoch`; vision_transformer.py `DINOHead`; utils.py `MultiCropWrapper`,
`cosine_scheduler`, `cancel_gradients_last_layer`).

Audio adaptation: BYOL-A's setting (64-bin log-mel crops, AudioNTT CNN, clip embedding = temporal
mean + max) with the preset's `views` chain in place of the image augmentations, and multi-crop
in time (`augment.MultiCrop`): G global views of the whole crop plus short local views, each a
random `local_frames` window of it, augmented by the same chain.

Student = encoder + DINOHead; teacher = their EMA copy (momentum 0.996 -> 1, cosine over the run,
`ema.momentum`; the update after step k uses the momentum of step k, as the official schedule).
The EMA moves the parameters only (official train_one_epoch: `for param_q, param_k in
zip(student.module.parameters(), teacher_without_ddp.parameters())`); the teacher starts as a copy
of the student (`teacher_without_ddp.load_state_dict(student.module.state_dict())`) and from then
on keeps its own BatchNorm running statistics, updated by its own train-mode forwards on the global
views, never copied from the student (whose statistics also see the local crops).
The teacher sees only the global views, the student all of them; `losses.dino_loss` compares every
teacher view with every other student view. As the official `MultiCropWrapper`, the views of one
length go through the encoder as one batch (globals together, locals together: BatchNorm
statistics per group) and the head takes all clip embeddings at once. The official teacher is built
without stochastic depth (the student has drop_path 0.1); our CNN's analogue is its dropout, so
the teacher's dropout is switched off. The head's MLP can take BatchNorm (official
`use_bn_in_head`, off by default for ViTs); the presets turn it on for the CNN (presets/dino.yaml
says why). Evaluation uses the teacher (the official eval scripts load the `teacher` weights;
`eval_teacher: false` gives the student).

Centre: a (K,) buffer (checkpointed), updated after the step with momentum 0.9 towards the batch
mean of the raw teacher outputs (under several processes the mean over all of them, through
`gather_fn`, as the official all_reduce). Teacher temperature: linear from `warmup_teacher_temp`
to `teacher_temp` over `warmup_teacher_temp_steps` (the official schedule is np.linspace over
epochs; we count steps), then constant. `freeze_last_layer` steps: the official code drops the
last layer's gradients after backward (`cancel_gradients_last_layer`) during the first epoch; the
trainer owns backward here, so the student's last layer runs on detached weights while step <
freeze_last_layer, which leaves it without gradient, and AdamW skips it (no decay either), as the
official `p.grad = None` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslaudio.augment import MultiCrop
from sslaudio.config import ConfigError
from sslaudio.methods import losses
from sslaudio.methods.base import ViewMethod, embedding_signals, multicrop_embed
from sslaudio.methods.ema import EMAConfig, make_teacher, momentum
from sslaudio.methods.heads import mlp
from sslaudio.registry import METHODS


class WeightNormLinear(nn.Module):
    """Bias-free Linear with weight normalisation (Salimans & Kingma 2016), W_k = g_k v_k / ||v_k||
    per output row, as torch.nn.utils.weight_norm(dim=0). The gain starts at 1 (official
    `weight_g.data.fill_(1)`); `fix_gain` freezes it (official norm_last_layer). `forward(x,
    frozen=True)` uses detached weights: no gradient reaches v or g."""

    def __init__(self, in_dim: int, out_dim: int, fix_gain: bool = True):
        super().__init__()
        self.weight_v = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fix_gain)

    def forward(self, x: Tensor, frozen: bool = False) -> Tensor:
        v, g = self.weight_v, self.weight_g
        if frozen:
            v, g = v.detach(), g.detach()
        return F.linear(x, g * v / v.norm(dim=1, keepdim=True))


class DINOHead(nn.Module):
    """MLP (nlayers Linear, GELU between, optional BN) to the bottleneck, L2-normalise, then a
    weight-normalised bias-free Linear to out_dim (official vision_transformer.py DINOHead; MLP
    weights truncated-normal std 0.02, biases 0, as its `_init_weights`)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, use_bn: bool = False, norm_last_layer: bool = True):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        self.mlp = mlp(dims, norm="bn" if use_bn else "none", act=nn.GELU)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_gain=norm_last_layer)

    def embed(self, x: Tensor) -> Tensor:
        """(N, in_dim) -> (N, bottleneck_dim) L2-normalised bottleneck features."""
        return F.normalize(self.mlp(x), dim=-1)

    def forward(self, x: Tensor, freeze_last: bool = False) -> Tensor:
        return self.last_layer(self.embed(x), frozen=freeze_last)


@METHODS.register("dino")
class DINO(ViewMethod):
    @dataclass
    class Config:
        out_dim: int = 65536
        hidden_dim: int = 2048
        bottleneck_dim: int = 256
        nlayers: int = 3
        use_bn: bool = False  # official use_bn_in_head
        norm_last_layer: bool = True
        student_temp: float = 0.1
        # official argparse defaults (0.04 throughout); the paper's recipe warms 0.04 -> 0.07 over
        # 30 of 100 epochs, which the presets use
        warmup_teacher_temp: float = 0.04
        teacher_temp: float = 0.04
        warmup_teacher_temp_steps: int = 0
        center_momentum: float = 0.9
        freeze_last_layer: int = 0  # steps (official: 1 epoch)
        ema: EMAConfig = field(default_factory=lambda: EMAConfig(start=0.996, end=1.0, schedule="cosine"))
        crops: MultiCrop = field(default_factory=lambda: MultiCrop(global_crops=2, local_crops=8, local_frames=32))
        eval_teacher: bool = True  # official evaluation uses the teacher

        def __post_init__(self):
            for key in ("out_dim", "hidden_dim", "bottleneck_dim", "nlayers"):
                if getattr(self, key) < 1:
                    raise ConfigError(f"method.{key} must be >= 1, found {getattr(self, key)}")
            for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
                if getattr(self, key) <= 0:
                    raise ConfigError(f"method.{key} must be positive, found {getattr(self, key)}")
            if self.warmup_teacher_temp_steps < 0 or self.freeze_last_layer < 0:
                raise ConfigError("method.warmup_teacher_temp_steps and method.freeze_last_layer must be >= 0")
            if not 0 <= self.center_momentum <= 1:
                raise ConfigError(f"method.center_momentum must be in [0, 1], found {self.center_momentum}")
            if self.crops.global_crops + self.crops.local_crops < 2:
                raise ConfigError("method.crops: DINO needs at least 2 views (global_crops + local_crops)")

    def __init__(self, cfg: Config, inputs, frontend, encoder, masker=None):
        super().__init__(cfg, inputs, frontend, encoder, masker, crops=cfg.crops)
        self.head = DINOHead(encoder.frame_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.nlayers,
                             cfg.use_bn, cfg.norm_last_layer)
        self.teacher_encoder = make_teacher(encoder)
        self.teacher_head = make_teacher(self.head)
        for m in self.teacher_encoder.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0  # the official teacher has no stochastic depth
        self.register_buffer("center", torch.zeros(cfg.out_dim))
        self._batch_center: Tensor | None = None  # this step's teacher mean, folded in by after_step

    def teacher_temp_at(self, step: int) -> float:
        """np.linspace(warmup_teacher_temp, teacher_temp, W)[step] for step < W, then teacher_temp."""
        c = self.cfg
        W = c.warmup_teacher_temp_steps
        if step >= W:
            return c.teacher_temp
        return c.warmup_teacher_temp + (c.teacher_temp - c.warmup_teacher_temp) * step / max(W - 1, 1)

    def forward(self, batch: dict, step: int, generator: torch.Generator, max_steps: int) -> dict[str, Tensor]:
        views = self.make_views(batch["audio"], generator)  # G global (B, F, T), then local (B, F, L)
        V, G, B = len(views), self.cfg.crops.global_crops, views[0].shape[0]
        b = self.head.embed(multicrop_embed(self.encoder, views))  # (V * B, bottleneck)
        s = self.head.last_layer(b, frozen=step < self.cfg.freeze_last_layer).unflatten(0, (V, B))  # (V, B, K)
        with torch.no_grad():
            t = self.teacher_head(multicrop_embed(self.teacher_encoder, views[:G])).unflatten(0, (G, B))
        temp = self.teacher_temp_at(step)
        loss, terms = losses.dino_loss(s, t, self.center, temp, self.cfg.student_temp)
        mean = t.float().mean(dim=(0, 1))  # (K,)
        if self.gather_fn is not None:  # every process holds the same batch size: mean of the means
            mean = self.gather_fn(mean[None])[0].mean(dim=0)
        self._batch_center = mean.detach()
        tau = momentum(self.cfg.ema, step, max_steps)
        return {"loss": loss, **terms, **embedding_signals(b[:B]),
                "teacher_temp": torch.tensor(temp), "ema_tau": torch.tensor(tau)}

    @torch.no_grad()
    def update_center(self, batch_center: Tensor) -> None:
        m = self.cfg.center_momentum
        self.center.mul_(m).add_(batch_center.to(self.center.dtype), alpha=1.0 - m)

    def after_step(self, step: int, max_steps: int) -> None:
        tau = momentum(self.cfg.ema, step, max_steps)
        _ema_parameters(self.teacher_encoder, self.encoder, tau)
        _ema_parameters(self.teacher_head, self.head, tau)
        if self._batch_center is not None:
            self.update_center(self._batch_center)
            self._batch_center = None

    def inference_encoder(self) -> nn.Module:
        return self.teacher_encoder if self.cfg.eval_teacher else self.encoder


@torch.no_grad()
def _ema_parameters(teacher: nn.Module, student: nn.Module, tau: float) -> None:
    """teacher <- tau * teacher + (1 - tau) * student for parameters only: the teacher's buffers
    (BatchNorm running statistics) stay its own, as in the official DINO update."""
    t_params = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    if tau >= 1.0:
        return
    torch._foreach_mul_(t_params, tau)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - tau)
