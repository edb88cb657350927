"""Errors a caller can branch on: one class per failure, each a FeatstoreError with a docstring;
lmdb.Error translated once in the CLI; argument errors name the flag and its value."""

import os
import re

import lmdb
import pytest
import torch

import featstore
import featstore.errors as E
from featstore.cli import main as cli_main
from featstore.store.reader import FeatureStore
from featstore.ops.verify import verify_store
from featstore.store.writer import StoreWriter

from _featstore_helpers import make_data_root


def test_every_error_is_a_featstore_error_with_a_docstring():
    for name in E.__all__:
        cls = getattr(E, name)
        assert issubclass(cls, E.FeatstoreError) and cls.__doc__, name
        assert getattr(featstore, name) is cls  # re-exported by the package
    for name in ("StoreAlreadyOpenError", "InheritedLockedStoreError", "EntrySchemaError", "MergeConflictError"):
        assert name in E.__all__
    # A schema problem is never a miss: a compute-on-miss policy catching MissingKeyError skips it.
    assert not issubclass(E.EntrySchemaError, E.MissingKeyError)
    assert not issubclass(E.CorruptStoreError, E.ManifestError)


def test_store_already_open_in_this_process(core_make_store, core_features):
    path = core_make_store({"a.jpg": core_features(0)})
    store = FeatureStore(path)
    store.get("a.jpg")
    with pytest.raises(E.StoreAlreadyOpenError, match="the store is already open in this process"):
        StoreWriter(path, handle_signals=False)
    store.close()
    StoreWriter(path, handle_signals=False).close()  # once closed, it opens


def test_entry_without_the_tensor_is_a_schema_error_not_a_miss(core_make_store, core_features):
    with FeatureStore(core_make_store({"a.jpg": core_features(0)})) as store:
        for out in (None, torch.empty(1, 1, 37, 64, dtype=torch.bfloat16)):
            with pytest.raises(E.EntrySchemaError, match=re.escape("entry 'a.jpg' in ")) as e:
                store.read_into(["a.jpg"], out, tensor="depth")
            assert "has no tensor 'depth' (it has ['features'])" in str(e.value)
        with pytest.raises(E.EntrySchemaError):  # the general path (frame check) too
            store.read_into(["a.jpg"], tensor="depth", frames=[["a.jpg"]])
        with pytest.raises(E.MissingKeyError):
            store.read_into(["b.jpg"])


@pytest.mark.parametrize("content", [b"not a database\n" * 300, bytes(4096 * 3)])
def test_verify_raises_corrupt_store_error_for_an_unreadable_lmdb_file(tmp_path, content):
    root = make_data_root(tmp_path, 3)
    with open(os.path.join(root, "vggt_features.lmdb", "data.mdb"), "wb") as f:
        f.write(content)
    for structure in (True, False):
        with pytest.raises(E.CorruptStoreError, match="data.mdb"):
            verify_store(root, structure=structure)


def test_lmdb_errors_are_translated_once_in_the_cli(monkeypatch, capsys):
    import featstore.ops.info as info

    def broken(args):
        raise lmdb.ReadonlyError("mdb_txn_begin: Permission denied")

    monkeypatch.setattr(info, "run", broken)
    assert cli_main(["info", "."]) == 2
    err = capsys.readouterr().err
    assert err.startswith("featstore info: error: LMDB: ReadonlyError: mdb_txn_begin: Permission denied (run "
                          "`featstore verify` on the store")
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flags, message", [
    (["--workers", "-1"], "--workers must be >= 0. Found -1"),
    (["--batch-frames", "0"], "--batch-frames must be >= 1. Found 0"),
    (["--commit-every", "0"], "--commit-every must be >= 1. Found 0"),
    (["--shard", "4/2"], "--shard must be I/N with 0 <= I < N. Found '4/2'"),
    (["--shard", "x"], "--shard must look like I/N (e.g. 0/4). Found 'x'"),
])
def test_build_argument_errors_name_the_flag_and_its_value(tmp_path, capsys, flags, message):
    assert cli_main(["build", "--data-root", str(tmp_path), "--encoder", "vggt-tiny", *flags]) == 2
    assert capsys.readouterr().err == f"featstore build: error: {message}\n"
    assert not os.path.exists(tmp_path / "vggt_features.lmdb")
