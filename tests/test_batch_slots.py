"""Batch slots (training.batch_slots) through real DataLoader workers, fork and spawn: every batch
arrives whole and bit-exact, a filled slot is never written over, dropped batches free their
slots, restarted workers' slots are let go, and training takes the same steps with or without
slots. The CUDA copy (cudaHostRegister, release after the copy's event) runs on a GPU only:
benchmarks/train_bench.py checks it there against the ordinary loader."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from training.batch_slots import SlotBatch, SlotCollator, slots_in_use

sys.path.insert(0, os.path.dirname(__file__))


class GrowingDataset(torch.utils.data.Dataset):
    """Items whose size grows with the index, so later batches outgrow the first slots."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        return {"x": torch.randn(500 + 400 * i, generator=g).to(torch.bfloat16),
                "ids": torch.arange(i, i + 7, dtype=torch.int64), "flag": torch.tensor(i % 2 == 0)}


def collate(items):
    return {"x": torch.cat([it["x"] for it in items]),
            "ids": torch.stack([it["ids"] for it in items]),
            "flag": torch.stack([it["flag"] for it in items]),
            "empty": torch.zeros(0),
            "count": torch.tensor(len(items), dtype=torch.int64)}


def reference(batch_size: int):
    ds = GrowingDataset()
    return [collate([ds[j] for j in range(b, min(b + batch_size, len(ds)))]) for b in range(0, len(ds), batch_size)]


def assert_same(got, want, where):
    assert set(got) == set(want), where
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, (where, key)
        assert torch.equal(got[key], want[key]), (where, key)


def loader(context, *, persistent, slots=3, workers=2):
    procs = dict(multiprocessing_context=context, persistent_workers=persistent, prefetch_factor=2) if workers else {}
    return torch.utils.data.DataLoader(
        GrowingDataset(), batch_size=2, num_workers=workers, **procs,
        collate_fn=SlotCollator(collate, slots_per_worker=slots, host_keys=("count",)))


@pytest.mark.parametrize("context,persistent", [("fork", True), ("spawn", False)])
def test_every_batch_arrives_through_a_slot_and_bit_exact(context, persistent):
    want = reference(2)
    dl = loader(context, persistent=persistent, slots=5)
    for epoch in range(3):
        kinds = []
        for b, batch in enumerate(dl):
            kinds.append(isinstance(batch, SlotBatch))
            got = batch.to("cpu")
            assert_same(got, want[b], (epoch, b))
            assert got["count"].device.type == "cpu"
        # each batch was released on arrival (the copy to the CPU is done): the slots never ran out
        assert all(kinds), (epoch, kinds)
    # non-persistent workers restart every epoch: the slots of the workers gone are let go
    assert slots_in_use()["mapped"] <= 2 * 5 * (1 if persistent else 2)


def test_a_filled_slot_is_never_written_over_and_a_dropped_batch_frees_it():
    want = reference(2)
    dl = loader("fork", persistent=True, slots=2)
    held = list(dl)  # nothing moved: every slot stays filled while its batch is held
    in_slots = [i for i, b in enumerate(held) if isinstance(b, SlotBatch)]
    assert 0 < len(in_slots) <= 2 * 2, in_slots  # 2 workers x 2 slots, the rest the ordinary way
    for b, batch in enumerate(held):  # moved at last: the held slots still hold their own batches
        assert_same(batch.to("cpu") if isinstance(batch, SlotBatch) else batch, want[b], b)
    held = list(dl)
    del held  # dropped unread: their slots free again
    # a new epoch's first prefetch (2 workers x prefetch 2) finds all 4 slots free
    kinds = [isinstance(batch, SlotBatch) for batch, _ in zip(_moved(dl), range(4))]
    assert kinds == [True] * 4, kinds


def _moved(dl):
    for batch in dl:
        if isinstance(batch, SlotBatch):
            batch.to("cpu")
        yield batch


def test_a_batch_moves_once():
    batch = next(iter(loader("fork", persistent=False)))
    assert isinstance(batch, SlotBatch)
    batch.to("cpu")
    with pytest.raises(RuntimeError, match=r"batch slot .*already moved"):
        batch.to("cpu")


def test_without_workers_the_collator_gives_its_dict():
    batch = next(iter(loader("fork", persistent=False, workers=0)))
    assert isinstance(batch, dict)
    assert_same(batch, reference(2)[0], 0)


@pytest.mark.slow
def test_training_with_slots_takes_the_same_steps_as_without(tmp_path):
    """Two real cached runs with 2 fork workers, slots on (the default) and off: the same losses
    and gradient norms step by step, and the first run's batches came through slots."""
    from test_training_train import _argv

    from _training_helpers import build_store, sample_root
    from training.train import run

    root = sample_root(tmp_path)
    build_store(root)
    logs = {}
    for slots in ("True", "False"):
        before = slots_in_use()["received"]
        trainer = run(_argv(root, str(tmp_path / slots), "--use_vggt_cache", "--dataloader_num_workers", "2",
                            "--dataloader_batch_slots", slots, "--logging_steps", "1", steps=3))
        assert isinstance(trainer.data_collator, SlotCollator) is (slots == "True")
        if slots == "True":
            assert slots_in_use()["received"] - before >= 3  # at least the 3 steps' batches
        else:
            assert slots_in_use()["received"] == before
        logs[slots] = [(r["loss"], r["grad_norm"], r["cache_hits"]) for r in trainer.state.log_history if "loss" in r]
    assert len(logs["True"]) == 3 and logs["True"] == logs["False"]


def test_slots_make_non_blocking_copies_safe_without_the_pin_memory_thread(tmp_path):
    from training.args import parse_args

    base = ["--data_root", "sample_data", "--annotations", "sample_data/annotations.json", "--output_dir",
            str(tmp_path), "--dataloader_pin_memory", "False"]
    nb = lambda *extra: parse_args(base + list(extra))[2].accelerator_config.non_blocking  # noqa: E731
    assert nb() is False  # no workers: no slots, and no pinned memory
    assert nb("--dataloader_num_workers", "2") is True
    assert nb("--dataloader_num_workers", "2", "--dataloader_batch_slots", "False") is False


def test_a_cached_batch_is_read_straight_into_its_slot(tmp_path, monkeypatch):
    """The training collator in a worker: the store's features are copied out of the map into
    the slot (plan_read + copy_into), never into a batch that is then copied into a slot; the
    batch equals the one collated in the main process."""
    from _training_helpers import build_store, collate as collate_items, dataset, sample_root, spec_for
    from featstore.store.reader import FeatureStore
    from training import batch_slots
    from training.data import Collator

    root = sample_root(tmp_path)
    spec = spec_for()
    ds = dataset(root, spec, store=FeatureStore(build_store(root)))
    want = collate_items(ds, [0, 1, 2])

    def no_pack(*args, **kwargs):
        raise AssertionError("the batch was collated, then copied into a slot")

    monkeypatch.setattr(batch_slots._WorkerSlots, "pack", no_pack)  # inherited by the forked workers
    dl = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=1, multiprocessing_context="fork",
                                     collate_fn=SlotCollator(Collator(ds.tokenizer.pad_token_id)))
    batch = next(iter(dl))
    assert isinstance(batch, SlotBatch)
    got = batch.to("cpu")
    assert int(got["cache_hits"]) == 3 and got["vggt_features"].numel() > 0
    assert_same(got, want, "cached")
