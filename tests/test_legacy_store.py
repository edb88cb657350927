"""A store written before the redesign (tests/data/legacy_store, by featstore at commit 47bf9bd:
three feature sets, bf16, fp8 and the Qwen vision tower) opens unchanged: the same fingerprints as
today's specs of the same options, a clean verify, and the same features bit for bit through
`get`, `read_into` and the batch read path (`plan_read`)."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from featstore import FeatureStore
from featstore.encoders import resolve_spec
from featstore.ops.verify import verify_store
from featstore.store.reader import feature_set_names

from _featstore_helpers import REPO

LEGACY = os.path.join(REPO, "tests", "data", "legacy_store")
# The options each set was built with (make_legacy_store.py).
SPECS = {
    "vggt": ("vggt-tiny", {}),
    "vggt_fp8": ("vggt-tiny", {"storage_dtype": "float8_e4m3fn", "attention": "causal", "frames_kept": "last"}),
    "qwen_vision": ("qwen2.5-vl-vision-tiny", {}),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("legacy") / "store.lmdb"
    path.mkdir()
    shutil.copy(os.path.join(LEGACY, "data.mdb"), path / "data.mdb")
    return str(path)


@pytest.fixture(scope="module")
def expected():
    return load_file(os.path.join(LEGACY, "features.safetensors"))


def test_the_sets_and_their_fingerprints_are_todays(store):
    recorded = json.load(open(os.path.join(LEGACY, "fingerprints.json")))
    assert feature_set_names(store) == sorted(SPECS)
    for name, (encoder, options) in SPECS.items():
        today = resolve_spec(encoder, **options).fingerprint()
        with FeatureStore(store, feature_set=name) as fs:
            assert fs.manifest["fingerprint"] == recorded[name] == today, name


def test_verify_finds_nothing(store):
    report = verify_store(store)
    assert report.ok and not report.problems, report


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_entry_reads_back_bit_for_bit(store, expected, name):
    with FeatureStore(store, feature_set=name) as fs:
        keys = sorted(fs.keys())
        want = [expected[f"{name}/{k}"] for k in keys]
        assert keys and len(keys) == sum(k.startswith(name + "/") for k in expected)
        for key, w in zip(keys, want):
            got = fs.get(key, copy=True).features
            assert got.dtype == w.dtype and torch.equal(got, w), key
        by_shape = {}
        for key, w in zip(keys, want):
            by_shape.setdefault(tuple(w.shape), []).append((key, w))
        with fs.snapshot():
            for group in by_shape.values():
                out = fs.read_into([k for k, _ in group])
                assert all(torch.equal(out[i], w) for i, (_, w) in enumerate(group))
                plan = fs.plan_read([k for k, _ in group])
                for i, (_, w) in enumerate(group):
                    row = torch.empty(plan.numel(i), dtype=plan.dtype)
                    assert torch.equal(plan.copy_into(i, row).view(w.shape), w)
