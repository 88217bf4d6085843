"""Training steps that never wait on the device (issue 14: one host sync per step at most, the
trainer's own loss / health read).

A GPU sync happens when the host reads a device value: `.item()`, `int()` / `bool()` of a tensor,
boolean-mask indexing (its output size is data-dependent), `.tolist()`; a blocking host-to-device
copy (`cpu_tensor.to("cuda")`, `torch.tensor(value, device="cuda")`) waits for the stream too. The
check runs on the CPU:
after one real warm-up step, the method and its batch move to the meta device and the step runs
again with a generator that reports the meta device, so every tensor the step makes on the
training device is a meta tensor, whose values cannot be read: any such read raises. Tensors the
code builds on the host (Python-side counts, CPU generators) are real and stay readable, as they
would on a GPU machine. A second step also refuses blocking host-to-device copies (the first
fills per-device caches, which a GPU run copies once).
"""

import contextlib
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from sslaudio.build import load_preset
from sslaudio.hostint import host_int, set_host_int
from sslaudio.masking import host_generator
from tests.conftest import build_tiny, gen
from tests.test_methods import audio_batch, small

# Every tiny preset: each step is sync-free.
TINY = sorted(f"tiny/{p.stem}" for p in (Path(__file__).resolve().parents[1] / "presets" / "tiny").glob("*.yaml"))


class MetaGenerator(torch.Generator):
    """A CPU generator that says it lives on the meta device: what a method draws on
    `generator.device` becomes meta, as it would be a CUDA tensor on a GPU."""

    @property
    def device(self):
        return torch.device("meta")

    # a CUDA generator's Philox state (seed, offset) lives on the host; host_generator reads it
    def get_offset(self) -> int:
        return self.__dict__.get("offset", 0)

    def set_offset(self, offset: int) -> None:
        self.__dict__["offset"] = offset


