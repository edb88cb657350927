"""fp8 storage: a real vggt-tiny build with --storage-dtype float8_e4m3fn, read back dequantised;
verify on it (checksum over codes and scale, recompute tolerances); bf16 stores unchanged."""

from __future__ import annotations

import json
import os

import pytest
import torch

from _featstore_helpers import flip_byte_in_value, make_images, run_cli
from featstore.ops.compare import compare_features
from featstore.errors import CorruptEntryError, FingerprintMismatchError
from featstore.format.fp8 import SCALE_TENSOR, dequantize, quantize_fp8
from featstore.store.reader import FeatureStore
from featstore.store.layout import FORMAT_VERSION, FP8_FORMAT_VERSION
from featstore.ops.verify import verify_store

KEYS = [f"s/{i}.png" for i in range(4)]


def _build(root: str, store: str, *flags: str) -> str:
    r = run_cli("build", "--data-root", root, "--store", store, "--encoder", "vggt-tiny", "--workers", "0",
                "--no-progress", *flags)
    assert r.returncode == 0, r.stderr
    return store


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """One data root, built twice: bf16 (the default) and fp8."""
    root = str(tmp_path_factory.mktemp("fp8"))
    make_images(root, KEYS)
    bf16 = _build(root, os.path.join(root, "bf16.lmdb"))
    fp8 = _build(root, os.path.join(root, "fp8.lmdb"), "--storage-dtype", "float8_e4m3fn")
    return root, bf16, fp8


def test_round_trip_halves_the_bytes_and_keeps_cosine(stores):
    _, bf16, fp8 = stores
    with FeatureStore(bf16) as a, FeatureStore(fp8) as b:
        assert a.manifest["format_version"] == FORMAT_VERSION == 1  # bf16 stores: format unchanged
        assert b.manifest["format_version"] == FP8_FORMAT_VERSION
        assert b.manifest["encoder"]["storage_dtype"] == "float8_e4m3fn"
        assert a.manifest["fingerprint"] != b.manifest["fingerprint"]  # the dtype is in the fingerprint
        ref = a.read_into(KEYS)
        got = b.read_into(KEYS)
        assert got.dtype == ref.dtype == torch.bfloat16 and got.shape == ref.shape
        for i in range(len(KEYS)):
            cmp = compare_features(got[i], ref[i], "float8_e4m3fn")
            assert cmp["ok"] and cmp["cosine"] >= 0.999 and 0 < cmp["rel_error"] <= 0.0625, cmp
        # The stored layout: fp8 codes and one float32 scale per token, in the same blob.
        with b.view() as v:
            e = v.get(KEYS[0])
            assert e.features.dtype == torch.float8_e4m3fn
            assert e.tensors[SCALE_TENSOR].dtype == torch.float32
            assert list(e.tensors[SCALE_TENSOR].shape) == [*e.features.shape[:-1], 1]
            assert torch.equal(dequantize(e.features, e.tensors[SCALE_TENSOR]), got[0])
        # get() dequantises too, and keeps the same numbers as read_into.
        entry = b.get(KEYS[1])
        assert sorted(entry.tensors) == ["features"] and torch.equal(entry.features, got[1])
        assert torch.equal(b.get_many(KEYS[1:2])[0].features, got[1])
        bytes_bf16, bytes_fp8 = a.manifest["bytes"], b.manifest["bytes"]
    tokens, channels = ref.shape[-2], ref.shape[-1]
    # Half the bytes plus the scale (4 bytes per token) and the headers (a few hundred bytes).
    assert bytes_fp8 < bytes_bf16 / 2 + len(KEYS) * tokens * 4 + len(KEYS) * 1024, (bytes_fp8, bytes_bf16)
    assert channels * 2 * len(KEYS) * tokens <= bytes_bf16


