"""Command line: pretrain / extract / probe / plot / export / import / presets / demo.

Exit codes: 0 ok, 2 usage or configuration error (one line naming the bad option or key),
3 training stopped on repeated non-finite loss, 4 nothing usable in the input.
"""

from __future__ import annotations

import inspect
import json
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from sslaudio import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="Self-supervised audio representation learning: pretrain, extract, probe, export.")
err = Console(stderr=True)
out = Console()

EXIT_USAGE, EXIT_DIVERGED, EXIT_NO_DATA = 2, 3, 4


def _blank(value) -> bool:
    """An empty path (`--out "$RUN"` with RUN unset), which Path('') would quietly read as the
    working directory."""
    return not isinstance(value, Path) and not str(value).strip()


def _path(value) -> Path:
    """Every Path option's parser: a blank value is a usage error."""
    if _blank(value):
        raise typer.BadParameter("must not be empty")
    return Path(value)


def _out_folder(path, option: str = "--out", hint: str = "") -> None:
    """An option naming a folder to create or reuse (--out, --plots, --save, --cache): an existing
    file there is one line naming the option, not a traceback from the first write under it."""
    if Path(path).exists() and not Path(path).is_dir():
        from sslaudio.config import ConfigError

        raise ConfigError(f"{option} {path}: is a file; give a folder{hint}")


def _out_file(path, option: str = "--out") -> None:
    """An option naming a file to write (--json, plot --out): an existing folder there is one line
    naming the option, checked before the work whose result it would hold."""
    if Path(path).is_dir():
        from sslaudio.config import ConfigError

        raise ConfigError(f"{option} {path}: is a folder; give a file name")


@contextmanager
def guard():
    """Turn expected failures into one line on stderr and the documented exit code; a skipped
    checkpoint (CheckpointWarning) into one `warning:` line."""
    from safetensors import SafetensorError

    from sslaudio.checkpoint import CheckpointError, CheckpointWarning
    from sslaudio.config import ConfigError
    from sslaudio.data import DataError
    from sslaudio.export import ExportError
    from sslaudio.probe import ProbeError
    from sslaudio.runfolder import RunMismatch
    from sslaudio.runlock import RunLocked
    from sslaudio.train import TrainingDiverged

    code, msg = 0, ""
    show = warnings.showwarning

    def show_warning(message, category, *args, **kwargs):
        if issubclass(category, CheckpointWarning):
            from rich.markup import escape

            err.print(f"[yellow]warning:[/yellow] {escape(str(message))}", highlight=False, soft_wrap=True)
        else:
            show(message, category, *args, **kwargs)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", CheckpointWarning)
            warnings.showwarning = show_warning
            yield
    except BrokenPipeError:  # `sslaudio extract ... --out - | head`
        sys.stderr.close()
        raise typer.Exit(0)
    except (ConfigError, CheckpointError, RunMismatch, ExportError) as e:
        code, msg = EXIT_USAGE, str(e)
    except RunLocked as e:  # another pretrain writes this run folder
        code, msg = EXIT_USAGE, str(e)
    except ProbeError as e:
        code, msg = e.code, str(e)
    except DataError as e:
        code, msg = EXIT_NO_DATA, str(e)
    except TrainingDiverged as e:
        code, msg = EXIT_DIVERGED, str(e)
    except KeyboardInterrupt:
        code, msg = 130, "interrupted"
    except (OSError, UnicodeDecodeError, SafetensorError) as e:  # a full disk, --out onto a folder, no permission ...
        code, msg = EXIT_USAGE, _io_error(e)
    except RuntimeError as e:  # torch.OutOfMemoryError (a RuntimeError) or the CPU allocator's failure
        if not _out_of_memory(e):
            raise
        code, msg = EXIT_USAGE, _oom_message(e)
    if code:
        from rich.markup import escape

        err.print(f"[red]error:[/red] {escape(msg)}", highlight=False, soft_wrap=True)  # "[export]" stays
        raise typer.Exit(code)


def _out_of_memory(e: BaseException) -> bool:
    text = str(e)
    return (type(e).__name__ == "OutOfMemoryError" or "can't allocate memory" in text
            or "out of memory" in text.lower() or _worker_killed(text))


def _worker_killed(text: str) -> bool:
    """torch's message for a DataLoader worker that the system killed: on Linux almost always the
    out-of-memory killer."""
    return text.startswith("DataLoader worker (pid") and ("exited unexpectedly" in text or "killed by signal" in text)


def _oom_message(e: BaseException) -> str:
    """One line for a failed allocation: the size torch could not allocate and what to make smaller
    (a pretrain run keeps its last committed checkpoint)."""
    import re

    size = re.search(r"tried to allocate (\d+ bytes|\d+(?:\.\d+)? ?[KMGT]?i?B)", str(e), re.IGNORECASE)
    reason = f" (tried to allocate {size.group(1)})" if size else ""
    if _worker_killed(str(e)):
        reason = " (the system killed a data loader worker)"
    return (f"out of memory{reason}; use smaller batches: pretrain train.batch_size or data.clip_seconds, "
            "extract --batch-seconds")


