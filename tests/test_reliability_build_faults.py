"""Real `featstore build` subprocesses under resource faults: the LMDB map fills (it must grow
and go on), the disk fills (a clear stop; everything committed stays readable; a rerun after
freeing space completes), and a reader in another process watches a build (it sees only
committed entries, and the manifest always agrees with them)."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time

import lmdb
import pytest
import torch

from _featstore_helpers import REPO, died_of_signal, make_images, read_store, run_cli, signal_name
from featstore.ops.verify import verify_store

UNITS = 36


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("faultdata"))
    make_images(root, [f"scene{s}/{i:03d}.png" for s in range(6) for i in range(6)], seed=3)
    return root


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory):
    store = str(tmp_path_factory.mktemp("ref") / "ref.lmdb")
    r = run_cli(*_args(images, store))
    assert r.returncode == 0, r.stderr
    return read_store(store)


def _args(root: str, store: str, *extra: str) -> list[str]:
    return ["build", "--data-root", root, "--store", store, "--encoder", "vggt-tiny", "--workers", "0",
            "--batch-frames", "2", "--commit-every", "2", "--no-progress", *extra]


def _assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k][0], want[k][0]) and got[k][1] == want[k][1], k


# -- map full --------------------------------------------------------------------------------

_SMALL_MAP_BUILD = """
import sys
import featstore.store.writer
featstore.store.writer.DEFAULT_MAP_SIZE = 64 << 10  # 64 KiB: the first commits already fill it
from featstore.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_map_full_during_build_grows_and_continues(images, reference, tmp_path):
    store = str(tmp_path / "small-map.lmdb")
    r = subprocess.run([sys.executable, "-c", _SMALL_MAP_BUILD, *_args(images, store)], capture_output=True,
                       text=True, timeout=180, cwd=REPO)
    assert r.returncode == 0, r.stderr
    env = lmdb.open(store, readonly=True, lock=False, max_dbs=8)
    try:
        assert env.info()["map_size"] >= 4 * (64 << 10)  # grown (at least twice)
    finally:
        env.close()
    report = verify_store(store, data_root=images)
    assert report.ok, report.summary()
    _assert_same(read_store(store), reference)


# -- disk full -------------------------------------------------------------------------------

def _mount_tmpfs(path: str, size: str) -> bool:
    os.makedirs(path, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """(folder, limit_preexec): a 1 MiB tmpfs when this process may mount one (root), else a plain
    folder plus a preexec_fn that caps file size with RLIMIT_FSIZE (writes past it fail with
    EFBIG instead of ENOSPC: the closest unprivileged stand-in for a full disk)."""
    mnt = str(tmp_path / "disk")
    if _mount_tmpfs(mnt, "1m"):
        # Leave ~560 KB free: more than the build's own estimate (~13.3 KB x 36 units = 480 KB,
        # so it starts), less than LMDB needs (each 12.6 KB value takes four 4 KiB pages).
        with open(os.path.join(mnt, "filler"), "wb") as f:
            f.write(b"\0" * ((1 << 20) - 560 * 1024))
        yield mnt, None, "tmpfs"
        subprocess.run(["umount", "-l", mnt], check=False)
    else:
        def cap():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (560 * 1024, 560 * 1024))
        yield mnt, cap, "rlimit"


def _build_on_small_disk(images, store, preexec):
    return subprocess.run([*[sys.executable, "-m", "featstore"], *_args(images, store)], capture_output=True,
                          text=True, timeout=180, cwd=REPO, preexec_fn=preexec)


def test_disk_full_stops_the_build_and_keeps_every_commit(images, reference, small_disk):
    mnt, preexec, how = small_disk
    store = os.path.join(mnt, "feats.lmdb")
    r = _build_on_small_disk(images, store, preexec)
    assert not died_of_signal(r.returncode), signal_name(r.returncode)
    assert r.returncode != 0, f"the build should not fit ({how}): {r.stderr}"
    # What is on the (still full) disk opens, and every committed entry is intact.
    report = verify_store(store)
    assert set(report.counts()) <= {"build"}, report.summary()
    committed = read_store(store)
    assert 0 < len(committed) < UNITS, len(committed)
    for k, (feats, meta) in committed.items():
        assert torch.equal(feats, reference[k][0]) and meta == reference[k][1]
    # Free the space (move the store to a bigger disk) and rerun: it resumes and completes.
    import shutil

    big = os.path.join(os.path.dirname(mnt), "big.lmdb")
    shutil.copytree(store, big)
    r2 = run_cli(*_args(images, big))
    assert r2.returncode == 0, r2.stderr
    assert f"fresh {len(committed)}" in r2.stderr
    assert verify_store(big, data_root=images).ok
    _assert_same(read_store(big), reference)


def test_disk_full_message_is_clear(images, small_disk):
    mnt, preexec, _ = small_disk
    r = _build_on_small_disk(images, os.path.join(mnt, "feats.lmdb"), preexec)
    assert r.returncode == 2 and "disk is full" in r.stderr and "Traceback" not in r.stderr, r.stderr


# -- a reader in another process during a build ------------------------------------------------

def test_reader_during_build_sees_only_committed_entries(images, reference, tmp_path):
    from featstore.format.blob import decode_entry
    from featstore.store.layout import FEATURES_DB, open_env, read_manifest

    store = str(tmp_path / "live.lmdb")
    args = _args(images, store)
    args[args.index("--commit-every") + 1] = "1"  # a commit per unit: many states to observe
    args[args.index("--batch-frames") + 1] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "featstore", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    seen, snapshots, env = [], 0, None
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            done = proc.poll() is not None
            if env is None:
                try:
                    env = open_env(store, readonly=True, lock=True)
                    db = env.open_db(FEATURES_DB, create=False)
                except Exception:  # not created yet, or no manifest committed yet
                    if env is not None:
                        env.close()
                    env = None
                    if done:
                        break
                    time.sleep(0.01)
                    continue
            try:
                with env.begin(buffers=True) as txn:
                    manifest = read_manifest(env, txn, path=store)
                    n = txn.stat(db)["entries"]
                    nbytes = 0
                    for key, value in txn.cursor(db=db):
                        entry = decode_entry(value, key=bytes(key).decode(), verify=True)
                        assert entry.features.shape[1:] == (48, 128)
                        nbytes += len(value)
                    # The manifest is committed with each batch: it always matches the entries.
                    assert manifest["entries"] == n and manifest["bytes"] == nbytes, (manifest, n, nbytes)
            except lmdb.MapResizedError:
                env.set_mapsize(0)  # the writer grew the map: adopt the new size
                continue
            assert not seen or n >= seen[-1], f"entries went backwards: {seen[-1]} -> {n}"
            seen.append(n)
            snapshots += 1
            if done:
                break
        rc = proc.wait(timeout=60)
        assert rc == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        if env is not None:
            env.close()
    distinct = sorted(set(seen))
    assert seen[-1] == UNITS
    assert len(distinct) >= 3, f"the reader saw too few states of the build: {distinct}"
    print(f"\n[reader] {snapshots} snapshots, {len(distinct)} distinct entry counts: {distinct}")
    _assert_same(read_store(store), reference)
