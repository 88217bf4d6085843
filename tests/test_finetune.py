"""Fine-tuning (`probe --finetune`): its options, layer-wise learning rates, early stopping, and
end-to-end runs on a tiny encoder file: the metrics beside the frozen probe's, the encoder's
weights moving while the file on disk stays as it was, --save, and one-line errors."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from typer.testing import CliRunner

import sslaudio.finetune as ft
from sslaudio.build import load_preset
from sslaudio.checkpoint import export_encoder
from sslaudio.cli import app
from sslaudio.evaluation import probe_checkpoint
from sslaudio.finetune import EarlyStopping, FinetuneConfig, encoder_param_groups
from sslaudio.inference import load_encoder
from sslaudio.probe import ProbeError
from tests.conftest import build_tiny


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    """tiny/byol-a at random init, exported as an encoder file (what `probe` loads from disk)."""
    path = tmp_path_factory.mktemp("enc") / "encoder.safetensors"
    export_encoder(path, build_tiny("byol-a"), load_preset("tiny/byol-a"))
    return path


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("kwargs, option", [({"epochs": 0}, "--ft-epochs"), ({"lr": -1.0}, "--ft-lr"),
                                            ({"lr": float("nan")}, "--ft-lr"),
                                            ({"encoder_lr_ratio": 2.0}, "--ft-encoder-lr-ratio"),
                                            ({"layer_decay": 0.0}, "--ft-layer-decay"),
                                            ({"patience": 0}, "--ft-patience"), ({"batch_size": 0}, "--ft-batch-size")])
def test_config_refuses_bad_values_naming_the_option(kwargs, option):
    with pytest.raises(ProbeError, match=option):
        FinetuneConfig(**kwargs)


def test_layer_decay_lowers_the_learning_rate_towards_the_input():
    bundle = load_encoder("random:tiny/byol-a")
    groups = encoder_param_groups(bundle, 1e-4, 0.5)
    lrs = [g["lr"] for g in groups]
    # AudioNTT: 3 x (conv, BatchNorm) then fc.0 and fc.3: 8 units, the last at the full rate
    assert len(groups) == 8 and lrs[-1] == pytest.approx(1e-4) and lrs[0] == pytest.approx(1e-4 * 0.5**7)
    assert lrs == sorted(lrs)
    assert sum(len(g["params"]) for g in groups) == len(list(bundle.parameters()))
    assert {g["lr"] for g in encoder_param_groups(bundle, 1e-4, 1.0)} == {1e-4}


def test_early_stopping_keeps_the_best_epoch_and_stops_after_patience():
    model = torch.nn.Linear(2, 1)
    stop = EarlyStopping(patience=2)
    stops = []
    for epoch, score in enumerate([0.5, 0.7, 0.6, 0.7, 0.9]):
        with torch.no_grad():
            model.weight.fill_(epoch)
        stops.append(stop.update(epoch, score, model))
    # best 0.7 at epoch 1 (the tie at epoch 3 keeps the earlier one); epoch 3 is 2 epochs later: stop
    assert stops == [False, False, False, True, False] and stop.best_epoch == 4
    stop = EarlyStopping(patience=2)
    for epoch, score in enumerate([0.5, 0.7, 0.6, 0.7]):
        with torch.no_grad():
            model.weight.fill_(epoch)
        stop.update(epoch, score, model)
    assert stop.best_epoch == 1 and stop.best == 0.7 and torch.all(stop.state["weight"] == 1)


def test_clip_finetune_moves_the_encoder_not_the_file(encoder_file, labeled_dir, tmp_path, monkeypatch):
    """Through the library: every epoch's encoder weights are recorded; the saved model is the best
    valid epoch's, the weights did move, and the encoder file probed is byte for byte unchanged."""
    snapshots = []

    class Recording(EarlyStopping):
        def update(self, epoch, score, model):
            snapshots.append({k: v.clone() for k, v in model.bundle.encoder.state_dict().items()})
            return super().update(epoch, score, model)

    monkeypatch.setattr(ft, "EarlyStopping", Recording)
    before = _sha(encoder_file)
    cfg = FinetuneConfig(epochs=3, patience=3, lr=3e-3, batch_size=8)
    res = probe_checkpoint(str(encoder_file), labeled_dir / "labels.csv", seed=0, finetune_cfg=cfg,
                           save=tmp_path / "ft")
    f = res["finetune"]
    assert _sha(encoder_file) == before
    assert {"accuracy", "f1"} <= set(res) and {"accuracy", "f1", "valid", "epochs"} <= set(f)
    history = f["valid_history"]
    assert len(history) == len(snapshots) == f["epochs_run"] + 1 == 4
    assert f["epochs"] == history.index(max(history)) and f["valid"] == pytest.approx(max(history), abs=1e-6)
    moved = max(float((snapshots[1][k].float() - snapshots[0][k].float()).abs().max()) for k in snapshots[0])
    assert moved > 0  # one epoch at 3e-4 moved the encoder
    saved = load_encoder(str(tmp_path / "ft" / "encoder.safetensors")).encoder.state_dict()
    assert all(torch.equal(saved[k], snapshots[f["epochs"]][k]) for k in saved)
    assert (tmp_path / "ft" / "head.safetensors").is_file()
    # deterministic given the seed: the same run again (fewer epochs, same start) repeats epoch 1
    monkeypatch.setattr(ft, "EarlyStopping", EarlyStopping)
    again = probe_checkpoint(str(encoder_file), labeled_dir / "labels.csv", seed=0,
                             finetune_cfg=FinetuneConfig(epochs=1, patience=3, lr=3e-3, batch_size=8))
    assert again["finetune"]["valid_history"] == history[:2]
    assert again["finetune"]["train_loss"] == f["train_loss"][:1]


