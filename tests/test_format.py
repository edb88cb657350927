"""The blob format: round trips, golden bytes, stock safetensors compatibility, and one exact
error per kind of malformed blob (blobs are untrusted input)."""

from __future__ import annotations

import json
import random
import re
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import safetensors.torch
import torch

from featstore.errors import CorruptEntryError
from featstore.format.blob import ALIGNMENT, DTYPES, align_blob, decode_entry, encode_entry


def _blob(header: dict, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _f32(n: int) -> dict:
    return {"dtype": "F32", "shape": [n], "data_offsets": None}


def _sample(dtype: torch.dtype, shape=(2, 3, 5)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 4).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g).to(dtype)


# -- round trips ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(DTYPES))
def test_round_trip_every_dtype(name):
    dtype = DTYPES[name]
    t = _sample(dtype)
    blob = encode_entry({"features": t}, {"frames": '["a.jpg"]'})
    entry = decode_entry(blob, verify=True)
    out = entry.features
    assert out.dtype == dtype and out.shape == t.shape
    assert torch.equal(out.view(torch.uint8) if dtype != torch.bool else out, t.view(torch.uint8) if dtype != torch.bool else t)
    assert entry.frames == ["a.jpg"]
    header_len = struct.unpack_from("<Q", blob)[0]
    assert (16 + 8 + header_len) % ALIGNMENT == 0  # data 64-aligned once stored 16 past a page


def test_multi_tensor_entry_each_tensor_aligned_to_its_itemsize():
    tensors = {
        "features": _sample(torch.bfloat16, (1, 7, 6)),
        "mask": _sample(torch.bool, (7,)),
        "ids": _sample(torch.int64, (3,)),
        "scale": _sample(torch.float8_e4m3fn, (5,)),
        "conf": _sample(torch.float32, (1, 7)),
    }
    blob = encode_entry(tensors, {"grid": "[1, 7]"})
    entry = decode_entry(bytes(blob), verify=True)
    assert set(entry.tensors) == set(tensors)
    for name, t in tensors.items():
        got = entry.tensors[name]
        assert got.dtype == t.dtype and got.shape == t.shape, name
        if t.dtype == torch.bool:
            assert torch.equal(got, t)
        else:
            assert torch.equal(got.view(torch.uint8), t.view(torch.uint8)), name
    header = json.loads(blob[8 : 8 + struct.unpack_from("<Q", blob)[0]])
    for name, info in header.items():
        if name != "__metadata__":
            assert info["data_offsets"][0] % DTYPES[info["dtype"]].itemsize == 0, name
    # Largest itemsize first: the int64 tensor starts the data section.
    assert header["ids"]["data_offsets"][0] == 0


def test_empty_and_scalar_tensors_round_trip():
    entry = decode_entry(encode_entry({"a": torch.zeros(0, 4), "b": torch.tensor(3.5)}), verify=True)
    assert entry.tensors["a"].shape == (0, 4)
    assert entry.tensors["b"].item() == 3.5


def test_non_contiguous_input_is_stored_in_logical_order():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    assert torch.equal(decode_entry(encode_entry({"x": t})).tensors["x"], t)


def test_decode_is_a_view_of_the_buffer_unless_copy():
    buf = bytearray(encode_entry({"features": torch.ones(4, 16)}))
    lo = torch.frombuffer(buf, dtype=torch.uint8).data_ptr()
    view = decode_entry(memoryview(buf)).features
    assert lo <= view.data_ptr() < lo + len(buf)
    copied = decode_entry(memoryview(buf), copy=True).features
    assert not lo <= copied.data_ptr() < lo + len(buf)


# -- golden bytes -----------------------------------------------------------------------------
GOLDEN_HEADER = (
    b'{"features":{"dtype":"F32","shape":[1,2,2],"data_offsets":[0,16]},'
    b'"__metadata__":{"frames":"[\\"a.jpg\\"]","checksum":"crc32:205ba5d4"}}'
)
# What the checksum covers: the header in canonical JSON (sorted keys, checksum left out), then
# the tensor bytes. Pinned here byte for byte, independently of the encoder.
GOLDEN_CANONICAL = (
    b'{"__metadata__":{"frames":"[\\"a.jpg\\"]"},'
    b'"features":{"data_offsets":[0,16],"dtype":"F32","shape":[1,2,2]}}'
)
GOLDEN = (
    bytes.fromhex("a800000000000000")  # header length 168, u64 little-endian
    + GOLDEN_HEADER
    + b" " * 34  # pad: 16 (LMDB page header) + 8 + 168 = 192 = 3 x 64
    + bytes.fromhex("000000000000803f0000004000004040")  # 0.0 1.0 2.0 3.0 as f32 LE
)


