"""Sound event detection probe: the frame targets' coverage rule, grid pooling, the labels files,
and an end-to-end CLI probe on synthetic strongly-labelled clips."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from sslaudio.cli import app
from sslaudio.probe import ProbeError, frame_targets, is_event_csv, read_events, to_grid
from sslaudio.synth import SR
from tests.conftest import write_wav


def test_frame_targets_follow_the_half_coverage_rule():
    cidx = {"a": 0, "b": 1}
    # frames of 0.1 s: a covers 0.05 s of frame 0 (positive: exactly half), 0.04 s of frame 3
    ev = [(0.05, 0.26, "a"), (0.26, 0.34, "a"), (0.0, 0.04, "b"), (0.5, 0.56, "b"), (0.53, 0.6, "b")]
    y = frame_targets(ev, 7, 0.1, cidx)
    # a: union [0.05, 0.34] -> frame 0 covered 0.05 (yes), 1 and 2 fully, 3 covered 0.04 (no)
    assert y[:, 0].tolist() == [1, 1, 1, 0, 0, 0, 0]
    # b: [0, 0.04] no; union [0.5, 0.6] covers frame 5 fully (overlapping events merged, not double counted)
    assert y[:, 1].tolist() == [0, 0, 0, 0, 0, 1, 0]
    y2 = frame_targets([(0.5, 0.53, "b"), (0.5, 0.53, "b")], 7, 0.1, cidx)
    assert y2[5, 1] == 0  # the same 30 ms twice is still 30 ms


def test_to_grid_means_frames_inside_and_takes_the_nearest_otherwise():
    frames = np.arange(6, dtype=float)[:, None] * np.ones((1, 2))
    fine = to_grid(frames, (np.arange(6) + 0.5) * 0.05, 0.3, 0.1)  # 50 ms frames -> 100 ms grid
    assert fine[:, 0].tolist() == [0.5, 2.5, 4.5]
    coarse = to_grid(frames[:2], np.array([0.08, 0.24]), 0.3, 0.1)  # 160 ms frames: nearest centre
    assert coarse[:, 0].tolist() == [0.0, 0.0, 1.0]


def test_read_events_uses_files_csv_and_checks_rows(tmp_path):
    (tmp_path / "labels.csv").write_text("path,onset,offset,label,split\na.wav,0.1,0.5,x,train\n")
    (tmp_path / "files.csv").write_text("path,split\na.wav,train\nb.wav,test\n")
    assert is_event_csv(tmp_path / "labels.csv") and not is_event_csv(tmp_path / "files.csv")
    files = read_events(tmp_path / "labels.csv")
    assert [(f.rel, f.split, f.events) for f in files] == [("a.wav", "train", [(0.1, 0.5, "x")]), ("b.wav", "test", [])]
    (tmp_path / "bad.csv").write_text("path,onset,offset,label\na.wav,0.5,0.1,x\n")
    with pytest.raises(ProbeError, match="onset < offset"):
        read_events(tmp_path / "bad.csv", tmp_path / "files.csv")
    (tmp_path / "other.csv").write_text("path,onset,offset,label\nc.wav,0.1,0.2,x\n")
    with pytest.raises(ProbeError, match="not in"):
        read_events(tmp_path / "other.csv", tmp_path / "files.csv")


@pytest.fixture(scope="module")
def sed_dir(tmp_path_factory):
    """24 clips of 2 s over faint noise: a 300 Hz tone ('low') and a 3 kHz tone ('high'), each
    0.6 s long at a random onset; frames outside both are silent."""
    root = tmp_path_factory.mktemp("sed")
    rows, files = ["path,onset,offset,label,split"], ["path,split"]
    rng = np.random.default_rng(0)
    t = np.arange(2 * SR) / SR
    for i in range(24):
        split = "train" if i < 14 else "valid" if i < 18 else "test"
        x = 0.003 * rng.standard_normal(t.size)
        for label, f in (("low", 300.0), ("high", 3000.0)):
            on = round(float(rng.uniform(0, 1.4)), 2)
            x += 0.3 * np.sin(2 * np.pi * f * t) * ((t >= on) & (t < on + 0.6))
            rows.append(f"{i:02d}.wav,{on},{on + 0.6:.2f},{label},{split}")
        write_wav(root / f"{i:02d}.wav", x.astype(np.float32))
        files.append(f"{i:02d}.wav,{split}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    (root / "files.csv").write_text("\n".join(files) + "\n")
    return root


def test_cli_sed_probe_detects_events(sed_dir, tmp_path):
    out = tmp_path / "sed.json"
    r = CliRunner().invoke(app, ["probe", "random:tiny/byol-a", str(sed_dir / "labels.csv"), "--json", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["task"] == "sound_event_detection" and res["n_classes"] == 2 and res["n_files"] == 24
    assert res["frames_train"] == 14 * 20  # 2 s at 100 ms per clip
    # each class is on in 30 % of frames: predicting "on" everywhere gives micro-F1 0.46; a random-init
    # CNN on log-mel tells a low tone from a high one from silence frame by frame
    assert res["f1"] > 0.75 and res["map"] > 0.75, res
    assert 0 <= res["f1_macro"] <= 1 and res["protocol"] == "train/valid/test"
