"""EncoderSpec: canonical JSON, fingerprint, diff, validation; registry and presets."""

import sys

import pytest
import torch

from featstore.encoders import available_encoders, get_encoder, register_encoder
from featstore.contract.spec import EncoderSpec, PreprocessSpec
from featstore.errors import EncoderError, WeightsError


def _spec(**kw):
    base = dict(encoder="e", implementation="featstore", code_version="1", config={"depth": 24},
                weights_sha256="ab" * 32)
    base.update(kw)
    return EncoderSpec(**base)


def test_canonical_json_is_pinned():
    # Golden form: changing it silently would orphan every store built before.
    assert _spec().canonical_json() == (
        '{"attention":"full","code_version":"1","compute_dtype":"bfloat16","config":{"depth":24},'
        '"encoder":"e","frames_kept":"all","implementation":"featstore","layer":-2,"layer_resolved":22,'
        '"preprocess":{"extra_resize":null,"mode":"crop","resample":"bicubic","target_size":518},'
        '"spec_version":1,"storage_dtype":"bfloat16","tokens":"patch","weights_sha256":"' + "ab" * 32 + '"}'
    )


def test_roundtrip_and_fingerprint_stability():
    s = _spec(preprocess=PreprocessSpec(mode="pad", target_size=644, extra_resize=(392, 504)),
              attention="causal", frames_kept="last", layer=-1)
    d = s.to_dict()
    assert d["layer_resolved"] == 23 and d["preprocess"]["extra_resize"] == [392, 504]
    back = EncoderSpec.from_dict(d)
    assert back == s and back.fingerprint() == s.fingerprint() and hash(back) == hash(s)
    assert len(s.fingerprint()) == 64 and s.fingerprint() != _spec().fingerprint()


def test_diff_names_the_fields():
    a = _spec()
    assert a.diff(a) == []
    assert a.diff(a.replace(layer=-1)) == ["layer", "layer_resolved"]
    assert a.diff(a.replace(preprocess=PreprocessSpec(target_size=644))) == ["preprocess.target_size"]
    assert a.diff(_spec(config={"depth": 24, "embed_dim": 8})) == ["config.embed_dim"]
    assert a.diff(a.replace(weights_sha256="cd" * 32)) == ["weights_sha256"]


def test_validation_names_argument_and_value():
    with pytest.raises(EncoderError, match=r"Unknown encoder spec key\(s\): \['colour'\]"):
        EncoderSpec.from_dict({**_spec().to_dict(), "colour": 1})
    with pytest.raises(EncoderError, match=r"Unknown preprocess spec key\(s\): \['gamma'\]"):
        EncoderSpec.from_dict({**_spec().to_dict(), "preprocess": {"gamma": 2}})
    with pytest.raises(EncoderError, match="attention must be one of.*Found 'sideways'"):
        _spec(attention="sideways")
    with pytest.raises(EncoderError, match="layer must be in -24..23 for depth 24. Found 24"):
        _spec(layer=24)
    with pytest.raises(EncoderError, match="layer_resolved=3 does not match layer=-2"):
        _spec(layer_resolved=3)
    with pytest.raises(EncoderError, match=r"preprocess.target_size must be a positive multiple of 14 \(the patch size\). Found 500"):
        _spec(config={"depth": 24, "patch_size": 14}, preprocess=PreprocessSpec(target_size=500))


def test_patch_size_comes_from_the_encoder_config():
    """Sides are multiples of the encoder's own patch size (config["patch_size"]), not of 14: an
    encoder with 16-px patches (SigLIP-style) takes 512 and 256x384, and is refused 518."""
    sixteen = {"depth": 24, "patch_size": 16}
    s = _spec(config=sixteen, preprocess=PreprocessSpec(target_size=512, extra_resize=(256, 384)))
    assert EncoderSpec.from_dict(s.to_dict()) == s
    with pytest.raises(EncoderError, match=r"^preprocess.target_size must be a positive multiple of 16 \(the patch "
                                           r"size\). Found 518$"):
        _spec(config=sixteen)
    with pytest.raises(EncoderError, match=r"^preprocess.extra_resize must be \(height, width\), positive multiples "
                                           r"of 16. Found \(392, 504\)$"):
        _spec(config=sixteen, preprocess=PreprocessSpec(target_size=512, extra_resize=(392, 504)))
    with pytest.raises(EncoderError, match=r"multiple of 14 \(the patch size\). Found 512"):
        _spec(config={"depth": 24, "patch_size": 14}, preprocess=PreprocessSpec(target_size=512))
    with pytest.raises(EncoderError, match=r"^config\['patch_size'\] must be a positive int. Found 0$"):
        _spec(config={"depth": 24, "patch_size": 0})
    # Alone, a PreprocessSpec knows no patch size: plain positive ints.
    assert PreprocessSpec(target_size=500).target_size == 500
    for bad in (0, -14, "518", True, 51.8):
        with pytest.raises(EncoderError, match=r"^preprocess.target_size must be a positive int \(pixels\). Found "):
            PreprocessSpec(target_size=bad)
    with pytest.raises(EncoderError, match=r"^preprocess.extra_resize must be \(height, width\), positive ints "):
        PreprocessSpec(extra_resize=(0, 504))


def test_presets_and_overrides():
    assert {"vggt-1b", "vggt-tiny", "vggt-official"} <= set(available_encoders())
    enc = get_encoder("vggt-tiny", layer=-1, attention="causal", frames_kept="last", target_size=56,
                      extra_resize=(28, 42))
    s = enc.spec
    assert (s.encoder, s.weights_sha256, s.layer_resolved, s.attention, s.frames_kept) == \
        ("vggt-tiny", "random-seed-0", 3, "causal", "last")
    assert (s.preprocess.target_size, s.preprocess.extra_resize) == (56, (28, 42))
    # The random preset is reproducible: same seed, same weights, same fingerprint.
    again = get_encoder("vggt-tiny", layer=-1, attention="causal", frames_kept="last", target_size=56,
                        extra_resize=(28, 42))
    assert again.spec.fingerprint() == s.fingerprint()
    x = torch.rand(1, 2, 3, 28, 42)
    assert torch.equal(again.encode(x), enc.encode(x))
    with pytest.raises(EncoderError, match="unknown encoder option 'layers'"):
        get_encoder("vggt-tiny", layers=[1])
    with pytest.raises(EncoderError, match=r"unknown encoder 'vggt-2b'; available: \["):
        get_encoder("vggt-2b")
    with pytest.raises(EncoderError, match=r"encode takes frames \[B, S, 3, H, W\]"):
        enc.encode(torch.rand(2, 3, 28, 42))


def test_register_encoder_refuses_silent_replacement():
    register_encoder("test-dummy", lambda **kw: kw, overwrite=True)
    with pytest.raises(EncoderError, match="already registered"):
        register_encoder("test-dummy", lambda **kw: kw)
    assert get_encoder("test-dummy", device="cpu", weights=None) == {"weights": None, "device": "cpu"}


def test_hub_id_without_huggingface_hub_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # "facebook/VGGT-1B" must not exist as a local path
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(WeightsError, match="huggingface_hub is not installed.*download model.safetensors"):
        get_encoder("vggt-1b", weights="facebook/VGGT-1B")


def test_official_backend_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vggt", None)
    monkeypatch.setitem(sys.modules, "vggt.models", None)
    monkeypatch.setitem(sys.modules, "vggt.models.aggregator", None)
    with pytest.raises(EncoderError, match="pip install git\\+https://github.com/facebookresearch/vggt"):
        get_encoder("vggt-tiny", backend="official")
