"""Frozen-encoder probes on clip embeddings: linear (logistic regression) and kNN.

Protocol (as the field reports it, e.g. BYOL-A / EVAR, HEAR): standardise the embeddings with the
training split's statistics; fit a linear classifier on train; pick its learning rate, L2 weight
decay and epoch count on valid; report test once. Without a split column, stratified 5-fold
cross-validation, each fold picking its hyper-parameters on a stratified 20 % of its training part.
Single-label tasks report `accuracy` and macro `f1`; multi-label tasks (labels joined by ';')
report `map` (mean average precision over classes), micro `f1` and `f1_macro` at a threshold picked
on valid. Sound event detection (strong labels with onset / offset) is at the end of this module.
"""

from __future__ import annotations

import csv
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


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


def read_labels(csv_path: str | Path) -> list[LabeledFile]:
    p = Path(csv_path)
    if not p.is_file():
        raise ProbeError(f"{p}: no such labels file")
    try:
        return _read_labels(p)
    except UnicodeDecodeError:
        raise ProbeError(f"{p}: not a UTF-8 CSV file") from None


def _read_labels(p: Path) -> list[LabeledFile]:
    with p.open(newline="") as f:
        sample = f.read(4096)
        f.seek(0)
        first = sample.splitlines()[0] if sample else ""
        delim = "\t" if "\t" in first else ","
        reader = csv.DictReader(f, delimiter=delim)
        cols = reader.fieldnames or []
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
            rows.append(LabeledFile(str(full), path, tuple(sorted(set(label.split(";")))), split))
    if not rows:
        raise ProbeError(f"{p}: no rows", code=4)
    if "split" in cols and any(r.split is None for r in rows):
        raise ProbeError(f"{p}: some rows have an empty split")
    return rows


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


def _standardize(train: np.ndarray, *others: np.ndarray) -> list[torch.Tensor]:
    mu, sd = train.mean(0), train.std(0) + 1e-6
    return [torch.from_numpy((a - mu) / sd).float() for a in (train, *others)]


def _fit_linear(Xtr, Ytr, multilabel: bool, seed: int):
    """Full-batch Adam on CE (or BCE) + wd * ||W||^2 for every (lr, wd) of the grid at once (the
    summed loss has independent gradients per config, and Adam is elementwise, so each config
    trains exactly as it would alone). Yields (epoch, W (G, D, C), b (G, C)) every EVAL_EVERY epochs,
    G = len(LRS) * len(WDS) in itertools.product(LRS, WDS) order."""
    g = torch.Generator().manual_seed(seed)
    n_out = Ytr.shape[1] if multilabel else int(Ytr.max()) + 1
    wd = torch.tensor(WDS, dtype=torch.float32)[:, None, None]
    Ws = [(torch.randn(len(WDS), Xtr.shape[1], n_out, generator=g) * 0.01).requires_grad_() for _ in LRS]
    bs = [torch.zeros(len(WDS), 1, n_out, requires_grad=True) for _ in LRS]
    opt = torch.optim.Adam([{"params": [W, b], "lr": lr} for W, b, lr in zip(Ws, bs, LRS)])
    for epoch in range(1, EPOCHS + 1):
        loss = 0.0
        for W, b in zip(Ws, bs):
            logits = torch.matmul(Xtr, W) + b  # (G', N, C)
            if multilabel:
                per = F.binary_cross_entropy_with_logits(logits, Ytr.expand_as(logits), reduction="none").mean((1, 2))
            else:
                per = F.cross_entropy(logits.transpose(1, 2), Ytr.expand(len(WDS), -1), reduction="none").mean(1)
            loss = loss + per.sum() + (wd * W * W).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if epoch % EVAL_EVERY == 0:
            yield epoch, torch.cat(Ws).detach(), torch.cat(bs).detach()[:, 0]


