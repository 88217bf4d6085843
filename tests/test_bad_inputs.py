"""A bad-audio corpus generated here (no downloads) through `extract` and through the pretrain data
validation: every case is processed, or skipped with one warning naming its reason and counted.
Plus the odd inputs: binary files given as inputs, manifests with a BOM or spaces, duplicate
entries, the mp3 decoder's stderr, and several inputs with equal file names."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from safetensors.numpy import load_file
from typer.testing import CliRunner

import sslaudio.audio
import sslaudio.data
import sslaudio.features
from sslaudio.audio import AudioError, load, probe
from sslaudio.cli import app
from sslaudio.data import DataError, scan, scan_entries, scan_pairs, validate
from sslaudio.synth import clip

SR = 16000
ENCODER = "random:tiny/byol-a"  # needs 1120 samples (70 ms) per input
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def shown(path) -> str:
    """How a (possibly non-UTF-8) path appears in the warnings."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def tone(seconds: float = 0.3, sr: int = SR, channels: int = 1, seed: int = 0) -> np.ndarray:
    x = clip("saw", seed, seconds=seconds)
    n = int(round(seconds * sr))
    x = np.interp(np.linspace(0, len(x) - 1, n), np.arange(len(x)), x).astype(np.float32)
    return x if channels == 1 else np.stack([x * (0.5 + 0.1 * c) for c in range(channels)], 1)