class NoBlockingCopies(TorchDispatchMode):
    """A blocking host-to-device copy (`tensor.to(device)` of a CPU tensor without non_blocking)
    also waits for the device on CUDA (the copy synchronises the stream): refuse it."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and args[0].device.type == "cpu" \
                and torch.device(kwargs.get("device") or "cpu").type == "meta" and not kwargs.get("non_blocking"):
            raise RuntimeError(f"a blocking host-to-device copy of a {tuple(args[0].shape)} tensor")
        if func is torch.ops.aten.copy_.default and args[0].device.type == "meta" and args[1].device.type == "cpu" \
                and args[1].dim() and not (args[2] if len(args) > 2 else kwargs.get("non_blocking")):
            raise RuntimeError(f"a blocking host-to-device copy of a {tuple(args[1].shape)} tensor")
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_blocking_copies():
    """Refuse blocking host-to-device copies: through the dispatcher (NoBlockingCopies) and
    torch.tensor / as_tensor / new_tensor of host values onto the device, which copy without it."""
    patched = []
    for owner, name in ((torch, "tensor"), (torch, "as_tensor"), (torch.Tensor, "new_tensor")):
        original = getattr(owner, name)

        def guarded(*args, _original=original, _name=name, **kwargs):
            out = _original(*args, **kwargs)
            source = args[1] if _name == "new_tensor" else args[0]
            if out.device.type == "meta" and not isinstance(source, torch.Tensor):
                raise RuntimeError(f"torch.{_name} copies a host value to the device (a blocking copy)")
            return out

        patched.append((owner, name, original))
        setattr(owner, name, guarded)
    try:
        with NoBlockingCopies():
            yield
    finally:
        for owner, name, original in patched:
            setattr(owner, name, original)


@pytest.fixture
def meta_autocast(monkeypatch):
    """torch.autocast has no meta backend: treat meta as the CPU (precision only)."""
    init = torch.autocast.__init__

    def patched(self, device_type, *args, **kwargs):
        init(self, "cpu" if device_type == "meta" else device_type, *args, **kwargs)

    monkeypatch.setattr(torch.autocast, "__init__", patched)


def meta_step(m: nn.Module, audio: torch.Tensor) -> None:
    """Two training steps (forward, backward, after_step) with every device tensor on meta; the
    second also refuses blocking host-to-device copies (the first fills per-device caches, such
    as positional tables, which a GPU run copies once)."""
    m.to("meta")
    audio = audio.to("meta")
    for step in (1, 2):
        g = MetaGenerator()
        g.manual_seed(step)
        with no_blocking_copies() if step == 2 else contextlib.nullcontext():
            out = m({"audio": audio}, step, g, 10)
            out["loss"].backward()
            m.after_step(step, 10)


@pytest.mark.parametrize("name", TINY)
def test_training_step_reads_nothing_from_the_device(name, meta_autocast):
    p, m = small(name)
    if p.encoder["name"] in ("rnn", "cpc"):  # a meta-device RNN (APC; CPC's GRU context) runs its frames
        # one by one in Python (19 s for tiny/apc's 2 s crops): 0.3 s crops keep the check quick (30
        # frames, more than CPC's 12 predicted steps); a device read would show at any length
        sets = ["train.batch_size=4", "data.clip_seconds=0.3"]
        p, m = load_preset(name, sets), build_tiny(name, *sets)
    audio = audio_batch(p, m)
    m({"audio": audio}, 0, gen(0), 10)  # a real first step: memories, queues, host mirrors
    m.after_step(0, 10)
    meta_step(m, audio)  # raises at the first read of a device value


def test_the_check_catches_a_device_read(meta_autocast):
    class Reads(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, batch, step, g, max_steps):
            x = batch["audio"].flatten(1) @ torch.ones(batch["audio"].shape[-1], 3, device=g.device)
            if bool((x > 0).any()):  # the kind of check that stalls a GPU every step
                x = x + 1
            return {"loss": (x * self.w).sum()}

        def after_step(self, step, max_steps):
            pass

    with pytest.raises((RuntimeError, NotImplementedError)):
        meta_step(Reads(), torch.randn(2, 1, 8))


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))


def test_host_int_mirrors_the_buffer_and_follows_a_load():
    a = Counter()
    assert host_int(a, "ptr") == 0
    set_host_int(a, "ptr", 5)
    assert int(a.ptr) == 5 and host_int(a, "ptr") == 5
    b = Counter()
    set_host_int(b, "ptr", 2)  # b has a mirror of its own value ...
    b.load_state_dict(a.state_dict())  # ... which a load must not leave stale
    assert host_int(b, "ptr") == 5
    parent = nn.Sequential(Counter())
    host_int(parent[0], "ptr")
    parent.load_state_dict({"0.ptr": torch.tensor(7)})  # loaded through a parent module too
    assert host_int(parent[0], "ptr") == 7


def test_the_check_catches_a_blocking_copy(meta_autocast):
    class Copies(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, batch, step, g, max_steps):
            scale = torch.tensor(float(step), device=g.device)  # a host value copied with a stream sync
            return {"loss": batch["audio"].sum() * self.w * scale}

        def after_step(self, step, max_steps):
            pass

    with pytest.raises(RuntimeError, match="blocking"):
        meta_step(Copies(), torch.randn(2, 1, 8))


def test_host_generator_streams():
    """A CPU generator draws on itself (CPU runs unchanged); an accelerator's gives a CPU generator
    from its seed and offset, a new stream per call, the same after re-seeding (resume)."""
    cpu = gen(3)
    assert host_generator(cpu) is cpu

    def draws(seed):
        g = MetaGenerator()
        g.manual_seed(seed)
        a, b = (torch.rand(4, generator=host_generator(g)) for _ in range(2))
        return a, b, g.get_offset()

    a, b, offset = draws(5)
    assert not torch.equal(a, b) and offset == 8
    a2, b2, _ = draws(5)
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert not torch.equal(a, draws(6)[0])


@pytest.mark.parametrize("name", sorted(__import__("sslaudio.registry", fromlist=["MASKERS"]).MASKERS.names()))
def test_every_masker_in_keep_mode_reads_nothing_from_the_device(name):
    """Keep mode needs every row's visible count on the host (to cut keep_idx): each masker knows it
    there or draws the mask there (span, block), for training crops (no padding)."""
    from tests.test_masking import GRIDS, build

    grid = GRIDS[name]
    g = MetaGenerator()
    g.manual_seed(0)
    with no_blocking_copies():
        mask = build(name, mode="keep")(grid, 4, None, g)
    assert mask.masked.device.type == "meta" and mask.keep_idx.shape[0] == 4
