"""Transformer and convolutional building blocks shared by the encoders.

- `Attention`, `Block`, `TransformerStack`: BERT/ViT-style transformer (pre- or post-LN), attention
  through `F.scaled_dot_product_attention` with a key-padding mask. Every block also returns its
  FFN output before the residual add: data2vec regresses to it (fairseq
  `TransformerSentenceEncoderLayer` `layer_result`, Baevski et al. 2022).
- `PatchEmbed` and `sincos_pos_embed_2d`: ViT patches of any (F_p, T_p) shape on a spectrogram and
  fixed 2-D sin-cos positions for any grid (Dosovitskiy et al. 2021; MAE; M2D, Niizumi et al. 2023).
- `ConvFeatureExtractor` and `ConvPositionalEmbedding`: wav2vec 2.0's waveform encoder and
  convolutional relative positions (Baevski et al. 2020), with data2vec's deeper positional variant;
  both respect padding, so a padded batch gives the same valid outputs as each item alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sslaudio.config import ConfigError


def zero_padded(x: Tensor, padding: Tensor | None) -> Tensor:
    """Zero the padded steps of (B, T, D) x; padding (B, T) bool, True = padded."""
    return x if padding is None else x.masked_fill(padding.unsqueeze(-1), 0.0)


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """(B, N, ...) gathered along dim 1 by (B, K) indices -> (B, K, ...)."""
    index = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, index)


class Attention(nn.Module):
    """Multi-head self-attention. x (B, N, D), padding (B, N) bool (True = padded key),
    bias an optional additive float (B or 1, H, N, N) (e.g. ALiBi) -> (B, N, D)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, padding: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        mask = None
        if padding is not None:
            allowed = ~padding
            # a row with no valid key would give NaN; let it attend everywhere (its output is padding)
            allowed = allowed | ~allowed.any(1, keepdim=True)
            mask = allowed[:, None, None, :]  # (B, 1, 1, N)
        if bias is not None:
            bias = bias.to(q.dtype)
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, N, Dh)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample (Huang et al. 2016)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def _scale(self, x: Tensor) -> Tensor:
        """(B, 1, ...): 0 for a dropped sample, 1 / (1 - p) for a kept one."""
        return x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1.0 - self.p).div_(1.0 - self.p)

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        return x * self._scale(x)

    def residual(self, x: Tensor, branch: Tensor) -> Tensor:
        """x + forward(branch) as one pass over the activations (addcmul with the per-sample
        scale): the mask and the 1 / (1 - p) as two full-size ops and the add as a third cost 3-4 %
        of a 12-block ViT step on the CPU (memory-bound passes over (B, N, D))."""
        if self.p == 0.0 or not self.training:
            return x + branch
        return torch.addcmul(x, branch, self._scale(branch))


