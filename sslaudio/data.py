"""Training data: folder / manifest scan, validation, fixed-length crops, a step-indexed sampler.

Determinism: the file order of epoch e is a permutation seeded by (seed, e), and the crop offsets
of item `slot` in step `step` come from a generator seeded by (seed, step, slot). A batch is thus a
pure function of (seed, step), whatever the number of workers, and a resumed run replays exactly.
With `--cache DIR` (cache.py) the crops are read from memory-mapped int16 shards instead of being
decoded and resampled per item.
"""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from sslaudio import audio as _audio
from sslaudio.audio import (
    AUDIO_EXTENSIONS,
    AudioError,
    AudioInfo,
    check_duration,
    load,
    one_thread,
    path_problem,
    probe,
)

if TYPE_CHECKING:
    from sslaudio.cache import AudioCache
    from sslaudio.config import DataConfig


class DataError(Exception):
    """Nothing usable in the input (exit code 4) or an unreadable manifest."""


def shifted_row(where: str, fields: list[str], n: int, delim: str = ",") -> str | None:
    """A CSV row with non-empty fields past the header's `n` columns (an unquoted comma in a path
    shifts every column after it): the one-line complaint, else None. Trailing empty fields are
    harmless. The manifest reader and probe's labels reader share it."""
    if not any((x or "").strip() for x in fields[n:]):
        return None
    return (f"{where}: a row of {len(fields)} fields where the header names {n} "
            f"({delim.join(x or '' for x in fields)[:80]}): a comma in a path? quote the field")


def _manifest_paths(path: Path, data: bytes | None = None) -> list[str]:
    """The paths a manifest lists: a text file of paths (# comments), or a CSV/TSV with a `path`
    column (a UTF-8 BOM and spaces around the delimiters are allowed). Relative paths are relative
    to the manifest's folder; names that are not UTF-8 come back as the same file names."""
    data = path.read_bytes() if data is None else data
    if b"\x00" in data:
        raise DataError(f"{path}: not an audio file or a text manifest")
    text = data.decode("utf-8-sig", errors="surrogateescape")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return []
    delim = "\t" if path.suffix.lower() == ".tsv" or "\t" in lines[0] else ","
    header = [h.strip() for h in next(csv.reader([lines[0]], delimiter=delim))]
    root = path.parent
    if "path" in header:
        col = header.index("path")
        rows = list(csv.reader(lines[1:], delimiter=delim, skipinitialspace=True))
        if shifted := next(filter(None, (shifted_row(str(path), r, len(header), delim) for r in rows)), None):
            raise DataError(shifted)
        paths = [r[col].strip() for r in rows if len(r) > col and r[col].strip()]
    elif path.suffix.lower() in (".csv", ".tsv"):
        raise DataError(f"{path}: a CSV/TSV manifest needs a 'path' column (found {header})")
    else:
        paths = [ln.strip() for ln in lines if not ln.lstrip().startswith("#")]
    return [os.path.normpath(p if os.path.isabs(p) else os.path.join(root, p)) for p in paths]


def _walk(folder: Path) -> Iterator[Path]:
    """Every entry under `folder` (recursively, sorted, symlinked folders not followed) that has an
    audio extension and is not a folder, dangling and looping symlinks included, and every
    subfolder that cannot be listed: probing them names what is wrong, so nothing is left out
    without a word."""
    try:
        entries = sorted(_audio.list_dir(folder), key=lambda e: e.name)
    except OSError:
        yield folder
        return
    for e in entries:
        p = folder / e.name
        try:
            is_dir = e.is_dir(follow_symlinks=False)
        except OSError:
            is_dir = False
        if is_dir:
            yield from _walk(p)
        elif p.suffix.lower() in AUDIO_EXTENSIONS:
            yield p


def _entries_of(item: str) -> tuple[list[tuple[str, str]], bool]:
    """(path, name relative to the input) of one input (a folder, an audio file or a manifest),
    and whether the input is a single audio file."""
    p = Path(item)
    if p.is_dir():
        return [(str(f), str(f.relative_to(p))) for f in _walk(p)], False
    if p.suffix.lower() in AUDIO_EXTENSIONS and os.path.lexists(p):
        return [(str(p), p.name)], True  # even a dangling link: probing it says why it is skipped
    if not p.exists():
        problem = path_problem(p) if os.path.lexists(p) else None
        raise DataError(f"{item}: {problem or 'no such file or folder'}")
    if not p.is_file():
        raise DataError(f"{item}: not a regular file")
    data = p.read_bytes()
    if b"\x00" in data:  # binary: an audio file with another extension, or nothing we can use
        try:
            probe(p, check_finite=False)
        except AudioError:
            raise DataError(f"{item}: not an audio file or a text manifest") from None
        return [(str(p), p.name)], True
    base = os.path.abspath(p.parent)
    out = []
    for f in _manifest_paths(p, data):
        rel = os.path.relpath(os.path.abspath(f), base)
        if rel == os.pardir or rel.startswith(os.pardir + os.sep):
            rel = os.path.abspath(f).lstrip(os.sep)  # outside the manifest's folder: its absolute path
        out.append((f, rel))
    return out, False


