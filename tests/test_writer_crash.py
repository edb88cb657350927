"""The writer under signals: SIGKILL at any instant loses at most the open batch, SIGTERM
commits it, and a rerun resumes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from featstore.store.reader import FeatureStore

BATCH = 5

# A writer that puts entry i = full(i) under key k{i:04d}; after each commit it prints the count;
# with `pause_at` it stops (sleeps) after that many puts, i.e. in the middle of a batch.
WRITER = textwrap.dedent("""
    import sys, time, torch
    from featstore.store.writer import StoreWriter
    path, total, pause_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    with StoreWriter(path, batch_entries={batch}) as w:
        for i in range(total):
            if i == pause_at:
                print(f"paused {{w.manifest['entries']}}", flush=True)
                time.sleep(60)
            w.put(f"k{{i:04d}}", {{"features": torch.full((1, 64, 64), float(i))}})  # f32: exact indices
            if (i + 1) % {batch} == 0:
                print(f"committed {{i + 1}}", flush=True)  # one write: under PYTHONUNBUFFERED print's
                                                           # pieces are separate writes a kill can split
        w.finish()
""").format(batch=BATCH)


def _start(path, total, pause_at):
    return subprocess.Popen([sys.executable, "-c", WRITER, path, str(total), str(pause_at)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_paused(proc) -> int:
    line = proc.stdout.readline()
    while line and not line.startswith("paused"):
        line = proc.stdout.readline()
    assert line, proc.stderr.read()
    return int(line.split()[1])


def _check_store(path, expected_n, state="in_progress"):
    """The store opens, holds exactly entries 0..expected_n-1, each intact, manifest agrees."""
    store = FeatureStore(path, verify_checksums=True)
    keys = list(store.keys())
    assert keys == [f"k{i:04d}" for i in range(expected_n)]
    for i, k in enumerate(keys):
        assert store.get(k).features[0, 0, 0].item() == float(i)
    m = store.manifest
    assert m["entries"] == expected_n and m["build"]["state"] == state
    assert m["bytes"] == sum(len(v) for _, v in store.raw_items())
    store.close()


@pytest.mark.parametrize("pause_at", [2, 13])  # inside the first batch; inside the third batch
def test_sigkill_mid_batch_keeps_exactly_the_committed_batches(tmp_path, pause_at):
    path = str(tmp_path / "s")
    proc = _start(path, 40, pause_at)
    committed = _wait_paused(proc)
    assert committed == pause_at // BATCH * BATCH
    proc.kill()
    proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    _check_store(path, committed)
    # Rerun: resumes, rewrites nothing already committed, ends complete.
    rerun = _start(path, 40, -1)
    assert rerun.wait(60) == 0, rerun.stderr.read()
    store = FeatureStore(path, verify_checksums=True)
    assert len(store) == 40 and store.manifest["build"]["state"] == "complete"


def test_sigkill_at_random_instants(tmp_path):
    # Not paused: killed wherever it happens to be (between puts, mid-commit, in LMDB's fsync).
    rng = random.Random(7)
    for attempt in range(3):
        path = str(tmp_path / f"s{attempt}")
        proc = _start(path, 5000, -1)
        assert proc.stdout.readline().startswith("committed")  # it is writing
        time.sleep(rng.uniform(0.0, 0.3))
        proc.kill()
        proc.wait(10)
        # Complete lines only: the kill may land while a line is being written.
        printed = [int(l.split()[1]) for l in proc.stdout.read().splitlines(keepends=True)
                   if l.startswith("committed") and l.endswith("\n")]
        store = FeatureStore(path, verify_checksums=True)
        n = len(store)
        store.close()
        assert n % BATCH == 0, f"a partial batch is visible: {n} entries"
        assert n >= (printed[-1] if printed else BATCH)  # every batch reported committed is there
        _check_store(path, n, "complete" if n == 5000 else "in_progress")


def test_sigterm_commits_the_open_batch(tmp_path):
    path = str(tmp_path / "s")
    proc = _start(path, 40, 13)
    assert _wait_paused(proc) == 10
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert "BuildInterrupted: signal 15: committing what is done" in err
    _check_store(path, 13)  # 10 committed + the 3 queued in the open batch


def test_sigterm_during_close_does_not_lose_the_batch(tmp_path):
    # A second SIGTERM while the interrupted writer is committing its last batch is ignored.
    code = textwrap.dedent("""
        import os, signal, sys, torch
        from featstore.store.writer import StoreWriter
        w = StoreWriter(sys.argv[1], batch_entries=100)
        for i in range(3):
            w.put(f"k{i:04d}", {"features": torch.full((1, 64, 64), float(i), dtype=torch.bfloat16)})
        real_commit = w._commit_once
        def commit_once(txn, batch):
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while close() commits
            return real_commit(txn, batch)
        w._commit_once = commit_once
        w.close()
        print("closed")
    """)
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "closed", out.stderr
    _check_store(str(tmp_path / "s"), 3)


def test_sigterm_during_a_commit_is_raised_after_it(tmp_path):
    code = textwrap.dedent("""
        import os, signal, sys, torch
        from featstore.store.writer import StoreWriter, BuildInterrupted
        w = StoreWriter(sys.argv[1], batch_entries=100)
        w.put("k0000", {"features": torch.zeros(1, 64, 64, dtype=torch.bfloat16)})
        real_commit = w._commit_once
        def commit_once(txn, batch):
            os.kill(os.getpid(), signal.SIGTERM)
            return real_commit(txn, batch)
        w._commit_once = commit_once
        try:
            w.commit()
        except BuildInterrupted:
            print("interrupted after commit", w.committed)
        w._commit_once = real_commit
        w.close()
    """)
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s")], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "interrupted after commit 1", out.stderr
    _check_store(str(tmp_path / "s"), 1)
