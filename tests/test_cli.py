"""The four subcommands end to end on tiny generated audio, and the exit codes."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file
from typer.testing import CliRunner

from sslaudio import __version__
from sslaudio.cli import app

runner = CliRunner()
SMALL = ["--set", "encoder.d=64", "--set", "encoder.base_d=8", "--set", "method.proj_hidden=32",
         "--set", "method.proj_dim=16", "--set", "data.num_workers=0", "--set", "data.norm_samples=8"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, labeled_dir):
    run = tmp_path_factory.mktemp("cli") / "run"
    r = invoke("pretrain", labeled_dir, "--preset", "tiny/byol-a", "--out", run, "--steps", 3, "--batch-size", 4,
               "--quiet", *SMALL)
    assert r.exit_code == 0, r.output
    return run


def test_version_and_presets():
    r = invoke("--version")
    assert r.exit_code == 0 and __version__ in r.output
    r = invoke("presets")
    assert r.exit_code == 0 and "tiny/byol-a" in r.output and "audiontt" in r.output


def test_pretrain_outputs(run_dir):
    rows = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and np.isfinite(rows[-1]["loss"])
    assert (run_dir / "ckpt" / "step-000000003" / "model.safetensors").is_file()


def test_extract_safetensors_with_frames(run_dir, labeled_dir, tmp_path):
    out = tmp_path / "feats"
    r = invoke("extract", run_dir, labeled_dir, "--out", out, "--frames")
    assert r.exit_code == 0, r.output
    f = load_file(str(out / "a" / "000.wav.safetensors"))
    assert f["clip"].shape == (64,) and f["frames"].shape[1] == 64 and f["timestamps"].shape == (f["frames"].shape[0],)
    assert np.all(np.diff(f["timestamps"]) > 0)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["written"] == 44 and summary["skipped"] == 0
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 44


def test_extract_npy_and_stdout(run_dir, labeled_dir, tmp_path):
    r = invoke("extract", run_dir, labeled_dir / "a" / "000.wav", "--out", tmp_path / "n", "--format", "npy")
    assert r.exit_code == 0 and np.load(tmp_path / "n" / "000.wav.npy").shape == (64,)
    r = invoke("extract", run_dir, labeled_dir / "a" / "000.wav", labeled_dir / "a" / "001.wav", "--out", "-")
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert r.exit_code == 0 and len(lines) == 2 and len(lines[0]["clip"]) == 64


def test_extract_skips_bad_files_and_counts(run_dir, bad_dir, tmp_path):
    r = invoke("extract", run_dir, bad_dir, "--out", tmp_path / "f")
    assert r.exit_code == 0
    s = json.loads((tmp_path / "f" / "summary.json").read_text())
    assert s["written"] == 2 and s["skipped"] == 4  # the 100-sample file is shorter than the encoder needs
    errors = [json.loads(x) for x in (tmp_path / "f" / "errors.jsonl").read_text().splitlines()]
    assert {e["path"].split("/")[-1] for e in errors} == {"empty.wav", "corrupt.wav", "nan.wav", "short.wav"}


def test_probe_json_and_random_baseline(run_dir, labeled_dir, tmp_path):
    for ckpt in (run_dir, "random:tiny/byol-a"):
        out = tmp_path / "p.json"
        r = invoke("probe", ckpt, labeled_dir / "labels.csv", "--json", out)
        assert r.exit_code == 0, r.output
        res = json.loads(out.read_text())
        assert 0 <= res["accuracy"] <= 1 and 0 <= res["f1"] <= 1 and res["protocol"] == "train/valid/test"
        assert res["n_files"] == 44


def test_probe_json_to_stdout_for_a_pipe(labeled_dir, tmp_path, monkeypatch):
    """`--json -`: stdout carries the JSON alone (`| jq .accuracy` works), the table goes to
    stderr, and no file named '-' is written."""
    monkeypatch.chdir(tmp_path)
    r = invoke("probe", "random:tiny/byol-a", labeled_dir / "labels.csv", "--json", "-")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert 0 <= res["accuracy"] <= 1 and res["n_files"] == 44
    assert "probe: random:tiny/byol-a" in r.stderr and "accuracy" in r.stderr
    assert not (tmp_path / "-").exists()


def test_export_torchscript_and_onnx(run_dir, tmp_path):
    import torch

    r = invoke("export", run_dir, "--format", "torchscript", "--out", tmp_path / "m.pt")
    assert r.exit_code == 0, r.output
    m = torch.jit.load(str(tmp_path / "m.pt"))
    assert m(torch.randn(2, 16000) * 0.1).shape == (2, 64)
    assert m((torch.randn(1, 8000) * 3000).to(torch.int16)).shape == (1, 64)
    pytest.importorskip("onnxruntime")
    r = invoke("export", run_dir, "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert r.exit_code == 0, r.output
    assert "max_abs_diff" in r.output


@pytest.mark.parametrize("args, code, text", [
    (["pretrain", ".", "--preset", "tiny/byol-a", "--out", "x", "--set", "train.stpes=3"], 2, "train.stpes"),
    (["pretrain", ".", "--preset", "nope", "--out", "x"], 2, "unknown preset"),
    (["extract", "nowhere/run", ".", "--out", "x"], 2, "not a run folder"),
    (["export", "random:tiny/byol-a", "--format", "gif", "--out", "x"], 2, "unknown format"),
    (["probe", "random:tiny/byol-a", "missing.csv"], 2, "no such labels file"),
])
def test_usage_errors_are_one_line(args, code, text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = invoke(*args)
    assert r.exit_code == code and text in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


def test_extract_onto_an_existing_file_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "feats").write_text("not a folder")
    r = invoke("extract", "random:tiny/byol-a", ".", "--out", "feats")
    assert r.exit_code == 2 and r.output.strip() == "error: --out feats: is a file; give a folder (or - for JSON " \
        "lines on stdout)"
    assert (tmp_path / "feats").read_text() == "not a folder"


@pytest.mark.parametrize("args, kind", [
    (["pretrain", ".", "--preset", "tiny/byol-a", "--out", "{file}"], "folder"),
    (["pretrain", ".", "--preset", "tiny/byol-a", "--out", "r", "--cache", "{file}"], "folder"),
    (["import", "w.safetensors", "--out", "{file}"], "folder"),
    (["probe", "random:tiny/byol-a", "labels.csv", "--json", "{folder}"], "file"),
    (["probe", "random:tiny/byol-a", "labels.csv", "--finetune", "--save", "{file}"], "folder"),
    (["probe", "random:tiny/byol-a", "--suite", "s.yaml", "--cache", "{file}"], "folder"),
    (["plot", "run", "--out", "{folder}"], "file"),
])
def test_an_output_option_onto_the_wrong_kind_of_path_names_the_option(args, kind, tmp_path, monkeypatch):
    """Every option that names something to write: a file where a folder goes (or the reverse) is
    one line naming the option, refused before any work, and what is there is left as it was."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("keep")
    (tmp_path / "dir").mkdir()
    args = [a.format(file="taken", folder="dir") for a in args]
    option = args[args.index("taken" if kind == "folder" else "dir") - 1]
    r = invoke(*args)
    want = "is a file; give a folder" if kind == "folder" else "is a folder; give a file name"
    assert r.exit_code == 2 and r.output.strip() == f"error: {option} {'taken' if kind == 'folder' else 'dir'}: {want}"
    assert (tmp_path / "taken").read_text() == "keep" and not any((tmp_path / "dir").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "taken"]


