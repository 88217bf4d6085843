"""Training data: folder / manifest scan, validation, fixed-length crops, a step-indexed sampler.

Determinism: the file order of epoch e is a permutation seeded by (seed, e), and the crop offsets
of item `slot` in step `step` come from a generator seeded by (seed, step, slot). A batch is thus a
pure function of (seed, step), whatever the number of workers, and a resumed run replays exactly.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from sslaudio.audio import AUDIO_EXTENSIONS, AudioError, AudioInfo, load, probe


class DataError(Exception):
    """Nothing usable in the input (exit code 4) or an unreadable manifest."""


def _manifest_paths(path: Path) -> list[str]:
    text = path.read_text(errors="replace")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return []
    delim = "\t" if path.suffix == ".tsv" or "\t" in lines[0] else ","
    header = [h.strip() for h in lines[0].split(delim)]
    root = path.parent
    if "path" in header:
        rows = csv.DictReader(lines, delimiter=delim)
        paths = [r["path"].strip() for r in rows if r.get("path") and r["path"].strip()]
    elif path.suffix in (".csv", ".tsv"):
        raise DataError(f"{path}: a CSV/TSV manifest needs a 'path' column (found {header})")
    else:
        paths = [ln.strip() for ln in lines if not ln.lstrip().startswith("#")]
    return [str(p if Path(p).is_absolute() else root / p) for p in paths]


def scan_pairs(inputs: list[str]) -> list[tuple[str, str]]:
    """Folders (recursive, audio extensions), audio files, or manifests -> unique
    (path, relative name) pairs; the name is relative to the folder or manifest it came from."""
    found: list[tuple[str, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found += [(str(f), str(f.relative_to(p))) for f in sorted(p.rglob("*"))
                      if f.suffix.lower() in AUDIO_EXTENSIONS and f.is_file()]
        elif p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS:
            found.append((str(p), p.name))
        elif p.is_file():
            for f in _manifest_paths(p):
                try:
                    rel = str(Path(f).resolve().relative_to(p.parent.resolve()))
                except ValueError:
                    rel = str(Path(f).resolve()).lstrip("/")
                found.append((f, rel))
        else:
            raise DataError(f"{item}: no such file or folder")
    return list({path: (path, rel) for path, rel in found}.values())


def scan(inputs: list[str]) -> list[str]:
    return [path for path, _ in scan_pairs(inputs)]


def validate(paths: list[str], min_seconds: float, warn: Callable[[str], None] | None = None
             ) -> tuple[list[AudioInfo], list[tuple[str, str]]]:
    """Probe every file; returns (usable infos, [(path, reason)] skipped), one warning per skip."""
    warn = warn or (lambda m: print(m, file=sys.stderr))
    ok, skipped = [], []
    for p in paths:
        if not Path(p).is_file():
            skipped.append((p, "missing"))
            warn(f"skip {p}: missing")
            continue
        try:
            ok.append(probe(p, min_seconds=min_seconds))
        except AudioError as e:
            skipped.append((p, str(e)))
            warn(f"skip {p}: {e}")
    return ok, skipped


def crop(info: AudioInfo, sample_rate: int, n: int, rng: np.random.Generator) -> torch.Tensor:
    """A random n-sample crop at `sample_rate`; shorter files are zero-padded evenly on both sides."""
    src_n = int(np.ceil(n * info.sample_rate / sample_rate))
    start = int(rng.integers(0, info.frames - src_n + 1)) if info.frames > src_n else 0
    x = load(info.path, sample_rate, start=start, frames=min(src_n, info.frames))
    if x.shape[0] >= n:
        return x[:n]
    pad = n - x.shape[0]
    return torch.nn.functional.pad(x, (pad // 2, pad - pad // 2))


class CropDataset(Dataset):
    """Item key (file_index, step, slot) -> {"audio": (V, S) float32}; V = segments per file."""

    def __init__(self, infos: list[AudioInfo], sample_rate: int, clip_seconds: float, segments: int, seed: int):
        self.infos = infos
        self.sample_rate = sample_rate
        self.n = int(round(clip_seconds * sample_rate))
        self.segments = segments
        self.seed = seed

    def __len__(self) -> int:
        return len(self.infos)

    def __getitem__(self, key: tuple[int, int, int]) -> dict:
        index, step, slot = key
        rng = np.random.default_rng([self.seed, step + 2, slot, 0x5EED])  # step -2: stats sample
        for attempt in range(len(self.infos)):
            info = self.infos[(index + attempt) % len(self.infos)]
            try:
                audio = torch.stack([crop(info, self.sample_rate, self.n, rng) for _ in range(self.segments)])
                return {"audio": audio}
            except AudioError as e:  # file changed or broke since the scan: use the next one
                print(f"skip {info.path}: {e}", file=sys.stderr)
        raise DataError("no readable audio file left")


class StepSampler(Sampler):
    """Yields, for steps start..steps-1, the list of item keys of that step's batch (or of its
    `shard`, this process's rows of the global batch under torchrun)."""

    def __init__(self, n_files: int, batch_size: int, seed: int, start_step: int, steps: int,
                 shard: slice | None = None):
        self.n, self.b, self.seed, self.start, self.steps = n_files, batch_size, seed, start_step, steps
        self.shard = shard or slice(None)
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch, 0xE90C]).permutation(self.n)}
        return self._perms[epoch]

    def keys(self, step: int) -> list[tuple[int, int, int]]:
        out = []
        for slot in range(self.b):
            pos = step * self.b + slot
            out.append((int(self._perm(pos // self.n)[pos % self.n]), step, slot))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        for step in range(self.start, self.steps):
            yield self.keys(step)[self.shard]

    def __len__(self) -> int:
        return max(0, self.steps - self.start)


def loader(dataset: CropDataset, batch_size: int, seed: int, start_step: int, steps: int,
           num_workers: int, shard: slice | None = None) -> DataLoader:
    sampler = StepSampler(len(dataset), batch_size, seed, start_step, steps, shard)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      persistent_workers=False, pin_memory=torch.cuda.is_available(),
                      prefetch_factor=4 if num_workers else None)


def sample_for_stats(dataset: CropDataset, count: int, seed: int) -> torch.Tensor:
    """`count` crops (count, S) drawn with a fixed seed, for frontend normalisation statistics."""
    rng = np.random.default_rng([seed, 0x57A7])
    idx = rng.choice(len(dataset), size=count, replace=count > len(dataset))
    return torch.cat([dataset[(int(i), -2, k)]["audio"] for k, i in enumerate(idx)])
