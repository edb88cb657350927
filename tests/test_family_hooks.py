"""The encoder-family hooks of the registry: stored shape (frames kept, tokens with the merge
trim, channels) from one place per family, the patch size from the encoder config, which set an
encoder writes (the naming table the store reads), and the small shared helpers (pid_alive,
the autocast check, OnlineVGGT's fingerprint error)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from _featstore_helpers import make_images
from featstore.build.encode import encode_unit
from featstore.build.plan import Unit
from featstore.contract.naming import build_command_for_set, default_feature_set
from featstore.contract.spec import EncoderSpec, PreprocessSpec
from featstore.encoders import (frames_stored, get_encoder, register_encoder, resolve_spec, stored_channels,
                                stored_shape)
from featstore.encoders.base import autocast_dtype
from featstore.encoders.preprocess import grid_tokens, trimmed_grid
from featstore.errors import EncoderError, FingerprintMismatchError
from featstore.store.lock import pid_alive

SIZE = (238, 182)  # at target 126: a 126x98 view, 9x7 patches, both odd (Qwen trims to 8x6)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hooks"))
    make_images(root, ["s/0.png", "s/1.png"], size=SIZE)
    return root


@pytest.mark.parametrize("name, options", [("vggt-tiny", {}), ("vggt-tiny", {"frames_kept": "last"}),
                                           ("qwen2.5-vl-vision-tiny", {})])
def test_stored_shape_is_the_shape_the_encoder_stores(root, name, options):
    """No arithmetic at the caller: the registry's stored_shape equals what encoding gives."""
    enc = get_encoder(name, target_size=126, **options)
    frames = ("s/0.png",) if enc.spec.qwen_view else ("s/0.png", "s/1.png")
    feats, _ = encode_unit(enc, root, Unit(frames[-1], frames))
    assert tuple(feats.shape) == stored_shape(enc.spec, *SIZE, len(frames))
    assert feats.shape[0] == frames_stored(enc.spec, len(frames)) and feats.shape[2] == stored_channels(enc.spec)
    assert stored_shape(enc.spec, *SIZE, len(frames))[1] == (48 if enc.spec.qwen_view else 63)


def test_one_grid_trim():
    assert trimmed_grid(7, 9, 2) == (6, 8) and trimmed_grid(7, 9) == (7, 9)
    assert grid_tokens(*SIZE, PreprocessSpec(target_size=126)) == 63
    assert grid_tokens(*SIZE, PreprocessSpec(target_size=126), merge_size=2) == 48


def _sixteen_px_spec(**kw) -> EncoderSpec:
    return EncoderSpec(encoder="test-sixteen", implementation="test", code_version="1",
                       config={"depth": 2, "patch_size": 16, "width": 48}, weights_sha256="random-seed-0",
                       preprocess=PreprocessSpec(target_size=512), **kw)


def test_a_family_with_16_px_patches_and_its_own_channel_rule():
    """A family registers a channels rule (here 3 x width) and gets the default shape rule at its
    own patch size: 640x480 -> a 512x384 view -> 32x24 patches of 16 px."""
    register_encoder("test-sixteen", lambda **kw: None, spec=lambda **kw: _sixteen_px_spec(),
                     channels=lambda spec: 3 * int(spec.config["width"]), feature_set="sixteen", overwrite=True)
    spec = resolve_spec("test-sixteen")
    assert stored_shape(spec, 640, 480, 4) == (4, 32 * 24, 144)
    assert stored_shape(spec.replace(frames_kept="last"), 640, 480, 4) == (1, 768, 144)
    # The naming table the store reads: the set this encoder writes, and the command that builds it.
    assert default_feature_set(spec) == default_feature_set("test-sixteen") == "sixteen"
    assert build_command_for_set("sixteen") == "`featstore build --encoder test-sixteen`, which writes this set"
    register_encoder("test-ruleless", lambda **kw: None, spec=lambda **kw: _sixteen_px_spec(), overwrite=True)
    with pytest.raises(EncoderError, match=r"^encoder 'test-ruleless' registers no channels rule; register it with "
                                           r"register_encoder\(\.\.\., channels=lambda spec: C\)"):
        stored_channels(_sixteen_px_spec().replace(encoder="test-ruleless"))


def test_a_vggt_preset_registered_by_hand_keeps_vggts_channel_rule():
    from featstore.encoders import TINY_CONFIG, VGGTPreset

    p = VGGTPreset("test-tiny-by-hand", TINY_CONFIG, default_target=112, random_seed=1)
    register_encoder(p.name, p.build, spec=p.spec, overwrite=True)  # as benchmarks/_vggt_random.py does
    assert stored_channels(p.spec()) == 2 * TINY_CONFIG["embed_dim"]


def test_pid_alive():
    assert pid_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not pid_alive(child.pid)


def test_one_bf16_support_check(monkeypatch):
    assert autocast_dtype("bfloat16", "cpu") is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    with pytest.raises(EncoderError, match=r"^compute_dtype=bfloat16 is not supported on Tesla V100; pass "
                                           r"compute_dtype='float16'$"):
        autocast_dtype("bfloat16", "cuda")
    assert autocast_dtype("float16", "cuda") == torch.float16 and autocast_dtype("float32", "cuda") is None


def test_online_vggt_refuses_another_spec_with_the_error_class():
    from training.vggt_online import OnlineVGGT

    online = OnlineVGGT("vggt-tiny", expected_fingerprint="0" * 64)
    with pytest.raises(FingerprintMismatchError, match=r"^online VGGT vggt-tiny: built spec fingerprint [0-9a-f]{64} "
                                                       r"differs from the resolved 0{64}"):
        online.encoder("cpu")
