"""Encoders; importing this package registers them (explicitly, one import per module)."""

from sslaudio.encoders import cnn, conv_transformer, cpc, frame_transformer, rnn, vit  # noqa: F401