def _root_names(inputs: list[str]) -> dict[str, str]:
    """A distinct folder name per distinct input (its folder / manifest name; -2, -3 ... when equal)."""
    names: dict[str, str] = {}
    used: set[str] = set()
    for item in inputs:
        key = os.path.abspath(item)
        if key in names:
            continue
        p = Path(key)
        name = (p.name if p.is_dir() or not p.suffix else p.stem) or "root"
        cand, k = name, 2
        while cand in used:
            cand, k = f"{name}-{k}", k + 1
        used.add(cand)
        names[key] = cand
    return names


def scan_entries(inputs: list[str]) -> list[tuple[str, str]]:
    """Every (path, output name) the inputs hold, in order, duplicates included.

    Inputs are folders (recursive, audio extensions), audio files, or manifests. The name is
    relative to the folder or manifest an entry came from; with several inputs, each folder or
    manifest is mirrored under its own name (equal names get -2, -3 ...), audio files given
    directly keep their file name. Unreadable subfolders, dangling symlinks and symlink loops are
    entries too: probing them gives the reason they are skipped."""
    scanned = [(item, *_entries_of(item)) for item in inputs]
    several = len({os.path.abspath(i) for i in inputs}) > 1
    roots = _root_names([item for item, _, is_file in scanned if not is_file]) if several else {}
    found: list[tuple[str, str]] = []
    for item, entries, is_file_input in scanned:
        prefix = None if is_file_input else roots.get(os.path.abspath(item))
        found += [(path, os.path.join(prefix, rel) if prefix else rel) for path, rel in entries]
    return found


def dedupe(entries: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[tuple[str, int]]]:
    """Unique entries (the same file under the same output name), first occurrence first, and
    [(path, times listed)] for each entry listed more than once."""
    seen: dict[tuple[str, str], int] = {}
    first: dict[tuple[str, str], tuple[str, str]] = {}
    for path, rel in entries:
        key = (os.path.abspath(path), rel)
        seen[key] = seen.get(key, 0) + 1
        first.setdefault(key, (path, rel))
    return list(first.values()), [(first[k][0], n) for k, n in seen.items() if n > 1]


def scan_pairs(inputs: list[str]) -> list[tuple[str, str]]:
    """Folders, audio files or manifests -> unique (path, output name) pairs (see scan_entries)."""
    return dedupe(scan_entries(inputs))[0]


def scan(inputs: list[str]) -> list[str]:
    """Every path the inputs list, duplicates included: `validate` reports and drops them."""
    return [path for path, _ in scan_entries(inputs)]


def validate(paths: list[str], min_seconds: float, warn: Callable[[str], None] | None = None,
             cache: str | Path | None = None) -> tuple[list[AudioInfo], list[tuple[str, str]]]:
    """Probe every file; returns (usable infos, [(path, reason)] skipped), one warning per skip.

    A path listed more than once is used once and reported once ("listed N times"). With `cache`
    (a --cache DIR), a file its index lists with the same size and mtime_ns is not probed: its
    frames, rate and channels come from the index, for the cost of an os.stat."""
    warn = warn or (lambda m: print(m, file=sys.stderr))
    known = {}
    if cache is not None:
        from sslaudio.cache import known_files

        known = known_files(cache)
    counts: dict[str, int] = {}
    for p in paths:
        counts[os.path.abspath(p)] = counts.get(os.path.abspath(p), 0) + 1
    ok, skipped, done = [], [], set()
    for p in paths:
        key = os.path.abspath(p)
        if key in done:
            continue
        done.add(key)
        try:
            ok.append(_known(p, known.get(key), min_seconds) or probe(p, min_seconds=min_seconds))
            reason = f"listed {counts[key]} times (duplicate entries are used once)" if counts[key] > 1 else None
        except AudioError as e:
            reason = str(e) + (f" (listed {counts[key]} times)" if counts[key] > 1 else "")
        if reason:
            skipped.append((p, reason))
            warn(f"skip {p}: {reason}")
    return ok, skipped


