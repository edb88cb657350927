"""Fuzz `decode_entry` (hypothesis): any input raises only featstore's own CorruptEntryError,
never another exception, a crash or a hang. Three generators: raw bytes, valid blobs with bytes
mutated / cut / appended, and well-formed framing around hostile JSON headers."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from featstore.errors import CorruptEntryError
from featstore.format.blob import DTYPES, decode_entry, encode_entry

FUZZ = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


def _decode_all_ways(blob: bytes) -> None:
    for verify in (False, True):
        for copy in (False, True):
            try:
                entry = decode_entry(blob, key="fuzz/key.jpg", verify=verify, copy=copy)
            except CorruptEntryError as e:
                assert "fuzz/key.jpg" in str(e)  # every refusal names the key
                continue
            for t in entry.tensors.values():  # what decodes must be readable
                t.sum() if t.dtype != torch.bool else t.any()
            try:
                entry.frames
            except CorruptEntryError:
                pass


def _framed(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


@FUZZ
@given(st.binary(max_size=4096))
@example(b"")
@example(struct.pack("<Q", 2**63))
@example(struct.pack("<Q", 2) + b"{}")
@example(_framed(b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 8))
def test_random_bytes(blob):
    _decode_all_ways(blob)


_VALID = encode_entry({"features": torch.randn(1, 6, 8).to(torch.bfloat16), "mask": torch.ones(3, dtype=torch.bool),
                       "idx": torch.arange(5, dtype=torch.int64)}, {"frames": '["a.jpg"]'})


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), max_size=8),
       st.integers(0, len(_VALID)), st.binary(max_size=64))
def test_mutated_valid_blob(flips, cut, tail):
    blob = bytearray(_VALID)
    for pos, value in flips:
        blob[pos] = value
    _decode_all_ways(bytes(blob[:cut]) + tail)


_json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                         st.text(max_size=8))
_dtype = st.one_of(st.sampled_from(sorted(DTYPES)), st.text(max_size=4), st.integers(), st.lists(st.integers()))
_shape = st.one_of(st.lists(st.integers(-3, 2**40), max_size=4), _json_scalar)
_offsets = st.one_of(st.lists(st.integers(-8, 2**40), min_size=0, max_size=3), _json_scalar)
_tensor = st.one_of(st.fixed_dictionaries({"dtype": _dtype, "shape": _shape, "data_offsets": _offsets}),
                    st.dictionaries(st.text(max_size=12), _json_scalar, max_size=4), _json_scalar)
_meta = st.one_of(st.dictionaries(st.text(max_size=8), st.one_of(st.text(max_size=8), _json_scalar), max_size=3),
                  _json_scalar)


@FUZZ
@given(st.dictionaries(st.text(min_size=1, max_size=10), _tensor, max_size=4), _meta, st.binary(max_size=256),
       st.booleans())
def test_hostile_headers(tensors, meta, data, with_meta):
    header = dict(tensors)
    if with_meta:
        header["__metadata__"] = meta
    _decode_all_ways(_framed(json.dumps(header).encode(), data))


def test_deeply_nested_header_is_a_corrupt_entry():
    header = b"[" * 200_000 + b"]" * 200_000
    with pytest.raises(CorruptEntryError):
        decode_entry(_framed(header), key="deep.jpg")
