"""`--cache DIR`: every training file decoded once, at the run's sample rate, into int16 shards.

Layout of DIR (one cache per DIR: a run at another sample rate rebuilds it):

    DIR/index.json          {"format": "sslaudio-audio-cache", "version": 1, "sample_rate": 16000,
                             "shards": [{"name", "bytes", "mtime_ns", "sha256"}],
                             "files": [{"path", "size", "mtime_ns", "shard", "offset", "frames",
                                        "source_rate", "source_frames", "channels", "clipped"}]}
    DIR/shard-<hex>.i16     raw little-endian int16 mono samples, the files one after another
    DIR/.lock               held (flock) while the cache is checked or updated

`path` is the source's absolute path; `size` and `mtime_ns` are its os.stat at decoding time;
`offset` and `frames` count samples at `sample_rate` in shard number `shard`. Samples are plain
int16 (x * 32768, rounded, clipped): no per-file scale, so levels are the decoder's and a 16-bit
source comes back within half a quantisation step of the resampled float audio; what a float
source or the resampler's overshoot puts beyond full scale is clipped, counted per file
(`clipped`) and reported in one line. Whole files are stored, so crop settings (clip_seconds,
segments) do not change the content; data.min_seconds is applied by validation before the cache.
`data.validate(..., cache=DIR)` takes an unchanged file's frames, rate and channels from the
index (an os.stat instead of a probe: `known_files`).

Invalidation: a file is reused while its path, size and mtime_ns match and its shard is good;
a changed, added or missing file re-decodes only that file, into a new shard (old shards are not
rewritten; one left with no live file is deleted). Another sample rate, or an unreadable index,
rebuilds everything. Files listed by the index but not by this run stay cached while their
source is unchanged, so runs on subsets share the DIR.

Checksums: each shard's sha256 is computed while it is written and recorded in the index. Every
open checks each shard's size and mtime_ns (os.stat: catches truncation, appends and rewrites)
and its full sha256 (~1 GB/s; catches a bit flip in place), in the opening process, before
training: every shard while the cache is at most VERIFY_BYTES (2 GiB, ~18 h at 16 kHz), else a
random subset of shards of about that size per open, so start-up stays bounded and each shard is
still checked every few runs. A bad shard is reported in one warning line and its files are
decoded again. Readers (DataLoader workers) then memory-map the shards without further checks.

Atomicity: shards are written to hidden temp files and renamed; the index is written last
(atomic.atomic_text), after the shards are flushed to the disk, so an interrupted build leaves
either the old index or none: nothing the next open reads as valid. Shards no index refers to,
and temp files, are removed at the next open (under the lock, so never another build's).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import secrets
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sslaudio.atomic import atomic_text, fsync_path
from sslaudio.audio import AudioError, AudioInfo, load, one_thread

try:
    import fcntl
except ImportError:  # Windows: no lock (one process per cache DIR)
    fcntl = None

FORMAT, VERSION = "sslaudio-audio-cache", 1
SHARD_BYTES = 1 << 30  # a file never spans two shards; one larger than this gets a shard of its own
SCALE = 32768.0
VERIFY_BYTES = 2 << 30  # hashed per open (~2 s): all of a cache up to this size, a random subset beyond
_CHUNK = 1 << 24  # bytes hashed per read when verifying
_SHARD_NAME = re.compile(r"shard-[0-9a-f]{16}\.i16")  # never a path: an index cannot point outside DIR
_INT_FIELDS = ("size", "mtime_ns", "shard", "offset", "frames")


@dataclass(frozen=True)
class Location:
    shard: int
    offset: int
    frames: int


class AudioCache:
    """An open cache: shard file names and where each file's samples lie. Picklable and small
    (DataLoader workers under spawn get a copy); the memory maps are opened lazily, per process."""

    def __init__(self, root: Path, sample_rate: int, shards: list[str], where: dict[str, Location],
                 stats: dict | None = None):
        self.root, self.sample_rate, self.shards, self.where = Path(root), sample_rate, shards, where
        self.stats = stats or {}
        self._maps: dict[int, np.memmap] = {}
        self._pid = os.getpid()

    def locate(self, path: str) -> Location | None:
        return self.where.get(os.path.abspath(path))

    def samples(self, loc: Location) -> np.ndarray:
        """The file's int16 samples (a read-only view into its shard's memory map)."""
        if self._pid != os.getpid():  # a forked worker: map the files itself
            self._maps, self._pid = {}, os.getpid()
        mm = self._maps.get(loc.shard)
        if mm is None:
            mm = self._maps[loc.shard] = np.memmap(self.root / self.shards[loc.shard], dtype="<i2", mode="r")
        return mm[loc.offset:loc.offset + loc.frames]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}}


def _stat_key(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


class _Lock:
    """flock on DIR/.lock: one process checks or updates the cache at a time (torchrun ranks wait
    for the first, then find the cache built)."""

    def __init__(self, root: Path):
        self.path = root / ".lock"
        self.fd: int | None = None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        if fcntl is not None:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # releases the lock


def _read_index(root: Path, sample_rate: int, warn: Callable[[str], None]) -> dict:
    """The index, or an empty one (with a warning when there was one we cannot use)."""
    empty = {"format": FORMAT, "version": VERSION, "sample_rate": sample_rate, "shards": [], "files": []}
    path = root / "index.json"
    if not path.exists():
        return empty
    try:
        index = json.loads(path.read_text())
        ok = (isinstance(index, dict) and index.get("format") == FORMAT and index.get("version") == VERSION
              and isinstance(index.get("shards"), list) and isinstance(index.get("files"), list)
              and all(_SHARD_NAME.fullmatch(str(s.get("name"))) and isinstance(s.get("sha256"), str)
                      and all(isinstance(s.get(k), int) for k in ("bytes", "mtime_ns")) for s in index["shards"])
              and all(isinstance(f.get("path"), str) and all(isinstance(f.get(k), int) for k in _INT_FIELDS)
                      and 0 <= f["shard"] < len(index["shards"]) for f in index["files"]))
    except (OSError, ValueError, AttributeError):  # AttributeError: an entry that is not an object
        ok = False
    if not ok:
        warn(f"cache {root}: index.json is unreadable or of another version; rebuilding the cache")
        return empty
    if index.get("sample_rate") != sample_rate:
        warn(f"cache {root}: built at {index.get('sample_rate')} Hz, the run reads {sample_rate} Hz; "
             f"rebuilding the cache")
        return empty
    return index


def _good_shards(root: Path, shards: list[dict], warn: Callable[[str], None], workers: int) -> set[int]:
    """Indices of the shards whose size and mtime match the index and, for those hashed this time
    (all of them up to VERIFY_BYTES, else a random subset of about that size), the sha256 too
    (hashed in threads: hashlib releases the GIL)."""
    hashed = set(range(len(shards)))
    if sum(s.get("bytes", 0) for s in shards) > VERIFY_BYTES:
        order, budget, hashed = random.Random().sample(range(len(shards)), len(shards)), VERIFY_BYTES, set()
        for i in order:
            if budget <= 0:
                break
            hashed.add(i)
            budget -= shards[i].get("bytes", 0)

    def check(i: int) -> str | None:
        s = shards[i]
        try:
            st = os.stat(root / s["name"])
        except OSError:
            return "is missing"
        if st.st_size != s["bytes"]:
            return f"is truncated or extended ({st.st_size} bytes, {s['bytes']} written)"
        if st.st_mtime_ns != s["mtime_ns"]:
            return "was modified after it was written"
        if i not in hashed:
            return None
        try:
            if _sha256(root / s["name"]) != s["sha256"]:
                return "is corrupt (sha256 mismatch)"
        except OSError as e:
            return f"is unreadable ({e.strerror or e})"
        return None

    with ThreadPoolExecutor(max(1, workers)) as ex:
        problems = list(ex.map(check, range(len(shards))))
    for s, problem in zip(shards, problems):
        if problem:
            warn(f"cache shard {root / s['name']} {problem}: decoding its files again")
    return {i for i, p in enumerate(problems) if p is None}


def _decode(info: AudioInfo, sample_rate: int) -> tuple[np.ndarray, int]:
    """The whole file at `sample_rate` as int16, and how many samples were clipped."""
    x = load(info.path, sample_rate).numpy() * SCALE  # decoded, downmixed, resampled (audio.resample)
    clipped = int(np.count_nonzero((x > 32767) | (x < -32768)))
    return np.clip(np.rint(x), -32768, 32767).astype("<i2"), clipped


class _ShardWriter:
    """Appends files to temp shard files, renaming each when it is full; records names and sums."""

    def __init__(self, root: Path):
        self.root, self.done, self.temps = root, [], []
        self.f = self.h = self.name = None
        self.size = 0

    def add(self, samples: np.ndarray) -> tuple[str, int]:
        """Write one file's samples; (final shard name, offset in samples)."""
        nbytes = samples.nbytes
        if self.f is not None and self.size + nbytes > SHARD_BYTES:
            self.close_shard()
        if self.f is None:
            self.name = f"shard-{secrets.token_hex(8)}.i16"  # fresh names: no old index ever names a new shard
            tmp = self.root / f".{self.name}.tmp"
            self.temps.append(tmp)
            self.f, self.h, self.size = open(tmp, "wb"), hashlib.sha256(), 0  # noqa: SIM115 (closed in close_shard)
        data = samples.tobytes()
        self.f.write(data)
        self.h.update(data)
        offset, self.size = self.size // 2, self.size + nbytes
        return self.name, offset

    def close_shard(self) -> None:
        if self.f is None:
            return
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        tmp, final = self.root / f".{self.name}.tmp", self.root / self.name
        os.replace(tmp, final)
        self.temps.remove(tmp)
        st = os.stat(final)
        self.done.append({"name": self.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
                          "sha256": self.h.hexdigest()})
        self.f = None

    def abort(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
        for p in self.temps + [self.root / s["name"] for s in self.done]:
            try:
                os.unlink(p)
            except OSError:
                pass


def _ordered(fn: Callable, items: list, workers: int) -> Iterable:
    """fn over items in threads, results in order, at most 2 * workers decoded files held at once."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as ex:
        pending = []
        try:
            for item in items:
                pending.append(ex.submit(fn, item))
                if len(pending) >= 2 * workers:
                    yield pending.pop(0).result()
            while pending:
                yield pending.pop(0).result()
        finally:
            for f in pending:
                f.cancel()


def _progress_line(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def open_cache(root: str | Path, infos: list[AudioInfo], sample_rate: int, workers: int = 1,
               warn: Callable[[str], None] | None = None, progress: Callable[[str], None] | None = _progress_line
               ) -> AudioCache:
    """The cache in `root` holding every file of `infos` at `sample_rate`, built or updated as
    needed (see the module docstring). A file that fails to decode is warned about once and left
    out (`locate` gives None). I/O problems with DIR come out as one-line OSErrors naming DIR."""
    warn = warn or (lambda m: print(f"warning: {m}", file=sys.stderr))
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "--cache needs a folder; this is a file", str(root))
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _Lock(root):
            return _update(root, infos, sample_rate, max(1, workers), warn, progress)
    except OSError as e:  # sources are read through AudioError: this is DIR (no permission, a full disk)
        if e.errno is None:
            raise
        raise OSError(e.errno, f"cannot use it as the cache folder ({e.strerror or os.strerror(e.errno)})",
                      str(root)) from None


def _update(root: Path, infos: list[AudioInfo], sample_rate: int, workers: int, warn, progress) -> AudioCache:
    index = _read_index(root, sample_rate, warn)
    good = _good_shards(root, index["shards"], warn, workers)
    changed = len(good) != len(index["shards"]) or not (root / "index.json").exists()
    entries: dict[str, dict] = {}
    for e in index["files"]:  # still valid: the shard is good and the source unchanged
        if e.get("shard") in good and _stat_key(e["path"]) == (e["size"], e["mtime_ns"]):
            entries[e["path"]] = e
        else:
            changed = True
    todo, seen = [], set()
    for info in infos:
        key = os.path.abspath(info.path)
        if key not in entries and key not in seen:
            seen.add(key)
            todo.append(info)
    writer, failed, clipped_files = _ShardWriter(root), 0, 0
    if todo:
        changed = True
        _remove_strays(root, {index["shards"][i]["name"] for i in good})
        t0 = t_shown = time.time()
        total_s = sum(i.seconds for i in todo)
        if progress is not None:
            progress(f"cache {root}: decoding {len(todo)} files ({total_s / 3600:.2f} h of audio) at {sample_rate} Hz, "
                     f"{len(entries)} already cached")

        def job(info: AudioInfo):
            stat = _stat_key(info.path)  # before decoding: a file changed meanwhile is stale next time
            try:
                samples, clipped = _decode(info, sample_rate)
            except AudioError as err:
                return info, stat, None, str(err)
            return info, stat, samples, clipped

        try:
            with one_thread():  # the parallelism is over files: `workers` threads of one torch thread each
                for k, (info, stat, samples, extra) in enumerate(_ordered(job, todo, workers), 1):
                    if samples is None or stat is None:
                        failed += 1
                        warn(f"skip {info.path}: {extra if samples is None else 'missing (deleted since it was found)'}")
                    else:
                        name, offset = writer.add(samples)
                        clipped_files += extra > 0
                        entries[os.path.abspath(info.path)] = {
                            "path": os.path.abspath(info.path), "size": stat[0], "mtime_ns": stat[1], "shard": name,
                            "offset": offset, "frames": len(samples), "source_rate": info.sample_rate,
                            "source_frames": info.frames, "channels": info.channels, "clipped": extra}
                    if progress is not None and time.time() - t_shown > 10:
                        t_shown = time.time()
                        progress(f"cache {root}: {k}/{len(todo)} files decoded ({time.time() - t0:.0f} s)")
            writer.close_shard()
        except BaseException:
            writer.abort()  # nothing of this build stays; the old index and its shards are untouched
            raise
        if clipped_files:
            warn(f"cache {root}: {clipped_files} of {len(todo)} files had samples beyond full scale, clipped to "
                 f"int16 (the counts are in index.json)")
    if changed:
        keep = [index["shards"][i] for i in sorted(good)]
        shards = keep + writer.done
        number = {s["name"]: i for i, s in enumerate(shards)}
        names_by_old = {i: index["shards"][i]["name"] for i in good}
        files = []
        for e in entries.values():  # the shard field: an index into the new list
            name = e["shard"] if isinstance(e["shard"], str) else names_by_old[e["shard"]]
            files.append({**e, "shard": number[name]})
        used = {f["shard"] for f in files}
        shards = [s for i, s in enumerate(shards) if i in used]  # a shard with no live file goes
        renumber = {old: new for new, old in enumerate(sorted(used))}
        files = [{**f, "shard": renumber[f["shard"]]} for f in files]
        index = {"format": FORMAT, "version": VERSION, "sample_rate": sample_rate, "shards": shards, "files": files}
        try:
            fsync_path(root)
            atomic_text(root / "index.json", json.dumps(index, separators=(",", ":")) + "\n")
        except BaseException:
            writer.abort()
            raise
    _remove_strays(root, {s["name"] for s in index["shards"]})
    where = {f["path"]: Location(f["shard"], f["offset"], f["frames"]) for f in index["files"]}
    return AudioCache(root, sample_rate, [s["name"] for s in index["shards"]], where,
                      {"decoded": len(todo) - failed, "failed": failed, "reused": len(infos) - len(todo),
                       "clipped_files": clipped_files})


def known_files(root: str | Path) -> dict[str, dict]:
    """The index entries of the cache in `root` by source path ({} when there is none or it is
    unreadable): what `data.validate` takes a file's header facts from instead of probing it,
    while the file's size and mtime_ns are unchanged. Read without the lock: the index is only
    ever replaced whole."""
    try:
        index = json.loads((Path(root) / "index.json").read_text())
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            return {}
        return {e["path"]: e for e in index["files"] if isinstance(e, dict) and isinstance(e.get("path"), str)}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return {}


def _remove_strays(root: Path, keep: set[str]) -> None:
    """Shards no index refers to and temp files of killed builds (called under the lock)."""
    for p in root.iterdir():
        if (p.name.startswith("shard-") and p.name.endswith(".i16") and p.name not in keep) or \
                (p.name.startswith(".shard-") and p.name.endswith(".tmp")) or \
                (p.name.startswith(".index.json.") and p.name.endswith(".tmp")):
            try:
                p.unlink()
            except OSError:
                pass
