"""Frozen-encoder probes on clip embeddings: linear (logistic regression) and kNN.

Protocol (as the field reports it, e.g. BYOL-A / EVAR, HEAR): standardise the embeddings with the
training split's statistics; fit a linear classifier on train; pick its learning rate, L2 weight
decay and epoch count on valid; report test once. Without a split column, stratified 5-fold
cross-validation, each fold picking its hyper-parameters on a stratified 20 % of its training part.
Single-label tasks report `accuracy` and macro `f1`; multi-label tasks (labels joined by ';')
report `map` (mean average precision over classes), micro `f1` and `f1_macro` at a threshold picked
on valid. Sound event detection (strong labels with onset / offset) and its DCASE segment- and
event-based metrics are at the end of this module. `ProbeFit` hands the linear probe's choice
(standardisation, weights, splits, threshold) to fine-tuning (sslaudio.finetune).
"""

from __future__ import annotations

import csv
import itertools
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sslaudio.data import shifted_row


class ProbeError(Exception):
    """A labels file that cannot be used (exit 2), or too little data to probe (exit 4)."""

    def __init__(self, msg: str, code: int = 2):
        super().__init__(msg)
        self.code = code


SPLITS = ("train", "valid", "test")


@dataclass
class LabeledFile:
    path: str
    rel: str
    labels: tuple[str, ...]
    split: str | None
    line: int = 0  # its line in the labels file (for messages)


def read_labels(csv_path: str | Path) -> list[LabeledFile]:
    p = Path(csv_path)
    if not p.is_file():
        raise ProbeError(f"{p}: no such labels file")
    try:
        return _read_labels(p)
    except UnicodeDecodeError:
        raise ProbeError(f"{p}: not a UTF-8 CSV file") from None


@contextmanager
def _open_csv(p: str | Path) -> Iterator[tuple[list[str], csv.DictReader]]:
    """A labels CSV or TSV (tab in its first line): its column names (stripped) and a DictReader of
    its rows. Read as `utf-8-sig` with stripped names: spreadsheet exports start with a UTF-8 BOM and
    often write "path, label"; both name the same columns (as the pretraining manifest reads them)."""
    with Path(p).open(newline="", encoding="utf-8-sig") as f:
        first = f.readline()
        f.seek(0)
        delim = "\t" if "\t" in first else ","
        reader = csv.DictReader(f, delimiter=delim)
        reader.fieldnames = [c.strip() for c in reader.fieldnames or []]

        def rows() -> Iterator[dict]:
            for r in reader:  # DictReader keeps the fields past the header under the key None
                if None in r and (shifted := shifted_row(f"{p}:{reader.line_num}", [r[c] for c in reader.fieldnames]
                                                         + r[None], len(reader.fieldnames), delim)):
                    raise ProbeError(shifted)
                yield r

        yield reader.fieldnames, rows()


def _read_labels(p: Path) -> list[LabeledFile]:
    with _open_csv(p) as (cols, reader):
        if "path" not in cols or "label" not in cols:
            raise ProbeError(f"{p}: needs columns path,label[,split]; found {cols}")
        rows = []
        for i, r in enumerate(reader, start=2):
            path, label = (r.get("path") or "").strip(), (r.get("label") or "").strip()
            if not path or not label:
                raise ProbeError(f"{p}:{i}: empty path or label")
            split = (r.get("split") or "").strip() or None if "split" in cols else None
            if split is not None and split not in SPLITS:
                raise ProbeError(f"{p}:{i}: split must be one of {', '.join(SPLITS)}, found '{split}'")
            full = Path(path) if Path(path).is_absolute() else p.parent / path
            rows.append(LabeledFile(str(full), path, tuple(sorted(set(label.split(";")))), split, i))
    if not rows:
        raise ProbeError(f"{p}: no rows", code=4)
    if "split" in cols and any(r.split is None for r in rows):
        raise ProbeError(f"{p}: some rows have an empty split")
    return rows


def check_leakage(rows: list[LabeledFile], where: str | Path) -> tuple[list[LabeledFile], list[str]]:
    """The rows to probe and one warning line per kind of leak found in a labels file.

    Files are compared by their resolved path (`a.wav`, `./a.wav` and a symlink to it are one file).
    - The same row twice (same file, labels and split): kept once, with a warning and a count. The
      copy holds nothing new; kept, it would weigh the file twice and, without a split column, the
      cross-validation folds could put one copy in training and the other in test.
    - One file in two splits (the same labels): kept as listed, with a warning and a count. Its
      test score is then measured on a clip the probe trained on or picked its hyper-parameters
      on, so the metrics are optimistic (test rows copied into train lift kNN accuracy towards 1);
      which split the file belongs to is the user's call, and dropping one copy would silently
      change the split sizes they defined.
    - One file with two different label sets: a ProbeError naming the file and its lines. There
      is no right target for it: a single-label probe would train on contradictory labels and
      count the file wrong whatever it predicts, and merging the rows would silently turn the task
      into a multi-label one (which lists all of a file's labels in one row, joined by ';')."""
    first: dict[str, LabeledFile] = {}
    seen: set[tuple] = set()
    kept, dups, multi_split = [], 0, {}
    for r in rows:
        key = os.path.realpath(r.path)
        f = first.setdefault(key, r)
        if f.labels != r.labels:
            raise ProbeError(f"{where}: {r.rel} has two labels, {';'.join(f.labels)} (line {f.line}) and "
                             f"{';'.join(r.labels)} (line {r.line}); give each file one row (a multi-label task "
                             f"joins its labels with ';')")
        if (key, r.split) in seen:
            dups += 1
            continue
        seen.add((key, r.split))
        if r.split != f.split:
            multi_split.setdefault(key, (f, r))
        kept.append(r)
    warnings = []
    if dups:
        warnings.append(f"{where}: {dups} duplicate row(s) (the same file, labels and split again): each file is "
                        f"probed once")
    if multi_split:
        f, r = next(iter(multi_split.values()))
        warnings.append(f"{where}: {len(multi_split)} file(s) in more than one split (e.g. {r.rel}: {f.split} at "
                        f"line {f.line}, {r.split} at line {r.line}): the probe is scored on clips it was fitted "
                        f"on, so its metrics are optimistic; give each file one split")
    return kept, warnings