def test_no_usable_input_exits_4(bad_dir, tmp_path):
    for f in bad_dir.glob("good*"):
        f.unlink()
    r = invoke("pretrain", bad_dir, "--preset", "tiny/byol-a", "--out", tmp_path / "r", "--quiet", *SMALL)
    assert r.exit_code == 4 and "no usable audio" in r.output
    (bad_dir / "short.wav").unlink()  # too short to train on or to extract
    r = invoke("extract", "random:tiny/byol-a", bad_dir, "--out", tmp_path / "f")
    assert r.exit_code == 4 and "no usable audio" in r.output


def test_probe_and_extract_an_intermediate_layer(labeled_dir, tmp_path):
    out = tmp_path / "p.json"
    r = invoke("probe", "random:tiny/m2d", labeled_dir / "labels.csv", "--layer", "1", "--json", out)
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["layer"] == 1
    r = invoke("extract", "random:tiny/m2d", labeled_dir / "a" / "000.wav", "--out", tmp_path / "f", "--layer", "-2")
    assert r.exit_code == 0, r.output
    r = invoke("probe", "random:tiny/m2d", labeled_dir / "labels.csv", "--layer", "9")
    assert r.exit_code == 2 and "has 5 layer(s)" in r.output  # the blocks' input and 4 blocks
    r = invoke("probe", "random:tiny/m2d", labeled_dir / "labels.csv", "--layer", "top")
    assert r.exit_code == 2 and "--layer must be a layer index" in r.output and "Traceback" not in r.output
    r = invoke("probe", "random:tiny/m2d", labeled_dir / "labels.csv", "--layer", "all", "--json", out)
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["layer"] == "all" and res["dim"] == 5 * 128 * 5  # the blocks' input and 4 blocks, of 5 frequency patches x 128


