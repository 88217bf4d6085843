import pytest
import torch
import torchaudio

from sslaudio.build import load_preset
from sslaudio.config import ConfigError
from sslaudio.frontends import build_frontend


def test_logmel_shapes_and_lengths():
    fe = build_frontend({"name": "logmel", "n_mels": 64, "n_fft": 1024, "hop": 160}, 16000)
    x, fl = fe(torch.randn(3, 16000) * 0.1, torch.tensor([16000, 8000, 300]))
    assert x.shape == (3, 64, 101) and fl.tolist() == [101, 51, 2]


def test_stats_normalise_to_zero_mean_unit_std():
    fe = build_frontend({"name": "logmel", "n_mels": 32, "n_fft": 400, "hop": 160, "f_max": 8000}, 16000)
    audio = torch.randn(8, 8000) * torch.linspace(0.01, 1, 8)[:, None]
    fe.estimate_stats(audio)
    x, _ = fe(audio)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    assert {"norm_mean", "norm_std"} <= set(fe.state_dict())  # travel with the weights


def test_conv_stft_matches_torch_stft():
    fe = build_frontend({"name": "logmel", "n_mels": 64, "n_fft": 1024, "win_length": 800, "hop": 160}, 16000)
    audio = torch.randn(2, 12345) * 0.1
    ref, _ = fe(audio)
    fe.use_conv_stft()
    got, _ = fe(audio)
    assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-3)


def test_waveform_normalises_valid_part_only():
    fe = build_frontend({"name": "waveform"}, 16000)
    a = torch.randn(2, 1000) * 3 + 1
    x, lengths = fe(a, torch.tensor([1000, 500]))
    assert abs(float(x[0].mean())) < 1e-5 and abs(float(x[1, :500].std(unbiased=False)) - 1) < 1e-3
    assert float(x[1, 500:].abs().max()) == 0


# -- mel filterbank options (issue 11) ----------------------------------------------------------

@pytest.mark.parametrize("scale,norm", [("htk", "none"), ("htk", "slaney"), ("slaney", "none"),
                                        ("slaney", "slaney")])
def test_filterbank_is_torchaudio_melscale_fbanks_with_the_chosen_options(scale, norm):
    fe = build_frontend({"name": "logmel", "n_mels": 64, "n_fft": 1024, "hop": 160, "f_min": 60, "f_max": 7800,
                         "mel_scale": scale, "mel_norm": norm}, 16000)
    want = torchaudio.functional.melscale_fbanks(513, 60.0, 7800.0, 64, 16000,
                                                 norm=None if norm == "none" else norm, mel_scale=scale)
    assert torch.equal(fe.mel.mel_scale.fb, want)
    # and the forward applies it: log(fb^T |STFT|^2 + eps)
    audio = torch.randn(2, 4000) * 0.1
    spec = torch.stft(audio, 1024, 160, window=torch.hann_window(1024), center=True, pad_mode="reflect",
                      return_complex=True).abs() ** 2
    ref = (torch.matmul(spec.transpose(1, 2), want).transpose(1, 2) + fe.cfg.eps).log()
    assert torch.allclose(fe.log_mel(audio), ref, atol=1e-4)


def test_default_filterbank_is_unchanged_htk_without_norm():
    fe = build_frontend({"name": "logmel"}, 16000)
    assert fe.cfg.mel_scale == "htk" and fe.cfg.mel_norm == "none"
    want = torchaudio.functional.melscale_fbanks(513, 60.0, 7800.0, 64, 16000, norm=None, mel_scale="htk")
    assert torch.equal(fe.mel.mel_scale.fb, want)


