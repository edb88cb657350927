"""Damaged stores: flipped bytes in values, truncated and garbage data.mdb, overwritten B-tree
pages. verify must name what is wrong and exit 1 or 2; no process may die of a signal.

Everything that maps a damaged file runs in a subprocess: a SIGBUS/SIGSEGV there shows up as a
negative return code instead of taking the test run down."""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import sys
import textwrap

import pytest

from _featstore_helpers import (REPO, died_of_signal, flip_byte_in_value, key_of, make_store, run_cli,
                                run_forked, signal_name)
from featstore.errors import CorruptEntryError
from featstore.store.reader import FeatureStore
from featstore.ops.verify import verify_store

N = 40


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pristine"))
    make_store(root, n=N)
    return root


@pytest.fixture
def root(pristine, tmp_path):
    dst = str(tmp_path / "data")
    shutil.copytree(pristine, dst)
    return dst


def _store(root: str) -> str:
    return os.path.join(root, "vggt_features.lmdb")


_READ_ALL = textwrap.dedent("""
    import sys
    from featstore.store.reader import FeatureStore
    from featstore.errors import FeatstoreError
    try:
        with FeatureStore(sys.argv[1], verify_checksums=True) as fs:
            for k in fs.keys():
                fs.get(k, copy=True)
    except FeatstoreError as e:
        print("featstore error:", e)
        sys.exit(2)
    print("read everything")
""")


def _read_all_in_subprocess(store: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _READ_ALL, store], capture_output=True, text=True,
                          timeout=60, cwd=REPO)


def test_random_flipped_bytes_are_each_named(root):
    """12 single-bit flips at random offsets in the tensor bytes of 12 random entries."""
    rng = random.Random(7)
    victims = sorted(rng.sample(range(N), 12), key=key_of)
    store = _store(root)
    for i in victims:
        flip_byte_in_value(store, key_of(i), offset_in_part=rng.randrange(0, 48 * 128 * 2))
    report = verify_store(root)
    assert report.keys_with("corrupt") == [key_of(i) for i in victims]
    assert set(report.counts()) == {"corrupt"}
    with FeatureStore(store, verify_checksums=True) as fs:
        for i in range(N):
            if i in victims:
                with pytest.raises(CorruptEntryError, match=key_of(i)):
                    fs.get(key_of(i))
            else:
                fs.get(key_of(i))


@pytest.mark.parametrize("size", [0, 100, 4096, 8192, 40000, "half", "minus-one-page"])
def test_truncated_data_file_is_reported_never_a_crash(root, size, tmp_path):
    path = os.path.join(_store(root), "data.mdb")
    full = os.path.getsize(path)
    size = full // 2 if size == "half" else full - 4096 if size == "minus-one-page" else size
    os.truncate(path, size)
    extras = ([], ["--no-structure"])
    # both verifies from one interpreter, each in its own forked process (a crash is still its own)
    runs = run_forked([("cli", ["verify", root, *extra]) for extra in extras], str(tmp_path / "runs"))
    for extra, r in zip(extras, runs):
        assert not died_of_signal(r.returncode), f"verify {extra} died of {signal_name(r.returncode)}"
        assert r.returncode in (1, 2), r.stdout + r.stderr
        out = r.stdout + r.stderr
        assert "Traceback" not in out, out
        if extra:  # without the audit, LMDB's own refusal (through featstore's message) or the size check
            assert "truncated" in out or "LMDB cannot open it" in out, out
        else:
            assert "data.mdb" in out and ("truncated" in out or "EOF" in out or "not a usable" in out), out


def test_reader_on_a_truncated_data_file_raises_instead_of_sigbus(root):
    path = os.path.join(_store(root), "data.mdb")
    os.truncate(path, os.path.getsize(path) // 2)
    r = _read_all_in_subprocess(_store(root))
    assert not died_of_signal(r.returncode), f"reader died of {signal_name(r.returncode)}"
    assert r.returncode == 2 and "featstore error" in r.stdout


@pytest.mark.parametrize("content", ["random", "zeros", "text"])
def test_garbage_data_file_is_a_clear_error(root, content, tmp_path):
    path = os.path.join(_store(root), "data.mdb")
    size = os.path.getsize(path)
    data = {"random": os.urandom(size), "zeros": bytes(size), "text": b"not a database\n" * 100}[content]
    with open(path, "wb") as f:
        f.write(data)
    verify, read = run_forked([("cli", ["verify", root]), ("script", [_READ_ALL, _store(root)])],
                              str(tmp_path / "runs"))  # one interpreter, a forked process each
    assert not died_of_signal(verify.returncode), signal_name(verify.returncode)
    assert verify.returncode == 2 and "data.mdb" in verify.stderr and "Traceback" not in verify.stderr, verify.stderr
    assert not died_of_signal(read.returncode), signal_name(read.returncode)
    assert read.returncode == 2 and "featstore error" in read.stdout, read.stdout + read.stderr


def _btree_pages(path: str) -> list[int]:
    """Page numbers of branch (0x01) and leaf (0x02) pages: the page header's flags at byte 10."""
    data = open(path, "rb").read()
    return [p for p in range(2, len(data) // 4096) if struct.unpack_from("<H", data, p * 4096 + 10)[0] in (1, 2)]


def test_overwritten_btree_pages_fail_the_structure_check(root, tmp_path):
    """Each B-tree page in turn overwritten with random bytes: verify exits 1 naming data.mdb
    and reads no entry (mapping a damaged tree is what can crash a reader), unless the page was
    a free one (an old copy LMDB keeps for reuse): then the store must still verify clean."""
    store = _store(root)
    pages = _btree_pages(os.path.join(store, "data.mdb"))
    assert len(pages) >= 3
    live = []
    for pg in pages:
        trial = str(tmp_path / f"page{pg}")
        shutil.copytree(store, trial)
        with open(os.path.join(trial, "data.mdb"), "r+b") as f:
            f.seek(pg * 4096 + 16)  # keep the page number so that it still looks like a page
            f.write(random.Random(pg).randbytes(4096 - 16))
        report = verify_store(trial)
        if "structure" in report.counts():
            assert report.entries == 0
            live.append(trial)
        else:
            assert report.ok and report.entries == N, f"page {pg}: {report.summary()}"
    assert len(live) >= 3, f"only {len(live)} of {len(pages)} overwritten pages were live"
    r = run_cli("verify", live[-1])
    assert r.returncode == 1 and "[structure]" in r.stdout and not died_of_signal(r.returncode)
