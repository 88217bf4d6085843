import numpy as np
import torch

from sslaudio.inference import load_encoder
from sslaudio.features import embed_files
from sslaudio.data import scan_pairs
from tests.conftest import write_wav
from sslaudio.synth import clip


def test_batched_equals_one_by_one(labeled_dir):
    bundle = load_encoder("random:tiny/byol-a")
    items = scan_pairs([str(labeled_dir)])[:6]
    batched = {e.path: e for e in embed_files(bundle, items, torch.device("cpu"), True, batch_size=6)}
    for item in items[:3]:
        (single,) = list(embed_files(bundle, [item], torch.device("cpu"), True, batch_size=1))
        assert np.allclose(single.clip, batched[item[0]].clip, atol=1e-5)
        assert np.allclose(single.frames, batched[item[0]].frames, atol=1e-5)


def test_long_files_are_chunked(tmp_path):
    bundle = load_encoder("random:tiny/byol-a")
    x = np.concatenate([clip("saw", 1, 2.0), clip("bell", 2, 2.0), clip("chirp", 3, 1.5)])
    p = write_wav(tmp_path / "long.wav", x)
    whole = next(embed_files(bundle, [(str(p), "long.wav")], torch.device("cpu"), True, chunk_seconds=60))
    chunked = next(embed_files(bundle, [(str(p), "long.wav")], torch.device("cpu"), True, chunk_seconds=1.0))
    assert chunked.frames.shape[1] == whole.frames.shape[1]
    assert abs(chunked.frames.shape[0] - whole.frames.shape[0]) <= 6
    assert np.all(np.diff(chunked.times) > 0) and abs(chunked.times[-1] - whole.times[-1]) < 0.5
    # chunking only changes the frames next to chunk borders (the CNN's context there)
    assert np.corrcoef(chunked.clip, whole.clip)[0, 1] > 0.9


def test_chunked_wave_encoder_loses_no_frame_at_chunk_borders(tmp_path):
    """A conv-transformer frame needs 400 samples per 320-sample hop: each chunk reads past its end,
    so the chunked frames are the whole file's frames, one hop apart, none lost or repeated."""
    torch.manual_seed(0)
    bundle = load_encoder("random:tiny/hubert-wave")
    bundle.needs_stats = False
    x = np.concatenate([clip("saw", 1, 1.3), clip("bell", 2, 1.2)])
    p = write_wav(tmp_path / "long.wav", x)
    whole = next(embed_files(bundle, [(str(p), "long.wav")], torch.device("cpu"), True, chunk_seconds=60))
    chunked = next(embed_files(bundle, [(str(p), "long.wav")], torch.device("cpu"), True, chunk_seconds=0.5))
    assert chunked.frames.shape == whole.frames.shape
    assert np.allclose(chunked.times, whole.times)
    assert np.allclose(np.diff(chunked.times), 0.02)


def test_decode_threads_give_the_same_features_in_the_same_order(labeled_dir, tmp_path):
    """--workers: files decoded ahead in threads, results identical and in order; a broken file is
    still a skip with its reason."""
    from sslaudio.features import prefetch

    assert list(prefetch(lambda x: x * x, list(range(20)), workers=3)) == [x * x for x in range(20)]
    assert list(prefetch(lambda x: x, [], workers=2)) == []
    bundle = load_encoder("random:tiny/byol-a")
    items = scan_pairs([str(labeled_dir)])[:9]
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF0000WAVEjunk")
    items = items[:4] + [(str(bad), "bad.wav")] + items[4:]
    skipped = {}
    runs = {}
    for w in (0, 2):
        out = list(embed_files(bundle, items, torch.device("cpu"), True, batch_size=2, workers=w,
                               on_skip=lambda p, r, w=w: skipped.setdefault(w, []).append(p)))
        runs[w] = out
    assert [e.path for e in runs[0]] == [e.path for e in runs[2]] and len(runs[0]) == 9
    for a, b in zip(runs[0], runs[2]):
        assert np.array_equal(a.clip, b.clip) and np.array_equal(a.frames, b.frames)
    assert skipped[0] == skipped[2] == [str(bad)]