def wav_bytes(tmp: Path, x: np.ndarray, sr: int = SR, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    sf.write(str(tmp), x, sr, subtype=subtype, format=fmt)
    data = tmp.read_bytes()
    tmp.unlink()
    return data


def can_write_mp3() -> bool:
    return "MP3" in sf.available_formats() and "MPEG_LAYER_III" in sf.available_subtypes("MP3")


# name -> (file name in the corpus, what extract does, what pretrain's validation does):
# None = processed / usable, else a piece of the skip reason.
CASES = {
    "wav PCM_16 16 kHz": ("pcm16.wav", None, None),
    "wav PCM_U8 8 kHz": ("u8_8k.wav", None, None),
    "wav PCM_24 44.1 kHz": ("pcm24_44k.wav", None, None),
    "wav PCM_32 48 kHz": ("pcm32_48k.wav", None, None),
    "wav FLOAT 22.05 kHz": ("float_22k.wav", None, None),
    "wav DOUBLE 8 kHz": ("double_8k.wav", None, None),
    "flac 16 bit": ("a.flac", None, None),
    "flac 24 bit 48 kHz": ("b48k.flac", None, None),
    "ogg vorbis": ("v.ogg", None, None),
    "aiff": ("a.aiff", None, None),
    "mp3": ("m.mp3", None, None),
    "stereo": ("stereo.wav", None, None),
    "6 channels 48 kHz": ("six.wav", None, None),
    "silent (all zeros)": ("silent.wav", None, None),
    "DC only": ("dc.wav", None, None),
    "clipped": ("clipped.wav", None, None),
    "wav named .flac": ("wav_named.flac", None, None),
    "wav named .mp3": ("wav_named.mp3", None, None),
    "folder named like audio": ("dir.wav/inner.wav", None, None),
    "non-UTF-8 name": (b"caf\xe9.wav", None, None),
    "truncated wav (data cut)": ("trunc.wav", None, None),
    "1 sample": ("one_sample.wav", "too short: 0.1 ms < 70 ms the encoder needs", "too short"),
    "1 ms": ("1ms.wav", "too short: 1 ms < 70 ms", "too short"),
    "10 ms": ("10ms.wav", "too short: 10 ms < 70 ms", "too short"),
    "zero-length file": ("zero.wav", "unreadable", "unreadable"),
    "header only, no samples": ("header_only.wav", "empty", "empty"),
    "broken header": ("broken_header.wav", "unreadable", "unreadable"),
    "truncated flac": ("trunc.flac", "truncated or corrupt", "truncated or corrupt"),
    "truncated ogg": ("trunc.ogg", "unreadable", "unreadable"),
    "truncated mp3": ("trunc.mp3", "unreadable", "unreadable"),
    "random bytes named .mp3": ("noise.mp3", "unreadable", "unreadable"),
    "NaN in a float wav": ("nan.wav", "non-finite", "non-finite"),
    "Inf in a float wav": ("inf.wav", "non-finite", "non-finite"),
    "text named .wav": ("text.wav", "unreadable", "unreadable"),
    "non-UTF-8 name, corrupt": (b"bad\xff.wav", "unreadable", "unreadable"),
    "dangling symlink": ("dangling.wav", "dangling symlink", "dangling symlink"),
    "symlink to itself": ("self_loop.wav", "symlink loop", "symlink loop"),
    "symlink loop of two": ("loop_a.wav", "symlink loop", "symlink loop"),
    "permission denied": ("denied.wav", "permission denied", "permission denied"),
    "unreadable subfolder": ("locked", "unreadable folder", "unreadable folder"),
    "named pipe": ("pipe.wav", "not a regular file", "not a regular file"),
    "deleted after the scan": ("gone_after_scan.wav", "missing", "missing"),
    "deleted after probing": ("gone_after_probe.wav", "missing", "missing"),
}


def build_corpus(root: Path) -> dict[str, Path]:
    """Write every case under root; returns name -> path (cases the filesystem refuses are left out)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / "scratch.wav"
    paths: dict[str, Path] = {}

    def put(name: str, data: bytes) -> None:
        fname = CASES[name][0]
        p = Path(os.fsdecode(root / os.fsdecode(fname))) if isinstance(fname, bytes) else root / fname
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        except (OSError, UnicodeEncodeError):  # a filesystem that refuses non-UTF-8 names
            return
        paths[name] = p

    x = tone()
    put("wav PCM_16 16 kHz", wav_bytes(tmp, x))
    put("wav PCM_U8 8 kHz", wav_bytes(tmp, tone(sr=8000), 8000, "PCM_U8"))
    put("wav PCM_24 44.1 kHz", wav_bytes(tmp, tone(sr=44100), 44100, "PCM_24"))
    put("wav PCM_32 48 kHz", wav_bytes(tmp, tone(sr=48000), 48000, "PCM_32"))
    put("wav FLOAT 22.05 kHz", wav_bytes(tmp, tone(sr=22050), 22050, "FLOAT"))
    put("wav DOUBLE 8 kHz", wav_bytes(tmp, tone(sr=8000), 8000, "DOUBLE"))
    put("flac 16 bit", wav_bytes(tmp.with_suffix(".flac"), x, SR, "PCM_16", "FLAC"))
    put("flac 24 bit 48 kHz", wav_bytes(tmp.with_suffix(".flac"), tone(sr=48000), 48000, "PCM_24", "FLAC"))
    ogg = wav_bytes(tmp.with_suffix(".ogg"), tone(0.5), SR, "VORBIS", "OGG")
    put("ogg vorbis", ogg)
    put("aiff", wav_bytes(tmp.with_suffix(".aiff"), x, SR, "PCM_16", "AIFF"))
    if can_write_mp3():
        mp3 = wav_bytes(tmp.with_suffix(".mp3"), tone(0.5), SR, "MPEG_LAYER_III", "MP3")
        put("mp3", mp3)
        put("truncated mp3", mp3[:300])
    put("stereo", wav_bytes(tmp, tone(channels=2), SR))
    put("6 channels 48 kHz", wav_bytes(tmp, tone(sr=48000, channels=6), 48000))
    put("silent (all zeros)", wav_bytes(tmp, np.zeros(4800, np.float32)))
    put("DC only", wav_bytes(tmp, np.full(4800, 0.5, np.float32)))
    put("clipped", wav_bytes(tmp, np.clip(4 * x, -1, 1), SR, "FLOAT"))
    put("wav named .flac", wav_bytes(tmp, x))
    put("wav named .mp3", wav_bytes(tmp, x))
    put("folder named like audio", wav_bytes(tmp, x))
    put("non-UTF-8 name", wav_bytes(tmp, x))
    full = wav_bytes(tmp, tone(0.5))
    put("truncated wav (data cut)", full[: len(full) // 2])
    put("1 sample", wav_bytes(tmp, x[:1]))
    put("1 ms", wav_bytes(tmp, x[:16]))
    put("10 ms", wav_bytes(tmp, x[:160]))
    put("zero-length file", b"")
    put("header only, no samples", full[:44])
    put("broken header", b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00" + b"\xff" * 40)
    flac = wav_bytes(tmp.with_suffix(".flac"), tone(1.0), SR, "PCM_16", "FLAC")
    put("truncated flac", flac[: len(flac) // 2])
    put("truncated ogg", ogg[: len(ogg) // 2])
    put("random bytes named .mp3", np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    bad = x.copy()
    bad[100] = np.nan
    put("NaN in a float wav", wav_bytes(tmp, bad, SR, "FLOAT"))
    bad[100] = np.inf
    put("Inf in a float wav", wav_bytes(tmp, bad, SR, "FLOAT"))
    put("text named .wav", b"this is not audio\n" * 20)
    put("non-UTF-8 name, corrupt", b"RIFF junk")
    os.symlink("nowhere.wav", root / "dangling.wav")
    paths["dangling symlink"] = root / "dangling.wav"
    os.symlink("self_loop.wav", root / "self_loop.wav")
    paths["symlink to itself"] = root / "self_loop.wav"
    os.symlink("loop_b.wav", root / "loop_a.wav")
    os.symlink("loop_a.wav", root / "loop_b.wav")  # is scanned too: one more skip with the same reason
    paths["symlink loop of two"] = root / "loop_a.wav"
    put("permission denied", wav_bytes(tmp, x))
    (root / "locked").mkdir()
    (root / "locked" / "inside.wav").write_bytes(wav_bytes(tmp, x))
    paths["unreadable subfolder"] = root / "locked"
    if hasattr(os, "mkfifo"):
        os.mkfifo(root / "pipe.wav")
        paths["named pipe"] = root / "pipe.wav"
    put("deleted after the scan", wav_bytes(tmp, x))
    put("deleted after probing", wav_bytes(tmp, x))
    return paths


def deny(monkeypatch, paths: dict[str, Path]) -> None:
    """chmod 000 on the denied file and the locked folder; as root (where that denies nothing) the
    same errors are simulated at the two places sslaudio reads the filesystem."""
    denied, locked = paths["permission denied"], paths["unreadable subfolder"]
    if os.geteuid() != 0:
        denied.chmod(0)
        locked.chmod(0)
        return
    real_open, real_list = sslaudio.audio.open_for_reading, sslaudio.audio.list_dir

    def open_for_reading(p):
        if Path(p) == denied:
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real_open(p)

    def list_dir(p):
        if Path(p) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real_list(p)

    monkeypatch.setattr(sslaudio.audio, "open_for_reading", open_for_reading)
    monkeypatch.setattr(sslaudio.audio, "list_dir", list_dir)


def undeny(paths: dict[str, Path]) -> None:
    for name in ("permission denied", "unreadable subfolder"):
        paths[name].chmod(0o755)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The corpus through `extract` (one run) and through pretrain's validate(scan(...))."""
    base = tmp_path_factory.mktemp("bad_corpus")
    root = base / "corpus"
    paths = build_corpus(root)
    out = base / "feats"
    with pytest.MonkeyPatch.context() as mp:
        deny(mp, paths)
        real_scan, real_plan = sslaudio.data.scan_entries, sslaudio.features.plan_files

        def scan_then_delete(inputs):
            found = real_scan(inputs)
            paths["deleted after the scan"].unlink()
            return found

        def plan_then_delete(*a, **k):
            plan = real_plan(*a, **k)
            paths["deleted after probing"].unlink()
            return plan

        mp.setattr(sslaudio.data, "scan_entries", scan_then_delete)
        mp.setattr(sslaudio.features, "plan_files", plan_then_delete)
        r = invoke("extract", ENCODER, root, "--out", out)
        mp.undo()
        # the pretrain side: the same corpus, the two deleted files written again first
        deny(mp, paths)
        for name in ("deleted after the scan", "deleted after probing"):
            paths[name].write_bytes(wav_bytes(base / "scratch.wav", tone()))
        listed = scan([str(root)])
        for name in ("deleted after the scan", "deleted after probing"):
            paths[name].unlink()
        warnings: list[str] = []
        ok, skipped = validate(listed, min_seconds=0.1, warn=warnings.append)
    undeny(paths)
    return {"paths": paths, "result": r, "out": out, "ok": ok, "skipped": skipped, "warnings": warnings}


def _errors(out: Path) -> dict[str, str]:
    return {e["path"]: e["error"] for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("case", list(CASES))
def test_corpus_case_through_extract(corpus, case):
    paths, r, out = corpus["paths"], corpus["result"], corpus["out"]
    if case not in paths:
        pytest.skip(f"{case}: cannot be made here (no mp3 encoder, no mkfifo, or non-UTF-8 names refused)")
    assert r.exit_code == 0, r.output
    path, expect = str(paths[case]), CASES[case][1]
    errors = _errors(out)
    manifest = {row["path"]: row for row in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    warned = [ln for ln in r.output.splitlines() if f"skip {shown(path)}:" in ln]
    if expect is None:
        assert path in manifest and path not in errors and not warned, (case, errors.get(path))
        f = load_file(str(out / manifest[path]["outputs"][0]))
        assert f["clip"].shape == (512,) and np.isfinite(f["clip"]).all()
    else:
        assert path not in manifest and expect in errors.get(path, ""), (case, errors.get(path))
        assert len(warned) == 1 and expect in warned[0], (case, warned)


def test_corpus_counts_in_summary(corpus):
    paths, out = corpus["paths"], corpus["out"]
    s = json.loads((out / "summary.json").read_text())
    good = [n for n in paths if CASES[n][1] is None]
    bad = [n for n in paths if CASES[n][1] is not None]
    extra = 1  # loop_b.wav, the other half of the two-link loop
    assert s["written"] == len(good) and s["skipped"] == len(bad) + extra
    assert s["files"] == len(good) + len(bad) + extra
    assert len(_errors(out)) == s["skipped"]
    assert len(paths) >= 30


@pytest.mark.parametrize("case", list(CASES))
def test_corpus_case_through_pretrain_validation(corpus, case):
    paths = corpus["paths"]
    if case not in paths:
        pytest.skip(f"{case}: cannot be made here (no mp3 encoder, no mkfifo, or non-UTF-8 names refused)")
    path, expect = str(paths[case]), CASES[case][2]
    ok = {i.path for i in corpus["ok"]}
    reasons = [r for p, r in corpus["skipped"] if p == path]
    warned = [w for w in corpus["warnings"] if w.startswith(f"skip {path}:")]
    if expect is None:
        assert path in ok and not reasons and not warned, (case, reasons)
    else:
        assert path not in ok and len(reasons) == 1 and expect in reasons[0], (case, reasons)
        assert len(warned) == 1


def test_corpus_pretrain_counts(corpus):
    paths = corpus["paths"]
    n_good = sum(CASES[n][2] is None for n in paths)
    n_bad = sum(CASES[n][2] is not None for n in paths) + 1  # + loop_b.wav
    assert len(corpus["ok"]) == n_good and len(corpus["skipped"]) == n_bad == len(corpus["warnings"])


@pytest.mark.parametrize(("fmt", "subtype"), [("WAV", "PCM_16"), ("WAV", "PCM_24"), ("AIFF", "PCM_16"),
                                             ("WAV", "FLOAT"), ("FLAC", "PCM_16")])
def test_a_cut_file_probes_as_the_samples_it_holds(tmp_path, fmt, subtype):
    """probe() skips the end-of-file decode for uncompressed PCM (libsndfile counts only the frames a
    cut file holds); whatever it accepts decodes to exactly the frames it reported, and a cut
    compressed file is refused."""
    x = (0.1 * np.random.default_rng(0).standard_normal(SR)).astype("float32")
    path = tmp_path / f"cut.{fmt.lower()}"
    sf.write(path, x, SR, format=fmt, subtype=subtype)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 1])
    try:
        info = probe(path)
    except AudioError as e:
        assert fmt == "FLAC" and "truncated or corrupt" in str(e)
        return
    assert fmt != "FLAC" and 0 < info.frames < SR
    assert load(path, SR).shape[-1] == info.frames


@pytest.mark.skipif(os.geteuid() == 0, reason="running as root: chmod 000 denies root nothing (the corpus "
                                              "simulates these errors instead)")
def test_chmod_000_file_and_folder_are_skipped_with_reasons(tmp_path):
    write = lambda p: (p.parent.mkdir(parents=True, exist_ok=True), sf.write(str(p), tone(), SR))  # noqa: E731
    write(tmp_path / "ok.wav")
    write(tmp_path / "denied.wav")
    write(tmp_path / "locked" / "inside.wav")
    (tmp_path / "denied.wav").chmod(0)
    (tmp_path / "locked").chmod(0)
    try:
        warnings = []
        ok, skipped = validate(scan([str(tmp_path)]), 0.1, warnings.append)
    finally:
        (tmp_path / "denied.wav").chmod(0o644)
        (tmp_path / "locked").chmod(0o755)
    reasons = {Path(p).name: r for p, r in skipped}
    assert [Path(i.path).name for i in ok] == ["ok.wav"] and len(warnings) == 2
    assert reasons == {"denied.wav": "permission denied", "locked": "unreadable folder (permission denied)"}


def test_mp3_decoder_messages_do_not_reach_stderr(tmp_path, capfd):
    if not can_write_mp3():
        pytest.skip("this libsndfile cannot write mp3")
    good = wav_bytes(tmp_path / "g.mp3", tone(0.5), SR, "MPEG_LAYER_III", "MP3")
    (tmp_path / "trunc.mp3").write_bytes(good[:300])
    (tmp_path / "junk.mp3").write_bytes(b"ID3" + bytes(range(256)) * 8)
    (tmp_path / "gap.mp3").write_bytes(good[:50] + bytes(2000) + good[50:900])
    capfd.readouterr()
    for name in ("trunc.mp3", "junk.mp3", "gap.mp3"):
        with pytest.raises(AudioError, match="unreadable"):
            probe(tmp_path / name)
        with pytest.raises(AudioError, match="unreadable"):
            load(tmp_path / name, SR)
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def test_binary_input_with_an_unknown_extension_is_refused_in_one_line(tmp_path):
    blob = tmp_path / "weights.bin"
    blob.write_bytes(b"\x00\x01binary\x00" * 100)
    with pytest.raises(DataError, match="weights.bin: not an audio file or a text manifest"):
        scan([str(blob)])
    r = invoke("extract", ENCODER, blob, "--out", tmp_path / "f")
    assert r.exit_code == 4 and len(r.output.strip().splitlines()) == 1
    assert "not an audio file or a text manifest" in r.output and "Traceback" not in r.output
    audio = tmp_path / "recording.bin"  # an audio file under another extension is used as one
    audio.write_bytes(wav_bytes(tmp_path / "s.wav", tone()))
    assert scan([str(audio)]) == [str(audio)]


@pytest.mark.parametrize("header", ["\ufeffpath,label", "id, path, label", "\ufeffid , path , label"])
def test_manifest_with_bom_or_spaces_in_the_header(tmp_path, header):
    for name in ("a.wav", "b.wav"):
        sf.write(str(tmp_path / name), tone(), SR)
    cols = [h.strip().lstrip("\ufeff") for h in header.split(",")]
    rows = [", ".join({"path": n, "label": "x", "id": str(i)}[c] for c in cols)
            for i, n in enumerate(["a.wav", "b.wav"])]
    (tmp_path / "m.csv").write_text("\n".join([header] + rows) + "\n", encoding="utf-8")
    assert scan([str(tmp_path / "m.csv")]) == [str(tmp_path / "a.wav"), str(tmp_path / "b.wav")]


@pytest.mark.parametrize("bom", ["\ufeff", ""])
def test_probe_labels_with_bom_or_spaces_in_the_header(tmp_path, bom):
    """A spreadsheet's CSV export (UTF-8 BOM, "path, label") names the same columns for the probe's
    labels and sound-event files as for the pretraining manifest."""
    from sslaudio.probe import is_event_csv, read_events, read_labels

    (tmp_path / "labels.csv").write_text(f"{bom}path, label , split\na.wav, dog, train\nb.wav,cat,test\n",
                                         encoding="utf-8")
    rows = read_labels(tmp_path / "labels.csv")
    assert [(r.rel, r.labels, r.split) for r in rows] == [("a.wav", ("dog",), "train"), ("b.wav", ("cat",), "test")]
    assert not is_event_csv(tmp_path / "labels.csv")
    (tmp_path / "events.csv").write_text(f"{bom}path,onset, offset,label,split\na.wav,0.1,0.5,x,train\n",
                                         encoding="utf-8")
    (tmp_path / "files.csv").write_text(f"{bom}path, split\na.wav,train\nb.wav,test\n", encoding="utf-8")
    assert is_event_csv(tmp_path / "events.csv")
    files = read_events(tmp_path / "events.csv", tmp_path / "files.csv")
    assert [(f.rel, f.split, f.events) for f in files] == [("a.wav", "train", [(0.1, 0.5, "x")]), ("b.wav", "test", [])]


def test_duplicate_manifest_entries_are_reported_once_and_processed_once(tmp_path):
    for name in ("a.wav", "b.wav"):
        sf.write(str(tmp_path / name), tone(), SR)
    (tmp_path / "list.txt").write_text("a.wav\nb.wav\n./a.wav\na.wav\n")
    r = invoke("extract", ENCODER, tmp_path / "list.txt", "--out", tmp_path / "f")
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "f" / "summary.json").read_text())
    assert s["files"] == 2 and s["written"] == 2 and s["duplicates"] == 1
    dup = [ln for ln in r.output.splitlines() if "listed 3 times" in ln]
    assert len(dup) == 1 and "a.wav" in dup[0]
    assert len((tmp_path / "f" / "manifest.jsonl").read_text().splitlines()) == 2
    warnings = []
    ok, skipped = validate(scan([str(tmp_path / "list.txt")]), 0.1, warnings.append)
    assert len(ok) == 2 and len(skipped) == 1 and "listed 3 times" in skipped[0][1] and len(warnings) == 1


