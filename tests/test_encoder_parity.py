"""Parity with the official VGGT code (vendored in .vendor/vggt_official; skipped when absent).

Run with -s to see the error numbers. fp32 on CPU at a small config with the DINOv2 ViT-S/14
patch embed (its 12 blocks, position-embedding interpolation to a non-square grid).
"""

import sys
from pathlib import Path

import pytest
import torch

from featstore.encoders import get_encoder
from featstore.encoders.vggt.model import VGGTAggregator, init_random_

VENDOR = Path(__file__).resolve().parents[1] / ".vendor" / "vggt_official"

CONFIGS = {
    "dinov2_vits14": dict(img_size=518, embed_dim=384, depth=2, num_heads=6, patch_embed="dinov2_vits14_reg"),
    "conv_no_layerscale": dict(img_size=112, embed_dim=64, depth=3, num_heads=4, patch_embed="conv",
                               init_values=None, num_register_tokens=2),
}


@pytest.fixture(scope="module")
def Aggregator():
    if not (VENDOR / "vggt" / "models" / "aggregator.py").is_file():
        pytest.skip(f"official vggt not vendored at {VENDOR}")
    sys.path.insert(0, str(VENDOR))
    try:
        from vggt.models.aggregator import Aggregator
    finally:
        sys.path.remove(str(VENDOR))
    return Aggregator


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parity_fp32_cpu(Aggregator, name):
    cfg = CONFIGS[name]
    official = Aggregator(**cfg).eval()
    ours = init_random_(VGGTAggregator(**cfg), 5).eval()
    official.load_state_dict(ours.state_dict(), strict=True)  # same names, both directions
    ours.load_state_dict(official.state_dict(), strict=True)
    x = torch.rand(2, 3, 3, 70, 98, generator=torch.Generator().manual_seed(1))  # 5x7 patch grid
    with torch.no_grad():
        want, psi_w = official(x)
        got, psi_g = ours(x)
    assert psi_w == psi_g and len(want) == len(got)
    for i, (w, g) in enumerate(zip(want, got)):
        assert w.shape == g.shape
        max_abs = (w - g).abs().max().item()
        rel = ((w - g).norm() / w.norm()).item()
        max_rel = ((w - g).abs() / w.abs().clamp_min(1e-3)).max().item()
        print(f"\n[parity {name}] layer {i}: max_abs={max_abs:.3e} rel_l2={rel:.3e} "
              f"max_rel(|ref|>=1e-3 floor)={max_rel:.3e} |ref|max={w.abs().max().item():.2f}")
        assert rel < 1e-5 and max_abs < 1e-4 * max(1.0, w.abs().max().item())


def test_official_backend_encoder_matches_ours(Aggregator, monkeypatch):
    monkeypatch.syspath_prepend(str(VENDOR))
    x = torch.rand(1, 3, 3, 42, 56, generator=torch.Generator().manual_seed(2))
    a = get_encoder("vggt-tiny").encode(x)
    official = get_encoder("vggt-tiny", backend="official")
    b = official.encode(x)
    assert official.spec.implementation == "official" and official.spec.diff(get_encoder("vggt-tiny").spec) == [
        "code_version", "implementation"]
    assert ((a - b).norm() / b.norm()).item() < 1e-5