class Block(nn.Module):
    """Transformer block. `norm_first` True: pre-LN (ViT, wav2vec 2.0 Large); False: post-LN
    (BERT, wav2vec 2.0 Base, data2vec). forward(x (B,N,D), padding, bias) -> (out, ffn) where
    `ffn` (B, N, D) is the FFN branch output before dropout and the residual add."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, *, qkv_bias: bool = True,
                 dropout: float = 0.0, attention_dropout: float = 0.0, activation_dropout: float = 0.0,
                 drop_path: float = 0.0, norm_first: bool = True, norm_eps: float = 1e-5):
        super().__init__()
        self.norm_first = norm_first
        self.attn = Attention(dim, heads, qkv_bias, attention_dropout)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.drop = nn.Dropout(dropout)
        self.act_drop = nn.Dropout(activation_dropout)
        self.drop_path = DropPath(drop_path)

    def _ffn(self, x: Tensor) -> Tensor:
        return self.fc2(self.act_drop(F.gelu(self.fc1(x))))

    def forward(self, x: Tensor, padding: Tensor | None = None,
                bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        res = self.drop_path.residual
        if self.norm_first:
            x = res(x, self.drop(self.attn(self.norm1(x), padding, bias)))
            ffn = self._ffn(self.norm2(x))
            return res(x, self.drop(ffn)), ffn
        x = self.norm1(res(x, self.drop(self.attn(x, padding, bias))))
        ffn = self._ffn(x)
        return self.norm2(res(x, self.drop(ffn))), ffn


def check_eval_blocks(n: int, depth: int) -> None:
    """`encoder.eval_blocks` of a transformer: 1 .. depth blocks, or depth + 1 hidden states (the
    blocks' input too)."""
    if not 1 <= n <= depth + 1:
        raise ConfigError(f"encoder.eval_blocks must be between 1 and encoder.depth + 1 = {depth + 1} (every "
                          f"hidden state, the blocks' input included), found {n}")


class TransformerStack(nn.Module):
    """A list of blocks with optional LayerDrop (Fan et al. 2019) while training.

    forward(x (B,N,D), padding, bias, return_layers) -> (x, layers, ffns): with return_layers, the
    hidden states as SUPERB and transformers count them (the blocks' input x, then every block's
    output: `depth` + 1 entries) and every block's FFN output (`depth` entries); a dropped block
    contributes its unchanged input and a zero FFN output. Otherwise two empty lists.
    LayerDrop draws from the global RNG, like dropout.

    `activation_checkpointing` (set by the trainer for `train.activation_checkpointing: true`):
    while training with gradients, each block's activations are recomputed in the backward pass
    instead of kept (torch.utils.checkpoint, non-reentrant, RNG state replayed so dropout draws
    the same masks): memory of one block instead of `depth`, for about one more forward.
    """

    activation_checkpointing = False

    def __init__(self, blocks: list[Block], layerdrop: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.layerdrop = layerdrop

    def forward(self, x: Tensor, padding: Tensor | None = None, bias: Tensor | None = None,
                return_layers: bool = False) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        layers: list[Tensor] = [x] if return_layers else []
        ffns: list[Tensor] = []
        drops = None
        if self.training and self.layerdrop > 0:
            drops = (torch.rand(len(self.blocks)) < self.layerdrop).tolist()
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if drops is not None and drops[i]:
                ffn = torch.zeros_like(x) if return_layers else None
            elif recompute:
                x, ffn = checkpoint(block, x, padding, bias, use_reentrant=False)
            else:
                x, ffn = block(x, padding, bias)
            if return_layers:
                layers.append(x)
                ffns.append(ffn)
        return x, layers, ffns


def init_bert_(module: nn.Module) -> None:
    """BERT / fairseq `init_bert_params`: Linear weights N(0, 0.02), biases zero."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def init_vit_(module: nn.Module) -> None:
    """MAE ViT init: xavier-uniform Linear weights (qkv as one matrix), zero biases, unit LayerNorm."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------
# Spectrogram patches


class PatchEmbed(nn.Module):
    """(B, F, T) spectrogram -> (B, Fg*Tg, D) patch embeddings in row-major (freq, time) order.
    Time frames beyond a multiple of T_p are dropped; F must be a multiple of F_p."""

    def __init__(self, patch: tuple[int, int], dim: int):
        super().__init__()
        self.patch = tuple(patch)
        self.proj = nn.Conv2d(1, dim, kernel_size=self.patch, stride=self.patch)
        # MAE: initialise the patch projection like a Linear layer
        nn.init.xavier_uniform_(self.proj.weight.view(dim, -1))
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        tp = self.patch[1]
        x = x[:, :, : (x.shape[-1] // tp) * tp]
        return self.proj(x.unsqueeze(1)).flatten(2).transpose(1, 2)  # (B, Fg*Tg, D)


def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """Transformer sin-cos embedding (N,) positions -> (N, dim): [sin(pos*w), cos(pos*w)]."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([out.sin(), out.cos()], dim=1)


_SINCOS_CACHE: dict[tuple, Tensor] = {}


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int], device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32, time_first: bool = False) -> Tensor:
    """Fixed 2-D sin-cos positions for a (Fg, Tg) grid -> (Fg*Tg, dim), row-major (freq, time).

    Half the channels encode the frequency index, half the time index (MAE): the frequency half
    first, or with `time_first` the time half first, the channel order of MAE / M2D's
    `get_2d_sincos_pos_embed` (its first half encodes the grid's width, the time axis). The value
    at (i, j) does not depend on the grid size, so inputs longer than the training crop get
    consistent positions. Cached by (dim, grid, device, dtype, time_first).
    """
    key = (dim, tuple(grid), str(device), dtype) + ((True,) if time_first else ())
    if key not in _SINCOS_CACHE:
        fg, tg = grid
        f_idx = torch.arange(fg).repeat_interleave(tg)
        t_idx = torch.arange(tg).repeat(fg)
        halves = [sincos_1d(dim // 2, f_idx), sincos_1d(dim // 2, t_idx)]
        emb = torch.cat(halves[::-1] if time_first else halves, dim=1)
        if len(_SINCOS_CACHE) > 64:
            _SINCOS_CACHE.clear()
        _SINCOS_CACHE[key] = emb.to(device=device, dtype=dtype)
    return _SINCOS_CACHE[key]


def sincos_pos_embed_2d_traced(dim: int, fg: int, tokens: Tensor, time_first: bool = False) -> Tensor:
    """`sincos_pos_embed_2d` for the grid (fg, N / fg) of `tokens` (B, N, D), built from the token
    count with tensor ops only, so a traced or exported graph accepts inputs of any length."""
    tg = tokens.shape[1] // fg
    f = sincos_1d(dim // 2, torch.arange(fg, device=tokens.device))  # (fg, dim/2)
    t = sincos_1d(dim // 2, torch.arange(tg, device=tokens.device))  # (tg, dim/2)
    halves = [f[:, None].expand(-1, t.shape[0], -1), t[None].expand(f.shape[0], -1, -1)]
    emb = torch.cat(halves[::-1] if time_first else halves, dim=-1)
    return emb.reshape(-1, dim).to(tokens.dtype)


def alibi_slopes(heads: int) -> list[float]:
    """ALiBi head slopes (Press et al., ICLR 2022; fairseq `get_slopes`): a geometric sequence
    starting at 2^(-8/n) for n a power of two, interleaved from 2n heads otherwise."""
    def pow2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(heads).is_integer():
        return pow2(heads)
    closest = 2 ** math.floor(math.log2(heads))
    return pow2(closest) + alibi_slopes(2 * closest)[0::2][: heads - closest]


def alibi_bias(positions: Tensor, slopes: Tensor) -> Tensor:
    """Symmetric ALiBi bias for (B, N) token positions and (H,) per-head slopes -> (B, H, N, N):
    -slope_h * |pos_i - pos_j| (fairseq data2vec 2.0 `get_alibi`, dims=1, gathered by
    `masked_alibi` for kept tokens)."""
    dist = (positions[:, :, None] - positions[:, None, :]).abs().to(slopes.dtype)  # (B, N, N)
    return -slopes[None, :, None, None] * dist[:, None]


# --------------------------------------------------------------------------------------------
# wav2vec 2.0 waveform encoder

WAV2VEC2_CONV_LAYERS: list[tuple[int, int, int]] = (
    [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2
)  # 400-sample receptive field, 320 samples (20 ms at 16 kHz) per frame


def conv_output_lengths(lengths: Tensor, conv_layers: list[tuple[int, int, int]]) -> Tensor:
    """Valid output frames after unpadded strided convs: L -> floor((L - k) / s) + 1 per layer
    (clamped at 0)."""
    for _, k, s in conv_layers:
        lengths = torch.div(lengths - k, s, rounding_mode="floor") + 1
        lengths = lengths.clamp_min(0)
    return lengths


def receptive_field(conv_layers: list[tuple[int, int, int]]) -> int:
    """Input samples seen by one output frame (400 for wav2vec 2.0)."""
    field, jump = 1, 1
    for _, k, s in conv_layers:
        field += (k - 1) * jump
        jump *= s
    return field


class MaskedInstanceNorm(nn.Module):
    """GroupNorm(C, C) over time computed on valid frames only, in fp32 (fairseq `Fp32GroupNorm`
    normalises over padding too, so padded batches would differ from single items). Works on
    channels-last (B, T, C) input, the extractor's layout."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor, lengths: Tensor | None) -> Tensor:  # x (B, T, C); lengths None: unpadded
        xf = x.float()
        if lengths is None or bool((lengths >= x.shape[1]).all()):  # no padding: the native kernel,
            # on a channels-last (B, C, 1, T) view of x (no copy; 3-4x the speed of the masked path)
            y = F.group_norm(xf.unsqueeze(1).permute(0, 3, 1, 2), xf.shape[-1], self.weight, self.bias, self.eps)
            return y.permute(0, 2, 3, 1).squeeze(1).to(x.dtype)
        valid = (torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]).float()
        w = (valid / valid.sum(1, keepdim=True).clamp_min(1.0))[:, :, None]  # (B, T, 1)
        mean = (xf * w).sum(1, keepdim=True)
        var = ((xf - mean).square() * w).sum(1, keepdim=True)
        scale = torch.rsqrt(var + self.eps) * self.weight  # y = (x - mean) / std * weight + bias
        return torch.addcmul(self.bias - mean * scale, xf, scale).to(x.dtype)


class _Windows(torch.autograd.Function):
    """(B, T, C) -> (B, n, k * C): the n windows of k steps every `stride`, in (k, C) order,
    copied with k strided slices; the backward adds the k slices back in place (ATen's generic
    unfold_backward ran at a fraction of that speed)."""

    @staticmethod
    def forward(ctx, x: Tensor, k: int, stride: int) -> Tensor:
        n = (x.shape[1] - k) // stride + 1
        ctx.meta = (x.shape, k, stride, n)
        return torch.cat([x[:, j:j + stride * (n - 1) + 1:stride] for j in range(k)], -1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        shape, k, stride, n = ctx.meta
        c = shape[2]
        out = grad.new_zeros(shape)
        for j in range(k):
            out[:, j:j + stride * (n - 1) + 1:stride] += grad[..., j * c:(j + 1) * c]
        return out, None, None


def strided_conv_last(x: Tensor, weight: Tensor, stride: int, bias: Tensor | None = None) -> Tensor:
    """F.conv1d (no padding) on channels-last input: (B, T, C_in) -> (B, T', C_out), with the
    Conv1d weight (C_out, C_in, k), as one matrix product over the copied windows.

    Why not F.conv1d: on the CPU, mkldnn's 1-D convolutions over (B, C, T) and the transposes that
    LayerNorm over channels then needs ran the wav2vec 2.0 extractor's forward + backward at about
    a fifth of the attained matmul rate (strided GELU / LayerNorm backward, copies); here every
    element-wise op runs on contiguous memory and the FLOPs go to one GEMM per layer. Traced
    graphs (TorchScript, ONNX: no custom autograd functions there) keep the convolution.
    """
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return F.conv1d(x.transpose(1, 2), weight, bias, stride).transpose(1, 2)
    c_out, c_in, k = weight.shape
    y = _Windows.apply(x, k, stride) @ weight.transpose(1, 2).reshape(c_out, k * c_in).t()
    return y if bias is None else y + bias


def conv_instance_norm(x: Tensor, weight: Tensor, stride: int, norm: MaskedInstanceNorm) -> Tensor:
    """norm(strided_conv_last(x, weight, stride)) for one input channel and no padding, as one
    batched GEMM: (B, S, 1) -> (B, T, C).

    Each output channel is a linear function of the k-sample windows, so its mean and variance
    over time follow from the windows' mean and k x k covariance (mean_c = mu . w_c, var_c =
    w_c' Cov w_c): the normalisation folds into a per-item weight (w_c * gamma_c / std_c) and bias,
    and the (B, T, C) activation, the largest of wav2vec 2.0, is written once instead of being
    normalised in fp32 and back-propagated through (a conv bias cancels in the normalisation).
    Equal to the two-step form within float rounding (a test checks values and gradients)."""
    c_out, _, k = weight.shape
    windows = _Windows.apply(x.float(), k, stride)  # (B, T, k)
    mu = windows.mean(1, keepdim=True)  # (B, 1, k)
    centred = windows - mu
    cov = centred.transpose(1, 2) @ centred / windows.shape[1]  # (B, k, k)
    w = weight.reshape(c_out, k).float()
    var = ((cov @ w.t()) * w.t()).sum(1)  # (B, C): w_c' Cov w_c
    scale = norm.weight * torch.rsqrt(var + norm.eps)  # (B, C)
    bias = norm.bias - (mu[:, 0] @ w.t()) * scale  # (B, C)
    return torch.baddbmm(bias[:, None, :], windows, w.t()[None] * scale[:, None, :]).to(x.dtype)


class ConvFeatureExtractor(nn.Module):
    """wav2vec 2.0 conv feature encoder: (B, S) waveform -> (B, C, T) features, with lengths.

    Each layer is Conv1d (no bias by default, Kaiming init) -> norm -> GELU. mode "group" (fairseq
    'default'): per-channel normalisation over time on the first layer only; "layer" (fairseq
    'layer_norm', data2vec): LayerNorm over channels after every layer.
    """

    def __init__(self, conv_layers: list[tuple[int, int, int]], mode: str = "group",
                 conv_bias: bool = False):
        super().__init__()
        if mode not in ("group", "layer"):
            raise ValueError(f"extractor mode must be 'group' or 'layer', found {mode!r}")
        self.conv_layers = [tuple(c) for c in conv_layers]
        self.mode = mode
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        c_in = 1
        for i, (c, k, s) in enumerate(self.conv_layers):
            conv = nn.Conv1d(c_in, c, k, stride=s, bias=conv_bias)
            nn.init.kaiming_normal_(conv.weight)
            self.convs.append(conv)
            if mode == "layer":
                self.norms.append(nn.LayerNorm(c))
            elif i == 0:
                self.norms.append(MaskedInstanceNorm(c))
            else:
                self.norms.append(nn.Identity())
            c_in = c
        self.out_channels = c_in
        self.receptive_field = receptive_field(self.conv_layers)
        self.stride = math.prod(s for _, _, s in self.conv_layers)

    def output_lengths(self, lengths: Tensor) -> Tensor:
        return conv_output_lengths(lengths, self.conv_layers)

    def forward(self, wav: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """lengths None: every item spans the whole input (nothing read back from the device)."""
        x = wav.unsqueeze(-1)  # (B, S, 1): channels last throughout (strided_conv_last)
        for (_, k, s), conv, norm in zip(self.conv_layers, self.convs, self.norms):
            full = lengths
            lengths = None if full is None else conv_output_lengths(full, [(0, k, s)])
            if (isinstance(norm, MaskedInstanceNorm) and x.shape[-1] == 1 and not torch.jit.is_tracing()
                    and not torch.onnx.is_in_onnx_export() and (full is None or bool((full >= x.shape[1]).all()))):
                x = conv_instance_norm(x, conv.weight, s, norm)  # wav2vec 2.0's first layer, unpadded
            else:
                x = strided_conv_last(x, conv.weight, s, conv.bias)
                if isinstance(norm, MaskedInstanceNorm):
                    x = norm(x, lengths)
                elif isinstance(norm, nn.LayerNorm):
                    x = norm(x)
            x = F.gelu(x)
        return x.transpose(1, 2), lengths  # (B, C, T): a view of the contiguous (B, T, C); (B,)


class WeightNormConv1d(nn.Module):
    """Conv1d with weight normalisation over every dim but the kernel axis (fairseq's
    `weight_norm(conv, dim=2)`), written out so the module deep-copies and serialises plainly."""

    def __init__(self, channels: int, kernel: int, groups: int):
        super().__init__()
        self.kernel, self.groups = kernel, groups
        std = math.sqrt(4.0 / (kernel * channels))
        v = torch.randn(channels, channels // groups, kernel) * std
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(v.norm(dim=(0, 1), keepdim=True))  # (1, 1, k)
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight_g * self.weight_v / self.weight_v.norm(dim=(0, 1), keepdim=True)
        return F.conv1d(x, w, self.bias, padding=self.kernel // 2, groups=self.groups)


class ConvPositionalEmbedding(nn.Module):
    """Convolutional relative positions: (B, T, D) -> (B, T, D) to be added to the input.

    depth 1 (wav2vec 2.0): one weight-normalised grouped conv of width `kernel` + GELU.
    depth > 1 (data2vec): `depth` grouped convs of width max(3, kernel // depth), each followed by
    LayerNorm (no affine) and GELU. Padded steps are zeroed before every conv so they never leak
    into valid ones; even kernels drop the last output step (fairseq `SamePad`).
    """

    def __init__(self, dim: int, kernel: int = 128, groups: int = 16, depth: int = 1):
        super().__init__()
        if dim % groups:
            raise ValueError(f"positional conv groups {groups} do not divide the width {dim}")
        self.depth = depth
        if depth == 1:
            self.convs = nn.ModuleList([WeightNormConv1d(dim, kernel, groups)])
            self.norms = None
            self.kernel = kernel
        else:
            k = max(3, kernel // depth)
            self.kernel = k
            self.convs = nn.ModuleList(
                nn.Conv1d(dim, dim, k, padding=k // 2, groups=groups) for _ in range(depth))
            self.norms = nn.ModuleList(nn.LayerNorm(dim, elementwise_affine=False) for _ in range(depth))

    def forward(self, x: Tensor, padding: Tensor | None = None) -> Tensor:
        T = x.shape[1]
        for i, conv in enumerate(self.convs):
            x = zero_padded(x, padding)
            x = conv(x.transpose(1, 2))[:, :, :T].transpose(1, 2)
            if self.norms is not None:
                x = self.norms[i](x)
            x = F.gelu(x)
        return x


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def scale_grad(x: Tensor, scale: float) -> Tensor:
    """Identity forward (bit-exact), gradient multiplied by `scale` (fairseq `GradMultiply`)."""
    return x if scale == 1.0 else _ScaleGrad.apply(x, scale)