def check_classes(labels: list[tuple[str, ...]], splits: list[str | None], where: str | Path,
                  min_files: int = 3) -> list[str]:
    """One warning line per way the classes of the probed files leave the probe unable to learn a
    class it is scored on (the metrics stay, but a user reading them should know):
    - with a split column, classes that have valid or test files but no train file: the linear
      probe cannot predict them, so every such file counts wrong;
    - without one, classes with one or two files: too few to train, validate and test on in one
      cross-validation fold (stratified_folds deals each class's files out from the first fold, so
      the fold that tests one of two files gives the other to its validation part), so the probe is
      scored on them without having trained on any. Three files leave one to train on.
    `min_files` 2 for sound event detection, whose folds are random over clips (labels: each clip's
    event classes): a class in one clip is tested untrained there, two may or may not be."""
    def names(cs: list[str], counts: Counter | None = None) -> str:
        shown = ", ".join(repr(c) + (f" ({counts[c]})" if counts else "") for c in cs[:5])
        return shown + (f" and {len(cs) - 5} more" if len(cs) > 5 else "")

    if splits and splits[0] is not None:
        train = {c for ls, sp in zip(labels, splits) if sp == "train" for c in ls}
        held = sorted({c for ls, sp in zip(labels, splits) if sp != "train" for c in ls} - train)
        if held:
            return [(f"{where}: {len(held)} class(es) with valid/test files but none in train, which the probe "
                     f"cannot predict: {names(held)}")]
        return []
    counts = Counter(c for ls in labels for c in ls)
    rare = sorted(c for c, n in counts.items() if n < min_files)
    if rare:
        few = "one file" if min_files == 2 else "one or two files"
        return [(f"{where}: {len(rare)} class(es) with {few}, too few to train, validate and test on in a "
                 f"cross-validation fold, so the probe is scored on them untrained (files): {names(rare, counts)}")]
    return []


# -- metrics --------------------------------------------------------------------------------------

def accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    return float((pred == y).mean())


def macro_f1(pred: np.ndarray, y: np.ndarray, n_classes: int) -> float:
    f1s = []
    for c in range(n_classes):
        tp = np.sum((pred == c) & (y == c))
        fp = np.sum((pred == c) & (y != c))
        fn = np.sum((pred != c) & (y == c))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else 0.0


def average_precision(scores: np.ndarray, y: np.ndarray) -> float:
    """AP of one class: mean precision at the rank of each positive (sklearn's definition)."""
    if y.sum() == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    hits = y[order].astype(np.float64)
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum())


def mean_average_precision(scores: np.ndarray, Y: np.ndarray) -> float:
    aps = [average_precision(scores[:, c], Y[:, c]) for c in range(Y.shape[1])]
    aps = [a for a in aps if not np.isnan(a)]
    return float(np.mean(aps)) if aps else 0.0


def micro_f1(pred: np.ndarray, Y: np.ndarray) -> float:
    tp = np.sum(pred & (Y == 1))
    return float(2 * tp / max(1, pred.sum() + Y.sum()))


def macro_f1_multilabel(pred: np.ndarray, Y: np.ndarray) -> float:
    """Mean over the classes present in Y (or predicted) of each class's F1."""
    f1s = [micro_f1(pred[:, c], Y[:, c]) for c in range(Y.shape[1]) if Y[:, c].any() or pred[:, c].any()]
    return float(np.mean(f1s)) if f1s else 0.0


# -- linear probe ----------------------------------------------------------------------------------

LRS = (1e-3, 1e-2)
WDS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)
EPOCHS = 400
EVAL_EVERY = 25


_MOMENT_ROWS = 4096  # rows per chunk of the column moments: temporaries of 4096 x D, not N x D