def test_golden_bytes():
    t = torch.arange(4, dtype=torch.float32).reshape(1, 2, 2)
    assert encode_entry({"features": t}, {"frames": '["a.jpg"]'}) == GOLDEN
    assert torch.equal(decode_entry(GOLDEN, verify=True).features, t)
    assert "crc32:%08x" % zlib.crc32(GOLDEN[-16:], zlib.crc32(GOLDEN_CANONICAL)) == "crc32:205ba5d4"


# -- compatibility with stock safetensors -----------------------------------------------------
def test_stock_safetensors_reads_our_blobs():
    tensors = {"features": _sample(torch.bfloat16, (1, 9, 8)), "ids": _sample(torch.int32, (4,))}
    blob = encode_entry(tensors, {"frames": '["x.png"]', "grid": "[3, 3]"})
    loaded = safetensors.torch.load(bytes(blob))  # load() takes bytes only, as LMDB returns them
    assert set(loaded) == set(tensors)
    for k in tensors:
        assert torch.equal(loaded[k], tensors[k])
    from safetensors import safe_open
    import tempfile, os

    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "x.safetensors")
        with open(p, "wb") as f:
            f.write(blob)
        with safe_open(p, "pt") as f:
            assert f.metadata()["grid"] == "[3, 3]"


def test_we_read_stock_safetensors_blobs_but_cannot_verify_them():
    t = _sample(torch.float16, (2, 3))
    blob = safetensors.torch.save({"features": t})
    assert torch.equal(decode_entry(blob).features, t)
    with pytest.raises(CorruptEntryError, match=re.escape("blob: has no checksum in its metadata; cannot verify it")):
        decode_entry(blob, verify=True)


def test_align_blob_repads_for_another_page_header():
    blob = encode_entry({"features": _sample(torch.bfloat16, (1, 4, 4))}, {"frames": "[]"})
    assert align_blob(blob, 16) is blob
    other = align_blob(blob, 24)  # LMDB 1.0 pages: values start 24 bytes past the boundary
    n = struct.unpack_from("<Q", other)[0]
    assert (24 + 8 + n) % ALIGNMENT == 0
    assert torch.equal(decode_entry(other, verify=True).features, decode_entry(blob).features)
    assert torch.equal(safetensors.torch.load(other)["features"], decode_entry(blob).features)


# -- malformed blobs: each defect, its own message ------------------------------------------------
DUP = b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
GOOD = encode_entry({"features": torch.arange(4, dtype=torch.float32)})


