"""Leaks in labels files: a row twice, a file in two splits, a file with two labels (probe.check_leakage,
read_events); classes the probe cannot learn (probe.check_classes); and that the probe reports them as
warning lines, never silently."""

import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from sslaudio.cli import app
from sslaudio.probe import (
    ProbeError,
    check_classes,
    check_leakage,
    read_events,
    read_labels,
    stratified_folds,
)


def labels(tmp_path, *rows: str):
    p = tmp_path / "labels.csv"
    p.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    return read_labels(p), p


def test_clean_file_has_no_warning(tmp_path):
    rows, p = labels(tmp_path, "a.wav,dog,train", "b.wav,cat,train", "c.wav,dog,test")
    assert check_leakage(rows, p) == (rows, [])


def test_a_test_row_copied_into_train_is_reported_and_kept(tmp_path):
    rows, p = labels(tmp_path, "a.wav,dog,train", "b.wav,cat,test", "b.wav,cat,train", "./c.wav,dog,test",
                     "c.wav,dog,valid")
    kept, warnings = check_leakage(rows, p)
    assert kept == rows  # kept as listed: the split is the user's call
    assert len(warnings) == 1
    assert "2 file(s) in more than one split" in warnings[0] and "b.wav: test at line 3, train at line 4" in warnings[0]


def test_duplicate_rows_are_dropped_with_a_count(tmp_path):
    rows, p = labels(tmp_path, "a.wav,dog,train", "a.wav,dog,train", "./a.wav,dog,train", "b.wav,cat,test")
    kept, warnings = check_leakage(rows, p)
    assert [r.line for r in kept] == [2, 5]
    assert warnings == [f"{p}: 2 duplicate row(s) (the same file, labels and split again): each file is probed once"]
    both, _ = labels(tmp_path, "a.wav,dog,train", "a.wav,dog,train", "a.wav,dog,test")
    assert len(check_leakage(both, p)[1]) == 2  # one line per kind


def test_a_file_with_two_labels_is_an_error(tmp_path):
    rows, p = labels(tmp_path, "a.wav,dog,train", "b.wav,cat,train", "a.wav,cat,test")
    with pytest.raises(ProbeError, match=r"a.wav has two labels, dog \(line 2\) and cat \(line 4\).*';'") as e:
        check_leakage(rows, p)
    assert "\n" not in str(e.value) and e.value.code == 2


def test_probe_command_warns_on_a_copied_test_row(labeled_dir, tmp_path):
    shutil.copytree(labeled_dir / "a", tmp_path / "a")
    lines = (labeled_dir / "labels.csv").read_text().splitlines()
    test_row = next(r for r in lines if r.endswith(",test"))
    (tmp_path / "labels.csv").write_text("\n".join(lines + [test_row.replace(",test", ",train"), lines[1]]) + "\n")
    r = CliRunner().invoke(app, ["probe", "random:tiny/byol-a", str(tmp_path / "labels.csv")])
    assert r.exit_code == 0, r.output
    warned = [ln for ln in r.output.splitlines() if ln.startswith("warning:")]
    assert len(warned) == 2 and "1 duplicate row(s)" in warned[0] and "1 file(s) in more than one split" in warned[1]
    assert "Traceback" not in r.output
    (tmp_path / "conflict.csv").write_text("\n".join(lines + [lines[1].replace(lines[1].split(",")[1], "other")]))
    r = CliRunner().invoke(app, ["probe", "random:tiny/byol-a", str(tmp_path / "conflict.csv")])
    assert r.exit_code == 2 and "error:" in r.output and "has two labels" in r.output and "Traceback" not in r.output