def test_cli_clip_finetune_json_beside_frozen_and_writes_nothing(encoder_file, labeled_dir, tmp_path):
    out = tmp_path / "r.json"
    before = sorted(p.name for p in encoder_file.parent.iterdir())
    r = CliRunner().invoke(app, ["probe", str(encoder_file), str(labeled_dir / "labels.csv"), "--json", str(out),
                                 "--finetune", "--ft-epochs", "1", "--ft-encoder-lr-ratio", "0.5",
                                 "--ft-layer-decay", "0.8"])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["task"] == "multiclass" and "knn_accuracy" in res and 0 <= res["accuracy"] <= 1
    f = res["finetune"]
    assert 0 <= f["accuracy"] <= 1 and 0 <= f["f1"] <= 1 and f["encoder_lr"] == pytest.approx(5e-4)
    assert f["layer_decay"] == 0.8 and "saved" not in f and "fine-tune epoch 1/1" in r.output
    assert sorted(p.name for p in encoder_file.parent.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


@pytest.mark.parametrize("args, message", [
    (["--finetune", "--ft-lr=-1"], "--ft-lr must be a finite number > 0"),
    (["--finetune", "--ft-epochs", "0"], "--ft-epochs must be an integer >= 1"),
    (["--ft-epochs", "3"], "--ft-epochs is a fine-tuning option: add --finetune"),
    (["--finetune", "--rnn-head"], "--rnn-head is for sound event detection"),
    (["--median-filter", "3"], "--median-filter is for sound event detection"),
    (["--save", "somewhere"], "--save writes a fine-tuned encoder: it needs --finetune"),
])
def test_cli_bad_fine_tuning_options_are_one_line_errors(encoder_file, labeled_dir, args, message):
    r = CliRunner().invoke(app, ["probe", str(encoder_file), str(labeled_dir / "labels.csv"), *args])
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_finetune_needs_a_split_column(encoder_file, labeled_dir, tmp_path):
    """Refused before any audio is read."""
    rows = (labeled_dir / "labels.csv").read_text().splitlines()
    nosplit = tmp_path / "labels.csv"
    nosplit.write_text("\n".join(["path,label"] + [",".join(r.split(",")[:2]) for r in rows[1:]]) + "\n")
    r = CliRunner().invoke(app, ["probe", str(encoder_file), str(nosplit), "--finetune"])
    assert r.exit_code == 2 and "needs train/valid/test splits" in r.output and len(r.output.strip().splitlines()) == 1