def test_several_inputs_are_mirrored_under_their_own_names(tmp_path):
    for i, d in enumerate(("A", "B", "x/C", "y/C")):
        (tmp_path / d).mkdir(parents=True)
        sf.write(str(tmp_path / d / "x.wav"), tone(seed=i), SR)
    (tmp_path / "list.txt").write_text("A/x.wav\n")
    out = tmp_path / "f"
    r = invoke("extract", ENCODER, tmp_path / "A", tmp_path / "B", tmp_path / "x/C", tmp_path / "y/C",
               tmp_path / "list.txt", "--out", out)
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert {row["outputs"][0]: Path(row["path"]).relative_to(tmp_path).as_posix() for row in rows} == {
        "A/x.wav.safetensors": "A/x.wav", "B/x.wav.safetensors": "B/x.wav", "C/x.wav.safetensors": "x/C/x.wav",
        "C-2/x.wav.safetensors": "y/C/x.wav", "list/A/x.wav.safetensors": "A/x.wav"}
    s = json.loads((out / "summary.json").read_text())
    assert s["written"] == 5 and s["files"] == 5
    a, b = load_file(str(out / "A/x.wav.safetensors")), load_file(str(out / "B/x.wav.safetensors"))
    assert not np.array_equal(a["clip"], b["clip"])  # each keeps its own features
    # one input keeps today's layout
    r = invoke("extract", ENCODER, tmp_path / "A", "--out", tmp_path / "g")
    assert r.exit_code == 0 and (tmp_path / "g" / "x.wav.safetensors").is_file()


