"""Store layout, FeatureStore (zero-copy reads, batch reads, errors), StoreWriter (batches, map
growth, resume), and `featstore info`."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import textwrap

import lmdb
import pytest
import torch

from featstore.cli import main as cli_main
from featstore.errors import (CorruptEntryError, EntrySchemaError, FeatstoreError, FingerprintMismatchError, InvalidKeyError,
                              MissingKeyError, StoreNotFoundError)
from featstore.format.blob import ALIGNMENT, decode_entry, encode_entry
from featstore.store.reader import FeatureStore
from featstore.store.layout import FEATURES_DB, FORMAT_VERSION, MANIFEST_KEY, META_DB, open_env
from featstore.store.writer import StoreWriter

from _featstore_helpers import core_spec

LARGE = (1, 64, 64)  # 8 KiB in bf16: an overflow-page value, like every real feature


def _entries(core_features, n, tokens=64):
    return {f"scene/{i:03d}.jpg": core_features(i, tokens=tokens) for i in range(n)}


# -- zero-copy reads ------------------------------------------------------------------------------
def test_view_returns_views_inside_the_map_64_byte_aligned(core_make_store, core_features, core_map_range):
    entries = {k: {"features": v, "conf": v[0, :, 0].float(), "ids": torch.arange(3)}
               for k, v in _entries(core_features, 5).items()}
    path = core_make_store(entries)
    with FeatureStore(path) as store, store.view() as view:
        assert store.readahead is True  # the benchmarked default (docs/BENCHMARKS.md)
        for key, tensors in entries.items():
            entry = view.get(key)
            lo, hi = core_map_range(path)
            for name, t in entry.tensors.items():
                assert torch.equal(t, tensors[name]), (key, name)
                ptr = t.data_ptr()
                assert lo <= ptr and ptr + t.numel() * t.element_size() <= hi, f"{key}/{name} was copied"
            assert entry.tensors["ids"].data_ptr() % ALIGNMENT == 0  # first tensor of the data section
            assert entry.frames == [key]
        copied = store.get("scene/000.jpg", copy=True).features
        assert not lo <= copied.data_ptr() < hi


def test_read_into_is_one_copy_out_of_the_map(core_make_store, core_features, core_map_range):
    entries = _entries(core_features, 6)
    path = core_make_store(entries)
    store = FeatureStore(path)
    keys = ["scene/004.jpg", "scene/001.jpg", "scene/004.jpg"]
    out = torch.empty((3, *LARGE), dtype=torch.bfloat16).share_memory_()
    assert store.read_into(keys, out) is out
    for i, k in enumerate(keys):
        assert torch.equal(out[i], entries[k])
    lo, hi = core_map_range(path)
    assert not lo <= out.data_ptr() < hi
    fresh = store.read_into(keys[:2])
    assert fresh.shape == (2, *LARGE) and torch.equal(fresh[1], entries["scene/001.jpg"])
    assert [e.features.shape for e in store.get_many(keys)] == [LARGE] * 3
    store.close()


def test_read_into_checks_arguments_before_reading(core_make_store, core_features):
    store = FeatureStore(core_make_store(_entries(core_features, 2)))
    with pytest.raises(ValueError, match="read_into needs at least one key"):
        store.read_into([])
    with pytest.raises(ValueError, match=re.escape(f"out has shape (1, {', '.join(map(str, LARGE))}): it needs one row per key (2 keys)")):
        store.read_into(["scene/000.jpg", "scene/001.jpg"], torch.empty((1, *LARGE), dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=re.escape("entry 'scene/000.jpg' holds (1, 64, 64) torch.bfloat16 but the "
                                                   "output slot is (1, 64, 64) torch.float32; batch only entries of one shape")):
        store.read_into(["scene/000.jpg"], torch.empty((1, *LARGE)))
    with pytest.raises(InvalidKeyError):
        store.read_into(["scene/000.jpg", "../x"])
    with pytest.raises(EntrySchemaError, match=re.escape("entry 'scene/000.jpg' in ")) as e:
        store.read_into(["scene/000.jpg"], tensor="nope")
    assert not isinstance(e.value, MissingKeyError)  # a schema problem is never a miss


def test_small_values_are_copied_not_misviewed(core_make_store):
    # Values under ~2 KiB live on LMDB leaf pages at arbitrary addresses: still correct.
    entries = {f"k{i}": torch.arange(i + 1, dtype=torch.float64) for i in range(20)}
    with FeatureStore(core_make_store(entries)) as store:
        for k, v in entries.items():
            assert torch.equal(store.get(k).features, v)


def test_lmdb_1_0_page_header_is_aligned_too(tmp_path):
    # LMDB 1.0 (data format v3) puts large values 24 bytes past a page boundary, not 16.
    code = textwrap.dedent(f"""
        import torch, json, os
        from featstore.store.writer import StoreWriter
        from featstore.store.reader import FeatureStore
        p = {str(tmp_path / 's')!r}
        with StoreWriter(p, handle_signals=False) as w:
            assert w.value_offset == 24, w.value_offset
            w.put("a", {{"features": torch.ones(1, 64, 64, dtype=torch.bfloat16)}})
            w.put("b", encode(torch.ones(2, 64, 64, dtype=torch.bfloat16)))  # encoded for 16: re-padded
            w.finish()
        s = FeatureStore(p)
        assert s._environment().lib_version()[0] == 1
        with s.view() as v:  # zero-copy views: their address is the value's place in the map
            print(json.dumps([v.get(k).features.data_ptr() % 64 for k in "ab"]))
    """).replace("encode(", "__import__('featstore.format.blob').format.blob.encode_entry({'features': ").replace(
        "torch.bfloat16)))", "torch.bfloat16)}))")
    env = dict(os.environ, LMDB_DEFAULT_LIB_VERSION="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [0, 0]


# -- the store's public face -------------------------------------------------------------------
def test_len_contains_keys_manifest_raw_items(core_make_store, core_features):
    entries = _entries(core_features, 3)
    path = core_make_store(entries)
    store = FeatureStore(os.path.dirname(path))  # a data root finds vggt_features.lmdb
    assert store.path == path
    assert len(store) == 3
    assert "scene/001.jpg" in store and "./scene//001.jpg" in store and "scene/9.jpg" not in store
    assert list(store.keys()) == sorted(entries) == list(store)
    m = store.manifest
    assert m["format"] == "featstore" and m["format_version"] == FORMAT_VERSION
    assert m["entries"] == 3 and m["fingerprint"] == core_spec().fingerprint() and m["build"]["state"] == "complete"
    assert m["encoder"] == core_spec().to_dict() and "storage_dtype" not in m  # kept once, inside the spec
    assert m["bytes"] == sum(len(v) for _, v in store.raw_items())
    assert [k for k, _ in store.raw_items(start="scene/001.jpg")] == ["scene/001.jpg", "scene/002.jpg"]


def test_missing_key_error_names_key_and_store(core_make_store, core_features):
    path = core_make_store(_entries(core_features, 1))
    store = FeatureStore(path)
    with pytest.raises(KeyError) as e:
        store.get("scene/nope.jpg")
    assert str(e.value) == (f"key 'scene/nope.jpg' is not in the store {path}: its keys are image paths relative to "
                            "the data root (a build without --annotations, or of single-image samples); the nearest "
                            f"are 'scene/000.jpg' (`featstore info --keys {path}` lists them)")


def test_frames_mismatch_is_a_miss(core_make_store, core_features):
    store = FeatureStore(core_make_store(_entries(core_features, 1)))
    assert store.get("scene/000.jpg", frames=["./scene/000.jpg"]).frames == ["scene/000.jpg"]
    with pytest.raises(MissingKeyError, match=re.escape("was computed on frames ['scene/000.jpg'], but "
                                                        "['a.jpg', 'scene/000.jpg'] were asked for")):
        store.get("scene/000.jpg", frames=["a.jpg", "scene/000.jpg"])


def test_store_not_found(tmp_path):
    with pytest.raises(StoreNotFoundError, match=re.escape(f"no featstore database at {tmp_path} (nor at "
                                                           f"{tmp_path}/vggt_features.lmdb)")):
        FeatureStore(tmp_path)


def test_a_data_root_holding_only_shard_stores_says_to_merge_them(tmp_path):
    """After `featstore build --shard I/N` on each host and before `featstore merge`, the data root
    holds no store but its parts: the error names them and the merge command, whether the data
    root or the store path beside it (training's --use_vggt_cache) is named."""
    for i in range(2):
        with StoreWriter(str(tmp_path / f"vggt_features.shard-{i}-of-2.lmdb"), handle_signals=False):
            pass
    (tmp_path / "vggt_features.shard-x-of-2.lmdb").mkdir()  # not a shard's name: not listed
    want = (", but shard stores of `featstore build --shard`: vggt_features.shard-0-of-2.lmdb, "
            f"vggt_features.shard-1-of-2.lmdb; merge them into {tmp_path}/vggt_features.lmdb with `featstore merge "
            f"--data-root {tmp_path} {tmp_path}/vggt_features.shard-*-of-*.lmdb`, or name one of them")
    for named in (tmp_path, tmp_path / "vggt_features.lmdb"):
        with pytest.raises(StoreNotFoundError, match=re.escape(want)):
            FeatureStore(named)


def test_expected_encoder_mismatch_names_the_field(core_make_store, core_features):
    path = core_make_store(_entries(core_features, 1))  # built with layer 23
    for expected in (core_spec(layer=22), core_spec(layer=22).to_dict()):  # an EncoderSpec, or its dict
        with pytest.raises(FingerprintMismatchError, match=re.escape("layer: store has 23, expected 22")):
            FeatureStore(path, expected_encoder=expected).get("scene/000.jpg")
    for expected in (core_spec(), core_spec().to_dict()):
        assert FeatureStore(path, expected_encoder=expected).get("scene/000.jpg")


def test_expected_encoder_mismatch_lists_every_field_with_both_values(core_make_store, core_features):
    path = core_make_store(_entries(core_features, 1))
    other = core_spec(layer=22, attention="causal", frames_kept="last", storage_dtype="float16",
                      compute_dtype="float32", weights_sha256="ab" * 32, code_version="2")
    with pytest.raises(FingerprintMismatchError) as e:
        FeatureStore(path, expected_encoder=other).manifest
    message = str(e.value)
    assert message == (
        f"{path}: the store was built with a different encoder spec (attention: store has 'full', expected "
        "'causal'; code_version: store has '1', expected '2'; compute_dtype: store has 'bfloat16', expected "
        "'float32'; frames_kept: store has 'all', expected 'last'; layer: store has 23, expected 22; "
        "layer_resolved: store has 23, expected 22; storage_dtype: store has 'bfloat16', expected 'float16'; "
        f"weights_sha256: store has 'random-seed-0', expected '{'ab' * 32}'). Rebuild the store with the spec "
        "training uses, or point training at the matching store.")


def test_pickles_as_path_and_options(core_make_store, core_features):
    store = FeatureStore(core_make_store(_entries(core_features, 1)), readahead=False, verify_checksums=True)
    store.get("scene/000.jpg")  # opened: the env must not travel
    state = store.__getstate__()
    assert set(state) == {"path", "feature_set", "lock", "readahead", "prefetch", "verify_checksums", "expected_encoder", "max_readers"}
    clone = pickle.loads(pickle.dumps(store))
    assert clone._env is None and clone.readahead is False and clone.verify_checksums
    assert torch.equal(clone.get("scene/000.jpg").features, store.get("scene/000.jpg").features)


def test_in_progress_store_is_read_with_locks_and_copies(core_make_store, core_features, core_map_range):
    path = core_make_store(_entries(core_features, 2), complete=False)
    store = FeatureStore(path)
    t = store.get("scene/000.jpg").features  # a writer may reuse pages: never a view
    assert store._locked
    lo, hi = core_map_range(path)
    assert not lo <= t.data_ptr() < hi
    store.close()


def test_corrupt_value_named_on_read(core_make_store, core_features):
    path = core_make_store(_entries(core_features, 1))
    env = open_env(path, readonly=False)
    with env.begin(write=True) as txn:
        db = env.open_db(FEATURES_DB, txn=txn)
        value = bytearray(txn.get(b"scene/000.jpg", db=db))
        value[-1] ^= 1
        txn.put(b"scene/000.jpg", bytes(value), db=db)
    env.close()
    FeatureStore(path).get("scene/000.jpg")  # unverified: served (LMDB has no value checksums)
    with pytest.raises(CorruptEntryError, match=re.escape("entry 'scene/000.jpg': checksum mismatch")):
        FeatureStore(path, verify_checksums=True).get("scene/000.jpg")


def test_two_handles_share_one_environment(core_make_store, core_features):
    path = core_make_store(_entries(core_features, 1))
    a, b = FeatureStore(path), FeatureStore(path)
    view = a.get("scene/000.jpg").features
    assert a._env is b._environment()
    b.close()
    assert torch.equal(view, core_features(0, tokens=64))  # a still holds the env open
    a.close()


# -- writer -----------------------------------------------------------------------------------
def test_map_grows_from_a_tiny_initial_size(core_make_store, core_features):
    entries = _entries(core_features, 40, tokens=1024)  # 40 x 128 KiB into a 64 KiB map
    path = core_make_store(entries, map_size=64 << 10, batch_entries=7)
    store = FeatureStore(path, verify_checksums=True)
    assert len(store) == 40 and store.manifest["entries"] == 40
    for k, v in entries.items():
        assert torch.equal(store.get(k).features, v)


@pytest.mark.parametrize("reset", [True, False])
def test_reopening_a_full_map_grows_it_instead_of_failing(core_make_store, core_features, monkeypatch, reset):
    """A store whose data file fills its map (a store over the default map size reopens with a
    map of exactly its file's size): opening a writer on it, with --force's reset or without,
    writes the manifest in its first transaction; the map grows there as it does in a commit."""
    from featstore.store import writer as writer_mod

    entries = _entries(core_features, 8, tokens=8192)  # 8 x 1 MiB: dropping them frees more pages than are spare
    path = core_make_store(entries, map_size=64 << 10, batch_entries=5)
    # The default map no larger than the file: what a store of more than DEFAULT_MAP_SIZE gets.
    monkeypatch.setattr(writer_mod, "DEFAULT_MAP_SIZE", 64 << 10)
    with StoreWriter(path, spec=core_spec(), reset=reset, handle_signals=False) as w:
        w.put("new", {"features": core_features(99, tokens=1024)}, {"frames": '["new"]'})
        w.finish(report={"failed": []})
    store = FeatureStore(path, verify_checksums=True)
    assert len(store) == (1 if reset else 9)
    assert torch.equal(store.get("new").features, core_features(99, tokens=1024))


def test_batches_commit_by_count_and_bytes(tmp_path, core_features):
    path = str(tmp_path / "s")
    with StoreWriter(path, batch_entries=3, batch_bytes=1 << 40, handle_signals=False) as w:
        for i in range(7):
            w.put(f"k{i}", {"features": core_features(i)})
        assert w.committed == 6 and w.manifest["entries"] == 6
    with StoreWriter(path, batch_entries=100, batch_bytes=1, handle_signals=False) as w:  # every put
        w.put("z", {"features": core_features(9)})
        assert w.committed == 1
    assert len(FeatureStore(path)) == 8


def test_resume_skips_identical_entries_and_last_put_wins(tmp_path, core_features):
    path = str(tmp_path / "s")
    with StoreWriter(path, handle_signals=False) as w:
        w.put("a", {"features": core_features(1)})
        w.put("a", {"features": core_features(2)})  # same batch: the last one is written
        w.put("b", {"features": core_features(3)})
    with StoreWriter(path, handle_signals=False) as w:
        w.put("a", {"features": core_features(2)})
        w.put("b", {"features": core_features(4)})
        w.commit()
        assert (w.committed, w.skipped) == (1, 1)
        assert w.manifest["bytes"] == sum(len(v) for v in _raw(path, w).values())
        raw = _raw(path, w)
        assert decode_entry(raw[b"a"], key="a").metadata["checksum"].startswith("crc32:") and b"missing" not in raw
        assert w.delete(["a", "nope"]) == 1
        w.finish()
    store = FeatureStore(path)
    assert list(store) == ["b"] and torch.equal(store.get("b").features, core_features(4))
    assert store.manifest["entries"] == 1


def _raw(path, w):
    with w.env.begin() as txn:
        return dict(txn.cursor(db=w.env.open_db(FEATURES_DB, txn=txn)))


def test_writer_refuses_bad_input_before_writing(tmp_path, core_features):
    path = str(tmp_path / "s")
    with pytest.raises(ValueError, match=re.escape("batch_entries must be a positive int. Found 0")):
        StoreWriter(path, batch_entries=0)
    with StoreWriter(path, handle_signals=False) as w:
        with pytest.raises(CorruptEntryError, match=re.escape("entry 'a': truncated")):
            w.put("a", encode_entry({"features": core_features(0)})[:-2])
        with pytest.raises(ValueError, match=re.escape("put('a'): metadata must be None when passing an encoded blob")):
            w.put("a", encode_entry({"features": core_features(0)}), {"frames": "[]"})
        with pytest.raises(InvalidKeyError):
            w.put("/abs.jpg", {"features": core_features(0)})
        assert w._pending == []


def test_reopen_with_another_encoder_names_the_field(tmp_path, core_features):
    path = str(tmp_path / "s")
    spec = core_spec(encoder="vggt-1b")
    with StoreWriter(path, spec=spec, handle_signals=False) as w:
        w.put("a", {"features": core_features(0)})
    with pytest.raises(FingerprintMismatchError, match=re.escape("layer: store has 23, expected 4")):
        StoreWriter(path, spec=spec.replace(layer=4), handle_signals=False)
    # Equal fields but another fingerprint (a manifest edited by hand): both fingerprints are named.
    env = lmdb.open(path, max_dbs=8)
    with env.begin(write=True) as txn:
        meta = env.open_db(b"meta", txn=txn)
        manifest = json.loads(txn.get(b"manifest", db=meta))
        txn.put(b"manifest", json.dumps(dict(manifest, fingerprint="f1")).encode(), db=meta)
    env.close()
    with pytest.raises(FingerprintMismatchError, match=re.escape(f"the store's fingerprint 'f1' differs from the "
                                                                 f"expected '{spec.fingerprint()}'")):
        StoreWriter(path, spec=spec, handle_signals=False)
    # The failed opens closed their environment: the store opens again in this process.
    with StoreWriter(path, spec=spec.replace(layer=4), reset=True, handle_signals=False) as w:
        assert w.manifest["entries"] == 0 and w.manifest["fingerprint"] == spec.replace(layer=4).fingerprint()
    assert len(FeatureStore(path)) == 0


def test_writer_and_reader_in_one_process_get_a_clear_error(core_make_store, core_features):
    path = core_make_store(_entries(core_features, 1))
    store = FeatureStore(path)
    store.get("scene/000.jpg")
    with pytest.raises(FeatstoreError, match="the store is already open in this process"):
        StoreWriter(path, handle_signals=False)
    store.close()


# -- featstore info -----------------------------------------------------------------------------
def test_info_text_and_json(core_make_store, core_features, capsys):
    entries = _entries(core_features, 3)
    entries["multi.jpg"] = {"features": core_features(7, tokens=64), "conf": torch.zeros(4)}
    spec = core_spec(encoder="vggt-1b")
    path = core_make_store(entries, spec=spec)
    assert cli_main(["info", os.path.dirname(path)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0] == f"store        {path}"
    assert lines[1] == f"format       featstore v{FORMAT_VERSION} (written by featstore 0.1.0)"
    assert lines[2].startswith("build        complete (updated ")
    assert lines[3] == "entries      4"
    assert lines[5] == f"encoder      vggt-1b  fingerprint {spec.fingerprint()[:16]}"
    assert lines[6] == "storage      bfloat16"
    assert "  layer        23" in lines and "  attention    full" in lines
    assert "tensors:" in lines
    assert "         4 x features bfloat16 [1, 64, 64]" in lines
    assert "         1 x conf float32 [4]" in lines

    assert cli_main(["info", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["entries"] == 4 and info["scanned"] == 4 and info["path"] == path
    assert info["shapes"] == {"features bfloat16 [1, 64, 64]": 4, "conf float32 [4]": 1}
    assert info["manifest"]["fingerprint"] == spec.fingerprint()
    assert info["manifest"]["bytes"] > 4 * 64 * 64 * 2


def test_info_on_a_missing_store_fails_cleanly(tmp_path, capsys):
    assert cli_main(["info", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"featstore info: error: no featstore database at {tmp_path}")


def test_read_into_hot_and_general_paths_agree(core_make_store, core_features):
    """The byte-copy hot path (contiguous CPU out, no frame check) and the general path
    (non-contiguous out, frame lists, checksums) fill the batch identically."""
    entries = {f"k/{i}.jpg": core_features(i) for i in range(6)}
    path = core_make_store(entries)
    keys = list(entries)
    expected = torch.stack([entries[k] for k in keys])
    with FeatureStore(path) as store:
        assert torch.equal(store.read_into(keys), expected)
        contiguous = torch.empty_like(expected)
        assert torch.equal(store.read_into(keys, contiguous), expected)
        strided = torch.empty(1, 37, 64, len(keys), dtype=torch.bfloat16).permute(3, 0, 1, 2)
        assert not strided.is_contiguous()
        assert torch.equal(store.read_into(keys, strided), expected)
        assert torch.equal(store.read_into(keys, frames=[[k] for k in keys]), expected)
        wrong = torch.empty(len(keys), 1, 37, 64, dtype=torch.float16)
        with pytest.raises(ValueError, match=r"holds \(1, 37, 64\) torch.bfloat16 but the output slot is"):
            store.read_into(keys, wrong)
    with FeatureStore(path, verify_checksums=True) as store:
        assert torch.equal(store.read_into(keys), expected)


def test_lmdbs_permission_denied_is_a_permission_error_naming_the_store(tmp_path, monkeypatch):
    """py-lmdb says EACCES as lmdb.Error text: it must not read as a damaged or missing store."""
    from featstore.errors import StorePermissionError

    path = str(tmp_path / "vggt_features.lmdb")
    os.makedirs(path)
    open(os.path.join(path, "data.mdb"), "wb").close()

    def denied(p, **kwargs):
        raise lmdb.Error(f"{p}: Permission denied")

    monkeypatch.setattr(lmdb, "open", denied)
    for readonly, need in ((True, "reading needs read access"), (False, "needs write access")):
        with pytest.raises(StorePermissionError, match=re.escape(f"{path}: permission denied (owner uid")) as e:
            open_env(path, readonly=readonly)
        assert need in str(e.value) and "chmod" in str(e.value)
        assert isinstance(e.value, PermissionError)


def _as_another_user():
    """argv prefix that runs a command as a user without root's access bypass, or None."""
    import shutil

    if os.getuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    probe = subprocess.run(prefix + [sys.executable, "-c", "import featstore"], capture_output=True,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return prefix if probe.returncode == 0 else None


def test_a_store_this_user_may_not_read_or_write_is_one_line_naming_it():
    """Real permissions, as a user who lacks them: build into a folder it may not write, info
    on a store folder it may not enter, build on a data root below a folder it may not enter.
    One line each, naming the path; never 'no database' or 'not a directory'."""
    import shutil
    import tempfile

    prefix = _as_another_user()
    if prefix is None:
        pytest.skip("needs a non-root user, or setpriv and a checkout another user can read")
    from _featstore_helpers import make_images

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = tempfile.mkdtemp(prefix="featstore-permissions-")  # not below pytest's 0700 folder
    try:
        os.chmod(base, 0o755)
        data = os.path.join(base, "shared")
        make_images(data, ["a/000.png", "a/001.png"])
        for root, _, files in os.walk(data):
            os.chmod(root, 0o755)
            for f in files:
                os.chmod(os.path.join(root, f), 0o644)
        run = lambda *args: subprocess.run(prefix + [sys.executable, "-m", "featstore", *args],  # noqa: E731
                                           capture_output=True, text=True, timeout=180, cwd=repo)
        build_args = ["build", "--data-root", data, "--encoder", "vggt-tiny", "--no-progress"]

        if not prefix:  # a non-root user runs the tests: take its own rights away
            os.chmod(data, 0o555)
        built = run(*build_args)
        os.chmod(data, 0o755)
        assert built.returncode == 2, built.stderr
        assert "Traceback" not in built.stderr
        last = built.stderr.strip().splitlines()[-1]
        assert last.startswith(f"featstore build: error: permission denied: {data}/vggt_features.lmdb"), last

        store = os.path.join(data, "vggt_features.lmdb")
        assert subprocess.run([sys.executable, "-m", "featstore", *build_args], capture_output=True).returncode == 0
        os.chmod(store, 0o700 if prefix else 0o000)
        info = run("info", data)
        os.chmod(store, 0o755)
        assert info.returncode == 2, info.stderr
        assert info.stderr.startswith(f"featstore info: error: {store}: permission denied (owner uid "), info.stderr
        assert "no featstore database" not in info.stderr

        os.chmod(base, 0o700 if prefix else 0o000)
        hidden = run(*build_args)
        os.chmod(base, 0o755)
        assert hidden.returncode == 2, hidden.stderr
        assert hidden.stderr.startswith(f"featstore build: error: {data}: permission denied ("), hidden.stderr
        assert "not a directory" not in hidden.stderr
    finally:
        os.chmod(base, 0o755)
        shutil.rmtree(base, ignore_errors=True)
