"""Shared pytest fixtures. Names carry their owner's prefix (`core_` = store core) so that
fixtures added by other parts do not collide."""

from __future__ import annotations

import json
import os

import pytest
import torch


def _map_range(path: str) -> tuple[int, int]:
    """[start, end) of this process's mapping of `path`/data.mdb, from /proc/self/maps.

    (env.info()["map_addr"] is 0 unless LMDB was opened with MDB_FIXEDMAP, so it cannot be used.)
    """
    st = os.stat(os.path.join(path, "data.mdb"))
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and int(parts[4]) == st.st_ino and parts[5].endswith("data.mdb"):
                start, end = (int(x, 16) for x in parts[0].split("-"))
                return start, end
    raise AssertionError(f"{path}/data.mdb is not mapped in this process")


@pytest.fixture
def core_map_range():
    """core_map_range(store_path) -> [start, end) of the store's LMDB map in this process."""
    return _map_range


@pytest.fixture
def core_make_store(tmp_path):
    """Factory: core_make_store(entries={key: tensor or {name: tensor}}, complete=True, **writer_kw)
    -> path of a new store whose entries record their key as their one frame (spec: core_spec())."""
    from featstore.store.writer import StoreWriter

    from _featstore_helpers import core_spec

    counter = iter(range(1000))

    def make(entries: dict, *, complete: bool = True, **kw) -> str:
        path = str(tmp_path / f"store{next(counter)}" / "vggt_features.lmdb")
        kw.setdefault("handle_signals", False)
        kw.setdefault("spec", core_spec())
        with StoreWriter(path, **kw) as w:
            for key, value in entries.items():
                tensors = value if isinstance(value, dict) else {"features": value}
                w.put(key, tensors, {"frames": json.dumps([key])})
            if complete:
                w.finish()
        return path

    return make


@pytest.fixture
def core_features():
    """Factory: core_features(i, tokens=37, channels=64) -> a deterministic [1, tokens, channels] bf16 tensor."""

    def make(i: int, tokens: int = 37, channels: int = 64) -> torch.Tensor:
        g = torch.Generator().manual_seed(i)
        return torch.randn((1, tokens, channels), generator=g).to(torch.bfloat16)

    return make