def test_two_inputs_that_still_map_to_one_output_are_refused(tmp_path):
    for d in ("A", "B"):
        (tmp_path / d).mkdir()
        sf.write(str(tmp_path / d / "x.wav"), tone(), SR)
    r = invoke("extract", ENCODER, tmp_path / "A" / "x.wav", tmp_path / "B" / "x.wav", "--out", tmp_path / "f")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    assert "would both be written to x.wav.safetensors" in r.output
    assert not (tmp_path / "f").exists()
    assert [rel for _, rel in scan_pairs([str(tmp_path / "A"), str(tmp_path / "B")])] == ["A/x.wav", "B/x.wav"]


def test_unreadable_entries_are_listed_by_the_scan(tmp_path):
    """Nothing is left out of the scan without a word: dangling links, loops and subfolders that
    cannot be listed are entries, and probing them names the reason."""
    sf.write(str(tmp_path / "ok.wav"), tone(), SR)
    os.symlink("missing.wav", tmp_path / "dangling.wav")
    os.symlink("loop.wav", tmp_path / "loop.wav")
    names = sorted(Path(p).name for p, _ in scan_entries([str(tmp_path)]))
    assert names == ["dangling.wav", "loop.wav", "ok.wav"]


def test_no_frame_is_placed_past_the_end_of_its_file(tmp_path):
    """A clip the encoder can take is embedded as it is; the short tail of a long file is padded up
    to the encoder's minimum, but only frames centred inside the file are kept."""
    import torch

    from sslaudio.features import embed_files, min_samples
    from sslaudio.inference import load_encoder

    bundle = load_encoder(ENCODER)
    need = min_samples(bundle)
    assert need == 1120  # 8 STFT frames at a 10 ms hop, centred: the audiontt CNN's minimum
    chunk = 12 * int(bundle.encoder.downsample)  # what chunk_seconds=1.0 gives
    lengths = {"short": need, "long": 2 * chunk + 500}
    items = []
    for name, n in lengths.items():
        sf.write(str(tmp_path / f"{name}.wav"), tone(n / SR + 1e-3)[:n], SR, subtype="FLOAT")
        items.append((str(tmp_path / f"{name}.wav"), name))
    out = {e.rel: e for e in embed_files(bundle, items, torch.device("cpu"), True, chunk_seconds=1.0)}
    for name, n in lengths.items():
        e = out[name]
        assert len(e.times) == len(e.frames) >= 1 and e.times.max() < n / SR, (name, e.times[-3:], n / SR)
        assert abs(e.seconds - n / SR) < 1e-9


