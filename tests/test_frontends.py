import torch

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
