"""read_into's frame and freshness checks on the hot path, and plan_read / ReadPlan.copy_into
(a batch read sized before it is copied: one copy out of the map, rows gathered on the way)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from featstore.errors import FeatstoreError, MissingKeyError, StaleEntryError


def _sourced_store(tmp_path, core_features, names=("a.jpg", "b.jpg")):
    """A data root with real files and a store whose entries record their frames and sources."""
    from _featstore_helpers import core_spec
    from featstore.store.writer import StoreWriter

    root = tmp_path / "data"
    root.mkdir()
    path = str(tmp_path / "store")
    with StoreWriter(path, handle_signals=False, spec=core_spec()) as w:
        for i, name in enumerate(names):
            (root / name).write_bytes(b"x" * (10 + i))
            st = os.stat(root / name)
            sources = json.dumps([{"mtime_ns": st.st_mtime_ns, "sha256": "0" * 64, "size": st.st_size}], sort_keys=True)
            w.put(name, {"features": core_features(i, tokens=6 + 2 * i)},
                  {"frames": json.dumps([name], ensure_ascii=False), "sources": sources})
        w.finish()
    return str(root), path


def test_read_into_checks_frames_as_bytes_without_decoding(tmp_path, core_features, monkeypatch):
    """The memoised hot path serves frames= (and data_root=) without decoding the entry; a
    frame list that differs raises what get(frames=) raises, word for word."""
    from featstore.store import reader
    from featstore.store.reader import FeatureStore

    root, path = _sourced_store(tmp_path, core_features)
    store = FeatureStore(path)
    want = store.read_into(["a.jpg"])
    decoded = []
    real = reader.decode_entry
    monkeypatch.setattr(reader, "decode_entry", lambda *a, **k: decoded.append(1) or real(*a, **k))
    assert torch.equal(store.read_into(["a.jpg"], frames=[["./a.jpg"]], data_root=root), want)
    assert decoded == []  # matched as bytes: no header parsed into an Entry
    with pytest.raises(MissingKeyError) as got:
        store.read_into(["a.jpg"], frames=[["b.jpg"]])
    with pytest.raises(MissingKeyError) as ref:
        store.get("a.jpg", frames=["b.jpg"])
    assert str(got.value) == str(ref.value) and type(got.value) is MissingKeyError
    os.utime(os.path.join(root, "a.jpg"), ns=(1, 1))
    with pytest.raises(StaleEntryError, match="'a.jpg' changed since"):
        store.read_into(["a.jpg"], frames=[["a.jpg"]], data_root=root)
    store.close()


def test_a_frame_list_written_another_way_is_compared_as_a_list(core_make_store, core_features):
    from featstore.store.reader import FeatureStore
    from featstore.store.writer import StoreWriter

    path = core_make_store({"a.jpg": core_features(0)}, complete=False)
    with StoreWriter(path, handle_signals=False) as w:  # compact JSON: not the bytes build writes
        w.put("b.jpg", {"features": core_features(1)}, {"frames": json.dumps(["a.jpg", "b.jpg"], separators=(",", ":"))})
        w.finish()
    with FeatureStore(path) as store:
        assert torch.equal(store.read_into(["b.jpg"], frames=[["a.jpg", "b.jpg"]]), store.read_into(["b.jpg"]))
        with pytest.raises(MissingKeyError, match="was computed on frames"):
            store.read_into(["b.jpg"], frames=[["b.jpg"]])


def test_plan_read_packs_entries_of_different_shapes_with_one_copy_each(tmp_path, core_features):
    from featstore.store.reader import FeatureStore

    root, path = _sourced_store(tmp_path, core_features)
    store = FeatureStore(path)
    a, b = store.get("a.jpg").features, store.get("b.jpg").features
    assert a.shape != b.shape
    with pytest.raises(FeatstoreError, match="inside `with store.snapshot"):
        store.plan_read(["a.jpg"])
    with store.snapshot():
        plan = store.plan_read(["a.jpg", "nope.jpg", "b.jpg"], frames=[["a.jpg"], ["nope.jpg"], ["b.jpg"]],
                               data_root=root, missing="skip")
        assert plan.shapes == [tuple(a.shape), None, tuple(b.shape)] and plan.absent == [False, True, False]
        assert isinstance(plan.errors[1], MissingKeyError) and plan.dtype == a.dtype
        flat = torch.empty(plan.numel(), dtype=plan.dtype)
        plan.copy_into(0, flat[: a.numel()])
        rows = np.array([5, 0, 3], dtype=np.int64)  # a gather of token rows, in this order
        gathered = plan.copy_into(2, torch.empty(3, b.shape[-1], dtype=plan.dtype), rows)
        with pytest.raises(ValueError, match="missed"):
            plan.copy_into(1, flat)
        with pytest.raises(ValueError, match="lie outside"):
            plan.copy_into(0, torch.empty(1, a.shape[-1], dtype=plan.dtype), np.array([a.shape[1]]))
    assert torch.equal(flat[: a.numel()].view(a.shape), a)
    assert torch.equal(gathered, b.reshape(-1, b.shape[-1])[rows])
    with pytest.raises(FeatstoreError, match="snapshot block has ended"):
        plan.copy_into(0, flat[: a.numel()])
    with store.snapshot(), pytest.raises(MissingKeyError, match="nope.jpg"):
        store.plan_read(["a.jpg", "nope.jpg"])
    store.close()


def test_plan_read_dequantises_an_fp8_store_as_read_into_does(tmp_path):
    from _featstore_helpers import core_spec
    from featstore.format.fp8 import entry_tensors
    from featstore.store.reader import FeatureStore
    from featstore.store.writer import StoreWriter

    spec = core_spec(storage_dtype="float8_e4m3fn")
    path = str(tmp_path / "fp8")
    x = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with StoreWriter(path, handle_signals=False, spec=spec) as w:
        w.put("a.jpg", entry_tensors(x, spec.storage_dtype), {"frames": '["a.jpg"]'})
        w.finish()
    with FeatureStore(path) as store:
        want = store.read_into(["a.jpg"])[0]
        rows = np.array([11, 2, 7], dtype=np.int64)
        with store.snapshot():
            plan = store.plan_read(["a.jpg"], frames=[["a.jpg"]])
            whole = plan.copy_into(0, torch.empty(want.shape, dtype=plan.dtype))
            some = plan.copy_into(0, torch.empty(3, 64, dtype=plan.dtype), rows)
    assert plan.dtype == torch.bfloat16 and torch.equal(whole, want)
    assert torch.equal(some, want.reshape(-1, 64)[rows])