def _io_error(e: BaseException) -> str:
    """One line `<path>: <reason>` (just the reason when the path is unknown) for an I/O error."""
    import os
    import re

    where = getattr(e, "filename", None)
    reason = getattr(e, "strerror", None)
    if reason is None and (m := re.search(r"\(os error (\d+)\)", str(e))):  # safetensors' Rust io::Error
        reason = os.strerror(int(m.group(1)))
    if reason is None:
        lines = str(e).strip().splitlines()
        reason = lines[0] if lines else type(e).__name__
    return f"{where}: {reason}" if where else reason


def _version(value: bool):
    if value:
        print(f"sslaudio {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    pass


def _warn_skip(path: str, reason: str) -> None:
    from rich.markup import escape

    err.print(f"[yellow]warning:[/yellow] skip {escape(path)}: {escape(reason)}", highlight=False, soft_wrap=True)


class _Progress:
    """train.fit's on_log: a rich progress bar with loss, steps/s, audio-hours/s, the share of the time
    spent waiting for data and ETA on a terminal,
    one plain line per logged step on stderr otherwise (nohup, CI); silent when disabled.

        with _Progress(not quiet) as bar:
            fit(..., on_log=bar)
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.plain = enabled and not self.enabled  # not a terminal: one line per log step
        self.p = None
        self.total = 0

    def __enter__(self):
        return self

    def __exit__(self, *a):
        if self.p is not None:
            self.p.__exit__(*a)
            self.p = None

    def __call__(self, done: int, total: int, row: dict | None) -> None:
        if row is None:  # training starts at step `done` of `total`
            self.total = total
            if self.enabled and self.p is None:
                from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

                self.p = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                  TextColumn("loss {task.fields[loss]:.4f}  {task.fields[sps]:.2f} step/s  "
                                             "{task.fields[ah]:.3f} audio-h/s  data {task.fields[wait]:.0%}"),
                                  TimeRemainingColumn())
                self.task = self.p.add_task("train", total=total, completed=done, loss=float("nan"), sps=0.0, ah=0.0,
                                            wait=0.0)
                self.p.__enter__()
        elif self.p is not None:
            self.p.update(self.task, completed=done, loss=row["loss"], sps=row["steps_per_s"],
                          ah=row["audio_h_per_s"], wait=row.get("data_wait", 0.0))
        elif self.plain:
            eta = (self.total - done) / max(row["steps_per_s"], 1e-9)
            print(f"step {done}/{self.total}  loss {row['loss']:.4f}  {row['steps_per_s']:.2f} step/s  "
                  f"{row['audio_h_per_s']:.3f} audio-h/s  data {row.get('data_wait', 0.0):.0%}  eta {eta / 60:.1f} min",
                  file=sys.stderr, flush=True)


@app.command(epilog="Example: sslaudio pretrain ./audio --preset tiny/byol-a --out runs/byola --steps 300")
def pretrain(
    data: List[str] = typer.Argument(..., help="Folders (searched recursively), audio files, or manifests "
                                                "(a text file of paths, or a CSV/TSV with a 'path' column)."),
    preset: str = typer.Option(..., "--preset", "-p", help="Preset name (see 'sslaudio presets') or a YAML file."),
    out_dir: Path = typer.Option(..., "--out", "-o", parser=_path, help="Run folder."),
    steps: Optional[int] = typer.Option(None, help="Override train.steps."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Override train.batch_size."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    set_: List[str] = typer.Option([], "--set", help="Override any key: --set optim.lr=1e-4 (repeatable)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from RUN's latest checkpoint."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    targets: Optional[str] = typer.Option(None, "--targets", help="HuBERT's k-means targets: 'mfcc' (iteration 1) "
                                          "or RUN_OR_CKPT[:LAYER] (iteration 2: block LAYER, from 1, of that "
                                          "model; default the preset's method.layer)."),
    cache: Path | None = typer.Option(None, "--cache", parser=_path, help="Decode the audio once, at data.sample_rate, into "
                                      "int16 shards in this folder (built or updated at the start; later runs "
                                      "read crops from it at disk speed). One folder per sample rate."),
):
    """Pretrain an encoder on unlabeled audio; writes RUN/config.yaml, log.jsonl, ckpt/, export/."""
    from rich.markup import escape

    from sslaudio.build import load_preset
    from sslaudio.train import Interrupted, fit, resolve_device

    with guard():
        _out_folder(out_dir)
        if cache is not None:
            _out_folder(cache, "--cache")
        overrides = list(set_)
        if steps is not None:
            overrides.append(f"train.steps={steps}")
        if batch_size is not None:
            overrides.append(f"train.batch_size={batch_size}")
        if targets is not None:
            overrides.append(f"method.targets={json.dumps(targets)}")  # a string, whatever it looks like
        p = load_preset(preset, overrides)
        dev = resolve_device(device)
        try:
            with _Progress(not quiet) as bar:
                summary = fit(p, data, out_dir, resume=resume, device=str(dev), on_log=bar, cache=cache,
                              warn=lambda m: err.print(f"[yellow]warning:[/yellow] {escape(m)}", highlight=False,
                                                       soft_wrap=True))
        except Interrupted as e:  # Ctrl-C / SIGTERM: the last finished step is saved (exit code 130)
            if e.step is not None:
                err.print(f"{e.signal_name}: stopped after step {e.step}, which is saved in {out_dir}/ckpt; "
                          f"run the same command to resume", highlight=False, soft_wrap=True)
            raise
        if not summary["rank"]:  # under torchrun, rank 0 reports
            _print_table("pretrain", {
                "run": summary["run"], "preset": preset, "steps": f"{summary['start_step']} -> {summary['steps']}",
                "files used / skipped": f"{summary['files']} / {summary['skipped']}",
                "device / precision": f"{summary['device']} / {summary['precision']}",
                "training time": f"{summary['time_s']:.1f} s", "last loss": _last_loss(Path(out_dir)),
                "encoder": str(Path(out_dir) / "export" / "encoder.safetensors")})
        if summary["world_size"] > 1:
            _leave_after_distributed_run()


def _leave_after_distributed_run() -> None:
    """A torchrun worker whose run ended well exits here with status 0, skipping the interpreter's
    teardown: torch's gloo backend can abort in its C++ destructors at exit ('terminate called
    without an active exception', SIGABRT; seen on CI after both ranks had returned from fit and
    destroyed the process group), and torchrun would then report a finished run as failed and
    SIGTERM the other ranks. Everything the run writes is on disk by then (atomic writes, rank 0
    commits before the last barrier); only the standard streams need flushing."""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _last_loss(run: Path) -> str:
    log = run / "log.jsonl"
    if not log.is_file() or not log.read_text().strip():
        return "-"
    return f"{json.loads(log.read_text().strip().splitlines()[-1])['loss']:.4f}"


def _print_table(title: str, rows: dict) -> None:
    t = Table(title=title, show_header=False)
    for k, v in rows.items():
        t.add_row(k, str(v))
    out.print(t)


def _parse_layer(value: str | None, weighted: bool = False) -> int | str | None:
    """--layer: None, 'all', a layer index (negative from the end; a transformer's 0 is its blocks'
    input and i block i's output, as SUPERB / transformers count hidden states), or with `weighted`
    (probe) 'weighted': the probe learns a weighted sum of every layer."""
    from sslaudio.config import ConfigError

    named = ("all", "weighted") if weighted else ("all",)
    if value is None or value.strip().lower() in named:
        return None if value is None else value.strip().lower()
    try:
        return int(value)
    except ValueError:
        what = "', '".join(named)
        raise ConfigError(f"--layer must be a layer index (-1 the last) or '{what}', found '{value}'") from None


def _stdin_entries() -> list[tuple[str, str]]:
    """INPUTS `-`: one path per line on stdin (blank lines ignored), each named relative to the
    working folder (outside it: by its absolute path), as a manifest there would name it. Missing
    files are entries too: probing them gives the reason they are skipped."""
    import os

    stream = getattr(sys.stdin, "buffer", None)
    data = stream.read() if stream is not None else sys.stdin.read().encode("utf-8", "surrogateescape")
    text = data.decode("utf-8-sig", errors="surrogateescape")
    found = []
    for line in text.splitlines():
        path = line.strip()
        if not path:
            continue
        path = os.path.normpath(path)
        rel = os.path.relpath(os.path.abspath(path))
        if rel == os.pardir or rel.startswith(os.pardir + os.sep):
            rel = os.path.abspath(path).lstrip(os.sep)
        found.append((path, rel))
    return found


@app.command(epilog="Examples: sslaudio extract runs/byola ./clips --out feats --frames\n\n"
                    "sslaudio extract runs/byola song.wav --out - | jq .clip\n\n"
                    "find clips -name '*.wav' | sslaudio extract runs/byola - --out - --layer all | jq .layer_clips")
def extract(
    ckpt: str = typer.Argument(..., help="Run folder, step folder, encoder .safetensors, or random:PRESET."),
    inputs: List[str] = typer.Argument(..., help="Audio files, folders or manifests; - alone: one path per "
                                                 "line on stdin."),
    out_dir: str = typer.Option(..., "--out", "-o", help="Output folder, or - for JSON lines on stdout."),
    frames: bool = typer.Option(False, "--frames", help="Also write frame embeddings and timestamps."),
    fmt: Optional[str] = typer.Option(None, "--format", help="Feature files: safetensors (default) | npy."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Inputs (files or chunks of equal length) "
                                    "per forward pass."),
    batch_seconds: Optional[float] = typer.Option(None, "--batch-seconds",
                                                  help="At most this much audio per batch (default: no limit)."),
    workers: int = typer.Option(1, "--workers", min=0, help="Threads that decode and resample the next batches "
                                                            "while the encoder runs (0: decode in line)."),
    layer: Optional[str] = typer.Option(None, help="Embed this layer's output (-1 the last; a transformer's 0 "
                                                   "is its blocks' input, i block i) instead of the encoder's "
                                                   "final output; all: also every layer's (layer_clips, and "
                                                   "with --frames layers)."),
    pool: Optional[str] = typer.Option(None, "--pool", help="Clip embedding over the frames: mean | max | "
                                       "mean+max (their sum); default: the encoder's own statistics."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
):
    """Write clip (and frame) embeddings per input file, mirroring the input tree (several inputs:
    each folder or manifest under its own name). A rerun into the same --out resumes."""
    from rich.markup import escape

    from sslaudio.config import ConfigError
    from sslaudio.data import DataError, dedupe, scan_entries
    from sslaudio.features import OutputCollision, check_collisions
    from sslaudio.features import extract as run_extract
    from sslaudio.inference import load_encoder
    from sslaudio.train import resolve_device

    with guard():
        if any(_blank(v) for v in (out_dir, ckpt, *inputs)):
            raise ConfigError("--out, CKPT and every input must be non-empty (a shell variable that was never set?)")
        to_stdout = out_dir == "-"
        if to_stdout and fmt is not None:  # stdout carries JSON lines; a format would be silently ignored
            raise ConfigError(f"--format {fmt} names the feature files' format; --out - writes JSON lines")
        fmt = "safetensors" if fmt is None else fmt
        if fmt not in ("safetensors", "npy"):
            raise ConfigError(f"--format must be safetensors or npy, found '{fmt}'")
        if batch_seconds is not None and not (batch_seconds > 0 and batch_seconds != float("inf")):
            raise ConfigError(f"--batch-seconds must be a positive number of seconds, found {batch_seconds}")
        if "-" in inputs and len(inputs) > 1:
            raise ConfigError("- (paths on stdin) must be the only input")
        if not to_stdout:
            _out_folder(out_dir, hint=" (or - for JSON lines on stdout)")
        chosen = _parse_layer(layer)
        all_layers = chosen == "all"
        dev = resolve_device(device)
        bundle = load_encoder(ckpt).set_layer(None if all_layers else chosen).set_pool(pool)
        items = _stdin_entries() if inputs == ["-"] else scan_entries(inputs)
        if not items:
            raise DataError(f"no audio files in {' '.join(inputs)}")
        try:
            if not to_stdout:  # two inputs, one output file: a usage error, before anything is written
                check_collisions(dedupe(items)[0], fmt, frames, all_layers)
        except OutputCollision as e:
            raise ConfigError(str(e)) from None

        def warn(message: str) -> None:  # one line each, whatever the terminal width or the names hold
            text = message.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            err.print(f"[yellow]warning:[/yellow] {escape(text)}", highlight=False, soft_wrap=True)

        summary = run_extract(bundle, items, None if to_stdout else Path(out_dir), frames, fmt, dev, batch_size,
                              encoder_id=ckpt, on_skip=lambda p, r: warn(f"skip {p}: {r}"), on_warn=warn,
                              all_layers=all_layers, batch_seconds=batch_seconds, workers=workers)
        if summary["written"] == 0:
            raise DataError(f"no usable audio file ({summary['skipped']} skipped)")
        msg = f"{summary['written']} files -> {out_dir} (dim {summary['clip_dim']}), {summary['skipped']} skipped, {summary['time_s']:.1f} s"
        err.print(msg, highlight=False) if to_stdout else _print_table("extract", summary)


@app.command(epilog="Example: sslaudio probe runs/byola data/labels.csv --json results.json\n\n"
                    "sslaudio probe runs/byola data/labels.csv --json - | jq .accuracy\n\n"
                    "Baseline: sslaudio probe random:tiny/byol-a data/labels.csv\n\n"
                    "Fine-tuned beside frozen: sslaudio probe runs/byola sound_events/labels.csv --finetune --rnn-head")
def probe(
    args: List[str] = typer.Argument(..., help="CKPT LABELS (run folder, step folder, encoder .safetensors or "
                                     "random:PRESET; CSV with path,label[,split]), or with --suite: CKPT...",
                                     metavar="CKPT... [LABELS]"),
    suite: Optional[Path] = typer.Option(None, "--suite", parser=_path, help="A suite YAML (tasks: name, labels, files?, "
                                         "frame_hop?): every CKPT on every task, one table."),
    cache: Optional[Path] = typer.Option(None, "--cache", parser=_path, help="With --suite: the feature cache folder "
                                         "(default: .sslaudio-cache beside the suite, or $SSLAUDIO_CACHE)."),
    mlp: bool = typer.Option(False, "--mlp", help="Also run the MLP probe (clip tasks): mlp_* metrics."),
    json_out: Optional[Path] = typer.Option(None, "--json", parser=_path, help="Write the metrics here as JSON; - writes them "
                                            "to stdout (the table then goes to stderr)."),
    plots: Path | None = typer.Option(None, "--plots", parser=_path, help="Write PNG plots to this folder: the test "
                                      "confusion matrix of a single-label task (confusion.png); with "
                                      "--suite one per task and a bar chart (suite.png). Needs matplotlib."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Files per forward pass when embedding."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    seed: int = typer.Option(0, help="Seed of the probe's initialisation and folds (and of fine-tuning)."),
    pool: str | None = typer.Option(None, "--pool", help="Clip tasks: the clip embedding over the frames, "
                                       "mean | max | mean+max (their sum), as extract --pool; default: the "
                                       "encoder's own statistics."),
    layer: Optional[str] = typer.Option(None, help="Probe this layer's output (-1 the last; a transformer's 0 is "
                                        "its blocks' input, i block i); 'all': every layer side by side (the "
                                        "probe weights each dimension freely); 'weighted': SUPERB's learned "
                                        "weighted sum of every layer (softmax weights trained with the linear "
                                        "head, reported as layer_weights; layers of one width)."),
    files: Optional[Path] = typer.Option(None, "--files", parser=_path, help="Sound event detection: CSV path[,split] of "
                                         "every clip (default: files.csv beside LABELS if there)."),
    frame_hop: float = typer.Option(0.1, "--frame-hop", min=0.01, max=10, help="Sound event detection: seconds per "
                                    "scored frame."),
    median_filter: Optional[int] = typer.Option(None, "--median-filter", help="Sound event detection: median "
                                                "filter window (odd, in frames) for every class before events "
                                                "are decoded; 1 = none (default: per class, picked on valid)."),
    finetune_: bool = typer.Option(False, "--finetune", help="Also fine-tune the encoder with the probe head "
                                   "(needs a split column) and report its metrics beside the frozen probe's."),
    ft_epochs: Optional[int] = typer.Option(None, "--ft-epochs", help="Fine-tuning: at most this many epochs "
                                            "(default: 10)."),
    ft_lr: Optional[float] = typer.Option(None, "--ft-lr", help="Fine-tuning: the head's learning rate "
                                          "(default: 1e-3)."),
    ft_encoder_lr_ratio: Optional[float] = typer.Option(None, "--ft-encoder-lr-ratio", help="Fine-tuning: the "
                                                        "encoder's learning rate over the head's (default: 0.1)."),
    ft_layer_decay: Optional[float] = typer.Option(None, "--ft-layer-decay", help="Fine-tuning: each encoder "
                                                   "layer below the top learns this much slower (default: 1, none)."),
    ft_patience: Optional[int] = typer.Option(None, "--ft-patience", help="Fine-tuning: stop after this many "
                                              "epochs without a better valid score (default: 3)."),
    ft_batch_size: Optional[int] = typer.Option(None, "--ft-batch-size", help="Fine-tuning: files per step "
                                                "(default: 8)."),
    rnn_head: bool = typer.Option(False, "--rnn-head", help="Fine-tuning, sound event detection: add a "
                                  "bidirectional GRU over the frame embeddings to the linear head."),
    save: Optional[Path] = typer.Option(None, "--save", parser=_path, help="Fine-tuning: write the fine-tuned encoder "
                                        "(DIR/encoder.safetensors) and head (DIR/head.safetensors); "
                                        "otherwise nothing is written."),
):
    """Linear and kNN probes on frozen clip or frame embeddings (clip tasks, sound event detection;
    --finetune, --suite); prints accuracy / F1 / mAP.

    LABELS with onset,offset columns (seconds) is a sound event detection task: a frame-level
    linear probe on frame embeddings, reporting frame micro-F1 (`f1`), `f1_macro` and `map`, and
    the DCASE segment-based (1 s) and event-based (200 ms collar) F1. --finetune also trains the
    encoder with the head and reports the same metrics beside the frozen ones (JSON: `finetune`).
    --suite SUITE.yaml probes every CKPT on every task of the suite (features cached, see --cache)."""
    from rich.markup import escape

    from sslaudio.evaluation import probe_checkpoint
    from sslaudio.probe import ProbeError

    with guard():
        layer = _parse_layer(layer, weighted=True)
        if json_out is not None:  # refused before the probe, not after it
            _out_file(json_out, "--json")
        if plots is not None:  # matplotlib missing or DIR a file: refused before the probe too
            from sslaudio.plots import require_matplotlib

            require_matplotlib()
            _out_folder(plots, "--plots")
        if suite is not None:
            given = [n for n, v in (("--finetune", finetune_), ("--save", save), ("--files", files),
                                    ("--median-filter", median_filter), ("--rnn-head", rnn_head)) if v]
            if given:
                raise ProbeError(f"{given[0]} is not available with --suite")
            if cache is not None:
                _out_folder(cache, "--cache")
            _probe_suite(args, suite, cache, json_out, batch_size, device, seed, layer, mlp, pool, plots)
            return
        if cache is not None:
            raise ProbeError("--cache is for --suite")
        if len(args) != 2:
            raise ProbeError(f"probe takes CKPT LABELS (got {len(args)} argument(s)); several checkpoints need --suite")
        ckpt, labels = args[0], Path(args[1])
        cfg = _finetune_config(finetune_, rnn_head, epochs=ft_epochs, lr=ft_lr, encoder_lr_ratio=ft_encoder_lr_ratio,
                               layer_decay=ft_layer_decay, patience=ft_patience, batch_size=ft_batch_size)
        if save is not None:
            _out_folder(save, "--save")

        def on_epoch(epoch: int, total: int, loss: float, score: float) -> None:
            err.print(f"fine-tune epoch {epoch}/{total}: train loss {loss:.4f}, valid {score:.4f}", highlight=False)

        res = probe_checkpoint(ckpt, labels, batch_size, device, seed, layer=layer, files=files, frame_hop=frame_hop,
                               on_skip=_warn_skip, median=median_filter, finetune_cfg=cfg, save=save,
                               on_epoch=on_epoch, mlp=mlp, confusion=plots is not None, pool=pool)
        ft = res.get("finetune")
        t = Table(title=f"probe: {ckpt} on {labels}")
        t.add_column("metric")
        t.add_column("frozen" if ft else "value", justify="right")
        if ft:
            t.add_column("fine-tuned", justify="right")

        def cell(r: dict, k: str) -> str:
            v = r.get(k, "")
            if isinstance(v, list):  # layer_weights
                return " ".join(f"{x:.2f}" for x in v)
            return f"{v:.4f}" if isinstance(v, float) else str(v)

        for k in ("accuracy", "f1", "f1_macro", "map", "segment_f1", "segment_f1_macro", "segment_error_rate",
                  "event_f1", "event_f1_macro", "knn_accuracy", "mlp_accuracy", "mlp_map", "mlp_f1",
                  "mlp_f1_macro", "valid", "threshold", "protocol", "n_files",
                  "skipped", "n_classes", "dim", "lr", "weight_decay", "epochs", "layer_weights"):
            if k in res:
                t.add_row(k, cell(res, k), *([cell(ft, k)] if ft else []))
        _print_results(t, res, json_out)
        if ft and ft.get("stopped"):  # its metrics are the best epoch's before the stop: say so
            which = f"epoch {ft['epochs']}" if ft.get("epochs") else "the frozen probe's starting point (epoch 0)"
            err.print(f"[yellow]warning:[/yellow] fine-tuning stopped: {escape(ft['stopped'])}; the fine-tuned "
                      f"column is {which}", highlight=False, soft_wrap=True)
        if plots is not None:
            _write_plots(res, plots, suite=False)


def _probe_suite(ckpts: list[str], suite: Path, cache: Optional[Path], json_out: Optional[Path], batch_size: int,
                 device: str, seed: int, layer: int | str | None, mlp: bool, pool: str | None = None,
                 plots: Path | None = None) -> None:
    """`probe --suite`: one table (tasks x checkpoints, each task's main metric) and one JSON."""
    from rich.markup import escape

    from sslaudio.evaluation import probe_suite

    def warn(message: str) -> None:
        err.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False, soft_wrap=True)

    def done(task: str, ckpt: str, r: dict) -> None:
        err.print(f"{escape(task)} / {escape(ckpt)}: done", highlight=False)

    res = probe_suite(ckpts, suite, cache, batch_size, device, seed, layer, mlp, pool, on_skip=_warn_skip, on_warn=warn,
                      on_result=done)
    t = Table(title=f"probe suite: {suite}")
    t.add_column("task")
    t.add_column("metric")
    for c in ckpts:
        t.add_column(c, justify="right")

    def cell(v) -> str:
        return f"{v:.4f}" if isinstance(v, float) else "-"

    for task in res["tasks"]:
        t.add_row(task, res["main_metric"][task], *[cell(res["table"][task][c]) for c in ckpts])
        if task in res.get("table_mlp", {}):
            t.add_row("", "mlp_" + res["main_metric"][task], *[cell(res["table_mlp"][task][c]) for c in ckpts])
    err.print(f"features: {res['extracted']} extracted, {res['cached']} from the cache ({res['cache']})",
              highlight=False)
    _print_results(t, res, json_out)
    if plots is not None:
        _write_plots(res, plots, suite=True)


def _print_results(table: Table, res: dict, json_out: Path | None) -> None:
    """The probe's table on stdout and its JSON in the --json file (atomically: a full disk or an
    unwritable folder is one error line and no temp file); with `--json -` the JSON alone goes to
    stdout, for a pipe, and the table to stderr."""
    from sslaudio.atomic import atomic_text

    to_stdout = json_out is not None and str(json_out) == "-"
    (err if to_stdout else out).print(table)
    if to_stdout:
        sys.stdout.write(json.dumps(res, indent=1) + "\n")
        sys.stdout.flush()
    elif json_out is not None:
        atomic_text(json_out, json.dumps(res, indent=1))


def _write_plots(res: dict, folder: Path, suite: bool) -> None:
    """probe --plots: the PNGs of plots.probe_plots, one line on stderr saying what was written."""
    from rich.markup import escape

    from sslaudio.plots import probe_plots

    written = probe_plots(res, folder, suite=suite)
    if written:
        err.print(f"plots: {len(written)} PNG file(s) -> {escape(str(folder))}", highlight=False, soft_wrap=True)
    else:
        err.print("[yellow]warning:[/yellow] --plots: no confusion matrix for a multi-label or sound event "
                  "detection task, nothing written", highlight=False, soft_wrap=True)


def _finetune_config(enabled: bool, rnn_head: bool, **given):
    """The FinetuneConfig of the probe's --ft-* options (None without --finetune; an --ft-* option
    without it is a usage error)."""
    from sslaudio.finetune import FinetuneConfig
    from sslaudio.probe import ProbeError

    options = {k: v for k, v in given.items() if v is not None}
    if not enabled:
        if options or rnn_head:
            name = "rnn-head" if rnn_head else "ft-" + next(iter(options)).replace("_", "-")
            raise ProbeError(f"--{name} is a fine-tuning option: add --finetune")
        return None
    return FinetuneConfig(rnn_head=rnn_head, **options)


@app.command(epilog="Examples: sslaudio plot runs/byola\n\nsslaudio plot runs/byola --out byola.png")
def plot(
    run: Path = typer.Argument(..., parser=_path, help="A pretrain run folder (or its log.jsonl)."),
    out_file: Path | None = typer.Option(None, "--out", "-o", parser=_path, help="The PNG to write "
                                         "(default: RUN/plots/training.png)."),
):
    """Plot a run's log.jsonl: the loss and every method signal (emb_std, frame_std, code_ppl,
    cluster_usage, acc ...: each numeric key but step, time, lr, steps_per_s, audio_h_per_s and
    data_wait), one subplot each against the step; steps with warnings marked. Needs matplotlib."""
    from sslaudio.plots import plot_training

    with guard():
        if out_file is not None:
            _out_file(out_file)
        res = plot_training(run, out_file)
        _print_table("plot", {"run": run, "steps": res["steps"], "panels": ", ".join(res["panels"]),
                              "out": res["out"]})


@app.command(epilog="Examples: sslaudio export runs/byola --format onnx --out byola.onnx\n\n"
                    "sslaudio export runs/m2d --format torchscript --out m2d.pt --layers all")
def export(
    ckpt: str = typer.Argument(..., help="Run folder, step folder, encoder .safetensors, or random:PRESET."),
    fmt: str = typer.Option("torchscript", "--format", help="torchscript | onnx"),
    out_file: Path = typer.Option(..., "--out", "-o", parser=_path, help="Output file; its model card goes to OUT.json."),
    layers: str | None = typer.Option(None, "--layers", help="Also output these layers' frames: 'all' or "
                                      "indices as --layer counts them (0,2,-1): outputs layer_<i>."),
    opset: int = typer.Option(18, "--opset", help="ONNX opset (17 to 20)."),
):
    """A deployable waveform -> clip embedding, frames and frame times model, checked against
    PyTorch output by output, with a JSON model card beside it (OUT.json)."""
    from sslaudio.export import check_format, parse_layers
    from sslaudio.export import export as run_export
    from sslaudio.inference import load_encoder

    with guard():
        check_format(fmt, opset)  # before the (slow) model load
        wanted = parse_layers(layers)
        res = run_export(load_encoder(ckpt), fmt, out_file, layers=wanted, source=ckpt, opset=opset)
        _print_table("export", res)


@app.command("import", epilog="Examples: sslaudio import ./wav2vec2-base --out runs/w2v2\n\n"
                               "sslaudio import m2d_vit_base-80x608p16x16-221006-mr7/checkpoint-300.pth --out runs/m2d\n\n"
                               "sslaudio import AudioNTT2022-BYOLA-64x96d2048.pth --out runs/byola2 --norm-stats -9.66 4.72\n\n"
                               "then: sslaudio extract runs/w2v2 ./clips --out feats")
def import_(
    src: Path = typer.Argument(..., parser=_path, help="A transformers folder (config.json + model.safetensors or "
                               "pytorch_model.bin) of wav2vec 2.0, HuBERT or data2vec-audio; or an official "
                               "BYOL-A / BYOL-A v2 / M2D / ATST-Clip / ATST-Frame weight file."),
    out: Path = typer.Option(..., "--out", "-o", parser=_path, help="Run folder; the encoder goes to OUT/export/encoder.safetensors."),
    kind: str | None = typer.Option(None, "--kind", help="A weight file's kind: byol-a, byol-a-v2, m2d, atst-clip or atst-frame "
                                    "(default: told from its keys)."),
    norm_stats: tuple[float, float] | None = typer.Option(
        None, "--norm-stats", metavar="MEAN STD", help="A .pth file's log-mel mean and std for the frontend "
        "(needed for BYOL-A; M2D: the file's norm_stats, else -7.1 4.2, M2D's AudioSet values; not for ATST, "
        "whose frontend has fixed dB bounds)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing OUT/export/encoder.safetensors."),
):
    """Convert a Hugging Face wav2vec 2.0 / HuBERT / data2vec-audio model, or an official BYOL-A /
    M2D / ATST weight file, into an sslaudio encoder that extract, probe and export accept; a Hugging Face
    model is checked against transformers (when installed) output by output before anything is written."""
    from sslaudio.config import ConfigError
    from sslaudio.importers import import_model, import_official

    with guard():
        _out_folder(out)
        if norm_stats is not None and any(v is None for v in norm_stats):
            norm_stats = None
        if src.is_file():
            res = import_official(src, out, kind=kind, norm_stats=norm_stats, force=force)
            _print_table("import", {k: v for k, v in res.items() if k != "encoder"})
        else:
            if kind is not None or norm_stats is not None:
                raise ConfigError(f"{src}: --kind and --norm-stats are for official .pth files, not a transformers folder")
            _print_table("import", import_model(src, out, force=force))


@app.command("presets", epilog="Examples: sslaudio presets\n\nsslaudio presets tiny/m2d > my.yaml   "
                                "(edit it, then: sslaudio pretrain ./audio --preset my.yaml --out runs/mine)")
def presets_cmd(name: str | None = typer.Argument(None, help="A preset (or YAML file) to show in full.")):
    """List every preset, one line each: name, method, encoder, input. With NAME: its description
    and its resolved YAML (every default filled in), ready to edit and pass to --preset."""
    from sslaudio.build import load_preset
    from sslaudio.config import ConfigError, dump_yaml, list_presets

    def summary(p) -> tuple[str, str, str]:
        fe = p.frontend.get("name", "?")
        mels = f" {p.frontend['n_mels']}" if "n_mels" in p.frontend else ""
        return p.method.get("name", "?"), p.encoder.get("name", "?"), \
            f"{fe}{mels} {p.data.clip_seconds:g}s {p.data.sample_rate / 1000:g}kHz"  # features, crop, rate

    with guard():
        if name is not None:  # an unknown name: ConfigError with "did you mean", one line, exit 2
            p = load_preset(name)
            method, encoder, inp = summary(p)
            lines = [f"# {name}: method {method}, encoder {encoder}, input {inp}"]
            lines += [f"# {ln}" for ln in (p.description or "(no description)").splitlines()]
            print("\n".join(lines) + "\n" + dump_yaml(p), end="")
            return
        rows, broken = [("preset", "method", "encoder", "input")], []
        for n in list_presets():
            try:
                rows.append((n, *summary(load_preset(n))))
            except ConfigError as e:  # one broken user preset should not hide the others
                broken.append(f"{n}  invalid: {e}")
        width = [max(len(r[i]) for r in rows) for i in range(3)]
        for r in rows:  # plain lines: no wrapping at any terminal width, easy to grep
            print("  ".join(c.ljust(w) for c, w in zip(r, width)) + "  " + r[3])
        for line in broken:
            print(line)
        print("\nsslaudio presets NAME: a preset's description and its resolved YAML")


@app.command(epilog="Example: sslaudio demo --out sslaudio-demo")
def demo(
    out_dir: Path = typer.Option(Path("sslaudio-demo"), "--out", "-o", parser=_path, help="Where the data and the run go."),
    preset: str = typer.Option("tiny/byol-a", "--preset", "-p",
                               help="The preset to pretrain (see 'sslaudio presets')."),
    steps: Optional[int] = typer.Option(None, help="Override the preset's steps."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
):
    """Generate a toy labeled dataset, pretrain on it, extract, probe vs random init, export."""
    from sslaudio.build import load_preset
    from sslaudio.data import scan_pairs
    from sslaudio.evaluation import probe_checkpoint
    from sslaudio.export import export as run_export
    from sslaudio.features import extract as run_extract
    from sslaudio.inference import load_encoder
    from sslaudio.synth import make_dataset
    from sslaudio.train import fit, resolve_device

    with guard():
        t0 = time.time()
        # every setting is checked before the toy dataset is made (half a minute)
        p = load_preset(preset, [f"train.steps={steps}"] if steps is not None else [])
        dev = resolve_device(device)
        _out_folder(out_dir)
        err.print("1/5 generating the toy dataset ...")
        labels = make_dataset(out_dir / "data")
        run = out_dir / "run"
        err.print(f"2/5 pretraining {preset} for {p.train.steps} steps on {dev} ...")
        with _Progress(True) as bar:
            fit(p, [str(out_dir / "data" / "audio" / "train"), str(out_dir / "data" / "unlabeled")], run,
                resume=True, device=str(dev), on_log=bar)
        err.print("3/5 extracting embeddings ...")
        feats = out_dir / "features"
        bundle = load_encoder(str(run))  # for extraction and export
        ex = run_extract(bundle, scan_pairs([str(out_dir / "data" / "audio")]), feats, True,
                         "safetensors", dev, 32, encoder_id=str(run))
        err.print("4/5 probing the pretrained and the random-init encoder ...")
        trained = probe_checkpoint(str(run), labels, device=device, on_skip=_warn_skip)
        random_ = probe_checkpoint(f"random:{preset}", labels, device=device, on_skip=_warn_skip)
        err.print("5/5 exporting ...")
        exp = run_export(bundle, "torchscript", out_dir / "encoder.torchscript.pt")
        t = Table(title=f"sslaudio demo: {preset} ({time.time() - t0:.0f} s)")
        for c in ("encoder", "linear acc", "macro F1", "kNN acc"):
            t.add_column(c, justify="right" if c != "encoder" else "left")
        for name, r in (("pretrained", trained), ("random init", random_)):
            t.add_row(name, f"{r['accuracy']:.3f}", f"{r['f1']:.3f}", f"{r['knn_accuracy']:.3f}")
        out.print(t)
        _print_table("files", {"toy data (labels.csv)": labels, "run (log.jsonl, ckpt/)": run,
                               "encoder weights": run / "export" / "encoder.safetensors",
                               f"features ({ex['written']} files)": feats,
                               "TorchScript encoder": f"{exp['out']} (max abs diff {exp['max_abs_diff']:.1e})"})
        res = {"pretrained": trained, "random": random_, "export": exp}
        (out_dir / "demo_results.json").write_text(json.dumps(res, indent=1))


def _reflow(doc: str) -> str:
    """A command's docstring with each paragraph on one line: Typer's rich help prints the source's
    single line breaks as they are, so the help would break mid-sentence at whatever width."""
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(doc).split("\n\n"))


for _info in app.registered_commands:
    if _info.help is None and _info.callback is not None and _info.callback.__doc__:
        _info.help = _reflow(_info.callback.__doc__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