def test_slaney_filterbank_matches_librosa_formula():
    """Independent of torchaudio: Slaney mel (linear to 1 kHz, log above) triangles scaled by
    2 / (f[i + 2] - f[i]), as librosa.filters.mel / nnAudio get_mel with htk=False, norm=1."""
    import math

    def hz_to_mel(f):
        return f / (200.0 / 3) if f < 1000 else 15.0 + math.log(f / 1000) / (math.log(6.4) / 27)

    def mel_to_hz(m):
        return m * 200.0 / 3 if m < 15.0 else 1000 * math.exp((m - 15.0) * math.log(6.4) / 27)

    sr, n_fft, n_mels, lo, hi = 16000, 400, 80, 50.0, 8000.0
    fe = build_frontend({"name": "logmel", "n_mels": n_mels, "n_fft": n_fft, "hop": 160, "f_min": lo, "f_max": hi,
                         "mel_scale": "slaney", "mel_norm": "slaney"}, sr)
    m_lo, m_hi = hz_to_mel(lo), hz_to_mel(hi)
    f = [mel_to_hz(m_lo + (m_hi - m_lo) * i / (n_mels + 1)) for i in range(n_mels + 2)]
    fft = [k * sr / n_fft for k in range(n_fft // 2 + 1)]
    want = torch.zeros(n_fft // 2 + 1, n_mels, dtype=torch.float64)
    for i in range(n_mels):
        for k, fk in enumerate(fft):
            w = max(0.0, min((fk - f[i]) / (f[i + 1] - f[i]), (f[i + 2] - fk) / (f[i + 2] - f[i + 1])))
            want[k, i] = w * 2.0 / (f[i + 2] - f[i])
    assert torch.allclose(fe.mel.mel_scale.fb.double(), want, rtol=1e-4, atol=1e-7)


def test_empty_mel_bin_is_a_config_error_naming_the_keys():
    with pytest.raises(ConfigError, match=r"frontend: mel bin 2 of 128 is empty.*use fewer n_mels or a larger n_fft"):
        build_frontend({"name": "logmel", "n_mels": 128, "n_fft": 400, "hop": 160, "f_min": 20, "f_max": 8000}, 16000)
    # the same bands with a finer FFT (or the Slaney scale) have no empty bin
    build_frontend({"name": "logmel", "n_mels": 128, "n_fft": 1024, "win_length": 400, "hop": 160, "f_min": 20,
                    "f_max": 8000}, 16000)
    with pytest.raises(ConfigError, match="mel_scale"):
        build_frontend({"name": "logmel", "mel_scale": "mel"}, 16000)
    with pytest.raises(ConfigError, match="mel_norm"):
        build_frontend({"name": "logmel", "mel_norm": "area"}, 16000)


@pytest.mark.parametrize("scale,norm", [("htk", "none"), ("slaney", "slaney")])
def test_conv_stft_export_path_follows_the_filterbank_option(scale, norm):
    fe = build_frontend({"name": "logmel", "n_mels": 80, "n_fft": 400, "hop": 160, "f_min": 50, "f_max": 8000,
                         "mel_scale": scale, "mel_norm": norm}, 16000)
    audio = torch.randn(2, 12345) * 0.1
    fe.estimate_stats(audio)
    ref, _ = fe(audio)
    fe.use_conv_stft()
    got, _ = fe(audio)
    assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-3)
    other = build_frontend({"name": "logmel", "n_mels": 80, "n_fft": 400, "hop": 160, "f_min": 50, "f_max": 8000,
                            "mel_scale": "htk" if scale == "slaney" else "slaney",
                            "mel_norm": "none" if norm == "slaney" else "slaney"}, 16000)
    other.norm_mean.copy_(fe.norm_mean), other.norm_std.copy_(fe.norm_std)
    assert not torch.allclose(other(audio)[0], got, atol=1e-2)  # the option changes what export computes


@pytest.mark.parametrize("name,scale,norm", [("byol-a-v2", "slaney", "slaney"), ("tiny/byol-a-v2", "slaney", "slaney"),
                                             ("m2d", "slaney", "slaney"), ("tiny/m2d", "slaney", "slaney"),
                                             ("byol-a", "htk", "none"), ("tiny/byol-a", "htk", "none")])
def test_presets_use_the_official_filterbank(name, scale, norm):
    """BYOL-A v2 (v2/train_v2.py) and M2D (m2d/runtime_audio.py) use nnAudio's MelSpectrogram with
    its defaults (htk=False, norm=1); BYOL-A v1's train.py torchaudio's (HTK, no norm)."""
    p = load_preset(name)
    fe = build_frontend(p.frontend, p.data.sample_rate)
    assert (fe.cfg.mel_scale, fe.cfg.mel_norm) == (scale, norm)


def test_cmvn_normalises_each_item_per_bin_over_its_valid_frames():
    """s3prl's utterance CMVN, (x - mean) / std over time per bin (torch.std: unbiased), against a
    direct computation on each item's valid frames (the padded item's statistics ignore its padding),
    the dataset statistics unused, and a silent item comes out as zeros, not rounding x 1e10."""
    fe = build_frontend({"name": "logmel", "n_mels": 40, "n_fft": 400, "hop": 160, "f_max": 8000, "cmvn": True}, 16000)
    fe.norm_mean.fill_(123.0)  # ignored with cmvn
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16000, generator=g), torch.randn(9600, generator=g) * torch.linspace(0, 1, 9600)
    batch = torch.stack([a, torch.nn.functional.pad(b, (0, 6400))])
    x, fl = fe(batch, torch.tensor([16000, 9600]))
    assert fl.tolist() == [101, 61]
    for raw, y, n in zip(fe.log_mel(batch), x, (101, 61)):
        raw = raw[:, :n]  # (F, T) of the item's valid frames
        want = (raw - raw.mean(1, keepdim=True)) / raw.std(1, keepdim=True)
        assert torch.allclose(y[:, :n], want, atol=1e-4)
        assert torch.allclose(y[:, :n].mean(1), torch.zeros(40), atol=1e-5)
        assert torch.allclose(y[:, :n].std(1), torch.ones(40), atol=1e-4)
    silent, _ = fe(torch.zeros(1, 8000))
    assert torch.isfinite(silent).all() and silent.abs().max() < 1e-2
    plain = build_frontend({"name": "logmel", "n_mels": 40, "n_fft": 400, "hop": 160, "f_max": 8000}, 16000)
    assert not torch.allclose(plain(batch)[0], x, atol=1e-2)  # the option changes the output
