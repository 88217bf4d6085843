import json

import pytest
import torch
from safetensors.torch import load_file

from sslaudio import checkpoint
from sslaudio.build import load_preset
from sslaudio.data import DataError
from sslaudio.inference import load_encoder
from sslaudio.runfolder import RunMismatch
from sslaudio.train import TrainingDiverged, fit, lr_at

SMALL = ["encoder.d=64", "encoder.base_d=8", "method.proj_hidden=32", "method.proj_dim=16",
         "views[0].memory=8", "train.batch_size=4", "train.steps=4", "train.ckpt_every=2",
         "train.log_every=1", "data.num_workers=0", "data.norm_samples=8", "train.keep_last=5"]


def small(*extra):
    return load_preset("tiny/byol-a", SMALL + list(extra))


def test_lr_schedule_is_a_pure_function():
    p = small("optim.warmup_steps=10", "optim.lr=1.0", "optim.min_lr_ratio=0.1")
    assert lr_at(0, p.optim, 110) == pytest.approx(0.1)
    assert lr_at(9, p.optim, 110) == pytest.approx(1.0)
    assert lr_at(110, p.optim, 110) == pytest.approx(0.1)
    assert lr_at(60, p.optim, 110) == pytest.approx(0.55)


def test_fit_writes_run_layout(audio_dir, tmp_path):
    run = tmp_path / "run"
    calls = []
    fit(small(), [str(audio_dir)], run, on_log=lambda *a: calls.append(a))
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all("loss" in r and "emb_std" in r for r in rows)
    assert all(0.0 <= r["data_wait"] <= 1.0 for r in rows)  # the share of the wall time spent waiting for batches
    assert calls == [(0, 4, None)] + [(r["step"], 4, r) for r in rows]  # on_log: the start, then each row
    assert [s for s, _ in checkpoint.step_dirs(run)] == [2, 4]
    assert (run / "config.yaml").is_file() and (run / "export" / "encoder.safetensors").is_file()
    assert not list((run / "ckpt").glob(".tmp*"))
    step = checkpoint.latest(run)
    assert {p.name for p in step.iterdir()} == {"model.safetensors", "optim.safetensors", "state.json"}


def test_resume_gives_identical_weights(audio_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    fit(small(), [str(audio_dir)], a)
    fit(small(), [str(audio_dir)], b)
    import shutil

    shutil.rmtree(b / "ckpt" / "step-000000004")  # as if stopped after step 2
    starts = []
    summary = fit(small(), [str(audio_dir)], b, on_log=lambda done, total, row: row or starts.append((done, total)))
    assert summary["start_step"] == 2 and starts == [(2, 4)]
    wa = load_file(str(a / "ckpt" / "step-000000004" / "model.safetensors"))
    wb = load_file(str(b / "ckpt" / "step-000000004" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert "views.global_chains.0.augs.0.bank" in wa  # the mixup memory is part of the checkpoint
    losses = [[json.loads(r)["loss"] for r in (d / "log.jsonl").read_text().splitlines()] for d in (a, b)]
    assert len(losses[0]) == 4 and losses[0] == losses[1]  # the resumed log is trimmed, then continued


def test_resume_refuses_another_config(audio_dir, tmp_path):
    fit(small(), [str(audio_dir)], tmp_path / "r")
    with pytest.raises(RunMismatch, match="another configuration"):
        fit(small("optim.lr=0.5"), [str(audio_dir)], tmp_path / "r")


def test_keep_last_prunes(audio_dir, tmp_path):
    fit(small("train.keep_last=1", "train.ckpt_every=1"), [str(audio_dir)], tmp_path / "r")
    assert [s for s, _ in checkpoint.step_dirs(tmp_path / "r")] == [4]


def test_nonfinite_loss_stops(audio_dir, tmp_path):
    with pytest.raises(TrainingDiverged, match="non-finite"):
        fit(small("optim.lr=1e30", "train.max_nonfinite=2", "train.steps=30"), [str(audio_dir)],
            tmp_path / "r")


def test_no_usable_audio(bad_dir, tmp_path):
    for f in bad_dir.glob("good*"):
        f.unlink()
    with pytest.raises(DataError, match="no usable audio"):
        fit(small(), [str(bad_dir)], tmp_path / "r")


def test_loaded_encoder_matches_training_weights(audio_dir, tmp_path):
    run = tmp_path / "r"
    fit(small(), [str(audio_dir)], run)
    audio = torch.randn(2, 16000) * 0.1
    outs = []
    for spec in (str(run), str(checkpoint.latest(run)), str(run / "export" / "encoder.safetensors")):
        with torch.no_grad():
            outs.append(load_encoder(spec).embed(audio)[0])
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    with pytest.raises(checkpoint.CheckpointError):
        load_encoder(str(tmp_path / "nothing"))


def test_weight_decay_schedule_is_cosine_and_resumes(tmp_path, audio_dir):
    """optim.weight_decay_end: a cosine from weight_decay to it over the run, applied to the decaying
    groups only; resume replays it."""
    import shutil

    from safetensors.torch import load_file

    from sslaudio.build import load_preset
    from sslaudio.train import fit, weight_decay_at

    p = load_preset("tiny/byol-a", ["train.steps=4", "train.ckpt_every=2", "train.batch_size=4",
                                    "data.num_workers=0", "optim.weight_decay=0.04", "optim.weight_decay_end=0.4"])
    assert weight_decay_at(0, p.optim, 10) == pytest.approx(0.04)
    assert weight_decay_at(5, p.optim, 10) == pytest.approx(0.22)
    assert weight_decay_at(10, p.optim, 10) == pytest.approx(0.4)
    plain = load_preset("tiny/byol-a")
    assert weight_decay_at(7, plain.optim, 10) == plain.optim.weight_decay
    fit(p, [str(audio_dir)], tmp_path / "a", device="cpu")
    fit(p, [str(audio_dir)], tmp_path / "b", device="cpu")
    shutil.rmtree(tmp_path / "b" / "ckpt" / "step-000000004")
    fit(p, [str(audio_dir)], tmp_path / "b", device="cpu")
    a = load_file(str(tmp_path / "a/ckpt/step-000000004/model.safetensors"))
    b = load_file(str(tmp_path / "b/ckpt/step-000000004/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = load_preset("tiny/byol-a", ["train.steps=4", "train.ckpt_every=2", "train.batch_size=4",
                                    "data.num_workers=0", "optim.weight_decay=0.04"])
    fit(c, [str(audio_dir)], tmp_path / "c", device="cpu")
    cw = load_file(str(tmp_path / "c/ckpt/step-000000004/model.safetensors"))
    assert any(not torch.equal(a[k], cw[k]) for k in a)  # the schedule changed the weights
