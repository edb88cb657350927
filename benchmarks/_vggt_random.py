"""Registers `vggt-1b-random`: the VGGT-1B aggregator config with seeded random weights, so that
benchmarks measure the real architecture on a machine that cannot download the checkpoint."""

from featstore.encoders import _make_vggt, register_encoder
from featstore.encoders.vggt import VGGT_1B_CONFIG

NAME = "vggt-1b-random"


def _vggt_1b_random(*, weights=None, device="cpu", **kw):
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in VGGT_1B_CONFIG.items()}
    return _make_vggt(name=NAME, config=cfg, weights=None, device=device, random_seed=0,
                      default_target=518, **kw)


register_encoder(NAME, _vggt_1b_random, overwrite=True)
