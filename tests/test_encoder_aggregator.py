"""VGGTAggregator: official key layout, strict weight loading, layer selection (tiny, CPU)."""

import hashlib
import os

import pytest
import torch
from safetensors.torch import save_file

from featstore.encoders import TINY_CONFIG, get_encoder
from featstore.encoders.vggt.model import VGGT_1B_CONFIG, VGGTAggregator, init_random_
from featstore.encoders.vggt.weights import load_aggregator_state, sha256_file
from featstore.errors import WeightsError

HEAD_KEYS = {"camera_head.trunk.0.weight": torch.zeros(3, 3), "depth_head.proj.bias": torch.zeros(4)}


def _tiny(seed=3):
    return init_random_(VGGTAggregator(**TINY_CONFIG), seed).eval()


def _write_ckpt(path, model, drop=(), add=None):
    """A full-VGGT-style checkpoint: aggregator.* keys plus other heads' keys."""
    sd = {"aggregator." + k: v.clone() for k, v in model.state_dict().items()}
    sd.update({k: v.clone() for k, v in HEAD_KEYS.items()})
    for k in drop:
        del sd[k]
    sd.update(add or {})
    if str(path).endswith(".safetensors"):
        save_file(sd, str(path))
    else:
        torch.save(sd, str(path))
    return path


def test_vggt_1b_config_has_the_official_parameter_count_and_keys():
    # VGGT.md: the aggregator holds 909M of VGGT-1B's 1.257B parameters.
    with torch.device("meta"):
        m = VGGTAggregator(**VGGT_1B_CONFIG)
    n = sum(p.numel() for p in m.parameters())
    assert abs(n - 909e6) / 909e6 < 0.005, n
    keys = set(m.state_dict())
    for k in ("camera_token", "register_token", "patch_embed.pos_embed", "patch_embed.mask_token",
              "patch_embed.register_tokens", "patch_embed.blocks.23.ls2.gamma", "patch_embed.norm.weight",
              "frame_blocks.23.attn.q_norm.weight", "global_blocks.0.attn.k_norm.bias",
              "global_blocks.0.ls1.gamma", "global_blocks.0.mlp.fc2.weight", "patch_embed.patch_embed.proj.weight"):
        assert k in keys, k
    assert tuple(m.state_dict()["patch_embed.pos_embed"].shape) == (1, 1 + 37 * 37, 1024)
    assert not any("rope" in k or "_mean" in k for k in keys)  # no buffers leak into the checkpoint


@pytest.mark.parametrize("ext", [".safetensors", ".pt"])
def test_official_layout_checkpoint_loads_and_gives_identical_outputs(tmp_path, ext):
    ref = _tiny(seed=7)
    path = _write_ckpt(tmp_path / f"model{ext}", ref)
    enc = get_encoder("vggt-tiny", weights=str(path))
    x = torch.rand(2, 3, 3, 42, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(x, keep_layers=[-2])[0][2][:, :, ref.patch_start_idx:]
    got = enc.encode(x)
    assert torch.equal(got, want)
    assert enc.spec.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    # A different seed really gives different features (the comparison above can fail).
    assert not torch.allclose(get_encoder("vggt-tiny").encode(x), got)


@pytest.mark.parametrize("ext", [".safetensors", ".pt"])
def test_missing_key_is_named(tmp_path, ext):
    path = _write_ckpt(tmp_path / f"model{ext}", _tiny(), drop=["aggregator.global_blocks.1.attn.k_norm.weight"])
    with pytest.raises(WeightsError, match=r"missing key\(s\) \[aggregator\.global_blocks\.1\.attn\.k_norm\.weight\]"):
        get_encoder("vggt-tiny", weights=str(path))


def test_unexpected_key_and_wrong_shape_are_named(tmp_path):
    path = _write_ckpt(tmp_path / "a.safetensors", _tiny(), add={"aggregator.frame_blocks.9.norm1.weight": torch.ones(64)})
    with pytest.raises(WeightsError, match=r"unexpected key\(s\) \[aggregator\.frame_blocks\.9\.norm1\.weight\]"):
        get_encoder("vggt-tiny", weights=str(path))
    path = _write_ckpt(tmp_path / "b.safetensors", _tiny(), add={"aggregator.camera_token": torch.zeros(1, 2, 1, 32)})
    with pytest.raises(WeightsError, match=r"aggregator\.camera_token has shape \(1, 2, 1, 32\).*\(1, 2, 1, 64\)"):
        get_encoder("vggt-tiny", weights=str(path))


def test_unreadable_or_absent_weights_name_the_file(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="model.safetensors"):
        get_encoder("vggt-tiny", weights=str(bad))
    with pytest.raises(WeightsError, match="does not exist"):
        get_encoder("vggt-tiny", weights=str(tmp_path / "nope.pt"))
    with pytest.raises(WeightsError, match="needs weights"):
        get_encoder("vggt-1b")


def test_bare_aggregator_state_dict_and_wrapped_pt(tmp_path):
    ref = _tiny()
    torch.save({"model": ref.state_dict()}, tmp_path / "w.pt")
    st = load_aggregator_state(tmp_path / "w.pt")
    assert set(st) == set(ref.state_dict())


def test_sha256_cache_is_keyed_by_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATSTORE_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    h1 = sha256_file(f)
    assert h1 == hashlib.sha256(b"a" * 1000).hexdigest()
    st = os.stat(f)
    f.write_bytes(b"b" * 1000)  # same size; restore the mtime: the cache answers (documented)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert sha256_file(f) == h1
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert sha256_file(f) == hashlib.sha256(b"b" * 1000).hexdigest()
    (tmp_path / "cache" / "sha256.json").write_text("{corrupt")
    assert sha256_file(f) == hashlib.sha256(b"b" * 1000).hexdigest()


def test_last_layer_stops_early_and_keeps_only_asked_layers():
    m = _tiny()
    ran = []
    for i, blk in enumerate(m.global_blocks):
        blk.register_forward_hook(lambda mod, a, o, i=i: ran.append(i))
    x = torch.rand(1, 2, 3, 28, 42)
    with torch.no_grad():
        all_outs, psi = m(x)
        ran.clear()
        outs, _ = m(x, last_layer=1, keep_layers=[1])
    assert ran == [0, 1]
    assert len(outs) == 2 and outs[0] is None
    assert torch.equal(outs[1], all_outs[1])
    assert len(all_outs) == 4 and all_outs[3].shape == (1, 2, psi + 2 * 3, 128)
    with pytest.raises(ValueError, match="out of range"):
        m(x, last_layer=4)


def test_bad_configs_and_inputs_are_rejected():
    with pytest.raises(ValueError, match="head_dim % 4"):
        VGGTAggregator(embed_dim=24, depth=1, num_heads=4, patch_embed="conv")
    with pytest.raises(ValueError, match="outputs 384 channels"):
        VGGTAggregator(embed_dim=64, depth=1, num_heads=4, patch_embed="dinov2_vits14_reg")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        _tiny()(torch.rand(1, 1, 3, 30, 28))
