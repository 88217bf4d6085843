"""Run the CLI's everyday commands on bad options, labels, suites and checkpoints, and report every
case that ends in anything but a clean exit or short `error:` / `warning:` lines on stderr.

The audio side (corrupt, truncated, non-finite, unreadable files) is held by tests/test_bad_inputs.py;
this script covers what the user types around the audio: number options of extract, probe (linear,
SED, fine-tuning), export and pretrain set to 0, -1, NaN, infinity or a huge value; option strings
that name nothing; label CSVs and suite YAMLs with missing columns, one class, unknown splits,
missing files, bad event times; checkpoints that are empty, text, another kind of file or a random:
preset that does not exist. Each case runs in this process through typer's test runner with a time
limit, in a scratch folder that is also the working directory (so a stray write lands there). A
case passes when it exits 0, or exits non-zero with stderr made of `error:` / `warning:` lines (the
documented one-line refusal, after any skip warnings) or click's own usage box; the table lists the
rest (TRACE: an exception reached the user; LONG: other lines on stderr; SILENT: a failure with
nothing said; HANG: past the time limit; STRAY: files written into the working directory). Run
folders damaged after training (a cut export or checkpoint, junk config.yaml or state.json) go
through extract, probe, export and a rerun of pretrain; import, plot, presets and demo get their
own bad values. 235 cases, 21 s on the 2-core CPU with nothing else running; the thirty-ninth session's fixes (devices, empty paths, NUL bytes,
infinite SED times, shifted CSV rows, oversized batches, a damaged export of a finished run, the
demo's order of checks) were found this way, and after them the table is empty (2026-12-07).
Cases that pass can still deserve a look: `--show` prints every exit code and stderr line.

    python benchmarks/cli_fuzz.py                 # every case
    python benchmarks/cli_fuzz.py probe export    # the cases whose name starts with one of these
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
from typer.testing import CliRunner

from sslaudio.cli import app

SR = 16000
CNN = "random:tiny/byol-a-v2"
VIT = "random:tiny/m2d"
BAD_FLOATS = ["0", "-1", "nan", "inf", "1e30"]
BAD_INTS = ["0", "-1", "1000000000"]


class Hang(Exception):
    pass


def write_fixtures(root: Path) -> dict[str, Path]:
    """Twelve 0.5 s clips of two classes (tones, noise), a clip labels CSV with splits, an SED labels
    CSV with files.csv, a suite YAML; returns name -> path."""
    rng = np.random.default_rng(0)
    audio = root / "audio"
    audio.mkdir(parents=True)
    t = np.arange(int(0.5 * SR)) / SR
    rows, files, events = [], [], []
    for i in range(12):
        kind = "tone" if i % 2 == 0 else "noise"
        x = (0.3 * np.sin(2 * np.pi * (300 + 40 * i) * t) if kind == "tone"
             else 0.1 * rng.standard_normal(len(t))).astype(np.float32)
        p = audio / f"clip{i}.wav"
        sf.write(p, x, SR)
        split = ["train", "train", "valid", "test"][i % 4] if i < 8 else "train"
        rows.append(f"{p},{kind},{split}")
        files.append(f"{p},{split}")
        events.append(f"{p},0.1,0.3,{kind}")
    f: dict[str, Path] = {"audio": audio}
    f["labels"] = root / "labels.csv"
    f["labels"].write_text("path,label,split\n" + "\n".join(rows) + "\n")
    f["sed"] = root / "sed" / "labels.csv"
    f["sed"].parent.mkdir()
    f["sed"].write_text("path,onset,offset,label\n" + "\n".join(events) + "\n")
    (root / "sed" / "files.csv").write_text("path,split\n" + "\n".join(files) + "\n")
    f["suite"] = root / "suite.yaml"
    f["suite"].write_text(f"tasks:\n  - name: kinds\n    labels: {f['labels']}\n")
    (root / "emptydir").mkdir()
    r = CliRunner().invoke(app, ["pretrain", str(audio), "--preset", "tiny/byol-a-v2", "-q", "--steps", "1",
                                 "--out", str(root / "run")])
    assert r.exit_code == 0, r.output
    f["run"] = root / "run"
    (root / "run_nockpt" / "ckpt").mkdir(parents=True)
    f["root"] = root
    return f


def text(root: Path, name: str, body: str) -> str:
    p = root / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(body)
    return str(p)


def cases(f: dict[str, Path]):
    """(name, argv, stdin) for every case."""
    root, audio, labels, sed, suite = f["root"], f["audio"], f["labels"], f["sed"], f["suite"]
    one = str(audio / "clip0.wav")
    body = labels.read_text().splitlines()[1:]
    out = lambda name: str(root / "out" / name)  # noqa: E731
    head = "path,label,split\n"

    def relabel(old: str, new: str) -> str:  # the label column only, never the path
        return head + "\n".join(",".join([r.split(",")[0], r.split(",")[1].replace(old, new), r.split(",")[2]])
                                for r in body) + "\n"

    # extract
    ex = ["extract", CNN, str(audio)]
    for v in BAD_FLOATS + ["1e-9"]:
        yield f"extract --batch-seconds {v}", ex + ["--out", out(f"bs{v}"), "--batch-seconds", v], None
    yield "extract --workers 64", ex + ["--out", out("w64"), "--workers", "64"], None
    for v in ["99", "-99", "x", "1.5", "", "weighted", "all"]:
        yield f"extract --layer {v!r}", ex + ["--out", out(f"l{v}"), "--layer", v], None
    for v in ["x", "", "MEAN", "mean+"]:
        yield f"extract --pool {v!r}", ex + ["--out", out(f"p{v}"), "--pool", v], None
    for v in ["x", "", "NPY"]:
        yield f"extract --format {v!r}", ex + ["--out", out(f"f{v}"), "--format", v], None
    for v in ["x", "cuda", "cuda:9", "meta", "cpu:0", ""]:
        yield f"extract --device {v!r}", ex + ["--out", out(f"d{v}"), "--device", v], None
    yield "extract --out an existing file", ex + ["--out", one], None
    yield "extract --out ''", ex + ["--out", ""], None
    for name, ck in [("missing path", str(root / "nope")), ("random:", "random:"),
                     ("random:nope", "random:nope"), ("random:tiny/", "random:tiny/"),
                     ("empty .safetensors", text(root, "empty.safetensors", "")),
                     ("text .safetensors", text(root, "t.safetensors", "hello")),
                     ("a CSV", str(labels)), ("an audio file", one),
                     ("an empty folder", str(root / "emptydir")),
                     ("folder with empty ckpt/", str(root / "run_nockpt")), ("''", "")]:
        yield f"extract ckpt {name}", ["extract", ck, str(audio), "--out", out("ck" + name)], None
    yield "extract input missing", ["extract", CNN, str(root / "nope.wav"), "--out", out("im")], None
    yield "extract input ''", ["extract", CNN, "", "--out", out("i0")], None
    yield "extract input empty folder", ["extract", CNN, str(root / "emptydir"), "--out", out("ie")], None
    yield "extract input empty manifest", ["extract", CNN, text(root, "m0.csv", ""), "--out", out("m0")], None
    yield "extract input header-only manifest", ["extract", CNN, text(root, "m1.csv", "path\n"),
                                                 "--out", out("m1")], None
    yield "extract input manifest, no path column", ["extract", CNN, text(root, "m2.csv", "file,x\na,b\n"),
                                                     "--out", out("m2")], None
    yield "extract input .txt of junk", ["extract", CNN, text(root, "m3.txt", "\x00\x01junk\n\n"),
                                         "--out", out("m3")], None
    yield "extract input .txt with a NUL line", ["extract", CNN, text(root, "m4.txt", f"{one}\nab\x00c.wav\n"),
                                                 "--out", out("m4")], None
    yield "extract stdin empty", ["extract", CNN, "-", "--out", out("s0")], ""
    yield "extract stdin junk", ["extract", CNN, "-", "--out", out("s1")], f"{one}\nnope\n\n  \n\x00\n"
    yield "extract stdin and --out -", ["extract", CNN, "-", "--out", "-"], one + "\n"
    yield "extract vit --layer 99", ["extract", VIT, str(audio), "--out", out("v99"), "--layer", "99"], None
    yield "extract vit --frames --layer all", ["extract", VIT, str(audio), "--out", out("vall"),
                                              "--frames", "--layer", "all"], None

    # probe, clip task
    pr = ["probe", CNN]
    yield "probe labels missing", pr + [str(root / "nope.csv")], None
    for name, content in [("empty", ""), ("header only", head),
                          ("no header", "\n".join(body) + "\n"),
                          ("no label column", "path,split\n" + "\n".join(
                              r.split(",")[0] + "," + r.split(",")[2] for r in body) + "\n"),
                          ("one class", relabel("noise", "tone")),
                          ("unknown split", head + "\n".join(body).replace(",test", ",tset") + "\n"),
                          ("no test split", head + "\n".join(body).replace(",test", ",train") + "\n"),
                          ("no train split", head + "\n".join(body).replace(",train", ",test") + "\n"),
                          ("empty labels", relabel("tone", "")),
                          ("every file missing", head + "\n".join(body).replace(".wav", "x.wav") + "\n"),
                          ("half the files missing", head + "\n".join(
                              r.replace(".wav,tone", "x.wav,tone") for r in body) + "\n"),
                          ("one row", head + body[0] + "\n"),
                          ("conflicting duplicate", head + "\n".join(body) + "\n"
                           + body[0].replace(",tone,", ",noise,") + "\n"),
                          ("extra fields in some rows", head + "\n".join(r + ",extra" for r in body[:3])
                           + "\n" + "\n".join(body[3:]) + "\n"),
                          ("no split column", "path,label\n" + "\n".join(r.rsplit(",", 1)[0] for r in body) + "\n"),
                          ("a class only in test", relabel("", "").replace("clip3.wav,noise", "clip3.wav,rare")),
                          ("a class with one file", relabel("", "").replace("clip1.wav,noise", "clip1.wav,rare")),
                          ("binary junk", "\x00\xff\x00" * 50)]:
        yield f"probe labels {name}", pr + [text(root, f"lab/{name}.csv", content)], None
    for opt, vals in [("--batch-size", ["1000000"]), ("--seed", ["-1", str(2 ** 40)]),
                      ("--pool", ["x", ""]), ("--layer", ["99", "x", "weighted", "all"]),
                      ("--device", ["x", "cuda", "meta"])]:
        for v in vals:
            yield f"probe {opt} {v!r}", pr + [str(labels), opt, v], None
    yield "probe --json to a folder", pr + [str(labels), "--json", str(root / "emptydir")], None
    yield "probe --plots to a file", pr + [str(labels), "--plots", one], None
    for opt, vals in [("--ft-epochs", BAD_INTS), ("--ft-lr", BAD_FLOATS),
                      ("--ft-encoder-lr-ratio", BAD_FLOATS), ("--ft-layer-decay", BAD_FLOATS),
                      ("--ft-patience", BAD_INTS), ("--ft-batch-size", BAD_INTS)]:
        for v in vals:
            extra = ["--ft-epochs", "1"] if opt != "--ft-epochs" else []
            yield f"probe --finetune {opt} {v}", pr + [str(labels), "--finetune", opt, v] + extra, None
    yield "probe --finetune --save to a folder", pr + [str(labels), "--finetune", "--ft-epochs", "1",
                                                       "--save", str(root / "emptydir")], None
    # probe, SED
    ps = ["probe", CNN, str(sed)]
    for v in ["0.01", "1000", "nan", "inf"]:
        yield f"probe sed --frame-hop {v}", ps + ["--frame-hop", v], None
    for v in ["0", "-1", "2", "100001"]:
        yield f"probe sed --median-filter {v}", ps + ["--median-filter", v], None
    sl = sed.read_text().splitlines()
    for name, content in [("onset after offset", [r.replace("0.1,0.3", "0.3,0.1") for r in sl[1:]]),
                          ("negative onset", [r.replace("0.1,0.3", "-0.2,0.3") for r in sl[1:]]),
                          ("NaN onset", [r.replace("0.1,0.3", "nan,0.3") for r in sl[1:]]),
                          ("inf offset", [r.replace("0.1,0.3", "0.1,inf") for r in sl[1:]]),
                          ("events past the end", [r.replace("0.1,0.3", "5,9") for r in sl[1:]]),
                          ("zero-length events", [r.replace("0.1,0.3", "0.2,0.2") for r in sl[1:]]),
                          ("text times", [r.replace("0.1,0.3", "a,b") for r in sl[1:]]),
                          ("no events", [])]:
        d = root / "sedbad" / name
        d.mkdir(parents=True)
        (d / "files.csv").write_text((sed.parent / "files.csv").read_text())
        yield f"probe sed {name}", ["probe", CNN, text(d, "labels.csv", "\n".join([sl[0]] + content) + "\n")], None
    yield "probe sed without files.csv", ["probe", CNN, text(root, "sednofiles/labels.csv", sed.read_text())], None
    yield "probe sed --files missing", ps + ["--files", str(root / "nope.csv")], None
    # probe --suite
    for name, content in [("empty", ""), ("not a mapping", "- a\n- b\n"), ("no tasks", "x: 1\n"),
                          ("tasks empty", "tasks: []\n"), ("task without labels", "tasks:\n  - name: a\n"),
                          ("labels missing", "tasks:\n  - name: a\n    labels: nope.csv\n"),
                          ("duplicate names", f"tasks:\n  - name: a\n    labels: {labels}\n"
                                              f"  - name: a\n    labels: {labels}\n"),
                          ("bad frame_hop", f"tasks:\n  - name: a\n    labels: {sed}\n    frame_hop: -1\n"),
                          ("unknown key", f"tasks:\n  - name: a\n    labels: {labels}\n    lables: x\n"),
                          ("yaml syntax error", "tasks: [\n"), ("binary", "\x00\xff")]:
        yield f"probe --suite {name}", ["probe", "--suite", text(root, f"suites/{name}.yaml", content), CNN], None
    yield "probe --suite with no CKPT", ["probe", "--suite", str(suite)], None
    yield "probe --suite --cache onto a file", ["probe", "--suite", str(suite), CNN, "--cache", one], None

    # export
    for v in ["x", ""]:
        yield f"export --format {v!r}", ["export", CNN, "--out", out(f"e{v}.pt"), "--format", v], None
    for v in ["0", "99", "-1"]:
        yield f"export --opset {v}", ["export", CNN, "--out", out(f"e{v}.onnx"), "--format", "onnx",
                                      "--opset", v], None
    for v in ["99", "x", "-99", ""]:
        yield f"export vit --layers {v!r}", ["export", VIT, "--out", out(f"el{v}.pt"), "--layers", v], None
    yield "export --out a folder", ["export", CNN, "--out", str(root / "emptydir")], None
    yield "export --out ''", ["export", CNN, "--out", ""], None

    # import
    fake_pth = root / "w.pth"
    fake_pth.write_bytes(b"PK\x03\x04 not a real zip")
    hf = root / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "wav2vec2"}')
    for name, argv in [("missing source", [str(root / "nope.pth")]), ("a text file", [str(labels)]),
                       ("a corrupt .pth", [str(fake_pth)]), ("a corrupt .pth --kind m2d", [str(fake_pth), "--kind", "m2d"]),
                       ("--kind x", [str(fake_pth), "--kind", "x"]), ("an empty folder", [str(root / "emptydir")]),
                       ("a transformers folder without weights", [str(hf)]),
                       ("--norm-stats nan 1", [str(fake_pth), "--kind", "byol-a", "--norm-stats", "nan", "1"]),
                       ("--norm-stats 0 0", [str(fake_pth), "--kind", "byol-a", "--norm-stats", "0", "0"]),
                       ("a safetensors of junk", [text(root, "junk.safetensors", "x" * 100)])]:
        yield f"import {name}", ["import"] + argv + ["--out", out("imp" + name)], None
    yield "import --out an existing file", ["import", str(fake_pth), "--out", one], None

    # plot and presets
    yield "plot a folder without log.jsonl", ["plot", str(root / "emptydir")], None
    yield "plot a missing run", ["plot", str(root / "nope")], None
    yield "plot an empty log.jsonl", ["plot", text(root, "plotrun/log.jsonl", "")], None
    yield "plot a log.jsonl of junk", ["plot", text(root, "plotjunk/log.jsonl", "{not json\n[1,2]\n\"x\"\n")], None
    yield "plot a log.jsonl without losses", ["plot", text(root, "plotnl/log.jsonl", '{"step": 1}\n{"step": 2}\n')], None
    yield "plot a log.jsonl with NaN", ["plot", text(root, "plotnan/log.jsonl",
                                                      '{"step": 1, "loss": NaN}\n{"step": 2, "loss": Infinity}\n')], None
    yield "plot --out into a missing folder", ["plot", text(root, "plotok/log.jsonl", '{"step": 1, "loss": 1.0}\n'
                                                            '{"step": 2, "loss": 0.5}\n'), "--out",
                                               str(root / "no" / "such" / "dir" / "p.png")], None
    for v in ["nope", "tiny/", "", "../presets/m2d"]:
        yield f"presets {v!r}", ["presets", v], None
    for name, argv in [("--preset nope", ["--preset", "nope"]), ("--steps 0", ["--steps", "0"]),
                       ("--steps -1", ["--steps", "-1"]), ("--device meta", ["--device", "meta"]),
                       ("--out an existing file", ["--out", one])]:
        yield f"demo {name}", ["demo"] + (argv if "--out" in argv else argv + ["--out", out("demo" + name)]), None

    # probe: checkpoints
    for name, ck in [("missing", str(root / "nope")), ("empty .safetensors", str(root / "empty.safetensors")),
                     ("random:nope", "random:nope")]:
        yield f"probe ckpt {name}", ["probe", ck, str(labels)], None

    # run folders damaged after training: each case copies a 1-step run and breaks one file
    base = f["run"]

    def damaged(name: str, rel: str, how: str) -> str:
        d = root / "damaged" / name
        shutil.copytree(base, d)
        target = next(d.glob(rel))
        data = target.read_bytes()
        target.write_bytes(b"" if how == "empty" else data[: len(data) // 2] if how == "cut" else b"{junk: [")
        return str(d)

    for name, rel, how in [("config.yaml junk", "config.yaml", "junk"), ("config.yaml empty", "config.yaml", "empty"),
                           ("export cut", "export/encoder.safetensors", "cut"),
                           ("checkpoint cut", "ckpt/step-*/model.safetensors", "cut"),
                           ("state.json junk", "ckpt/step-*/state.json", "junk"),
                           ("log.jsonl cut", "log.jsonl", "cut")]:
        run = damaged(name, rel, how)
        yield f"run {name}: extract", ["extract", run, one, "--out", out("dmg" + name)], None
        yield f"run {name}: probe", ["probe", run, str(labels)], None
        yield f"run {name}: export", ["export", run, "--out", out("dmg" + name + ".pt")], None
        yield f"run {name}: pretrain resume", ["pretrain", str(audio), "--preset", "tiny/byol-a-v2", "-q", "--out", run,
                                               "--steps", "1"], None

    # pretrain
    pt = ["pretrain", str(audio), "--preset", "tiny/byol-a-v2", "-q"]
    for opt, vals in [("--steps", BAD_INTS[:2]), ("--batch-size", BAD_INTS)]:
        for v in vals:
            yield f"pretrain {opt} {v}", pt + ["--out", out(f"pt{opt}{v}"), opt, v], None
    for v in ["x", "cuda", "cuda:9", "meta"]:
        yield f"pretrain --device {v}", pt + ["--out", out(f"ptd{v}"), "--device", v, "--steps", "1"], None
    for v in ["x", "=1", "optim.lr", "optim.lr=", "nope.key=1", "optim.lr=[1", "views.9.x=1",
              "train=1", "method=null", "train.batch_size=1000000000"]:
        yield f"pretrain --set {v!r}", pt + ["--out", out(f"pts{v}"), "--set", v, "--steps", "1"], None
    for v in ["mfcc", str(root / "nope"), "random:tiny/hubert"]:
        yield f"pretrain --targets {v} on byol-a-v2", pt + ["--out", out(f"ptt{v[-4:]}"), "--targets", v,
                                                           "--steps", "1"], None
    yield "pretrain --preset missing", ["pretrain", str(audio), "--preset", "nope", "--out", out("ptp")], None
    yield "pretrain --preset a YAML file of junk", ["pretrain", str(audio), "--preset",
                                                    text(root, "p.yaml", "[1, 2"), "--out", out("ptj")], None
    yield "pretrain --out an existing file", pt + ["--out", one, "--steps", "1"], None
    yield "pretrain --out ''", pt + ["--out", "", "--steps", "1"], None
    yield "pretrain --cache onto a file", pt + ["--out", out("ptc"), "--cache", one, "--steps", "1"], None
    yield "pretrain data missing", ["pretrain", str(root / "nope"), "--preset", "tiny/byol-a-v2",
                                    "--out", out("ptn")], None


def run_case(runner: CliRunner, argv: list[str], stdin: str | None, limit: int):
    def alarm(*_):
        raise Hang

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(limit)
    try:
        return runner.invoke(app, argv, input=stdin), None
    except Hang:
        return None, "HANG"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def verdict(r) -> str | None:
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        msg = str(r.exception).splitlines()[0][:90] if str(r.exception) else ""
        return f"TRACE {type(r.exception).__name__}: {msg}"
    if r.exit_code == 0:
        return None
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    if not lines:
        return f"SILENT exit {r.exit_code}"
    if any("Usage:" in ln for ln in lines):  # click's own refusal of an option value
        return None
    if not all(ln.lstrip().startswith(("error:", "warning:")) for ln in lines):
        return f"LONG ({len(lines)} lines): {lines[-1].strip()[:90]}"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("prefix", nargs="*", help="only the cases whose name starts with one of these")
    ap.add_argument("--limit", type=int, default=120, help="seconds per case before it counts as a hang")
    ap.add_argument("--show", action="store_true", help="print every case's exit code and last stderr line")
    a = ap.parse_args()
    runner = CliRunner()
    bad, n, t0, here = [], 0, time.time(), os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        f = write_fixtures(Path(tmp) / "fixtures")
        cwd = Path(tmp) / "cwd"
        cwd.mkdir()
        chosen = [c for c in cases(f) if not a.prefix or any(c[0].startswith(p) for p in a.prefix)]
        unmatched = [p for p in a.prefix if not any(c[0].startswith(p) for c in chosen)]
        if unmatched:  # a misspelt prefix: one usage line, not a clean run of nothing
            ap.error(f"no case name starts with {', '.join(map(repr, unmatched))}")
        os.chdir(cwd)
        try:
            for name, argv, stdin in chosen:
                n += 1
                r, hang = run_case(runner, argv, stdin, a.limit)
                v = hang or verdict(r)
                stray = sorted(p.name for p in cwd.iterdir())
                if stray:
                    v = (v + "; " if v else "") + f"STRAY {len(stray)} files in the working directory ({stray[0]} ...)"
                    for p in cwd.iterdir():
                        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                if a.show and r is not None:
                    last = [ln for ln in r.stderr.splitlines() if ln.strip()][-1:] or [""]
                    print(f"{r.exit_code:>3}  {name:<50} {last[0].strip()[:110]}", flush=True)
                if v:
                    bad.append((name, v))
                    print(f"  ** {name}: {v}", flush=True)
        finally:
            os.chdir(here)
    print(f"\n{n} cases in {time.time() - t0:.0f} s; {len(bad)} not clean")
    if bad:
        print("\n| case | outcome |\n|---|---|")
        for name, v in bad:
            print(f"| {name} | {v} |")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