def test_running_out_of_memory_is_one_line_and_other_errors_still_surface():
    import torch
    import typer

    from sslaudio.cli import guard

    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 36867072064 bytes. Error code 12 (Cannot allocate memory)")
    cuda = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                       "capacity of 79.10 GiB of which 1.10 GiB is free.")
    hint = "; use smaller batches: pretrain train.batch_size or data.clip_seconds, extract --batch-seconds"
    worker = RuntimeError("DataLoader worker (pid(s) 9320) exited unexpectedly")  # the system's OOM killer
    cases = [(cpu, "error: out of memory (tried to allocate 36867072064 bytes)" + hint),
             (cuda, "error: out of memory (tried to allocate 2.00 GiB)" + hint),
             (worker, "error: out of memory (the system killed a data loader worker)" + hint)]
    for exc, want in cases:
        def boom():
            with guard():
                raise exc

        r = CliRunner().invoke(typer.Typer(callback=boom, invoke_without_command=True), [])
        assert r.exit_code == 2 and r.output.strip() == want, r.output

    def bug():
        with guard():
            raise RuntimeError("shape mismatch")  # a bug is not hidden behind a friendly line

    r = CliRunner().invoke(typer.Typer(callback=bug, invoke_without_command=True), [])
    assert r.exit_code == 1 and isinstance(r.exception, RuntimeError)