def linear_probe(Xtr, ytr, Xva, yva, Xte, yte, n_classes: int, multilabel: bool, seed: int = 0) -> dict:
    """Pick (lr, wd, epochs) on valid, report test. y are class indices, or (N, C) 0/1 matrices."""
    Xtr, Xva, Xte = _standardize(Xtr, Xva, Xte)
    Ytr = torch.from_numpy(ytr).float() if multilabel else torch.from_numpy(ytr).long()
    grid = list(itertools.product(LRS, WDS))
    best = (-1.0, None)
    for epoch, Ws, bs in _fit_linear(Xtr, Ytr, multilabel, seed):
        S = (torch.matmul(Xva, Ws) + bs[:, None]).numpy()  # (G, N, C)
        for k, (lr, wd) in enumerate(grid):
            score = mean_average_precision(S[k], yva) if multilabel else accuracy(S[k].argmax(1), yva)
            if score > best[0]:
                best = (score, (lr, wd, epoch, Ws[k], bs[k]))
    score_va, (lr, wd, epoch, W, b) = best
    s_va, s_te = (Xva @ W + b).numpy(), (Xte @ W + b).numpy()
    out = {"valid": score_va, "lr": lr, "weight_decay": wd, "epochs": epoch}
    if multilabel:
        p_va, p_te = 1 / (1 + np.exp(-s_va)), 1 / (1 + np.exp(-s_te))
        thr = max(np.arange(0.05, 0.95, 0.05), key=lambda t: micro_f1(p_va >= t, yva))
        out.update(map=mean_average_precision(s_te, yte), f1=micro_f1(p_te >= thr, yte),
                   f1_macro=macro_f1_multilabel(p_te >= thr, yte), threshold=float(thr))
    else:
        pred = s_te.argmax(1)
        out.update(accuracy=accuracy(pred, yte), f1=macro_f1(pred, yte, n_classes))
    return out


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


def evaluate(X: np.ndarray, labels: list[tuple[str, ...]], splits: list[str | None], seed: int = 0) -> dict:
    """Run the probes on embeddings X (N, D) with their labels and splits; returns the metrics."""
    classes = sorted({c for ls in labels for c in ls})
    multilabel = any(len(ls) > 1 for ls in labels)
    if len(classes) < 2:
        raise ProbeError("need at least two classes to probe", code=4)
    cidx = {c: i for i, c in enumerate(classes)}
    if multilabel:
        y = np.zeros((len(labels), len(classes)), dtype=np.int64)
        for i, ls in enumerate(labels):
            y[i, [cidx[c] for c in ls]] = 1
        strat = y.argmax(1)
    else:
        y = np.array([cidx[ls[0]] for ls in labels])
        strat = y
    res = {"n_files": len(labels), "n_classes": len(classes), "dim": int(X.shape[1]),
           "task": "multilabel" if multilabel else "multiclass"}

    def one(tr, va, te) -> dict:
        r = linear_probe(X[tr], y[tr], X[va], y[va], X[te], y[te], len(classes), multilabel, seed)
        if not multilabel:
            r.update(knn_probe(X[tr], y[tr], X[va], y[va], X[te], y[te]))
        return r

    if splits[0] is not None:
        sp = np.array(splits)
        tr, va, te = (np.flatnonzero(sp == s) for s in SPLITS)
        if len(tr) == 0 or len(te) == 0:
            raise ProbeError("the split column needs train and test rows", code=4)
        if len(va) == 0:  # carve a stratified 20 % of train as valid
            fold = stratified_folds(strat[tr], 5, seed)[0]
            va, tr = tr[fold], np.delete(tr, fold)
        res.update(protocol="train/valid/test", **one(tr, va, te))
        return res
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
        res[key] = float(np.mean(vals))
        if key in ("accuracy", "f1", "map", "knn_accuracy"):
            res[f"{key}_std"] = float(np.std(vals))
    return res


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
# reports frame micro `f1`, `f1_macro` over classes, and frame `map`.


@dataclass
class EventFile:
    path: str
    rel: str
    split: str | None
    events: list[tuple[float, float, str]]


def is_event_csv(csv_path: str | Path) -> bool:
    """True when the CSV's header has onset and offset columns (a sound event detection task)."""
    try:
        with Path(csv_path).open(newline="") as f:
            first = f.readline()
    except (OSError, UnicodeDecodeError):
        return False
    cols = [c.strip() for c in first.replace("\t", ",").split(",")]
    return "onset" in cols and "offset" in cols


def _csv_rows(p: Path, need: tuple[str, ...]) -> tuple[list[str], list[dict]]:
    if not p.is_file():
        raise ProbeError(f"{p}: no such file")
    try:
        with p.open(newline="") as f:
            first = f.readline()
            f.seek(0)
            reader = csv.DictReader(f, delimiter="\t" if "\t" in first else ",")
            cols = reader.fieldnames or []
            if any(c not in cols for c in need):
                raise ProbeError(f"{p}: needs columns {','.join(need)}; found {cols}")
            return cols, list(reader)
    except UnicodeDecodeError:
        raise ProbeError(f"{p}: not a UTF-8 CSV file") from None


