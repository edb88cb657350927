"""A real DataLoader with 4 workers reads the store under fork and spawn, also when the parent
opened the store (and holds views into its map) before the workers started."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from featstore.errors import FeatstoreError
from featstore.store.reader import FeatureStore

N = 24


class _StoreDataset(Dataset):
    """Module level so that spawn workers can unpickle it (the store pickles as path + options)."""

    def __init__(self, store: FeatureStore, keys: list[str]):
        self.store, self.keys = store, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int):
        key = self.keys[i]
        out = self.store.read_into([key])[0]  # one copy out of the map, inside one transaction
        with self.store.view() as v:
            view = v.get(key).features.clone()  # a zero-copy view, copied before the block ends
        rec = self.store._rec
        # The env used here must have been opened by this very process, never inherited.
        return {"x": out, "view": view, "pid": os.getpid(), "opened_here": rec.pid == os.getpid()}


def _keys():
    return [f"s{i // 10}/{i:03d}.jpg" for i in range(N)]


@pytest.fixture(scope="module")
def core_dl_store(tmp_path_factory):
    from featstore.store.writer import StoreWriter

    path = str(tmp_path_factory.mktemp("dl") / "vggt_features.lmdb")
    with StoreWriter(path, handle_signals=False) as w:
        for i, k in enumerate(_keys()):
            w.put(k, {"features": torch.full((1, 64, 64), float(i), dtype=torch.bfloat16)})
        w.finish()
    return path


# spawn x lazy is left out: it is the easy case (a fresh process, nothing inherited) and
# spawning 4 workers costs ~5-10 s on a 2-core runner.
@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")
@pytest.mark.parametrize("method, parent_opened", [("fork", False), ("fork", True), ("spawn", True)],
                         ids=["fork-lazy", "fork-parent-opened", "spawn-parent-opened"])
def test_dataloader_four_workers(core_dl_store, method, parent_opened):
    store = FeatureStore(core_dl_store)
    held = parent_view = None
    if parent_opened:  # parent has the env open and a view into its map
        parent_view = store.view().__enter__()
        held = parent_view.get(_keys()[0]).features
    loader = DataLoader(_StoreDataset(store, _keys()), batch_size=4, num_workers=4,
                        multiprocessing_context=method, shuffle=False)
    seen, pids = [], set()
    for batch in loader:
        for j in range(len(batch["pid"])):
            seen.append(int(batch["x"][j, 0, 0, 0].item()))
            assert torch.equal(batch["x"][j], batch["view"][j])
        pids.update(batch["pid"].tolist())
        assert batch["opened_here"].all()
    assert seen == list(range(N))
    assert os.getpid() not in pids and len(pids) == 4
    if held is not None:  # the parent's env and views survive the workers
        assert held[0, 0, 0].item() == 0.0
        assert store.get(_keys()[5]).features[0, 0, 0].item() == 5.0
        parent_view.__exit__(None, None, None)
    store.close()


class _LockedProbe(Dataset):
    def __init__(self, store):
        self.store = store

    def __len__(self):
        return 1

    def __getitem__(self, i):
        try:
            self.store.get("a")
            return "ok"
        except FeatstoreError as e:
            return f"{type(e).__name__}: {e}"


def test_in_progress_store_opened_before_fork_gives_a_clear_error(tmp_path):
    from featstore.store.writer import StoreWriter

    path = str(tmp_path / "s")
    with StoreWriter(path, handle_signals=False) as w:  # no finish(): build in progress, locked reads
        w.put("a", {"features": torch.zeros(1, 64, 64)})
    store = FeatureStore(path)
    store.get("a")
    (msg,) = list(DataLoader(_LockedProbe(store), batch_size=None, num_workers=1, multiprocessing_context="fork"))
    assert msg.startswith(f"InheritedLockedStoreError: {path}: this store was opened with locking (its build is "
                          "in progress) before the process forked")
    # Workers that open it themselves are fine (spawn, or a parent that did not open it).
    (msg,) = list(DataLoader(_LockedProbe(FeatureStore(path)), batch_size=None, num_workers=1,
                             multiprocessing_context="spawn"))
    assert msg == "ok"
    store.close()
