"""Sound event detection probe: the frame targets' coverage rule, grid pooling, the labels files,
the DCASE segment- and event-based F1 and the median filter against hand-worked examples, and
end-to-end CLI probes (frozen, and fine-tuned beside it) on synthetic strongly-labelled clips."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from sslaudio.cli import app
from sslaudio.probe import (
    ProbeError,
    decode_events,
    event_based,
    frame_targets,
    grid_matrix,
    is_event_csv,
    median_filter,
    pick_median_windows,
    read_events,
    segment_based,
    to_grid,
)
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


def test_grid_matrix_averages_and_grids_stay_float32():
    rng = np.random.default_rng(0)
    for times, seconds in (((np.arange(23) + 0.5) * 0.045, 1.04), (np.array([0.08, 0.24, 0.4]), 0.5)):
        A = grid_matrix(times, seconds, 0.1)
        assert A.shape == (int(seconds / 0.1), len(times)) and (A >= 0).all() and np.allclose(A.sum(1), 1)
        frames = rng.normal(size=(len(times), 3))  # float64 in, float32 out: the probe's memory
        g = to_grid(frames, times, seconds, 0.1)
        assert g.dtype == np.float32 and np.allclose(g, A.astype(np.float64) @ frames, atol=1e-5)


# Two classes, a (0) and b (1); one 4 s file, so four 1 s segments [0,1) [1,2) [2,3) [3,4).
SEG_REF = [(0.5, 2.2, 0), (3.1, 3.6, 1)]
SEG_EST = [(0.4, 1.0, 0), (2.5, 2.8, 0),  # a's event found split in two, its middle missed
           (1.2, 1.5, 1), (3.0, 3.9, 1)]  # b: one false alarm, one hit


def test_segment_based_f1_by_hand():
    # sed_eval's event roll: an event is active in segments floor(onset) .. ceil(offset) - 1.
    #   reference  a: (0.5, 2.2) -> 0 1 2           b: (3.1, 3.6) -> 3
    #   estimated  a: (0.4, 1.0) -> 0, (2.5, 2.8) -> 2   (offset 1.0 ends at the boundary: not segment 1)
    #              b: (1.2, 1.5) -> 1, (3.0, 3.9) -> 3
    # a: tp 2 (segments 0, 2), ref 3, sys 2 -> F = 4 / 5 = 0.8
    # b: tp 1 (segment 3),     ref 1, sys 2 -> F = 2 / 3
    # micro: tp 3, ref 4, sys 4 -> F = 6 / 8 = 0.75; macro (0.8 + 2/3) / 2
    # error rate, per segment: 1 (ref a, sys b) is one substitution; the others are correct -> 1 / 4
    r = segment_based([SEG_REF], [SEG_EST], [4.0], 2)
    assert r["f1"] == pytest.approx(0.75)
    assert r["f1_macro"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert r["error_rate"] == pytest.approx(0.25)
    # a second, empty file of 3 s: a false alarm of a in its segment 1 adds one sys (and one insertion)
    r2 = segment_based([SEG_REF, []], [SEG_EST, [(1.1, 1.9, 0)]], [4.0, 3.0], 2)
    # a: tp 2, ref 3, sys 3 -> 2/3; micro: tp 3, ref 4, sys 5 -> 6/9; ER (1 + 1) / 4
    assert r2["f1"] == pytest.approx(6 / 9) and r2["f1_macro"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert r2["error_rate"] == pytest.approx(0.5)


def test_event_based_f1_by_hand():
    ref = [(1.0, 3.0, 0),  # a, 2 s long: offset collar max(0.2, 20 % of 2 s) = 0.4 s
           (5.0, 5.5, 0),  # a, 0.5 s long: offset collar max(0.2, 0.1) = 0.2 s
           (2.0, 4.0, 1)]  # b, 2 s long: offset collar 0.4 s
    est = [(1.15, 2.7, 0),  # onset off by 0.15 <= 0.2, offset by 0.3 <= 0.4: a hit (0.3 fails a plain 200 ms)
           (5.3, 5.5, 0),  # onset off by 0.3 > 0.2: a false alarm, and (5.0, 5.5) is missed
           (2.1, 3.0, 1), (3.0, 4.0, 1)]  # b split in two: offset off by 1.0, onset off by 1.0: neither hits
    # a: tp 1, ref 2, sys 2 -> F = 2 / 4 = 0.5;  b: tp 0, ref 1, sys 2 -> F = 0
    # micro: tp 1, ref 3, sys 4 -> F = 2 / 7; macro (0.5 + 0) / 2
    r = event_based([ref], [est], 2)
    assert r["f1"] == pytest.approx(2 / 7) and r["f1_macro"] == pytest.approx(0.25)
    # the collars are inclusive: onset 1.2 (0.2 late) and offset 3.4 (0.4 late) still hit
    assert event_based([ref[:1]], [[(1.2, 3.4, 0)]], 2)["f1"] == pytest.approx(1.0)
    # a label mismatch never hits; a class with neither reference nor estimated events scores 0 in the macro
    assert event_based([ref[:1]], [[(1.0, 3.0, 1)]], 3) == {"f1": 0.0, "f1_macro": 0.0}


def test_event_based_uses_the_maximum_matching():
    # two overlapping references of one class; est 0 is within the collars of both, est 1 of the first only.
    # Greedy in reference order pairs ref 0 with est 0 and leaves ref 1 unmatched (tp 1); the maximum
    # matching (sed_eval's 'optimal') pairs ref 0 - est 1 and ref 1 - est 0: tp 2, F = 1
    ref = [(0.0, 1.0, 0), (0.3, 1.0, 0)]
    est = [(0.15, 1.0, 0), (0.0, 1.0, 0)]
    assert event_based([ref], [est], 1)["f1"] == pytest.approx(1.0)


def test_median_filter_per_class_and_event_decoding():
    s = np.array([[0, 1, 0, 0, 1, 1, 1], [0, 1, 0, 0, 1, 1, 1]], dtype=float).T  # (T=7, C=2)
    # class 0, window 3, edges mirrored (0 | 0 1 0 0 1 1 1 | 1): medians 0 0 0 0 1 1 1 (the lone 1 goes)
    # class 1, window 1: unchanged
    f = median_filter(s, [3, 1])
    assert f[:, 0].tolist() == [0, 0, 0, 0, 1, 1, 1] and f[:, 1].tolist() == s[:, 1].tolist()
    # window 5 fills a one-frame gap: 1 1 0 1 1 -> all ones
    assert median_filter(np.array([[1, 1, 0, 1, 1]], dtype=float).T, 5)[:, 0].tolist() == [1] * 5
    with pytest.raises(ProbeError, match="odd"):
        median_filter(s, 4)
    # runs of active 100 ms frames -> events [k hop, (k + n) hop), by class then onset
    ev = decode_events(f >= 0.5, 0.1)
    assert [(round(a, 6), round(b, 6), c) for a, b, c in ev] == [(0.4, 0.7, 0), (0.1, 0.2, 1), (0.4, 0.7, 1)]


def test_median_window_picked_on_valid_per_class():
    # class 0 flickers off for one frame inside its event: window 3 joins the two halves into the
    # reference event (0.0, 0.9); class 1's short event (0.3, 0.4) is wiped out by any filter
    p = np.zeros((9, 2))
    p[:, 0] = [1, 1, 1, 1, 0, 1, 1, 1, 1]
    p[3, 1] = 1
    refs = [[(0.0, 0.9, 0), (0.3, 0.4, 1)]]
    assert pick_median_windows([p], refs, 0.5, 0.1, 2).tolist() == [3, 1]


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


def test_cli_sed_finetune_reports_beside_the_frozen_probe(sed_dir, tmp_path):
    out = tmp_path / "ft.json"
    r = CliRunner().invoke(app, ["probe", "random:tiny/byol-a", str(sed_dir / "labels.csv"), "--json", str(out),
                                 "--finetune", "--rnn-head", "--ft-epochs", "2", "--ft-patience", "2"])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    ft = res["finetune"]
    for key in ("f1", "f1_macro", "map", "segment_f1", "segment_f1_macro", "event_f1", "event_f1_macro"):
        assert 0 <= res[key] <= 1 and 0 <= ft[key] <= 1, key  # the same names, frozen and fine-tuned
    assert res["f1"] > 0.75 and ft["f1"] > 0.75 and ft["event_f1"] > 0.5, ft
    assert ft["head"] == "linear+bigru" and ft["epochs_run"] <= 2 and len(ft["valid_history"]) == ft["epochs_run"] + 1
    assert len(ft["median_windows"]) == 2 and "fine-tuned" in r.output


def test_sed_probe_and_finetune_on_a_weighted_sum_of_layers(sed_dir, tmp_path):
    """--layer weighted on frames: the SED probe learns the layer weights with its head, and
    fine-tuning starts from that fit (its head on every layer's frames side by side)."""
    out = tmp_path / "w.json"
    r = CliRunner().invoke(app, ["probe", "random:tiny/apc", str(sed_dir / "labels.csv"), "--layer", "weighted",
                                 "--json", str(out), "--finetune", "--ft-epochs", "1", "--ft-patience", "1"])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["dim"] == 3 * 128 and len(res["layer_weights"]) == 3 and abs(sum(res["layer_weights"]) - 1) < 1e-2
    assert res["f1"] > 0.75 and 0 <= res["finetune"]["f1"] <= 1, res


def test_cli_sed_probe_warns_on_an_event_class_missing_from_train(sed_dir, tmp_path):
    labels = tmp_path / "labels.csv"  # elsewhere, so its rows name sed_dir's clips by absolute path
    rows = (sed_dir / "labels.csv").read_text().splitlines()
    rows = [rows[0]] + [f"{sed_dir}/{r}" for r in rows[1:]] + [f"{sed_dir}/20.wav,0.1,0.5,mid,test"]
    labels.write_text("\n".join(rows) + "\n")
    r = CliRunner().invoke(app, ["probe", "random:tiny/byol-a", str(labels)])
    assert r.exit_code == 0, r.output
    warned = [ln for ln in r.output.splitlines() if ln.startswith("warning:")]
    assert len(warned) == 1 and "1 class(es) with valid/test files but none in train" in warned[0] \
        and "'mid'" in warned[0]
