"""FeatureStore inside DataLoader workers: 8 forked workers and spawned workers, hundreds of
random reads each, every value checked against what was written."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from _featstore_helpers import features_for, key_of, make_store
from featstore.store.reader import FeatureStore

N = 120
# 8 workers on a 2-core CI machine is the point of the test, not a mistake.
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


class _Features(Dataset):
    """Index -> (index, features of key_of(index)); the store travels pickled (path + options)."""

    def __init__(self, store: FeatureStore, batch_api: bool):
        self.store, self.batch_api = store, batch_api

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        if self.batch_api:
            return i, self.store.read_into([key_of(i)])[0], os.getpid()
        return i, self.store.get(key_of(i), copy=True).features, os.getpid()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dl"))
    return make_store(root, n=N, batch_entries=32)


def _check(loader: DataLoader, reads: int) -> set:
    expected = {i: features_for(i) for i in range(N)}
    pids, n = set(), 0
    for idx, feats, pid in loader:
        for i, f in zip(idx.tolist(), feats):
            assert torch.equal(f, expected[i]), f"wrong features for {key_of(i)}"
            n += 1
        pids.update(pid.tolist())
    assert n == reads
    return pids


@pytest.mark.parametrize("touch_in_parent", [False, True], ids=["lazy", "opened-before-fork"])
def test_fork_8_workers_random_reads(store, touch_in_parent):
    fs = FeatureStore(store, verify_checksums=True)
    if touch_in_parent:
        # The common mistake: the parent reads before the workers fork. Each worker must reopen.
        assert torch.equal(fs.get(key_of(0), copy=True).features, features_for(0))
    reads = 800
    loader = DataLoader(_Features(fs, batch_api=touch_in_parent), batch_size=8, num_workers=8,
                        sampler=RandomSampler(range(N), replacement=True, num_samples=reads,
                                              generator=torch.Generator().manual_seed(0)),
                        multiprocessing_context="fork")
    pids = _check(loader, reads)
    assert len(pids) == 8 and os.getpid() not in pids
    if touch_in_parent:  # the parent's handle still works after its children reopened theirs
        assert torch.equal(fs.get(key_of(5), copy=True).features, features_for(5))
    fs.close()


@pytest.mark.slow
def test_spawn_workers_random_reads(store):
    fs = FeatureStore(store, verify_checksums=True)
    fs.get(key_of(1))  # opened in the parent: spawn pickles only path and options
    reads = 300
    loader = DataLoader(_Features(fs, batch_api=True), batch_size=10, num_workers=2,
                        sampler=RandomSampler(range(N), replacement=True, num_samples=reads,
                                              generator=torch.Generator().manual_seed(1)),
                        multiprocessing_context="spawn", persistent_workers=False)
    pids = _check(loader, reads)
    assert len(pids) == 2 and os.getpid() not in pids
    fs.close()