@pytest.mark.parametrize("kind", ["bf16", "fp8"])
def test_read_into_fills_the_asked_dtype_from_either_store(stores, kind):
    _, bf16, fp8 = stores
    path = bf16 if kind == "bf16" else fp8
    with FeatureStore(bf16) as ref_store:
        ref = ref_store.read_into(KEYS).float()
    with FeatureStore(path) as store:
        default = store.read_into(KEYS)
        assert default.dtype == torch.bfloat16
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            out = store.read_into(KEYS, dtype=dtype)
            assert out.dtype == dtype and out.shape == ref.shape
            cos = torch.nn.functional.cosine_similarity(out.float().flatten(), ref.flatten(), dim=0)
            assert cos >= (0.999 if kind == "fp8" else 0.99999), (dtype, float(cos))
            # The general path (frame check, non-contiguous out) agrees with the hot path.
            strided = torch.empty(*ref.shape[1:], len(KEYS), dtype=dtype).permute(3, 0, 1, 2)
            assert torch.equal(store.read_into(KEYS, strided, dtype=dtype), out)
            assert torch.equal(store.read_into(KEYS, dtype=dtype, frames=[[k] for k in KEYS]), out)
        assert torch.equal(store.read_into(KEYS, dtype=torch.bfloat16), default)
        with pytest.raises(ValueError, match="pass one of them"):
            store.read_into(KEYS, torch.empty(ref.shape, dtype=torch.float32), dtype=torch.bfloat16)
    with FeatureStore(path, verify_checksums=True) as store:
        assert torch.equal(store.read_into(KEYS), default)


def test_an_out_of_another_dtype_is_still_refused_without_dtype(stores):
    _, bf16, _ = stores
    with FeatureStore(bf16) as store:
        shape = store.read_into(KEYS[:1]).shape
        with pytest.raises(ValueError, match="holds .* torch.bfloat16 but the output slot is"):
            store.read_into(KEYS[:1], torch.empty(shape, dtype=torch.float16))


def test_verify_and_recompute_on_an_fp8_store(stores):
    root, _, fp8 = stores
    report = verify_store(fp8, data_root=root, recompute=2, seed=0)
    assert report.ok, report.summary()
    assert len(report.recomputed) == 2
    assert all(r["ok"] and r["rel_tolerance"] == 0.08 and r["cosine"] >= 0.999 for r in report.recomputed)


def test_a_corrupted_scale_is_caught_by_the_checksum(stores, tmp_path):
    import shutil

    root, _, fp8 = stores
    store = str(tmp_path / "fp8.lmdb")
    shutil.copytree(fp8, store)
    # float32 scales are written first (largest itemsize first): byte 1 of the data section
    # is inside the first token's scale.
    flip_byte_in_value(store, KEYS[2], "data", offset_in_part=1)
    report = verify_store(store)
    assert report.keys_with("corrupt") == [KEYS[2]], report.summary()
    assert "checksum mismatch" in report.summary()
    with FeatureStore(store, verify_checksums=True) as fs:
        with pytest.raises(CorruptEntryError, match="checksum mismatch"):
            fs.read_into([KEYS[2]])
        assert fs.read_into([KEYS[0]]).shape[0] == 1  # the others still read


def test_cli_verify_json_names_the_dtype_check(stores):
    _, _, fp8 = stores
    r = run_cli("verify", fp8, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["ok"]


def test_quantisation_refuses_non_finite_features_and_keeps_zero_tokens():
    x = torch.randn(1, 5, 16)
    x[0, 2] = 0
    q, scale = quantize_fp8(x)
    assert scale[0, 2, 0] == 1 and torch.equal(dequantize(q, scale, torch.float32)[0, 2], x[0, 2])
    x[0, 1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinity"):
        quantize_fp8(x)


def test_a_bf16_spec_is_refused_by_an_fp8_store_naming_the_dtype(stores):
    from featstore.encoders import resolve_spec

    _, _, fp8 = stores
    with pytest.raises(FingerprintMismatchError, match="storage_dtype: store has 'float8_e4m3fn', expected 'bfloat16'"):
        FeatureStore(fp8, expected_encoder=resolve_spec("vggt-tiny")).read_into(KEYS[:1])
    ok = FeatureStore(fp8, expected_encoder=resolve_spec("vggt-tiny", storage_dtype="float8_e4m3fn"))
    assert ok.read_into(KEYS[:1]).dtype == torch.bfloat16
    ok.close()


def test_fp8_is_a_storage_dtype_only():
    from featstore.encoders import resolve_spec
    from featstore.errors import EncoderError

    with pytest.raises(EncoderError, match="compute_dtype must be one of"):
        resolve_spec("vggt-tiny", compute_dtype="float8_e4m3fn")
