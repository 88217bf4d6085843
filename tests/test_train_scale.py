"""The train options for speed and scale in one process: grad_accum (the accumulated gradient is the
full batch's; resume stays bit-identical), compile, activation_checkpointing, and the identity of
runs that do not use them. The multi-process side (DDP) is in test_distributed.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from sslaudio import config
from sslaudio.build import load_preset
from sslaudio.config import ConfigError
from sslaudio.train import fit

# APC: no BatchNorm, no dropout, no masks and a mean loss over equal-length crops, so micro-batches
# change nothing but the order of the sums
APC = ["data.clip_seconds=0.5", "train.batch_size=8", "train.steps=2", "train.ckpt_every=1", "train.log_every=1",
       "data.num_workers=0", "data.norm_samples=8", "optim.warmup_steps=1"]
M2D = ["train.batch_size=4", "train.steps=4", "train.ckpt_every=2", "train.log_every=1", "data.num_workers=0",
       "data.norm_samples=8", "train.keep_last=5"]


def weights(run, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "ckpt" / f"step-{step:09d}" / "model.safetensors"))


def losses(run) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (run / "log.jsonl").read_text().splitlines()]


def test_accumulated_gradient_is_the_full_batch_gradient(audio_dir, tmp_path, monkeypatch):
    grads = {}
    adamw_step = torch.optim.AdamW.step

    def record(self, *a, **kw):  # the gradients the trainer hands to the optimizer at its first step
        grads.setdefault(k, [p.grad.clone() for g in self.param_groups for p in g["params"]])
        return adamw_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    for k in (1, 2, 4):
        fit(load_preset("tiny/apc", APC + [f"train.grad_accum={k}"]), [str(audio_dir)], tmp_path / str(k), device="cpu")
    one = weights(tmp_path / "1", 2)
    for k in (2, 4):
        # measured: 6e-7 of the largest gradient element at most (float sums in another order); a
        # gradient scaled by the number of micro-batches, or one micro-batch lost, is far off
        assert all(torch.allclose(g, g1, rtol=1e-4, atol=1e-6 * g1.abs().max()) for g, g1 in zip(grads[k], grads[1]))
        assert losses(tmp_path / str(k)) == pytest.approx(losses(tmp_path / "1"), rel=1e-5)  # the mean loss
        w = weights(tmp_path / str(k), 2)
        # Adam turns rounding in a near-zero gradient element into a step of up to lr (3e-3): measured
        # 5e-5 at most, on a few of the 3e5 weights
        assert w.keys() == one.keys() and all(torch.allclose(w[n], one[n], rtol=0, atol=3e-4) for n in one)


def test_grad_accum_resume_is_bit_identical(audio_dir, tmp_path):
    """M2D (masks from the method's generator, dropout-free EMA teacher): every micro-batch draws
    from (seed, step, micro-batch), so a resumed run replays the same masks."""
    p = load_preset("tiny/m2d", M2D + ["train.grad_accum=2"])
    a, b = tmp_path / "a", tmp_path / "b"
    fit(p, [str(audio_dir)], a, device="cpu")
    shutil.copytree(a / "ckpt" / "step-000000002", b / "ckpt" / "step-000000002")
    shutil.copy(a / "config.yaml", b / "config.yaml")
    assert fit(p, [str(audio_dir)], b, device="cpu")["start_step"] == 2
    wa, wb = weights(a, 4), weights(b, 4)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    plain = tmp_path / "plain"
    fit(load_preset("tiny/m2d", M2D), [str(audio_dir)], plain, device="cpu")
    assert weights(plain, 4).keys() == wa.keys()
    assert losses(plain)[0] != losses(a)[0]  # micro-batch 1 draws its own masks


def test_grad_accum_must_split_the_batch(audio_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"divisible by the 1 processes x train.grad_accum 3$"):
        fit(load_preset("tiny/apc", APC + ["train.grad_accum=3"]), [str(audio_dir)], tmp_path / "r", device="cpu")
    with pytest.raises(ConfigError, match="train.grad_accum must be >= 1"):
        load_preset("tiny/apc", ["train.grad_accum=0"])
    with pytest.raises(ConfigError, match="train.parallel"):
        load_preset("tiny/apc", ["train.parallel=zero"])


def test_new_train_options_keep_the_identity_of_existing_runs(monkeypatch):
    hashed = []
    dumps = config.json.dumps
    monkeypatch.setattr(config.json, "dumps", lambda d, **kw: hashed.append(d) or dumps(d, **kw))
    base = load_preset("tiny/m2d")
    ident = base.identity()
    assert not {"parallel", "grad_accum", "compile", "activation_checkpointing"} & set(hashed[-1]["train"])
    # how the step is computed, not what it computes
    for opt in ("train.parallel=allreduce", "train.parallel=fsdp", "train.compile=true",
                "train.activation_checkpointing=true"):
        assert load_preset("tiny/m2d", [opt]).identity() == ident, opt
    assert load_preset("tiny/m2d", ["train.grad_accum=2"]).identity() != ident  # batch statistics of micro-batches


def test_activation_checkpointing_is_set_on_every_module_that_has_it(audio_dir, tmp_path, monkeypatch):
    from sslaudio import train

    warnings = []
    fit(load_preset("tiny/apc", APC + ["train.steps=1", "train.activation_checkpointing=true"]), [str(audio_dir)],
        tmp_path / "a", device="cpu", warn=warnings.append)
    assert any("does nothing" in w for w in warnings)  # a GRU encoder: said, not silently ignored
    built, warnings = [], []
    build = train.build_method
    monkeypatch.setattr(train, "build_method", lambda p: built.append(build(p)) or built[-1])
    fit(load_preset("tiny/m2d", M2D + ["train.steps=1", "train.activation_checkpointing=true"]), [str(audio_dir)],
        tmp_path / "m", device="cpu", warn=warnings.append)
    flagged = [m for m in built[0].modules() if hasattr(m, "activation_checkpointing")]
    if not flagged:
        pytest.skip("the transformer blocks have no activation_checkpointing attribute yet")
    assert all(m.activation_checkpointing is True for m in flagged) and not warnings


def test_compile_failure_is_one_line(audio_dir, tmp_path, monkeypatch):
    import torch._dynamo.exc

    def broken(model, **kw):
        def step(*a, **k):
            raise torch._dynamo.exc.TorchRuntimeError("no C compiler\nmore")
        return step

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(ConfigError, match=r"^train.compile: torch.compile failed for method apc \(.*\); set "
                                          r"train.compile: false$"):
        fit(load_preset("tiny/apc", APC + ["train.compile=true"]), [str(audio_dir)], tmp_path / "r", device="cpu")


@pytest.mark.slow
def test_compile_trains_with_the_same_checkpoint_keys(audio_dir, tmp_path):
    p = load_preset("tiny/apc", APC + ["train.compile=true"])
    fit(p, [str(audio_dir)], tmp_path / "c", device="cpu")
    fit(load_preset("tiny/apc", APC), [str(audio_dir)], tmp_path / "e", device="cpu")
    wc, we = weights(tmp_path / "c", 2), weights(tmp_path / "e", 2)
    assert wc.keys() == we.keys()  # no `_orig_mod.` prefix
    assert all(torch.allclose(wc[k], we[k], rtol=0, atol=1e-4) for k in wc)  # inductor's kernels round otherwise
    assert losses(tmp_path / "c") == pytest.approx(losses(tmp_path / "e"), rel=1e-4)