def test_sound_event_labels_report_repeats_and_two_splits(tmp_path):
    (tmp_path / "labels.csv").write_text("path,onset,offset,label,split\na.wav,0.1,0.5,x,train\n"
                                         "a.wav,0.1,0.5,x,train\na.wav,0.6,0.9,y,test\nb.wav,0.1,0.2,x,test\n")
    warnings: list[str] = []
    files = read_events(tmp_path / "labels.csv", warn=warnings.append)
    assert [(f.rel, f.split, f.events) for f in files] == [("a.wav", "train", [(0.1, 0.5, "x"), (0.6, 0.9, "y")]),
                                                         ("b.wav", "test", [(0.1, 0.2, "x")])]
    assert len(warnings) == 2
    assert "1 repeated event row(s)" in warnings[0] and "1 clip(s) given more than one split (e.g. a.wav: train, " \
        "then test" in warnings[1]
    (tmp_path / "files.csv").write_text("path,split\na.wav,train\nb.wav,test\na.wav,train\nb.wav,valid\n")
    warnings.clear()
    read_events(tmp_path / "labels.csv", tmp_path / "files.csv", warn=warnings.append)
    assert any("1 clip(s) listed more than once" in w for w in warnings)
    assert any("2 clip(s) given more than one split" in w for w in warnings)


def test_classes_the_probe_cannot_learn_are_named():
    # split column: 'cat' only in test, 'cow' only in valid; 'dog' is fine
    labels = [("dog",), ("dog",), ("cat",), ("cow",), ("dog",)]
    splits = ["train", "test", "test", "valid", "train"]
    (w,) = check_classes(labels, splits, "l.csv")
    assert w == "l.csv: 2 class(es) with valid/test files but none in train, which the probe cannot predict: " \
        "'cat', 'cow'"
    assert check_classes(labels, ["train"] * 5, "l.csv") == []
    # cross-validation: one or two files (multi-label rows count for each of their labels)
    cv = [("a",)] * 5 + [("b",)] * 2 + [("a", "c")]
    (w,) = check_classes(cv, [None] * len(cv), "l.csv")
    assert "2 class(es) with one or two files" in w and w.endswith("'b' (2), 'c' (1)")
    assert check_classes([("a",)] * 5 + [("b",)] * 3, [None] * 8, "l.csv") == []
    # sound event detection (random folds over clips; a clip may hold no event): one clip only
    (w,) = check_classes([("a", "b")] * 4 + [()] + [("c",)], [None] * 6, "e.csv", min_files=2)
    assert "1 class(es) with one file" in w and w.endswith("'c' (1)")
    many = [(f"k{i}",) for i in range(8)] + [("a",)] * 5
    assert check_classes(many, [None] * len(many), "l.csv")[0].endswith("'k4' (1) and 3 more")


def test_two_files_of_a_class_are_never_trained_on_by_the_folds_three_are():
    """The fact check_classes' cross-validation warning rests on, read off evaluate's own folds."""
    for n, trained in ((1, False), (2, False), (3, True)):
        y = np.array([0] * 20 + [1] * n)
        folds = stratified_folds(y, 5, 0)
        tested_untrained = []
        for k in range(5):
            rest = np.concatenate([folds[j] for j in range(5) if j != k])
            inner = stratified_folds(y[rest], 5, k)[0]
            if (y[folds[k]] == 1).any():
                tested_untrained.append(not (y[np.delete(rest, inner)] == 1).any())
        assert tested_untrained and all(tested_untrained) != trained and any(tested_untrained) != trained


def test_probe_command_warns_on_a_class_missing_from_train(labeled_dir, tmp_path):
    shutil.copytree(labeled_dir / "a", tmp_path / "a")
    lines = (labeled_dir / "labels.csv").read_text().splitlines()
    gone = lines[1].split(",")[1]  # the first class loses its train rows
    kept = [r for r in lines if not r.endswith(f",{gone},train")]
    (tmp_path / "labels.csv").write_text("\n".join(kept) + "\n")
    r = CliRunner().invoke(app, ["probe", "random:tiny/byol-a", str(tmp_path / "labels.csv")])
    assert r.exit_code == 0, r.output
    warned = [ln for ln in r.output.splitlines() if ln.startswith("warning:")]
    assert len(warned) == 1 and "1 class(es) with valid/test files but none in train" in warned[0] \
        and repr(gone) in warned[0]