def test_probe_a_weighted_sum_of_every_layer(labeled_dir, tmp_path):
    """--layer weighted: SUPERB's learned softmax weights over every layer, reported beside the
    metrics; encoders without several layers of one width, and extract, refuse it in one line."""
    out = tmp_path / "w.json"
    r = invoke("probe", "random:tiny/m2d", labeled_dir / "labels.csv", "--layer", "weighted", "--json", out)
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["layer"] == "weighted" and res["dim"] == 5 * 128 * 5 and 0 <= res["accuracy"] <= 1
    assert len(res["layer_weights"]) == 5 and abs(sum(res["layer_weights"]) - 1) < 1e-2
    assert "layer_weights" in r.output
    r = invoke("probe", "random:tiny/byol-a", labeled_dir / "labels.csv", "--layer", "weighted")
    assert r.exit_code == 2 and "two or more layers of one width" in r.output and "Traceback" not in r.output
    r = invoke("extract", "random:tiny/m2d", labeled_dir / "a" / "000.wav", "--out", tmp_path / "f", "--layer",
               "weighted")
    assert r.exit_code == 2 and "--layer must be a layer index (-1 the last) or 'all'" in r.output


def test_progress_lines_when_stderr_is_not_a_terminal(capsys):
    from sslaudio.cli import _Progress

    row = {"loss": 1.5, "steps_per_s": 2.0, "audio_h_per_s": 0.01, "data_wait": 0.25}
    for enabled in (True, False):  # False: --quiet
        with _Progress(enabled) as bar:
            bar(2, 10, None)
            bar(4, 10, row)
            bar(10, 10, row)
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["step 4/10  loss 1.5000  2.00 step/s  0.010 audio-h/s  data 25%  eta 0.1 min",
                     "step 10/10  loss 1.5000  2.00 step/s  0.010 audio-h/s  data 25%  eta 0.0 min"]


def test_error_messages_keep_square_brackets(tmp_path):
    """An error naming an extra like `pip install 'sslaudio[export]'` prints its brackets (rich markup
    would swallow them)."""
    from typer.testing import CliRunner

    from sslaudio.cli import app

    r = CliRunner().invoke(app, ["pretrain", str(tmp_path), "--preset", "tiny/byol-a", "--out", str(tmp_path / "r"),
                                 "--set", "views[x].ratio=1"])
    assert r.exit_code == 2
    assert "views[x]" in r.output, r.output  # "[x]" is a rich markup tag unless escaped



def test_option_help_texts_survive_rich_markup():
    """The CLI renders help with rich markup, where "[default: 10]" is a style tag and disappears:
    every argument's and option's help must print as written, every option has one, and the command
    docstrings print as paragraphs, not with the source's line breaks."""
    import typer.main
    from rich.text import Text

    group = typer.main.get_command(app)
    seen = 0
    for name, command in group.commands.items():
        for param in [*command.params, command]:  # each option and argument, and the command's own text
            for text in (getattr(param, "help", None), getattr(param, "epilog", None)):
                if text and Text.from_markup(text).plain != text:
                    raise AssertionError(f"{name} {param.name}: rich eats part of {text!r}")
            if getattr(param, "help", None) is None:
                assert param.name == "help" or param.param_type_name != "option", \
                    f"{name} {param.opts}: an option without a help text"
                continue
            seen += 1
    assert seen > 40  # every command's options were read
    r = CliRunner().invoke(app, ["probe", "--help"], env={"COLUMNS": "200"})  # rich reads the width from COLUMNS
    assert "many epochs (default: 10)." in r.output
    # the command docstrings reflow: at 200 columns no sentence breaks where the source line did
    assert "a frame-level linear probe on frame embeddings" in r.output
    r = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert "mirroring the input tree (several inputs: each folder" in r.output


def test_demo_runs_all_five_stages_on_a_small_toy_set(tmp_path, monkeypatch):
    """`sslaudio demo` end to end (toy data, pretraining, extraction, both probes, export) on a
    smaller toy set than the default (2/1/1 clips per class, 8 unlabeled) and 2 steps of tiny/apc."""
    from sslaudio import synth

    full = synth.make_dataset
    monkeypatch.setattr(synth, "make_dataset", lambda out: full(out, per_class=(2, 1, 1), unlabeled=8))
    out = tmp_path / "demo"
    r = invoke("demo", "--out", out, "--preset", "tiny/apc", "--steps", 2, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "pretrained" in r.stdout and "random init" in r.stdout
    res = json.loads((out / "demo_results.json").read_text())
    n_labeled = 4 * len(synth.CLASSES)
    for name in ("pretrained", "random"):
        assert 0.0 <= res[name]["accuracy"] <= 1.0 and res[name]["skipped"] == 0
    assert res["export"]["max_abs_diff"] < 1e-4 and (out / "encoder.torchscript.pt").is_file()
    rows = [json.loads(x) for x in (out / "run" / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and np.isfinite(rows[-1]["loss"])
    assert json.loads((out / "features" / "summary.json").read_text())["written"] == n_labeled