@pytest.mark.parametrize(
    "blob, message",
    [
        (b"\x01\x02", "blob: truncated: 2 bytes, less than the 8-byte header length"),
        (GOOD[:40], "blob: truncated: header claims {n} bytes but only 32 follow"),
        (GOOD[:-6], "blob: truncated: the tensors need 16 data bytes but only 10 follow the header"),
        (struct.pack("<Q", 1 << 40) + b"{}", "blob: header length 1099511627776 exceeds the 1048576-byte limit "
         "(featstore headers are a few KiB; this is corruption)"),
        (struct.pack("<Q", 5) + b"{abc}", "blob: header is not valid UTF-8 JSON (Expecting property name "
         "enclosed in double quotes: line 1 column 2 (char 1))"),
        (struct.pack("<Q", 2) + b"\xff\xfe", "blob: header is not valid UTF-8 JSON ('utf-8' codec can't decode "
         "byte 0xff in position 0: invalid start byte)"),
        (_blob([1, 2]), "blob: header is a JSON list, not an object"),
        (_blob({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "y": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8)),
         "blob: tensor 'y': data_offsets [4, 8] overlap the previous tensor"),
        (_blob({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "y": {"dtype": "F32", "shape": [1], "data_offsets": [100, 104]}}, bytes(8)),
         "blob: tensor 'y': data_offsets [100, 104] lie outside the 8 data bytes"),
        (_blob({"x": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}, bytes(4)),
         "blob: tensor 'x': data_offsets [8, 4] are not 0 <= begin <= end"),
        (_blob({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "y": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, bytes(12)),
         "blob: tensor 'y': gap of 4 bytes before it"),
        (_blob({"x": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8)),
         "blob: tensor 'x': unknown dtype 'C64' (allowed: " + str(sorted(DTYPES)) + ")"),
        (_blob({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(7)),
         "blob: 3 trailing bytes after the last tensor"),
        (_blob({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 4]}}, bytes(4)),
         "blob: tensor 'x': shape [3] x 4 bytes != 4 bytes at [0, 4]"),
        (_blob({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4)),
         "blob: tensor 'x': shape [-1] is not a list of non-negative ints"),
        (_blob({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, bytes(4)),
         "blob: tensor 'x': data_offsets [0] is not a pair of ints"),
        (_blob({"x": {"dtype": "F32", "shape": [1]}}, bytes(4)),
         "blob: tensor 'x': header entry must have exactly dtype, shape, data_offsets"),
        (_blob({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                "x": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, bytes(6)),
         "blob: tensor 'x': data offset 2 is not a multiple of its 4-byte itemsize (misaligned)"),
        (_blob({"__metadata__": {"frames": 3}}), "blob: __metadata__ must map strings to strings"),
        (_blob({}), "blob: holds no tensor"),
        (struct.pack("<Q", len(DUP)) + DUP + bytes(4), "blob: header names 'x' twice"),
    ],
    ids=["short", "truncated-header", "truncated-data", "huge-header-length", "non-json", "non-utf8",
         "not-object", "overlap", "out-of-range", "reversed-offsets", "gap", "unknown-dtype", "trailing",
         "shape-bytes", "negative-dim", "offsets-not-pair", "missing-field", "misaligned", "metadata",
         "no-tensor", "duplicate-name"],
)
def test_malformed_blob_rejected_with_its_own_message(blob, message):
    message = message.replace("{n}", str(struct.unpack_from("<Q", GOOD)[0]))
    with pytest.raises(CorruptEntryError) as e:
        decode_entry(blob)
    assert str(e.value) == message


def test_error_names_the_key():
    with pytest.raises(CorruptEntryError, match=re.escape("entry 'scene/0.jpg': truncated: 3 bytes")):
        decode_entry(b"abc", key="scene/0.jpg")


def test_flipped_data_byte_caught_only_by_checksum():
    bad = bytearray(GOOD)
    bad[-1] ^= 0x40
    decode_entry(bytes(bad))  # structurally fine: LMDB would serve it silently
    with pytest.raises(CorruptEntryError, match=r"^blob: checksum mismatch \(stored crc32:[0-9a-f]{8}, "
                       r"computed crc32:[0-9a-f]{8}\): the value is corrupt$"):
        decode_entry(bytes(bad), verify=True)


def test_fuzzed_blobs_raise_only_corrupt_entry_error():
    """Random byte edits, truncations and bit flips: each mutated blob is refused with
    CorruptEntryError (any other exception, or a crash, fails), or, when it still decodes and
    verifies, it decodes to exactly the original tensors and metadata (nothing wrong served:
    a random byte that lands on the header's space padding as another JSON whitespace)."""
    rng = random.Random(1234)
    tensors = {"features": _sample(torch.bfloat16, (1, 3, 4)), "ids": _sample(torch.int64, (2,))}
    base = encode_entry(tensors, {"frames": '["a.jpg"]'})
    original = decode_entry(base, verify=True)
    refused = unchanged = 0
    for _ in range(600):
        b = bytearray(base)
        op = rng.randrange(3)
        if op == 0:
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 1:
            del b[rng.randrange(len(b)) :]
        else:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        try:
            entry = decode_entry(bytes(b), verify=True)
        except CorruptEntryError:
            refused += 1
            continue
        # Only harmless edits verify: e.g. a padding space turned into another JSON whitespace.
        assert bytes(b) == base or b[:8] == base[:8], "a changed blob decoded and verified"
        assert entry.metadata == original.metadata
        assert all(torch.equal(entry.tensors[k], v) for k, v in tensors.items())
        unchanged += 1
    assert refused + unchanged == 600 and refused >= 590, (refused, unchanged)


def test_frames_metadata_must_be_a_json_list():
    entry = decode_entry(encode_entry({"x": torch.zeros(1)}, {"frames": "a.jpg"}))
    with pytest.raises(CorruptEntryError, match=re.escape("metadata 'frames' is not a JSON list of strings: 'a.jpg'")):
        entry.frames
    assert decode_entry(encode_entry({"x": torch.zeros(1)})).frames == []


# -- encoding refuses what it cannot store -----------------------------------------------------
def test_encode_refuses_bad_input():
    with pytest.raises(TypeError, match=re.escape("tensor 'x': dtype torch.uint16 is not storable")):
        encode_entry({"x": torch.zeros(2, dtype=torch.uint16)})
    with pytest.raises(TypeError, match=re.escape("metadata 'n': keys and values must be str (safetensors rule)")):
        encode_entry({"x": torch.zeros(2)}, {"n": 3})
    with pytest.raises(ValueError, match="encode_entry needs at least one tensor"):
        encode_entry({})
    with pytest.raises(ValueError, match=re.escape("tensor name '__metadata__' is not allowed")):
        encode_entry({"__metadata__": torch.zeros(1)})


# -- the hot path: decode_tensor ---------------------------------------------------------------
def test_decode_tensor_equals_decode_entry_and_caches_only_validated_layouts():
    import featstore.format.blob as fmt

    fmt._LAYOUTS.clear()
    blobs = [encode_entry({"features": _sample(torch.bfloat16, (1, 3, 8)), "grid": torch.tensor([1, 3])},
                          {"frames": f'["{i}.jpg"]'}) for i in range(5)]
    for blob in blobs:
        assert torch.equal(fmt.decode_tensor(blob), decode_entry(blob).features)
        assert torch.equal(fmt.decode_tensor(blob, "grid"), decode_entry(blob).tensors["grid"])
    assert len(fmt._LAYOUTS) == 1  # one layout for all five entries
    with pytest.raises(KeyError):
        fmt.decode_tensor(blobs[0], "nope")
    # Same tensor part, other data length (truncated): a miss, fully validated, rejected.
    with pytest.raises(CorruptEntryError, match="bytes"):
        fmt.decode_tensor(bytes(blobs[0])[:-2])
    # A tensor described after the metadata is never served from the cache.
    text = b'{"features":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"__metadata__":{},' \
           b'"x":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}'
    evil = struct.pack("<Q", len(text)) + text + b"\x01\x02"
    with pytest.raises(CorruptEntryError, match="overlap"):
        fmt.decode_tensor(evil)
    assert all(b'"x"' not in k[0] for k in fmt._LAYOUTS)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_decode_tensor_fuzzed_raises_only_its_own_errors(data):
    import featstore.format.blob as fmt

    blob = bytearray(encode_entry({"features": torch.arange(12, dtype=torch.float32).reshape(1, 3, 4)},
                                  {"frames": '["a.jpg"]'}))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    try:
        t = fmt.decode_tensor(bytes(blob[:cut]) if data.draw(st.booleans()) else bytes(blob))
    except (CorruptEntryError, KeyError):
        return
    assert t.numel() * t.element_size() <= len(blob)


def test_tensor_span_memo_tells_apart_layouts_of_equal_lengths():
    """The per-batch memo is keyed by header and value length but answers only when the header's
    tensor part is byte-identical: two layouts of equal lengths never share an answer."""
    from featstore.format.blob import tensor_span

    a = bytes(encode_entry({"features": torch.zeros(1, 32, 64, dtype=torch.bfloat16)}, {"frames": '["a"]'}))
    b = bytes(encode_entry({"features": torch.zeros(2, 16, 64, dtype=torch.bfloat16)}, {"frames": '["b"]'}))
    assert len(a) == len(b) and a[:8] == b[:8]  # same header length, same value length
    memo: dict = {}
    assert tensor_span(a, memo=memo)[1] == (1, 32, 64)
    assert tensor_span(b, memo=memo)[1] == (2, 16, 64)
    assert tensor_span(a, memo=memo)[1] == (1, 32, 64)
    bad = bytearray(a)
    bad[8:8 + 40] = bytes(bad[8:8 + 40]).replace(b"BF16", b"XX16")
    with pytest.raises(CorruptEntryError, match="unknown dtype 'XX16'"):
        tensor_span(bytes(bad), memo=memo, key=b"k")
