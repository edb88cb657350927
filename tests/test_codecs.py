"""Storage codecs (featstore.format.codecs): one per storage dtype, each owning its tensors, its
bytes per token, its decode into a caller's output, its validity check, its recompute tolerance
and its format version; checked against real blobs (encode_entry) and the real fp8 arithmetic."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from featstore.contract.dtypes import STORAGE_DTYPE_NAMES
from featstore.errors import CorruptEntryError, EntrySchemaError
from featstore.format import codecs
from featstore.format.blob import decode_entry, encode_entry
from featstore.format.codecs import RECOMPUTE_TOLERANCES, codec_for, register_codec
from featstore.format.codecs.plain import PlainCodec
from featstore.format.fp8 import dequantize, quantize_fp8
from featstore.ops import compare
from featstore.store import layout

SHAPE = (2, 6, 64)  # [F, N, C]


def _features(seed: int = 0) -> torch.Tensor:
    x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(seed))
    x[0, 1] *= 300  # an outlier token: per-token scales keep the others precise
    return x


def _blob(codec) -> bytes:
    return bytes(encode_entry(codec.encode(_features().to(codec.read_dtype())), {"frames": '["a.png"]'}))


def test_one_codec_per_storage_dtype_with_its_format_version():
    assert sorted(codecs.codec_names()) == sorted(STORAGE_DTYPE_NAMES)
    assert {n: codec_for(n).format_version for n in STORAGE_DTYPE_NAMES} == {
        "bfloat16": layout.FORMAT_VERSION, "float16": layout.FORMAT_VERSION, "float32": layout.FORMAT_VERSION,
        "float8_e4m3fn": layout.FP8_FORMAT_VERSION}
    assert layout.SUPPORTED_FORMAT_VERSIONS == (1, 2)
    for name in STORAGE_DTYPE_NAMES:
        assert layout.format_version_for({"storage_dtype": name}) == codec_for(name).format_version
    assert codec_for(None).name == "bfloat16" and layout.format_version_for(None) == 1  # a store without a spec
    with pytest.raises(ValueError, match=r"^dtype must be one of \['float32', 'float16', 'bfloat16', 'float8_e4m3fn'\]. "
                                         r"Found 'int8'$"):
        codec_for("int8")


@pytest.mark.parametrize("name", STORAGE_DTYPE_NAMES)
def test_bytes_per_token_is_what_an_entry_stores(name):
    codec = codec_for(name)
    tensors = codec.encode(_features().to(codec.read_dtype()))
    assert tuple(tensors) == codec.tensors
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    assert stored == SHAPE[0] * SHAPE[1] * codec.bytes_per_token(SHAPE[2])


@pytest.mark.parametrize("name", STORAGE_DTYPE_NAMES)
def test_decode_into_equals_decode_of_the_entry(name):
    codec = codec_for(name)
    blob = _blob(codec)
    entry = decode_entry(blob, key="a.png")
    for dtype in (codec.read_dtype(), torch.float32):
        out = torch.full(SHAPE, float("nan"), dtype=dtype)
        assert codec.decode_into(blob, out, key="a.png", cast=True, memo={}) is out
        assert torch.equal(out, codec.decode(entry.tensors, dtype, key="a.png"))
    want = codec.decode(entry.tensors, codec.read_dtype())
    assert want.dtype == codec.read_dtype()
    # A strided output row (not one byte copy): the same numbers.
    wide = torch.zeros(SHAPE[0], SHAPE[1], 2 * SHAPE[2], dtype=codec.read_dtype())
    codec.decode_into(blob, wide[..., ::2], key="a.png", cast=True)
    assert torch.equal(wide[..., ::2], want)
    with pytest.raises(ValueError, match=r"entry 'a.png' holds \(2, 6, 64\) .* but the output slot is \(2, 6, 32\) "):
        codec.decode_into(blob, torch.empty(2, 6, 32, dtype=codec.read_dtype()), key="a.png", cast=True)


def test_plain_decode_into_is_the_stored_bytes_and_casts_only_when_asked():
    codec = codec_for("bfloat16")
    blob = _blob(codec)
    out = torch.empty(SHAPE, dtype=torch.bfloat16)
    codec.decode_into(blob, out, key=b"a.png")
    assert torch.equal(out, decode_entry(blob).features)
    with pytest.raises(ValueError, match="batch only entries of one shape"):
        codec.decode_into(blob, torch.empty(SHAPE, dtype=torch.float32), key="a.png")  # cast not asked for
    with pytest.raises(EntrySchemaError, match=r"^entry 'a.png' in S has no tensor 'depth' \(it has \['features'\]\)$"):
        codec.decode_into(blob, out, key="a.png", tensor="depth", where="S")


def test_fp8_decode_is_the_fp8_arithmetic_and_refuses_what_featstore_did_not_write():
    codec = codec_for("float8_e4m3fn")
    x = _features()
    q, scale = quantize_fp8(x)
    stored = codec.encode(x)
    assert torch.equal(stored["features"].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(stored["features_scale"], scale)
    out = torch.empty(SHAPE, dtype=torch.bfloat16)
    codec.decode_into(encode_entry(stored, {}), out, key="k")
    assert torch.equal(out, dequantize(q, scale, torch.bfloat16))
    with pytest.raises(ValueError, match="already float8_e4m3fn without their scale"):
        codec.encode(q)
    bf16 = encode_entry({"features": x.to(torch.bfloat16), "features_scale": scale}, {})
    with pytest.raises(CorruptEntryError, match=r"^entry 'k' in S: features are torch.bfloat16, but the store holds "
                                                r"float8_e4m3fn features \(its manifest says so\)"):
        codec.decode_into(bf16, out, key="k", where="S")
    no_scale = encode_entry({"features": q}, {})
    with pytest.raises(EntrySchemaError, match="has no tensor 'features_scale'"):
        codec.decode_into(no_scale, out, key="k", where="S")
    with pytest.raises(CorruptEntryError, match="features_scale is torch.float16, not float32"):
        codec.decode({"features": q, "features_scale": scale.half()}, key="k", where="S")


def test_validity_checks():
    fp8, plain = codec_for("float8_e4m3fn"), codec_for("float32")
    x = _features()
    assert plain.all_finite(x) and not plain.all_finite(torch.tensor([1.0, float("inf")]))
    q, scale = quantize_fp8(x)
    assert fp8.all_finite(q)
    nan = q.clone()
    nan.view(torch.uint8)[0, 0, 0] = 0x7F  # e4m3's NaN
    assert not fp8.all_finite(nan)
    assert fp8.check_tensors({"features": q, "features_scale": scale}, key="k") == []
    assert fp8.check_tensors({"features": q}, key="k") == [
        ("shape", "entry 'k': fp8 features without their 'features_scale' tensor")]
    assert fp8.check_tensors({"features": q, "features_scale": scale[..., :1, :]}, key="k")[0][0] == "shape"
    assert fp8.check_tensors({"features": q, "features_scale": -scale}, key="k") == [
        ("corrupt", "entry 'k': features_scale holds values that are not finite and positive")]
    assert plain.check_tensors({"features": x}, key="k") == []


def test_the_recompute_tolerance_is_the_codecs():
    assert compare.RECOMPUTE_TOLERANCES is RECOMPUTE_TOLERANCES
    for name in STORAGE_DTYPE_NAMES:
        assert RECOMPUTE_TOLERANCES[name] == codec_for(name).tolerance
        got = compare.compare_features(torch.ones(3), torch.ones(3), name)
        assert (got["rel_tolerance"], got["cosine_tolerance"]) == codec_for(name).tolerance


def test_a_new_codec_is_one_registration():
    @dataclasses.dataclass(frozen=True)
    class Halves(PlainCodec):
        """float16 stored, compared more loosely: a stand-in for a new codec."""

    new = Halves("float16", tolerance=(0.5, 0.5))
    old = codec_for("float16")
    with pytest.raises(ValueError, match="'float16' is already registered"):
        register_codec(new)
    try:
        register_codec(new, overwrite=True)
        assert codec_for("float16") is new and compare.compare_features(torch.ones(2), torch.ones(2), "float16")[
            "rel_tolerance"] == 0.5
    finally:
        register_codec(old, overwrite=True)
    assert codec_for("float16") is old and RECOMPUTE_TOLERANCES["float16"] == old.tolerance
