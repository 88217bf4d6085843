"""What benchmarks/cli_fuzz.py found around the audio: the values a user types (an empty path, a
device torch knows but cannot run on, a NUL byte in a listed path, a frame hop or an event time
of infinity, events past the end of their files, CSV rows with more fields than the header, a
batch larger than the machine). Each is one `error:` line with the documented exit code, or a
`warning:` and a result, never a traceback or a silent result."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from sslaudio.cli import app
from sslaudio.data import DataError, scan_entries
from sslaudio.evaluation import probe_checkpoint
from sslaudio.probe import ProbeError, read_events, read_labels

SR = 16000
ENCODER = "random:tiny/byol-a"
runner = CliRunner()


def invoke(*args, stdin=None):
    return runner.invoke(app, [str(a) for a in args], input=stdin)


def errors(r) -> list[str]:
    return [ln for ln in r.stderr.splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Twelve 0.5 s clips, tones and noise, with a clip labels CSV and an SED labels CSV + files.csv."""
    root = tmp_path_factory.mktemp("edges")
    rng = np.random.default_rng(0)
    t = np.arange(SR // 2) / SR
    rows, files, events = [], [], []
    for i in range(12):
        kind = "tone" if i % 2 == 0 else "noise"
        x = 0.3 * np.sin(2 * np.pi * (300 + 40 * i) * t) if kind == "tone" else 0.1 * rng.standard_normal(t.size)
        sf.write(root / f"c{i}.wav", x.astype(np.float32), SR)
        split = ["train", "train", "valid", "test"][i % 4] if i < 8 else "train"
        rows.append(f"c{i}.wav,{kind},{split}")
        files.append(f"c{i}.wav,{split}")
        events.append(f"c{i}.wav,0.1,0.3,{kind}")
    (root / "labels.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    (root / "sed").mkdir()
    for i in range(12):
        os.symlink(root / f"c{i}.wav", root / "sed" / f"c{i}.wav")
    (root / "sed" / "files.csv").write_text("path,split\n" + "\n".join(files) + "\n")
    (root / "sed" / "labels.csv").write_text("path,onset,offset,label\n" + "\n".join(events) + "\n")
    return root


@pytest.mark.parametrize("device", ["meta", "x", "cuda:99"])
def test_a_device_that_cannot_run_the_model_is_one_line(clips, tmp_path, device):
    r = invoke("extract", ENCODER, clips / "c0.wav", "--out", tmp_path / "f", "--device", device)
    assert r.exit_code == 2 and (r.exception is None or isinstance(r.exception, SystemExit)), r.exception
    lines = errors(r)
    why = ("no CUDA device is available", "CUDA device(s)") if device.startswith("cuda") \
        else ("expected auto, cpu, cuda, cuda:N or mps",)
    assert len(lines) == 1 and lines[0].startswith("error: --device ") and any(w in lines[0] for w in why), lines
    assert not (tmp_path / "f").exists()


def test_an_empty_out_never_means_the_working_directory(clips, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = invoke("extract", ENCODER, clips / "c0.wav", "--out", "")
    assert r.exit_code == 2 and errors(r) == ["error: --out, CKPT and every input must be non-empty "
                                              "(a shell variable that was never set?)"]
    r = invoke("pretrain", clips, "--preset", "tiny/byol-a", "--out", "", "--steps", "1", "-q")
    assert r.exit_code == 2 and "must not be empty" in r.stderr  # click's usage error for the option
    r = invoke("export", ENCODER, "--out", "")
    assert r.exit_code == 2 and "must not be empty" in r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written where the command ran


def test_a_listed_path_with_a_nul_byte_is_skipped_with_its_reason(clips, tmp_path):
    r = invoke("extract", ENCODER, "-", "--out", tmp_path / "f", stdin=f"{clips / 'c0.wav'}\nab\x00c.wav\n")
    assert r.exit_code == 0, r.output
    assert "skip" in r.stderr and "not a valid path (it holds a NUL byte)" in r.stderr
    summary = json.loads((tmp_path / "f" / "summary.json").read_text())
    assert summary["written"] == 1 and summary["skipped"] == 1


def test_sed_refuses_infinite_times_and_frame_hops(clips, tmp_path):
    bad = tmp_path / "labels.csv"
    bad.write_text(f"path,onset,offset,label\n{clips}/c0.wav,0.1,inf,tone\n")
    with pytest.raises(ProbeError, match="both finite"):
        read_events(bad)
    labels = clips / "sed" / "labels.csv"
    with pytest.raises(ProbeError, match=r"--frame-hop must be a number of seconds in \[0.01, 10\], found inf"):
        probe_checkpoint(ENCODER, labels, frame_hop=float("inf"))
    r = invoke("probe", ENCODER, labels, "--frame-hop", "1000")  # the CLI's range, as the suite's
    assert r.exit_code == 2 and (r.exception is None or isinstance(r.exception, SystemExit)), r.exception


def test_sed_events_past_the_end_of_their_files(clips, tmp_path):
    """All of them: an error (the targets would be all zero); some: a warning with the count."""
    d = tmp_path / "sed"
    d.mkdir()
    (d / "files.csv").write_text((clips / "sed" / "files.csv").read_text().replace("c", f"{clips}/c"))
    rows = (clips / "sed" / "labels.csv").read_text().splitlines()
    body = [f"{clips}/{r}" for r in rows[1:]]
    (d / "labels.csv").write_text("\n".join([rows[0]] + [r.replace("0.1,0.3", "5,9") for r in body]) + "\n")
    r = invoke("probe", ENCODER, d / "labels.csv")
    assert r.exit_code == 4 and "every event starts after the end of its file" in errors(r)[-1], r.output
    late = [r.replace("0.1,0.3", "5,9") if i < 2 else r for i, r in enumerate(body)]
    (d / "labels.csv").write_text("\n".join([rows[0]] + late) + "\n")
    r = invoke("probe", ENCODER, d / "labels.csv")
    assert r.exit_code == 0, r.output
    assert "2 of 12 events start after the end of their file" in r.stderr


def test_csv_rows_longer_than_their_header_are_refused(clips, tmp_path):
    """A comma inside an unquoted path shifts every column after it; trailing empty fields do not."""
    rows = (clips / "labels.csv").read_text().splitlines()
    shifted = tmp_path / "labels.csv"
    shifted.write_text("\n".join([rows[0], f"{clips}/a,b.wav,tone,train"] + [f"{clips}/{r}" for r in rows[2:]]) + "\n")
    with pytest.raises(ProbeError, match=r"labels.csv:2: a row of 4 fields where the header names 3"):
        read_labels(shifted)
    trailing = tmp_path / "trailing.csv"
    trailing.write_text("\n".join([rows[0]] + [f"{clips}/{r}," for r in rows[1:]]) + "\n")
    assert len(read_labels(trailing)) == 12
    tsv = tmp_path / "labels.tsv"  # a tab-separated file: the message quotes the row with its tabs
    tsv.write_text("\n".join(r.replace(",", "\t") for r in [rows[0], f"{clips}/a,b.wav,tone,train,x"]) + "\n")
    with pytest.raises(ProbeError, match="labels.tsv:2: a row of 5 fields where the header names 3 \\(.+\ttone\t"):
        read_labels(tsv)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path\n{clips}/c0.wav\n{clips}/a,b.wav\n")
    with pytest.raises(DataError, match="a row of 2 fields where the header names 1"):
        scan_entries([str(manifest)])
    manifest.write_text(f"path\n{clips}/c0.wav,\n")
    assert len(scan_entries([str(manifest)])) == 1


def test_a_batch_larger_than_the_machine_is_refused_before_anything_is_written(clips, tmp_path):
    r = invoke("pretrain", clips, "--preset", "tiny/byol-a", "--out", tmp_path / "run", "--batch-size",
               "1000000000", "-q")
    assert r.exit_code == 2, r.output
    lines = errors(r)
    assert len(lines) == 1 and lines[0].startswith("error: train.batch_size 1000000000: one batch of") \
        and "GB of audio alone, more than this machine's" in lines[0]
    assert not (tmp_path / "run").exists()


def test_import_and_plot_name_what_is_wrong(tmp_path):
    r = invoke("import", tmp_path / "nope.pth", "--out", tmp_path / "run")
    assert r.exit_code == 2 and errors(r) == [f"error: {tmp_path / 'nope.pth'}: no such file or folder"]
    log = tmp_path / "run" / "log.jsonl"
    log.parent.mkdir()
    log.write_text("{not json\n[1, 2]\n")  # lines, but no logged step: not "empty"
    r = invoke("plot", log.parent)
    assert r.exit_code == 2 and errors(r) == [f"error: {log} holds no JSON line with a step: no logged step to plot"]


def test_a_finished_run_run_again_rewrites_a_damaged_export(clips, tmp_path):
    """Nothing is left to train, but the export was cut (or deleted) after the run: it is written
    again from the verified checkpoint, tensor for tensor the same, with a warning."""
    from sslaudio.checkpoint import read_tensors

    args = ("pretrain", clips, "--preset", "tiny/byol-a", "--out", tmp_path / "run", "--steps", "1", "-q")
    assert invoke(*args).exit_code == 0
    export = tmp_path / "run" / "export" / "encoder.safetensors"
    before, meta = read_tensors(export)
    before = {k: v.clone() for k, v in before.items()}  # not views of the file about to be cut
    for damage in ("cut", "delete"):
        export.write_bytes(export.read_bytes()[:1000]) if damage == "cut" else export.unlink()
        r = invoke(*args)
        assert r.exit_code == 0, r.output
        assert "missing or damaged; written again from checkpoint step 1" in r.stderr
        after, meta_after = read_tensors(export)
        assert meta_after == meta and after.keys() == before.keys()
        assert [k for k in before if not after[k].equal(before[k])] == [], damage
    r = invoke(*args)  # an intact export is left alone
    assert r.exit_code == 0 and "written again" not in r.stderr


@pytest.mark.parametrize(("args", "want"), [(["--steps", "0"], "error: train.steps must be >= 1, found 0"),
                                            (["--preset", "nope"], "error: unknown preset 'nope'"),
                                            (["--device", "meta"], "error: --device 'meta': expected")])
def test_demo_checks_its_settings_before_making_the_toy_data(tmp_path, args, want):
    r = invoke("demo", "--out", tmp_path / "demo", *args)
    assert r.exit_code == 2 and len(errors(r)) == 1 and errors(r)[0].startswith(want), r.output
    assert not (tmp_path / "demo").exists()  # --steps 0 used to mean the preset's own steps


def test_a_fine_tuning_stopped_by_a_non_finite_loss_is_said_on_stderr(clips, tmp_path):
    """Its column holds the best epoch before the stop (here the frozen start): a warning says so,
    where before only the JSON's `stopped` did."""
    out = tmp_path / "r.json"
    r = invoke("probe", ENCODER, clips / "labels.csv", "--finetune", "--ft-lr", "1e30", "--ft-epochs", "3",
               "--json", out)
    assert r.exit_code == 0, r.output
    ft = json.loads(out.read_text())["finetune"]
    assert ft["stopped"].startswith("non-finite training loss in epoch")
    warned = [ln for ln in r.stderr.splitlines() if ln.startswith("warning: fine-tuning stopped")]
    assert len(warned) == 1 and ft["stopped"] in warned[0] and "the fine-tuned column is" in warned[0]
