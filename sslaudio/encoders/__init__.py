"""Encoders; importing this package registers them (explicitly, one import per module)."""

from sslaudio.encoders import (  # noqa: F401
    cnn,
    conv_transformer,
    cpc,
    frame_transformer,
    npc,
    rnn,
    vit,
)