def read_events(csv_path: str | Path, files_csv: str | Path | None = None) -> list[EventFile]:
    p = Path(csv_path)
    _, rows = _csv_rows(p, ("path", "onset", "offset", "label"))
    files: dict[str, EventFile] = {}

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
            files[full(rel, fp)] = EventFile(full(rel, fp), rel, split_of(r, f"{fp}:{i}"), [])
    for i, r in enumerate(rows, start=2):
        rel, label = (r.get("path") or "").strip(), (r.get("label") or "").strip()
        try:
            on, off = float(r["onset"]), float(r["offset"])
        except (TypeError, ValueError):
            raise ProbeError(f"{p}:{i}: onset and offset must be numbers (seconds)") from None
        if not rel or not label or not (0 <= on < off):
            raise ProbeError(f"{p}:{i}: needs a path, a label and 0 <= onset < offset")
        key = full(rel, p)
        if key not in files:
            if files_csv is not None:
                raise ProbeError(f"{p}:{i}: {rel} is not in {files_csv}")
            files[key] = EventFile(key, rel, split_of(r, f"{p}:{i}"), [])
        files[key].events.append((on, off, label))
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


def to_grid(frames: np.ndarray, times: np.ndarray, seconds: float, hop: float) -> np.ndarray:
    """Encoder frames (T, D) at centre `times` -> (n_grid, D) on a `hop` grid over `seconds`:
    the mean of the encoder frames whose centre falls in each grid frame, or the encoder frame
    nearest its centre when none does."""
    n = max(1, int(np.floor(seconds / hop + 1e-9)))
    idx = np.floor(times / hop + 1e-9).astype(int)
    sums = np.zeros((n, frames.shape[1]))
    counts = np.zeros(n)
    ok = (idx >= 0) & (idx < n)
    np.add.at(sums, idx[ok], frames[ok])
    np.add.at(counts, idx[ok], 1)
    centres = (np.arange(n) + 0.5) * hop
    nearest = np.abs(times[None, :] - centres[:, None]).argmin(1)
    return np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], frames[nearest])


def evaluate_events(grids: list[np.ndarray], targets: list[np.ndarray], splits: list[str | None],
                    classes: list[str], seed: int = 0) -> dict:
    """Frame-level linear SED probe on per-file grid embeddings and 0/1 targets (see above)."""
    n = len(grids)
    res = {"n_files": n, "n_classes": len(classes), "dim": int(grids[0].shape[1]), "task": "sound_event_detection"}

    def stack(ix) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate([grids[i] for i in ix]), np.concatenate([targets[i] for i in ix])

    def one(tr, va, te) -> dict:
        (Xtr, Ytr), (Xva, Yva), (Xte, Yte) = stack(tr), stack(va), stack(te)
        r = linear_probe(Xtr, Ytr, Xva, Yva, Xte, Yte, len(classes), multilabel=True, seed=seed)
        return {**r, "frames_train": int(len(Xtr))}

    if splits[0] is not None:
        sp = np.array(splits)
        tr, va, te = (np.flatnonzero(sp == s) for s in SPLITS)
        if len(tr) == 0 or len(te) == 0:
            raise ProbeError("the split column needs train and test files", code=4)
        if len(va) == 0:
            rng = np.random.default_rng(seed)
            perm = rng.permutation(tr)
            va, tr = np.sort(perm[: max(1, len(tr) // 5)]), np.sort(perm[max(1, len(tr) // 5):])
        res.update(protocol="train/valid/test", **one(tr, va, te))
        return res
    if n < 10:
        raise ProbeError(f"only {n} files: too few for 5-fold cross-validation", code=4)
    perm = np.random.default_rng(seed).permutation(n)
    folds = [np.sort(perm[k::5]) for k in range(5)]
    per = []
    for k in range(5):
        rest = np.concatenate([folds[j] for j in range(5) if j != k])
        va, tr = rest[: max(1, len(rest) // 5)], rest[max(1, len(rest) // 5):]
        per.append(one(tr, va, folds[k]))
    res["protocol"] = "5-fold cross-validation over files"
    for key in per[0]:
        res[key] = float(np.mean([p[key] for p in per]))
    return res