def _known(path: str, entry: dict | None, min_seconds: float) -> AudioInfo | None:
    """The AudioInfo a cache index entry gives for `path` while the file is unchanged, else None."""
    if entry is None:
        return None
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # ValueError: a NUL byte in the name
        return None
    if (st.st_size, st.st_mtime_ns) != (entry.get("size"), entry.get("mtime_ns")):
        return None
    try:
        frames, sr, channels = int(entry["source_frames"]), int(entry["source_rate"]), int(entry["channels"])
    except (KeyError, TypeError, ValueError):
        return None
    check_duration(frames, sr, min_seconds)
    return AudioInfo(str(path), frames, sr, channels)


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
    """Item key (file_index, step, slot) -> {"audio": (V, S) float32}; V = segments per file.

    With a `cache` (cache.py) the crops are read from its int16 memory maps (/ 32768) instead of
    decoding: the same (seed, step, slot) -> crop determinism, but offsets are drawn at the target
    rate over the cached samples, so a cached run differs from an uncached one (and is itself
    deterministic). A file the cache could not decode is passed over like an unreadable one."""

    def __init__(self, infos: list[AudioInfo], sample_rate: int, clip_seconds: float, segments: int, seed: int,
                 cache: AudioCache | None = None):
        self.infos = infos
        self.sample_rate = sample_rate
        self.n = int(round(clip_seconds * sample_rate))
        self.segments = segments
        self.seed = seed
        self.cache = cache
        self.where = [cache.locate(i.path) for i in infos] if cache is not None else None

    def __len__(self) -> int:
        return len(self.infos)

    def _cached(self, i: int, rng: np.random.Generator) -> torch.Tensor | None:
        loc = self.where[i]
        if loc is None:
            return None
        samples, n = self.cache.samples(loc), self.n
        out = np.zeros((self.segments, n), dtype=np.float32)
        for v in range(self.segments):  # shorter files are zero-padded evenly on both sides, as `crop`
            if loc.frames > n:
                start = int(rng.integers(0, loc.frames - n + 1))
                np.multiply(samples[start:start + n], np.float32(1 / 32768), out=out[v])
            else:
                pad = (n - loc.frames) // 2
                np.multiply(samples, np.float32(1 / 32768), out=out[v, pad:pad + loc.frames])
        return torch.from_numpy(out)

    def __getitem__(self, key: tuple[int, int, int]) -> dict:
        with one_thread():
            return self._item(key)

    def _item(self, key: tuple[int, int, int]) -> dict:
        index, step, slot = key
        rng = np.random.default_rng([self.seed, step + 2, slot, 0x5EED])  # step -2: stats sample
        for attempt in range(len(self.infos)):
            i = (index + attempt) % len(self.infos)
            if self.cache is not None:
                audio = self._cached(i, rng)
                if audio is not None:
                    return {"audio": audio}
                continue
            info = self.infos[i]
            try:
                audio = torch.stack([crop(info, self.sample_rate, self.n, rng) for _ in range(self.segments)])
                return {"audio": audio}
            except AudioError as e:  # file changed or broke since the scan: use the next one
                print(f"skip {info.path}: {e}", file=sys.stderr)
        raise DataError("no readable audio file left")

    @classmethod
    def open(cls, infos: list[AudioInfo], data: DataConfig, seed: int, cache: str | Path | None = None,
             saved: dict | None = None, warn: Callable[[str], None] | None = None) -> CropDataset:
        """The training CropDataset, reading from the cache in `cache` (built or updated first, with
        data.num_workers threads) when given. `saved`: the state.json of the checkpoint a run resumes
        from; a resume that switches between cached and decoded crops gets one warning."""
        warn = warn or (lambda m: print(f"warning: {m}", file=sys.stderr))
        opened = None
        if cache is not None:
            from sslaudio.cache import open_cache

            opened = open_cache(cache, infos, data.sample_rate, min(data.num_workers, os.cpu_count() or 1) or 1, warn)
        if saved and bool(saved.get("cache")) != (opened is not None):
            was = "with --cache" if saved.get("cache") else "without --cache"
            warn(f"this run was trained {was}; crops are now {'read from the cache' if opened else 'decoded'}, "
                 f"so the resumed run will not match an uninterrupted one")
        return cls(infos, data.sample_rate, data.clip_seconds, data.segments, seed, cache=opened)


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


def sample_batches(dataset: CropDataset, seed: int, device: torch.device | str, count: int,
                   batch: int) -> Iterator[torch.Tensor]:
    """`count` crops drawn with a fixed seed (another stream than `sample_for_stats`), yielded as
    (<= batch, S) tensors on `device`, the first segment of each: the sample a method fits a
    codebook on before training (HuBERT's k-means), read a batch at a time so memory stays bounded."""
    rng = np.random.default_rng([seed, 0xC0DE])
    idx = rng.choice(len(dataset), size=count, replace=count > len(dataset))
    for start in range(0, count, batch):
        # step -2 as the stats sample, slots far above any stats count: crops of their own
        rows = [dataset[(int(i), -2, 1 << 30 | (start + k))]["audio"][:1] for k, i in enumerate(idx[start:start + batch])]
        yield torch.cat(rows).to(device)
