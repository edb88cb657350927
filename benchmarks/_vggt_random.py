"""Registers `vggt-1b-random`: the VGGT-1B aggregator config with seeded random weights, so that
benchmarks measure the real architecture on a machine that cannot download the checkpoint."""

from featstore.encoders import VGGTPreset, register_encoder
from featstore.encoders.vggt.config import VGGT_1B_CONFIG

NAME = "vggt-1b-random"


_PRESET = VGGTPreset(NAME, VGGT_1B_CONFIG, default_target=518, random_seed=0)
register_encoder(NAME, _PRESET.build, spec=_PRESET.spec, overwrite=True)
