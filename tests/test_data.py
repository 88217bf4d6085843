import numpy as np
import pytest
import torch

from sslaudio.audio import AudioError, load, probe
from sslaudio.data import (
    CropDataset,
    DataError,
    StepSampler,
    sample_for_stats,
    scan,
    scan_pairs,
    validate,
)
from tests.conftest import write_wav


def test_scan_folder_recursive_and_manifests(audio_dir, tmp_path):
    files = scan([str(audio_dir)])
    assert len(files) == 8 and any("/sub/" in f for f in files)
    txt = tmp_path / "list.txt"
    txt.write_text("\n".join(files[:3]) + "\n")
    csv = tmp_path / "m.csv"
    csv.write_text("id,path\n" + "\n".join(f"{i},{f}" for i, f in enumerate(files[3:5])) + "\n")
    assert scan([str(txt), str(csv)]) == files[:5]
    pairs = dict(scan_pairs([str(audio_dir)]))
    assert all(not rel.startswith("/") and p.endswith(rel) for p, rel in pairs.items())


def test_scan_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        scan([str(tmp_path / "missing")])
    bad = tmp_path / "m.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="'path' column"):
        scan([str(bad)])


def test_validate_skips_bad_files_with_reasons(bad_dir):
    warnings = []
    ok, skipped = validate(scan([str(bad_dir)]), min_seconds=0.1, warn=warnings.append)
    reasons = {p.split("/")[-1]: r for p, r in skipped}
    assert sorted(i.path.split("/")[-1] for i in ok) == ["good1.wav", "good2.flac"]
    assert set(reasons) == {"empty.wav", "corrupt.wav", "nan.wav", "short.wav"}
    assert "non-finite" in reasons["nan.wav"] and "too short" in reasons["short.wav"]
    assert len(warnings) == 4 and all("\n" not in w for w in warnings)


def test_load_downmixes_and_resamples(tmp_path):
    t = np.arange(44100) / 44100
    st = np.stack([np.sin(2 * np.pi * 440 * t), np.zeros_like(t)], 1).astype(np.float32)
    p = write_wav(tmp_path / "st.wav", st, sr=44100)
    x = load(p, 16000)
    assert x.shape == (16000,) and x.dtype == torch.float32
    assert abs(float(x.abs().max()) - 0.5) < 0.02  # mean of the two channels
    with pytest.raises(AudioError):
        load(tmp_path / "nope.wav", 16000)


def test_crops_are_deterministic_and_padded(audio_dir, tmp_path):
    infos, _ = validate(scan([str(audio_dir)]), 0.1)
    ds = CropDataset(infos, 16000, 0.5, segments=2, seed=3)
    a, b = ds[(0, 5, 1)]["audio"], ds[(0, 5, 1)]["audio"]
    assert a.shape == (2, 8000) and torch.equal(a, b)
    assert not torch.equal(a, ds[(0, 6, 1)]["audio"])
    assert not torch.equal(a[0], a[1])  # two different segments of the same file
    short = write_wav(tmp_path / "s.wav", np.ones(4000, dtype=np.float32) * 0.5)
    ds2 = CropDataset([probe(short)], 16000, 0.5, 1, 0)
    x = ds2[(0, 0, 0)]["audio"][0]
    assert x.shape == (8000,) and float(x[:2000].abs().max()) == 0 and float(x[2000:6000].min()) > 0.49


def test_step_sampler_covers_each_file_once_per_epoch():
    s = StepSampler(n_files=10, batch_size=4, seed=0, start_step=0, steps=5)
    flat = [k[0] for step in s for k in step]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    resumed = StepSampler(10, 4, 0, start_step=3, steps=5)
    assert list(resumed) == list(s)[3:]


def test_stats_sample_is_fixed(audio_dir):
    infos, _ = validate(scan([str(audio_dir)]), 0.1)
    ds = CropDataset(infos, 16000, 0.3, 1, 0)
    assert torch.equal(sample_for_stats(ds, 5, 0), sample_for_stats(ds, 5, 0))


def test_kernel_cached_resample_is_torchaudio_bit_for_bit():
    import torchaudio.functional as AF

    from sslaudio import audio

    x = torch.randn(30011) * 0.1
    for sr in (44100, 22050, 8000, 16000):
        assert torch.equal(audio.resample(x, sr, 16000), AF.resample(x, sr, 16000))
        assert torch.equal(audio.resample(x[None], 16000, sr), AF.resample(x[None], 16000, sr))  # batched
    assert audio.resample(x, 16000, 16000) is x
