"""Shared pieces of the loss modules: LossOut, GatherFn, the fp32 decorator and the shape checks."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor

# gather_fn(local (N, D)) -> (all processes' rows (M, D), offset of the local rows in them)
GatherFn = Callable[[Tensor], tuple[Tensor, int]]


@dataclass(frozen=True)
class LossOut:
    """A loss and its detached parts; unpacks as `loss, terms`. Not a tuple: `a + b` raises."""

    loss: Tensor  # () float32, differentiable
    terms: dict[str, Tensor]  # detached () float32 tensors to log

    def __iter__(self) -> Iterator:
        return iter((self.loss, self.terms))


def _fp32(fn):
    """Run `fn` with autocast disabled on the device of its first tensor argument."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = next(iter((*args, *kwargs.values())))
        if not isinstance(first, Tensor):  # a sequence of layers
            if not first:
                return fn(*args, **kwargs)  # nothing to compute; fn reports the empty input
            first = first[0]
        with torch.autocast(device_type=first.device.type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def _check_2d_pair(name: str, a: Tensor, b: Tensor, min_rows: int = 1) -> None:
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"{name}: expected two (N, D) tensors of equal shape, "
                         f"found {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] < min_rows:
        raise ValueError(f"{name}: needs a batch of at least {min_rows}, found {a.shape[0]}")


def _off_diagonal(m: Tensor) -> Tensor:
    """The off-diagonal entries of a square (D, D) matrix, flattened to (D * (D - 1),), row by row
    (the official Barlow Twins view trick: no boolean indexing, so no host sync on a GPU)."""
    n = m.shape[0]
    return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def _gather(name: str, z: Tensor, gather_fn: GatherFn | None) -> tuple[Tensor, int]:
    if gather_fn is None:
        return z, 0
    all_z, offset = gather_fn(z)
    n = z.shape[0]
    if all_z.dim() != 2 or all_z.shape[1] != z.shape[1] or not 0 <= offset <= all_z.shape[0] - n:
        raise ValueError(f"{name}: gather_fn returned rows {tuple(all_z.shape)} with offset {offset}, "
                         f"which cannot hold the local ({n}, {z.shape[1]}) block")
    return all_z, int(offset)