def column_moments(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and standard deviation (+ 1e-6) of (N, D) features, float32, accumulated in
    float64 over row chunks (two passes: the mean, then the centred squares), so a frame-level
    matrix of N x D needs no N x D temporary besides itself (numpy's X.std(0) makes two)."""
    n = max(1, len(X))
    mu = sum((X[i:i + _MOMENT_ROWS].sum(0, dtype=np.float64) for i in range(0, len(X), _MOMENT_ROWS)),
             np.zeros(X.shape[1])) / n
    var = sum((np.square(X[i:i + _MOMENT_ROWS] - mu).sum(0) for i in range(0, len(X), _MOMENT_ROWS)),
              np.zeros(X.shape[1])) / n
    return mu.astype(np.float32), (np.sqrt(var) + 1e-6).astype(np.float32)


def _standardize(train: np.ndarray, *others: np.ndarray, moments=None, inplace: bool = False) -> list[torch.Tensor]:
    """Each array (N, D) as a float32 tensor standardised with the training split's column moments:
    one new float32 array per split, or, with `inplace`, float32 arrays overwritten (the SED probe
    hands over the frame matrices it stacked, the largest thing it holds)."""
    mu, sd = (torch.from_numpy(m) for m in (moments or column_moments(train)))

    def one(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.asarray(a))
        if inplace and t.dtype == torch.float32 and t.is_contiguous():
            return t.sub_(mu).div_(sd)
        return torch.sub(t.float(), mu).div_(sd)
    return [one(a) for a in (train, *others)]


@dataclass
class ProbeFit:
    """What the frozen linear probe chose, for fine-tuning to start from (sslaudio.finetune):
    the training split's standardisation, the weights at the chosen (lr, wd, epochs), the split
    indices into the probed items, and the decision threshold (multi-label and SED)."""
    W: torch.Tensor  # (D, C)
    b: torch.Tensor  # (C,)
    mu: np.ndarray  # (D,)
    sd: np.ndarray  # (D,)
    train: np.ndarray | None = None
    valid: np.ndarray | None = None
    test: np.ndarray | None = None
    threshold: float | None = None


def _fit_linear(Xtr, Ytr, multilabel: bool, seed: int, groups: int = 1):
    """Full-batch Adam on CE (or BCE) + wd * ||W||^2 for every (lr, wd) of the grid at once (the
    summed loss has independent gradients per config, and Adam is elementwise, so each config
    trains exactly as it would alone). Yields (epoch, W (G, D, C), b (G, C), A) every EVAL_EVERY
    epochs, G = len(LRS) * len(WDS) in itertools.product(LRS, WDS) order.

    `groups` L > 1: X is L equal-width blocks (layers side by side, `--layer weighted`) and each
    config learns SUPERB's weighted sum of them with its head: logits = sum_l softmax(a)_l X_l W + b,
    W (D / L, C), the layer logits a starting at zero (s3prl's Featurizer) and trained at the
    config's learning rate without decay. W is yielded as its equivalent on the whole X (block l of
    rows: softmax(a)_l W), so scoring and fine-tuning take it as any linear probe's, and A (G, L) as
    the softmax weights (None when groups is 1).

    The grid's weights sit side by side in one (D, G * C) matrix, so each epoch is one GEMM forward
    and one for the weights' gradient: a batched matmul of (N, D) against (G, D, C) would broadcast
    the features G times (8.7x slower at 20,000 x 1024 frame features, the SED probe's size)."""
    g = torch.Generator().manual_seed(seed)
    n, d = Xtr.shape
    d //= groups
    n_out = Ytr.shape[1] if multilabel else int(Ytr.max()) + 1
    G = len(LRS) * len(WDS)
    wd = torch.tensor([w for _, w in itertools.product(LRS, WDS)], dtype=torch.float32)[None, :, None]  # (1, G, 1)
    # one (D, len(WDS), C) block per learning rate (its own Adam group); the same initial values as
    # drawing (len(WDS), D, C) per learning rate
    Ws = [(torch.randn(len(WDS), d, n_out, generator=g) * 0.01).permute(1, 0, 2).contiguous().requires_grad_()
          for _ in LRS]
    bs = [torch.zeros(len(WDS), n_out, requires_grad=True) for _ in LRS]
    As = [torch.zeros(len(WDS), groups, requires_grad=groups > 1) for _ in LRS]
    opt = torch.optim.Adam([{"params": [W, b] + ([a] if groups > 1 else []), "lr": lr}
                            for W, b, a, lr in zip(Ws, bs, As, LRS)])
    target = Ytr[:, None].expand(n, G, n_out) if multilabel else Ytr[:, None].expand(n, G)
    blocks = Xtr.view(n * groups, d)  # row n * L + l: item n's block l

    def weights(W: torch.Tensor, A: torch.Tensor) -> torch.Tensor:  # (D, G, C), (G, L) -> (G, L * D, C)
        return (A.T[:, None, :, None] * W[None]).permute(2, 0, 1, 3).reshape(G, groups * d, n_out)

    for epoch in range(1, EPOCHS + 1):
        W = torch.cat(Ws, 1)  # (D, G, C), lr-major: itertools.product(LRS, WDS) order
        flat = W.view(d, G * n_out)
        if groups == 1:
            logits = torch.addmm(torch.cat(bs).flatten(), Xtr, flat).view(n, G, n_out)
        else:
            A = torch.cat(As).softmax(-1)  # (G, L)
            per = torch.mm(blocks, flat).view(n, groups, G, n_out)
            logits = torch.einsum("nlgc,gl->ngc", per, A) + torch.cat(bs)
        if multilabel:  # per config: the mean over frames and classes
            loss = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / (n * n_out)
        else:  # per config: the mean over items
            loss = F.cross_entropy(logits.transpose(1, 2), target, reduction="sum") / n
        loss = loss + (wd * W * W).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if epoch % EVAL_EVERY == 0:
            with torch.no_grad():
                W, b = torch.cat(Ws, 1), torch.cat(bs)
                A = torch.cat(As).softmax(-1) if groups > 1 else None
                W = W.permute(1, 0, 2) if A is None else weights(W, A)
            yield epoch, W, b, A


def _grid_scores(X: torch.Tensor, Ws: torch.Tensor, bs: torch.Tensor) -> torch.Tensor:
    """(N, D) features through every config's (D, C) weights and (C,) bias: (G, N, C) logits, as
    one GEMM (Ws (G, D, C) as _fit_linear yields them)."""
    G, d, c = Ws.shape
    flat = Ws.permute(1, 0, 2).reshape(d, G * c)
    return torch.addmm(bs.flatten(), X, flat).view(-1, G, c).transpose(0, 1)


def pick_threshold(p_va: np.ndarray, yva: np.ndarray) -> float:
    """The global threshold on valid probabilities (N, C) that maximises valid micro-F1."""
    return float(max(np.arange(0.05, 0.95, 0.05), key=lambda t: micro_f1(p_va >= t, yva)))


def report_metrics(s_va: np.ndarray, yva: np.ndarray, s_te: np.ndarray, yte: np.ndarray, n_classes: int,
                 multilabel: bool) -> dict:
    """Test metrics from logits (N, C): `accuracy` and macro `f1` (single-label), or `map`, micro
    `f1` and `f1_macro` at the `threshold` picked on the valid logits (multi-label)."""
    if multilabel:
        p_va, p_te = (1 / (1 + np.exp(-np.clip(s, -50, 50))) for s in (s_va, s_te))
        thr = pick_threshold(p_va, yva)
        return {"map": mean_average_precision(s_te, yte), "f1": micro_f1(p_te >= thr, yte),
                "f1_macro": macro_f1_multilabel(p_te >= thr, yte), "threshold": thr}
    pred = s_te.argmax(1)
    return {"accuracy": accuracy(pred, yte), "f1": macro_f1(pred, yte, n_classes)}


def valid_score(s_va: np.ndarray, yva: np.ndarray, multilabel: bool) -> float:
    """What the probes select on: valid mAP (multi-label, SED frames) or valid accuracy."""
    return mean_average_precision(s_va, yva) if multilabel else accuracy(s_va.argmax(1), yva)


def _rounded(weights) -> list[float]:
    """Layer weights as the JSON shows them."""
    return [round(float(w), 4) for w in weights]


def linear_probe(Xtr, ytr, Xva, yva, Xte, yte, n_classes: int, multilabel: bool, seed: int = 0,
                 return_fit: bool = False, overwrite_features: bool = False, groups: int = 1):
    """Pick (lr, wd, epochs) on valid, report test. y are class indices, or (N, C) 0/1 matrices.
    With return_fit, returns (metrics, ProbeFit) and the metrics hold the valid and test logits
    under `scores_valid` / `scores_test`. With overwrite_features, float32 X arrays are standardised
    in place instead of copied (for a caller that made them for this call). `groups` > 1: X is
    that many layers side by side and the probe learns their weighted sum (_fit_linear); the
    metrics then hold the chosen `layer_weights`."""
    mu, sd = column_moments(Xtr)
    Xtr, Xva, Xte = _standardize(Xtr, Xva, Xte, moments=(mu, sd), inplace=overwrite_features)
    Ytr = torch.from_numpy(ytr).float() if multilabel else torch.from_numpy(ytr).long()
    grid = list(itertools.product(LRS, WDS))
    best = (-1.0, None)
    for epoch, Ws, bs, As in _fit_linear(Xtr, Ytr, multilabel, seed, groups):
        S = _grid_scores(Xva, Ws, bs).numpy()  # (G, N, C)
        for k, (lr, wd) in enumerate(grid):
            score = valid_score(S[k], yva, multilabel)
            if score > best[0]:
                best = (score, (lr, wd, epoch, Ws[k], bs[k], None if As is None else As[k]))
    score_va, (lr, wd, epoch, W, b, A) = best
    s_va, s_te = (Xva @ W + b).numpy(), (Xte @ W + b).numpy()
    out = {"valid": score_va, "lr": lr, "weight_decay": wd, "epochs": epoch,
           **report_metrics(s_va, yva, s_te, yte, n_classes, multilabel)}
    if A is not None:
        out["layer_weights"] = _rounded(A)
    if not return_fit:
        return out
    out.update(scores_valid=s_va, scores_test=s_te)
    return out, ProbeFit(W.clone(), b.clone(), mu, sd, threshold=out.get("threshold"))


# -- MLP probe -------------------------------------------------------------------------------------
#
# HEAR's downstream protocol (hear-eval-kit) in small: one hidden layer (ReLU, dropout) on the
# standardised embedding, Adam on mini-batches, the hyper-parameters and the epoch picked on valid,
# early stopping once no configuration has improved for MLP_PATIENCE epochs. Every (lr, dropout,
# wd) of one hidden width trains at once as a batch of independent networks (as the linear grid),
# so the grid costs about one network's time per width on CPU. Deterministic given the seed.

MLP_HIDDEN = (256,)
MLP_DROPOUT = (0.1, 0.5)
MLP_LRS = (1e-3, 1e-2)
MLP_WDS = (0.0, 1e-3)
MLP_EPOCHS = 200
MLP_PATIENCE = 20
MLP_BATCH = 256


def _fit_mlp(Xtr, Ytr, Xva, yva, multilabel: bool, hidden: int, seed: int):
    """Train every (lr, dropout, wd) of the grid for one hidden width at once, as G independent
    networks (Adam written out with a learning rate per network; the L2 penalty in the loss, as the
    linear probe). -> (valid score, (lr, dropout, wd, epoch), [W1, b1, W2, b2]) of the best
    configuration at its best epoch."""
    grid = list(itertools.product(MLP_LRS, MLP_DROPOUT, MLP_WDS))
    G = len(grid)
    g = torch.Generator().manual_seed(seed)
    n, d = Xtr.shape
    n_out = Ytr.shape[1] if multilabel else int(Ytr.max()) + 1
    params = [(torch.randn(G, d, hidden, generator=g) * (2 / d) ** 0.5).requires_grad_(),
              torch.zeros(G, 1, hidden, requires_grad=True),
              (torch.randn(G, hidden, n_out, generator=g) * (1 / hidden) ** 0.5).requires_grad_(),
              torch.zeros(G, 1, n_out, requires_grad=True)]
    lr = torch.tensor([c[0] for c in grid])[:, None, None]
    keep = 1 - torch.tensor([c[1] for c in grid])[:, None, None]
    wd = torch.tensor([c[2] for c in grid])[:, None, None]
    m1 = [torch.zeros_like(q) for q in params]
    m2 = [torch.zeros_like(q) for q in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8

    def forward(X, train: bool):
        W1, b1, W2, b2 = params
        h = torch.relu(torch.matmul(X, W1) + b1)  # (G, N, H)
        if train:
            h = h * (torch.rand(h.shape, generator=g) < keep).float() / keep
        return torch.matmul(h, W2) + b2

    best_score = np.full(G, -1.0)
    best_state: list = [None] * G
    stale, t = 0, 0
    for epoch in range(1, MLP_EPOCHS + 1):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, MLP_BATCH):
            ix = perm[i:i + MLP_BATCH]
            logits = forward(Xtr[ix], True)
            if multilabel:
                per = F.binary_cross_entropy_with_logits(logits, Ytr[ix].expand_as(logits),
                                                         reduction="none").mean((1, 2))
            else:
                per = F.cross_entropy(logits.transpose(1, 2), Ytr[ix].expand(G, -1), reduction="none").mean(1)
            loss = per.sum() + (wd * params[0] ** 2).sum() + (wd * params[2] ** 2).sum()
            grads = torch.autograd.grad(loss, params)
            t += 1
            with torch.no_grad():
                for q, gr, a, b in zip(params, grads, m1, m2):
                    a.mul_(beta1).add_(gr, alpha=1 - beta1)
                    b.mul_(beta2).addcmul_(gr, gr, value=1 - beta2)
                    step = (a / (1 - beta1 ** t)) / ((b / (1 - beta2 ** t)).sqrt() + eps)
                    q.sub_(lr * step)
        with torch.no_grad():
            S = forward(Xva, False).numpy()
        improved = False
        for k in range(G):
            score = valid_score(S[k], yva, multilabel)
            if score > best_score[k]:
                best_score[k], improved = score, True
                best_state[k] = (epoch, [q[k].detach().clone() for q in params])
        stale = 0 if improved else stale + 1
        if stale >= MLP_PATIENCE:
            break
    k = int(np.argmax(best_score))  # ties: the first configuration in grid order
    epoch, state = best_state[k]
    return float(best_score[k]), (*grid[k], epoch), state


def mlp_probe(Xtr, ytr, Xva, yva, Xte, yte, n_classes: int, multilabel: bool, seed: int = 0) -> dict:
    """Pick (hidden, lr, dropout, wd, epoch) on valid, report test: the linear probe's metrics with
    an `mlp_` prefix (`mlp_accuracy`, `mlp_f1`; multi-label `mlp_map`, `mlp_f1`, `mlp_f1_macro`)."""
    Xtr, Xva, Xte = _standardize(Xtr, Xva, Xte)
    Ytr = torch.from_numpy(ytr).float() if multilabel else torch.from_numpy(ytr).long()
    best = None
    for h in MLP_HIDDEN:
        score, choice, state = _fit_mlp(Xtr, Ytr, Xva, yva, multilabel, h, seed)
        if best is None or score > best[0]:
            best = (score, (h, *choice), state)
    score, (h, lr, dropout, wd, epoch), (W1, b1, W2, b2) = best
    with torch.no_grad():
        s_va, s_te = [(torch.relu(X @ W1 + b1) @ W2 + b2).numpy() for X in (Xva, Xte)]
    metrics = report_metrics(s_va, yva, s_te, yte, n_classes, multilabel)
    return {**{f"mlp_{k}": v for k, v in metrics.items()}, "mlp_valid": score, "mlp_hidden": h, "mlp_lr": lr,
            "mlp_dropout": dropout, "mlp_weight_decay": wd, "mlp_epochs": epoch}


def knn_probe(Xtr, ytr, Xva, yva, Xte, yte, ks=(1, 5, 10, 20)) -> dict:
    """Cosine kNN on standardised embeddings (majority vote, ties to the nearest); k picked on valid."""
    Xtr, Xva, Xte = [F.normalize(x, dim=1) for x in _standardize(Xtr, Xva, Xte)]

    def predict(X, k):
        sim = X @ Xtr.T
        k = min(k, Xtr.shape[0])
        top = sim.topk(k, dim=1)
        votes = torch.zeros(X.shape[0], int(ytr.max()) + 1)
        votes.scatter_add_(1, torch.from_numpy(ytr)[top.indices], top.values.clamp_min(0) + 1e-3)
        return votes.argmax(1).numpy()

    k = max(ks, key=lambda k: accuracy(predict(Xva, k), yva))
    return {"knn_accuracy": accuracy(predict(Xte, k), yte), "knn_k": k}


def stratified_folds(y: np.ndarray, n_folds: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    folds = [[] for _ in range(n_folds)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        for i, j in enumerate(idx):
            folds[i % n_folds].append(j)
    return [np.array(sorted(f), dtype=int) for f in folds]


def encode_labels(labels: list[tuple[str, ...]]) -> tuple[list[str], np.ndarray, bool]:
    """-> (sorted classes, y, multilabel): y (N,) class indices, or (N, C) 0/1 when any item has
    several labels."""
    classes = sorted({c for ls in labels for c in ls})
    multilabel = any(len(ls) > 1 for ls in labels)
    if len(classes) < 2:
        raise ProbeError("need at least two classes to probe", code=4)
    cidx = {c: i for i, c in enumerate(classes)}
    if multilabel:
        y = np.zeros((len(labels), len(classes)), dtype=np.int64)
        for i, ls in enumerate(labels):
            y[i, [cidx[c] for c in ls]] = 1
        return classes, y, True
    return classes, np.array([cidx[ls[0]] for ls in labels]), False


def split_indices(splits: list[str | None], strat: np.ndarray, seed: int) -> tuple[np.ndarray, ...]:
    """(train, valid, test) indices of a split column; without valid rows, a stratified 20 % of train."""
    sp = np.array(splits)
    tr, va, te = (np.flatnonzero(sp == s) for s in SPLITS)
    if len(tr) == 0 or len(te) == 0:
        raise ProbeError("the split column needs train and test rows", code=4)
    if len(va) == 0:  # carve a stratified 20 % of train as valid
        fold = stratified_folds(strat[tr], 5, seed)[0]
        va, tr = tr[fold], np.delete(tr, fold)
    return tr, va, te


def evaluate(X: np.ndarray, labels: list[tuple[str, ...]], splits: list[str | None], seed: int = 0,
             return_fit: bool = False, mlp: bool = False, confusion: bool = False, groups: int = 1):
    """Run the probes on embeddings X (N, D) with their labels and splits; returns the metrics
    (with return_fit, and a split column: (metrics, ProbeFit of the linear probe)). `mlp` adds
    the MLP probe's `mlp_*` metrics; `confusion` (single-label) the linear probe's test confusion
    matrix (rows: true class, columns: predicted; summed over folds) as a list under `confusion`
    and the class names under `classes`. `groups` > 1: X is that many layers side by side, and the
    linear probe learns their weighted sum (linear_probe; kNN and MLP take X as it is)."""
    classes, y, multilabel = encode_labels(labels)
    strat = y.argmax(1) if multilabel else y
    res = {"n_files": len(labels), "n_classes": len(classes), "dim": int(X.shape[1]),
           "task": "multilabel" if multilabel else "multiclass"}

    def one(tr, va, te, keep: bool = False):
        r, fit = linear_probe(X[tr], y[tr], X[va], y[va], X[te], y[te], len(classes), multilabel, seed,
                              return_fit=True, groups=groups)
        s_te = r.pop("scores_test")
        del r["scores_valid"]
        if confusion and not multilabel:
            cm = np.zeros((len(classes), len(classes)), dtype=np.int64)
            np.add.at(cm, (y[te], s_te.argmax(1)), 1)
            r["confusion"] = cm
        if keep:
            fit.train, fit.valid, fit.test = tr, va, te
        if not multilabel:
            r.update(knn_probe(X[tr], y[tr], X[va], y[va], X[te], y[te]))
        if mlp:
            r.update(mlp_probe(X[tr], y[tr], X[va], y[va], X[te], y[te], len(classes), multilabel, seed))
        return (r, fit) if keep else r

    if splits[0] is not None:
        r, fit = one(*split_indices(splits, strat, seed), keep=True)
        res.update(protocol="train/valid/test", **r)
        _confusion_out(res, classes)
        return (res, fit) if return_fit else res
    if return_fit:
        raise ProbeError("fine-tuning needs a split column (train/valid/test) in the labels file")
    folds = stratified_folds(strat, 5, seed)
    per = []
    for k in range(5):
        te = folds[k]
        rest = np.concatenate([folds[j] for j in range(5) if j != k])
        inner = stratified_folds(strat[rest], 5, seed + k)[0]
        va, tr = rest[inner], np.delete(rest, inner)
        per.append(one(tr, va, te))
    res["protocol"] = "stratified 5-fold cross-validation"
    for key in per[0]:
        vals = [p[key] for p in per]
        if key == "confusion":
            res[key] = np.sum(vals, axis=0)
            continue
        if key == "layer_weights":
            res[key] = _rounded(np.mean(vals, axis=0))  # the folds' mean
            continue
        res[key] = float(np.mean(vals))
        if key in ("accuracy", "f1", "map", "knn_accuracy", "mlp_accuracy", "mlp_f1", "mlp_map"):
            res[f"{key}_std"] = float(np.std(vals))
    _confusion_out(res, classes)
    return res


def _confusion_out(res: dict, classes: list[str]) -> None:
    if "confusion" in res:
        res["confusion"] = np.asarray(res["confusion"]).tolist()
        res["classes"] = classes


# -- sound event detection (frame-level) -----------------------------------------------------------
#
# DCASE-style strong labels: a CSV of events `path,onset,offset,label[,split]` (seconds), plus the
# list of every clip (`path[,split]`, so clips without events count too; by default `files.csv`
# beside the labels when it exists, else the clips named in the labels). Protocol of devbench and
# the DCASE frame-based metrics: frame embeddings are averaged onto a fixed grid (100 ms by default;
# when the encoder's frames are coarser, each grid frame takes the encoder frame at its centre); a
# grid frame is positive for a class when that class's events cover at least half of it; one
# sigmoid per class on the standardised frame embedding (linear, the grid of `_fit_linear`), its
# hyper-parameters picked on valid frame mAP and one global threshold on valid micro-F1; test
# reports frame micro `f1`, `f1_macro` over classes, and frame `map`, and beside them the DCASE
# segment- and event-based F1 of the events decoded from the grid (see "DCASE event metrics").


@dataclass
class EventFile:
    path: str
    rel: str
    split: str | None
    events: list[tuple[float, float, str]]


def is_event_csv(csv_path: str | Path) -> bool:
    """True when the CSV's header has onset and offset columns (a sound event detection task)."""
    try:
        with _open_csv(csv_path) as (cols, _):
            return "onset" in cols and "offset" in cols
    except (OSError, UnicodeDecodeError, csv.Error):
        return False


def _csv_rows(p: Path, need: tuple[str, ...]) -> tuple[list[str], list[dict]]:
    if not p.is_file():
        raise ProbeError(f"{p}: no such file")
    try:
        with _open_csv(p) as (cols, reader):
            if any(c not in cols for c in need):
                raise ProbeError(f"{p}: needs columns {','.join(need)}; found {cols}")
            return cols, list(reader)
    except UnicodeDecodeError:
        raise ProbeError(f"{p}: not a UTF-8 CSV file") from None


def read_events(csv_path: str | Path, files_csv: str | Path | None = None,
                warn: Callable[[str], None] | None = None) -> list[EventFile]:
    """The clips of a strong-label task and their events. Leaks go to `warn` (default: a `warning:`
    line on stderr), one line per kind with a count: a clip listed twice in the files CSV or an
    event row repeated is used once; a clip given two splits (two listings, or event rows naming
    another split than its first) stays in the split it was first given, since a clip holds one
    split and one event list (clip-level labels keep both rows instead: see check_leakage)."""
    warn = warn or (lambda m: print(f"warning: {m}", file=sys.stderr))
    p = Path(csv_path)
    _, rows = _csv_rows(p, ("path", "onset", "offset", "label"))
    files: dict[str, EventFile] = {}
    seen: set[tuple[str, float, float, str]] = set()
    repeated = {"files": 0, "events": 0}
    two_splits: dict[str, str] = {}  # clip -> what the warning says of it

    def full(rel: str, base: Path) -> str:
        return str(Path(rel) if Path(rel).is_absolute() else base.parent / rel)

    def split_of(r: dict, where: str) -> str | None:
        s = (r.get("split") or "").strip() or None
        if s is not None and s not in SPLITS:
            raise ProbeError(f"{where}: split must be one of {', '.join(SPLITS)}, found '{s}'")
        return s

    if files_csv is None and (p.parent / "files.csv").is_file() and p.name != "files.csv":
        files_csv = p.parent / "files.csv"
    if files_csv is not None:
        fp = Path(files_csv)
        _, frows = _csv_rows(fp, ("path",))
        for i, r in enumerate(frows, start=2):
            rel = (r.get("path") or "").strip()
            if not rel:
                raise ProbeError(f"{fp}:{i}: empty path")
            key, split = full(rel, fp), split_of(r, f"{fp}:{i}")
            if key in files:
                if files[key].split == split:
                    repeated["files"] += 1
                else:
                    two_splits.setdefault(key, f"{rel}: {files[key].split}, then {split} at {fp}:{i}")
                continue
            files[key] = EventFile(key, rel, split, [])
    for i, r in enumerate(rows, start=2):
        rel, label = (r.get("path") or "").strip(), (r.get("label") or "").strip()
        try:
            on, off = float(r["onset"]), float(r["offset"])
        except (TypeError, ValueError):
            raise ProbeError(f"{p}:{i}: onset and offset must be numbers (seconds)") from None
        if not rel or not label or not (0 <= on < off < float("inf")):
            raise ProbeError(f"{p}:{i}: needs a path, a label and 0 <= onset < offset, both finite")
        key = full(rel, p)
        if key not in files:
            if files_csv is not None:
                raise ProbeError(f"{p}:{i}: {rel} is not in {files_csv}")
            files[key] = EventFile(key, rel, split_of(r, f"{p}:{i}"), [])
        split = split_of(r, f"{p}:{i}")
        if split is not None and files[key].split is not None and split != files[key].split:
            two_splits.setdefault(key, f"{rel}: {files[key].split}, then {split} at {p}:{i}")
        if (key, on, off, label) in seen:
            repeated["events"] += 1
            continue
        seen.add((key, on, off, label))
        files[key].events.append((on, off, label))
    if repeated["files"]:
        warn(f"{files_csv}: {repeated['files']} clip(s) listed more than once: each is used once")
    if repeated["events"]:
        warn(f"{p}: {repeated['events']} repeated event row(s) (same clip, onset, offset and label): each event "
             f"is used once")
    if two_splits:
        warn(f"{p}: {len(two_splits)} clip(s) given more than one split (e.g. {next(iter(two_splits.values()))}): "
             f"each stays in the split it was first given; give each clip one split")
    out = list(files.values())
    if not any(f.events for f in out):
        raise ProbeError(f"{p}: no events", code=4)
    if any(f.split is None for f in out) and any(f.split is not None for f in out):
        raise ProbeError(f"{p}: some files have a split and some do not")
    return out


def frame_targets(events: list[tuple[float, float, str]], n_frames: int, hop: float,
                  cidx: dict[str, int]) -> np.ndarray:
    """(n_frames, C) 0/1: frame k = [k hop, (k + 1) hop) is positive for a class when that class's
    events (their union) cover at least half of it."""
    cover = np.zeros((n_frames, len(cidx)))
    starts = np.arange(n_frames) * hop
    for c in range(len(cidx)):
        spans = sorted((on, off) for on, off, lab in events if cidx[lab] == c)
        merged: list[list[float]] = []
        for on, off in spans:  # union of overlapping events of one class
            if merged and on <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], off)
            else:
                merged.append([on, off])
        for on, off in merged:
            cover[:, c] += np.clip(np.minimum(starts + hop, off) - np.maximum(starts, on), 0, None)
    return (cover >= hop / 2 - 1e-9).astype(np.int64)


def _grid_members(times: np.ndarray, seconds: float, hop: float) -> np.ndarray:
    """(n_grid, T) 0/1: the encoder frames (centres `times`) each `hop` grid frame over `seconds`
    averages: those whose centre falls in it, or the one nearest its centre when none does."""
    n = max(1, int(np.floor(seconds / hop + 1e-9)))
    idx = np.floor(times / hop + 1e-9).astype(int)
    A = np.zeros((n, len(times)))
    ok = (idx >= 0) & (idx < n)
    A[idx[ok], np.flatnonzero(ok)] = 1
    empty = np.flatnonzero(A.sum(1) == 0)
    A[empty, np.abs(times[None, :] - ((empty + 0.5) * hop)[:, None]).argmin(1)] = 1
    return A


def grid_matrix(times: np.ndarray, seconds: float, hop: float) -> np.ndarray:
    """(n_grid, T) float32 weights that average encoder frames (centres `times`) onto a `hop` grid
    over `seconds` (see to_grid); fine-tuning backpropagates through the same matrix."""
    A = _grid_members(times, seconds, hop)
    return (A / A.sum(1, keepdims=True)).astype(np.float32)


def to_grid(frames: np.ndarray, times: np.ndarray, seconds: float, hop: float) -> np.ndarray:
    """Encoder frames (T, D) at centre `times` -> (n_grid, D) float32 on a `hop` grid over
    `seconds`: the mean of the encoder frames whose centre falls in each grid frame, or the encoder
    frame nearest its centre when none does. One (n_grid, T) @ (T, D) product (np.add.at per
    frame took 13 s of a 1024-d SED probe's 192), in float32 like the features (float64 grids
    doubled the SED probe's memory)."""
    return grid_matrix(times, seconds, hop) @ np.asarray(frames, dtype=np.float32)


# -- DCASE event metrics ----------------------------------------------------------------------------
#
# Beside the frame metrics, the two DCASE metrics of sed_eval (Mesaros, Heittola & Virtanen,
# "Metrics for polyphonic sound event detection", Applied Sciences 2016; github.com/TUT-ARG/sed_eval)
# with the parameters of the DCASE task 4 baseline: segment-based F1 on 1 s segments and event-based
# F1 with a 200 ms onset collar and an offset collar of max(200 ms, 20 % of the reference event's
# length), reference and estimated events paired by maximum bipartite matching (sed_eval's
# "optimal" matching). `f1` sums the counts over classes and files (micro, sed_eval's "overall");
# `f1_macro` is the mean of the per-class F1 over all classes (0 for a class with neither reference
# nor estimated events, as sed_eval's eps gives). Estimated events come from the grid
# probabilities: each class's track median-filtered (window per class: fixed, or picked on valid
# from MEDIAN_WINDOWS; the ATST-SED / DESED post-processing), thresholded at the probe's threshold,
# and each run of active grid frames k..k+n-1 is one event [k hop, (k + n) hop).

SEGMENT = 1.0  # seconds
T_COLLAR = 0.2  # seconds
OFFSET_FRACTION = 0.2  # of the reference event's length
MEDIAN_WINDOWS = (1, 3, 5, 7, 9)  # grid frames; 1 leaves the scores as they are
_EPS = 1e-9  # slack for times made of k * hop in floating point (0.1 * 3 > 0.3)

Events = list[tuple[float, float, int]]  # (onset, offset, class index) of one file


def median_filter(scores: np.ndarray, windows) -> np.ndarray:
    """(T, C) -> (T, C): each class's track replaced by its running median over `windows` frames
    (an odd int, or one per class; 1 leaves the track), edges mirrored: scipy.ndimage.median_filter
    with size (w, 1) and mode 'reflect', as ATST-SED (train/local/utils.py) filters its scores."""
    windows = np.broadcast_to(np.asarray(windows, dtype=int), (scores.shape[1],))
    if (windows < 1).any() or (windows % 2 == 0).any():
        raise ProbeError(f"median filter windows must be odd and >= 1, found {sorted(set(windows.tolist()))}")
    out = np.array(scores, copy=True)
    for w in np.unique(windows[windows > 1]):
        cols = np.flatnonzero(windows == w)
        x = np.pad(scores[:, cols], ((w // 2, w // 2), (0, 0)), mode="symmetric")
        out[:, cols] = np.median(np.lib.stride_tricks.sliding_window_view(x, w, axis=0), axis=-1)
    return out


def decode_events(active: np.ndarray, hop: float) -> Events:
    """(T, C) bool grid decisions -> events: each run of active frames k..k+n-1 of class c is the
    event (k hop, (k + n) hop, c); sorted by class, then onset."""
    d = np.diff(np.pad(active.astype(np.int8), ((1, 1), (0, 0))), axis=0).T  # (C, T + 1)
    cls, on = np.nonzero(d == 1)
    _, off = np.nonzero(d == -1)
    return [(float(a * hop), float(b * hop), int(c)) for c, a, b in zip(cls, on, off)]


def _f1(tp: np.ndarray, n_ref: np.ndarray, n_sys: np.ndarray) -> np.ndarray:
    den = n_ref + n_sys
    return np.where(den > 0, 2 * tp / np.maximum(den, 1), 0.0)


def _roll(events: Events, n: int, n_classes: int, segment: float) -> np.ndarray:
    """(n, C) bool: segment k = [k s, (k + 1) s) is active for a class when one of its events
    overlaps it (sed_eval's event roll: floor(onset / s) to ceil(offset / s))."""
    delta = np.zeros((n + 1, n_classes), np.int64)
    if events:
        ev = np.asarray(events, dtype=np.float64)
        c = ev[:, 2].astype(int)
        start = np.clip(np.floor(ev[:, 0] / segment + _EPS).astype(int), 0, n)
        end = np.clip(np.ceil(ev[:, 1] / segment - _EPS).astype(int), 0, n)
        np.add.at(delta, (start, c), 1)
        np.add.at(delta, (end, c), -1)
    return np.cumsum(delta, axis=0)[:n] > 0


def segment_based(refs: list[Events], ests: list[Events], durations: list[float], n_classes: int,
                  segment: float = SEGMENT) -> dict:
    """Segment-based micro `f1`, `f1_macro` and `error_rate` (substitutions, deletions and
    insertions counted per segment, over the reference count) of the estimated events of each
    file against its reference events; a file spans ceil(duration / segment) segments."""
    tp, n_ref, n_sys = (np.zeros(n_classes) for _ in range(3))
    sub = dele = ins = 0
    for ref, est, dur in zip(refs, ests, durations):
        last = max([dur] + [e[1] for e in ref] + [e[1] for e in est])
        n = max(1, int(np.ceil(last / segment - _EPS)))
        R, E = _roll(ref, n, n_classes, segment), _roll(est, n, n_classes, segment)
        tp += (R & E).sum(0)
        n_ref += R.sum(0)
        n_sys += E.sum(0)
        r, e, t = R.sum(1), E.sum(1), (R & E).sum(1)
        sub += int((np.minimum(r, e) - t).sum())
        dele += int(np.maximum(0, r - e).sum())
        ins += int(np.maximum(0, e - r).sum())
    return {"f1": float(_f1(tp.sum(), n_ref.sum(), n_sys.sum())), "f1_macro": float(_f1(tp, n_ref, n_sys).mean()),
            "error_rate": float((sub + dele + ins) / max(1, n_ref.sum()))}


def _max_matching(hit: np.ndarray) -> list[tuple[int, int]]:
    """Maximum bipartite matching (augmenting paths, Kuhn) of a (n_ref, n_est) bool matrix:
    the (ref, est) pairs."""
    owner = np.full(hit.shape[1], -1)

    def augment(r: int, seen: np.ndarray) -> bool:
        for e in np.flatnonzero(hit[r] & ~seen):
            seen[e] = True
            if owner[e] < 0 or augment(owner[e], seen):
                owner[e] = r
                return True
        return False

    for r in range(hit.shape[0]):
        augment(r, np.zeros(hit.shape[1], bool))
    return [(int(owner[e]), int(e)) for e in np.flatnonzero(owner >= 0)]


def _event_counts(refs: list[Events], ests: list[Events], n_classes: int, t_collar: float,
                  offset_fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tp, n_ref, n_sys = (np.zeros(n_classes) for _ in range(3))
    for ref, est in zip(refs, ests):
        r = np.asarray(ref, dtype=np.float64).reshape(-1, 3)
        e = np.asarray(est, dtype=np.float64).reshape(-1, 3)
        n_ref += np.bincount(r[:, 2].astype(int), minlength=n_classes)
        n_sys += np.bincount(e[:, 2].astype(int), minlength=n_classes)
        if not len(r) or not len(e):
            continue
        off_collar = np.maximum(t_collar, offset_fraction * (r[:, 1] - r[:, 0]))[:, None]
        hit = ((r[:, None, 2] == e[None, :, 2]) & (np.abs(r[:, None, 0] - e[None, :, 0]) <= t_collar + _EPS)
               & (np.abs(r[:, None, 1] - e[None, :, 1]) <= off_collar + _EPS))  # (n_ref, n_est)
        for j, _ in _max_matching(hit):
            tp[int(r[j, 2])] += 1
    return tp, n_ref, n_sys


def event_based(refs: list[Events], ests: list[Events], n_classes: int, t_collar: float = T_COLLAR,
                offset_fraction: float = OFFSET_FRACTION) -> dict:
    """Event-based micro `f1` and `f1_macro`: an estimated event is a hit for a reference event of
    its class when its onset is within t_collar of the reference onset and its offset within
    max(t_collar, offset_fraction * reference length) of the reference offset; each event is
    used once (maximum matching)."""
    tp, n_ref, n_sys = _event_counts(refs, ests, n_classes, t_collar, offset_fraction)
    return {"f1": float(_f1(tp.sum(), n_ref.sum(), n_sys.sum())), "f1_macro": float(_f1(tp, n_ref, n_sys).mean())}


def pick_median_windows(probs: list[np.ndarray], refs: list[Events], threshold: float, hop: float,
                        n_classes: int, candidates: tuple[int, ...] = MEDIAN_WINDOWS) -> np.ndarray:
    """(C,) per class, the window of `candidates` whose events give the best event-based F1 of
    that class on these (valid) files; ties go to the shorter window."""
    f1s = []
    for w in candidates:
        ests = [decode_events(median_filter(p, w) >= threshold, hop) for p in probs]
        f1s.append(_f1(*_event_counts(refs, ests, n_classes, T_COLLAR, OFFSET_FRACTION)))
    return np.asarray(candidates)[np.argmax(np.stack(f1s), axis=0)]


def event_metrics(probs_va: list[np.ndarray], refs_va: list[Events], probs_te: list[np.ndarray],
                  refs_te: list[Events], durations_te: list[float], threshold: float, hop: float,
                  n_classes: int, median: int | None = None) -> dict:
    """Segment- and event-based F1 on test from per-file grid probabilities (T, C): median filter
    (`median` frames for every class, or None: per class, picked on valid), threshold, decode."""
    windows = (pick_median_windows(probs_va, refs_va, threshold, hop, n_classes) if median is None
               else np.full(n_classes, median))
    ests = [decode_events(median_filter(p, windows) >= threshold, hop) for p in probs_te]
    seg, ev = segment_based(refs_te, ests, durations_te, n_classes), event_based(refs_te, ests, n_classes)
    return {"segment_f1": seg["f1"], "segment_f1_macro": seg["f1_macro"], "segment_error_rate": seg["error_rate"],
            "event_f1": ev["f1"], "event_f1_macro": ev["f1_macro"], "median_windows": windows.tolist()}


def event_split_indices(splits: list[str | None], seed: int) -> tuple[np.ndarray, ...]:
    """(train, valid, test) file indices of a split column; without valid files, a random 20 % of train."""
    sp = np.array(splits)
    tr, va, te = (np.flatnonzero(sp == s) for s in SPLITS)
    if len(tr) == 0 or len(te) == 0:
        raise ProbeError("the split column needs train and test files", code=4)
    if len(va) == 0:
        perm = np.random.default_rng(seed).permutation(tr)
        va, tr = np.sort(perm[: max(1, len(tr) // 5)]), np.sort(perm[max(1, len(tr) // 5):])
    return tr, va, te


def split_scores(scores: np.ndarray, lengths: list[int]) -> list[np.ndarray]:
    """Stacked per-frame logits (sum(lengths), C) -> per-file probabilities."""
    return np.split(1 / (1 + np.exp(-scores)), np.cumsum(lengths)[:-1])


def evaluate_events(grids: list[np.ndarray], targets: list[np.ndarray], splits: list[str | None],
                    classes: list[str], seed: int = 0, events: list[Events] | None = None,
                    durations: list[float] | None = None, hop: float = 0.1, median: int | None = None,
                    return_fit: bool = False, groups: int = 1):
    """Frame-level linear SED probe on per-file grid embeddings and 0/1 targets (see above); with
    the reference `events` (class indices) and `durations` of the files, also the DCASE segment-
    and event-based F1. With return_fit (needs a split column): (metrics, ProbeFit). `groups` > 1:
    the frames are that many layers side by side, weighted-summed by the probe (linear_probe)."""
    n = len(grids)
    res = {"n_files": n, "n_classes": len(classes), "dim": int(grids[0].shape[1]), "task": "sound_event_detection"}

    def stack(ix) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate([grids[i] for i in ix]), np.concatenate([targets[i] for i in ix])

    def one(tr, va, te):
        (Xtr, Ytr), (Xva, Yva), (Xte, Yte) = stack(tr), stack(va), stack(te)
        r, fit = linear_probe(Xtr, Ytr, Xva, Yva, Xte, Yte, len(classes), multilabel=True, seed=seed,
                              return_fit=True, overwrite_features=True, groups=groups)  # the stacks are this call's own
        s_va, s_te = r.pop("scores_valid"), r.pop("scores_test")
        fit.train, fit.valid, fit.test = tr, va, te
        if events is not None:
            r.update(event_metrics(split_scores(s_va, [len(grids[i]) for i in va]), [events[i] for i in va],
                                   split_scores(s_te, [len(grids[i]) for i in te]), [events[i] for i in te],
                                   [durations[i] for i in te], r["threshold"], hop, len(classes), median))
        return {**r, "frames_train": len(Xtr)}, fit

    if splits[0] is not None:
        r, fit = one(*event_split_indices(splits, seed))
        res.update(protocol="train/valid/test", **r)
        return (res, fit) if return_fit else res
    if return_fit:
        raise ProbeError("fine-tuning needs a split column (train/valid/test) in the files or labels CSV")
    if n < 10:
        raise ProbeError(f"only {n} files: too few for 5-fold cross-validation", code=4)
    perm = np.random.default_rng(seed).permutation(n)
    folds = [np.sort(perm[k::5]) for k in range(5)]
    per = []
    for k in range(5):
        rest = np.concatenate([folds[j] for j in range(5) if j != k])
        va, tr = rest[: max(1, len(rest) // 5)], rest[max(1, len(rest) // 5):]
        per.append(one(tr, va, folds[k])[0])
    res["protocol"] = "5-fold cross-validation over files"
    for key in per[0]:
        if isinstance(per[0][key], (int, float)):
            res[key] = float(np.mean([p[key] for p in per]))
        elif key == "layer_weights":
            res[key] = _rounded(np.mean([p[key] for p in per], axis=0))  # the folds' mean
    return res
