"""Training steps that never wait on the device (issue 14: one host sync per step at most, the
trainer's own loss / health read).

A GPU sync happens when the host reads a device value: `.item()`, `int()` / `bool()` of a tensor,
boolean-mask indexing (its output size is data-dependent), `.tolist()`. The check runs on the CPU:
after one real warm-up step, the method and its batch move to the meta device and the step runs
again with a generator that reports the meta device, so every tensor the step makes on the
training device is a meta tensor, whose values cannot be read: any such read raises. Tensors the
code builds on the host (Python-side counts, CPU generators) are real and stay readable, as they
would on a GPU machine.
"""

import pytest
import torch
from torch import nn

from sslaudio.hostint import host_int, set_host_int
from tests.conftest import gen
from tests.test_methods import audio_batch, small

# Every tiny preset whose step is sync-free. Still syncing (issue 14, what is left): the span
# masks' data-dependent counts in keep mode (tiny/data2vec2-wave), wav2vec 2.0's distractor
# sampling among each row's masked frames (tiny/wav2vec2[-wave]; fairseq and transformers sync
# there too), ATST-Frame's boolean selection of masked frames before its BatchNorm heads
# (tiny/atst-frame) and the s3prl alteration's span counts (tiny/mockingjay, tiny/tera).
SYNC_FREE = ["tiny/apc", "tiny/atst-c2f", "tiny/atst-clip", "tiny/barlow-twins", "tiny/byol", "tiny/byol-a",
             "tiny/byol-a-v2", "tiny/cpc", "tiny/data2vec", "tiny/data2vec-wave", "tiny/data2vec2",
             "tiny/deepcluster", "tiny/dino", "tiny/hubert", "tiny/hubert-wave", "tiny/m2d", "tiny/moco-v2", "tiny/moco-v3", "tiny/npc",
             "tiny/simclr", "tiny/simsiam", "tiny/swav", "tiny/vicreg"]


class MetaGenerator(torch.Generator):
    """A CPU generator that says it lives on the meta device: what a method draws on
    `generator.device` becomes meta, as it would be a CUDA tensor on a GPU."""

    @property
    def device(self):
        return torch.device("meta")


@pytest.fixture
def meta_autocast(monkeypatch):
    """torch.autocast has no meta backend: treat meta as the CPU (precision only)."""
    init = torch.autocast.__init__

    def patched(self, device_type, *args, **kwargs):
        init(self, "cpu" if device_type == "meta" else device_type, *args, **kwargs)

    monkeypatch.setattr(torch.autocast, "__init__", patched)


def meta_step(m: nn.Module, audio: torch.Tensor) -> None:
    """One training step (forward, backward, after_step) with every device tensor on meta."""
    m.to("meta")
    g = MetaGenerator()
    g.manual_seed(0)
    out = m({"audio": audio.to("meta")}, 1, g, 10)
    out["loss"].backward()
    m.after_step(1, 10)


@pytest.mark.parametrize("name", SYNC_FREE)
def test_training_step_reads_nothing_from_the_device(name, meta_autocast):
    p, m = small(name)
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
