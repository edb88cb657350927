"""`featstore verify`: each check finds what it should, names the key, and picks the right exit code."""

from __future__ import annotations

import json
import os
import shutil

import lmdb
import pytest
import torch

from _featstore_helpers import (core_spec, features_for, make_data_root, flip_byte_in_value, key_of, make_images, make_store, run_cli,
                                tiny_spec, write_source, entry_metadata, died_of_signal)
from featstore.errors import CorruptEntryError, FeatstoreError, ManifestError
from featstore.store.reader import FeatureStore
from featstore.store.layout import LAST_BUILD_KEY, MANIFEST_KEY, META_DB
from featstore.ops.compare import compare_features
from featstore.ops.verify import verify_store
from featstore.store.writer import StoreWriter


@pytest.fixture
def root(tmp_path):
    return make_data_root(tmp_path, n=20)


def store_of(root: str) -> str:
    return os.path.join(root, "vggt_features.lmdb")


def _edit_manifest(store: str, **changes) -> None:
    env = lmdb.open(store, max_dbs=8, subdir=True)
    try:
        meta = env.open_db(META_DB)
        with env.begin(write=True, db=meta) as txn:
            m = json.loads(bytes(txn.get(MANIFEST_KEY)))
            m.update(changes)
            txn.put(MANIFEST_KEY, json.dumps(m).encode())
    finally:
        env.close()


def _put(store: str, key: str, feats: torch.Tensor, meta: dict) -> None:
    with StoreWriter(store, handle_signals=False) as w:
        w.put(key, {"features": feats}, meta)
        w.finish()


# -- clean store ---------------------------------------------------------------------------

def test_clean_store_passes_every_check(root):
    report = verify_store(root, deep=True)
    assert report.ok and report.exit_code == 0, report.summary()
    assert report.entries == 20 and report.data_root == root
    assert report.bytes_read == report.manifest["bytes"] > 0
    assert any(c.startswith("structure") for c in report.checks)
    assert "plan coverage" in report.checks


def test_cli_clean_exit_0_and_json(root):
    r = run_cli("verify", root, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] is True and out["exit_code"] == 0 and out["entries"] == 20 and out["counts"] == {}
    assert out["gb_per_s"] >= 0 and out["build_state"] == "complete"
    human = run_cli("verify", root)
    assert human.returncode == 0 and "OK: no problems found" in human.stdout


def test_parallel_and_serial_reads_agree(root):
    flip_byte_in_value(store_of(root), key_of(3))
    flip_byte_in_value(store_of(root), key_of(17))
    serial, parallel = verify_store(root, workers=1), verify_store(root, workers=8)
    assert [f.to_dict() for f in serial.problems] == [f.to_dict() for f in parallel.problems]
    assert serial.keys_with("corrupt") == [key_of(3), key_of(17)]


# -- corruption ------------------------------------------------------------------------------

def test_flipped_byte_in_tensor_data_is_named_by_verify_and_refused_by_reader(root):
    store = store_of(root)
    flip_byte_in_value(store, key_of(5))
    report = verify_store(root)
    assert report.exit_code == 1
    assert report.keys_with("corrupt") == [key_of(5)]
    (finding,) = [f for f in report.problems if f.kind == "corrupt"]
    assert key_of(5) in finding.message and "checksum mismatch" in finding.message
    with FeatureStore(store, verify_checksums=True) as fs:
        with pytest.raises(CorruptEntryError, match=f"entry '{key_of(5)}': checksum mismatch"):
            fs.get(key_of(5))
        with pytest.raises(CorruptEntryError, match=key_of(5)):
            fs.read_into([key_of(4), key_of(5)])
        assert torch.equal(fs.get(key_of(4)).features, features_for(4))
    # Why checking matters: without it the flipped value is served silently.
    with FeatureStore(store) as fs:
        assert not torch.equal(fs.get(key_of(5), copy=True).features, features_for(5))
    r = run_cli("verify", root)
    assert r.returncode == 1 and key_of(5) in r.stdout and "[corrupt]" in r.stdout


def _header_offset(store: str, key: str, needle: bytes) -> int:
    from _featstore_helpers import value_bytes

    return value_bytes(store, key).index(needle) - 8


def test_flipped_byte_in_header_structure_or_checksum_is_found(root):
    store = store_of(root)
    flip_byte_in_value(store, key_of(2), where="header", offset_in_part=_header_offset(store, key_of(2), b"crc32:") + 8)
    flip_byte_in_value(store, key_of(3), where="header", offset_in_part=_header_offset(store, key_of(3), b'"dtype"'))
    flip_byte_in_value(store, key_of(4), where="header", offset_in_part=_header_offset(store, key_of(4), b'"features"') + 2)
    report = verify_store(root)
    # The checksum covers the canonical header too, so a renamed tensor is corrupt, not a shape issue.
    assert report.keys_with("corrupt") == [key_of(2), key_of(3), key_of(4)], report.summary()


def test_every_flipped_header_byte_is_found(root):
    """Every bit of every header byte (length prefix, JSON, metadata, padding) flipped in turn:
    each one is refused. The checksum covers the canonical header, so no metadata value (here
    the encoder name) changes silently."""
    from featstore.errors import CorruptEntryError
    from featstore.format.blob import decode_entry

    store = store_of(root)
    key = key_of(9)
    value = __import__("_featstore_helpers").value_bytes(store, key)
    header_end = 8 + int.from_bytes(value[:8], "little")
    passed = []
    for i in range(header_end):
        for bit in range(8):
            flipped = bytearray(value)
            flipped[i] ^= 1 << bit
            try:
                decode_entry(bytes(flipped), key=key, verify=True)
                passed.append((i, bit))
            except CorruptEntryError:
                pass
    assert header_end > 300 and passed == []
    # And through the whole verify, on disk: the metadata byte names its key.
    pos = _header_offset(store, key, b'"encoder":"vggt-tiny"') + len('"encoder":"vggt')
    assert value[8 + pos : 8 + pos + 1] == b"-"
    flip_byte_in_value(store, key, where="header", offset_in_part=pos)
    report = verify_store(root, deep=True)
    assert report.keys_with("corrupt") == [key], report.summary()


def test_wrong_dtype_shape_and_fingerprint_are_named(root):
    store = store_of(root)
    src = write_source(root, "extra/a.jpg", 100)
    _put(store, "extra/a.jpg", features_for(100, dtype=torch.float16), entry_metadata(["extra/a.jpg"], [src]))
    src = write_source(root, "extra/b.jpg", 101)
    _put(store, "extra/b.jpg", features_for(101, shape=(1, 40, 128)), entry_metadata(["extra/b.jpg"], [src]))
    src = write_source(root, "extra/c.jpg", 102)
    _put(store, "extra/c.jpg", features_for(102), entry_metadata(["extra/c.jpg"], [src], fingerprint="0" * 64))
    report = verify_store(root)
    assert report.keys_with("dtype") == ["extra/a.jpg"]
    assert report.keys_with("shape") == ["extra/b.jpg"]
    assert report.keys_with("fingerprint") == ["extra/c.jpg"]
    assert "expected [1, 48, 128]" in next(f.message for f in report.problems if f.kind == "shape")


def test_the_channel_check_asks_the_encoder_family(tmp_path, monkeypatch):
    # A family whose stored channels are 3 x embed_dim (not VGGT's 2 x): verify takes the
    # registry's stored-shape rule, so the family's own entries pass and a 2 x one is named.
    from featstore.encoders import registry

    spec = core_spec(encoder="test-triple")  # embed_dim 32
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register_encoder("test-triple", lambda **kw: None, spec=lambda **kw: spec,
                              shape=lambda s, w, h, n: (n, 4, 3 * s.config["embed_dim"]))
    store = str(tmp_path / "store.lmdb")
    with StoreWriter(store, spec=spec.to_dict(), handle_signals=False) as w:
        for key, channels in (("a.jpg", 96), ("b.jpg", 64)):
            meta = entry_metadata([key], [{"size": 1, "mtime_ns": 1}], grid=(2, 2), fingerprint=spec.fingerprint())
            w.put(key, {"features": torch.ones(1, 4, channels, dtype=torch.bfloat16)}, meta)
        w.finish()
    report = verify_store(store)
    assert [(f.kind, f.key) for f in report.problems] == [("shape", "b.jpg")]
    assert "features shape [1, 4, 64], expected [1, 4, 96]" in report.problems[0].message


def test_manifest_disagreeing_with_entries(root):
    _edit_manifest(store_of(root), entries=21, bytes=5)
    report = verify_store(root)
    msgs = [f.message for f in report.problems if f.kind == "manifest"]
    assert any("says 21 entries, the store holds 20" in m for m in msgs)
    assert any("says 5 value bytes" in m for m in msgs)


def test_manifest_fingerprint_not_of_its_spec(root):
    _edit_manifest(store_of(root), fingerprint="f" * 64)
    report = verify_store(root)
    assert any("is not the fingerprint of its encoder spec" in f.message for f in report.problems)


def test_incomplete_build_and_failed_units(tmp_path):
    root = str(tmp_path)
    make_store(root, n=5, finish=False)
    report = verify_store(root)
    assert report.counts().get("build") == 1
    store = store_of(root)
    with StoreWriter(store, handle_signals=False) as w:
        w.finish(report={"failed": [{"key": "bad/x.jpg", "error": "truncated JPEG"}]})
    report = verify_store(root)
    assert "build" not in report.counts()
    assert report.keys_with("failed") == ["bad/x.jpg"]
    assert "truncated JPEG" in report.summary()


def test_a_damaged_last_build_report_is_a_manifest_finding_and_a_clear_error(tmp_path):
    root = str(tmp_path)
    make_store(root, n=3)
    store = store_of(root)
    with StoreWriter(store, handle_signals=False) as w:
        w.finish(report={"failed": [{"key": "bad/x.jpg", "error": "truncated JPEG"}]})
    with FeatureStore(store) as fs:
        assert fs.last_build()["failed"] == [{"key": "bad/x.jpg", "error": "truncated JPEG"}]
    env = lmdb.open(store, max_dbs=8, subdir=True)
    try:
        with env.begin(write=True, db=env.open_db(META_DB)) as txn:
            txn.put(LAST_BUILD_KEY, b'{"failed": [')
    finally:
        env.close()
    report = verify_store(root)
    assert [f.message for f in report.problems] == ["the last build report is not valid JSON"]
    with FeatureStore(store) as fs, pytest.raises(ManifestError, match="the last build report is not valid JSON"):
        fs.last_build()
    r = run_cli("info", root)
    assert r.returncode == 2 and r.stderr == (f"featstore info: error: {store}: the last build report is not valid "
                                              "JSON; the store is damaged: run `featstore verify`, rebuild the set or "
                                              "restore the store\n")


# -- sources and plan --------------------------------------------------------------------------

def test_orphan_and_stale_sources(root):
    os.remove(os.path.join(root, key_of(1)))
    with open(os.path.join(root, key_of(2)), "ab") as f:
        f.write(b"more")  # size changed
    st = os.stat(os.path.join(root, key_of(3)))
    os.utime(os.path.join(root, key_of(3)), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched
    report = verify_store(root)
    assert report.keys_with("orphan") == [key_of(1)]
    assert report.keys_with("stale") == [key_of(2), key_of(3)]
    # The unit of the removed image is no longer planned: not "missing" as well.
    assert "missing" not in report.counts()


def test_deep_finds_content_change_that_kept_size_and_mtime(root):
    path = os.path.join(root, key_of(4))
    st = os.stat(path)
    with open(path, "r+b") as f:
        b = f.read(1)
        f.seek(0)
        f.write(bytes([b[0] ^ 1]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert verify_store(root).ok
    deep = verify_store(root, deep=True)
    assert deep.keys_with("stale") == [key_of(4)]
    assert "sha256" in deep.summary()


def test_deep_clears_a_touched_file_with_same_content(root):
    path = os.path.join(root, key_of(6))
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    assert verify_store(root).keys_with("stale") == [key_of(6)]
    deep = verify_store(root, deep=True)
    assert deep.ok and any("same content" in n for n in deep.notes)


def test_missing_units_and_frame_lists_that_differ(root):
    write_source(root, "new/img.jpg", 7)  # a new image: planned, not stored
    ann = os.path.join(root, "..", "ann.json")
    with open(ann, "w") as f:
        json.dump([{"image": key_of(0)},
                   {"id": key_of(1), "images": [key_of(0), key_of(1)]},  # stored on [key_of(1)] only
                   {"images": ["new/img.jpg"]}], f)
    report = verify_store(root)
    assert report.keys_with("missing") == ["new/img.jpg"]
    report = verify_store(root, annotations=[ann])
    assert report.keys_with("frames") == [key_of(1)]
    assert report.keys_with("missing") == ["new/img.jpg"]
    assert len(report.unplanned) == 18  # 20 stored, 2 of them planned


def test_data_root_is_implied_only_by_a_data_root_argument(root, tmp_path):
    copy = str(tmp_path / "elsewhere.lmdb")
    shutil.copytree(store_of(root), copy)
    report = verify_store(copy)
    assert report.data_root is None and report.ok
    assert any("no data root" in n for n in report.notes)
    assert verify_store(copy, data_root=root).ok


# -- cannot run: exit 2 ----------------------------------------------------------------------

def test_exit_2_when_it_cannot_run(root, tmp_path):
    r = run_cli("verify", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "no featstore database" in r.stderr
    r = run_cli("verify", str(tmp_path / "nothing"), "--json")
    assert r.returncode == 2 and json.loads(r.stdout)["exit_code"] == 2
    copy = str(tmp_path / "copy.lmdb")
    shutil.copytree(store_of(root), copy)
    r = run_cli("verify", copy, "--recompute", "2")
    assert r.returncode == 2 and "--data-root" in r.stderr
    _edit_manifest(copy, format_version=99)
    r = run_cli("verify", copy)
    assert r.returncode == 2 and "format version 99 is not supported" in r.stderr


def test_garbage_data_file_exits_2_with_a_clear_message(root):
    path = os.path.join(store_of(root), "data.mdb")
    with open(path, "wb") as f:
        f.write(os.urandom(64 * 1024))
    r = run_cli("verify", root)
    assert not died_of_signal(r.returncode)
    assert r.returncode == 2 and "data.mdb" in r.stderr, r.stderr


# -- recompute -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A real vggt-tiny build of 6 small images (2 sequence units + singles via a scan)."""
    root = str(tmp_path_factory.mktemp("built"))
    make_images(root, [f"s/{i}.png" for i in range(6)])
    r = run_cli("build", "--data-root", root, "--encoder", "vggt-tiny", "--workers", "0", "--no-progress")
    assert r.returncode == 0, r.stderr
    return root


def test_recompute_agrees_with_a_real_build(built):
    report = verify_store(built, recompute=3, seed=1)
    assert report.ok, report.summary()
    assert len(report.recomputed) == 3 and all(r["ok"] for r in report.recomputed)
    assert all(r["cosine"] > 0.9999 for r in report.recomputed)
    r = run_cli("verify", built, "--recompute", "2", "--seed", "3", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(json.loads(r.stdout)["recomputed"]) == 2


def test_recompute_catches_wrong_features(built, tmp_path):
    root = str(tmp_path / "data")
    shutil.copytree(built, root)
    store = store_of(root)
    with FeatureStore(store) as fs:
        e = fs.get("s/2.png", copy=True)
        other = fs.get("s/3.png", copy=True).features
    # Checksum-valid features of another image under this key (as a wrong build would write).
    _put(store, "s/2.png", other, {k: v for k, v in e.metadata.items() if k != "checksum"})
    report = verify_store(root, recompute=6, seed=0)
    assert report.keys_with("recompute") == ["s/2.png"], report.summary()
    assert "corrupt" not in report.counts()


def test_recompute_tolerance_covers_bf16_autocast_and_rejects_noise():
    from featstore.encoders import get_encoder

    enc = get_encoder("vggt-tiny")
    x = torch.rand(1, 2, 3, 84, 112)
    ref = enc.encode(x)[0]  # CPU: float32
    enc._autocast_dtype = torch.bfloat16  # what a CUDA build does, emulated on the CPU
    low = enc.encode(x)[0]
    got = compare_features(low.to(torch.bfloat16), ref, "bfloat16", "bfloat16")
    assert got["ok"] and got["rel_error"] > 0, got
    noisy = ref + 0.05 * ref.abs().max() * torch.randn_like(ref)
    assert not compare_features(ref.to(torch.bfloat16), noisy, "bfloat16", "bfloat16")["ok"]
    assert not compare_features(ref.to(torch.bfloat16), ref[:, torch.randperm(ref.shape[1])], "bfloat16")["ok"]
    # fp32 storage with fp32 compute must be nearly exact: bf16-sized errors fail it.
    assert not compare_features(ref, low, "float32", "float32")["ok"]


def test_recompute_needs_a_data_root(root, tmp_path):
    copy = str(tmp_path / "c.lmdb")
    shutil.copytree(store_of(root), copy)
    with pytest.raises(FeatstoreError, match="--data-root"):
        verify_store(copy, recompute=1)


def test_recompute_with_other_weights_lists_every_differing_field(built, tmp_path):
    from safetensors.torch import save_file

    from featstore.encoders import get_encoder
    from featstore.errors import FingerprintMismatchError

    weights = str(tmp_path / "other.safetensors")
    save_file(get_encoder("vggt-tiny").model.state_dict(), weights)
    with pytest.raises(FingerprintMismatchError) as e:
        verify_store(built, recompute=1, seed=0, weights=weights)
    from featstore.encoders.vggt.weights import sha256_file

    assert str(e.value) == (
        "the rebuilt encoder differs from the spec: weights_sha256: store has 'random-seed-0', expected "
        f"'{sha256_file(weights)}'. Pass the --weights the store was built with (and the featstore version it "
        "was built with)")


@pytest.mark.parametrize("dtype,bad", [(torch.bfloat16, float("nan")), (torch.float16, float("inf")),
                                       (torch.float32, -float("inf"))])
def test_nan_or_infinite_features_are_corrupt_and_gc_removes_them(root, dtype, bad):
    from featstore.ops.collect import collect_garbage

    store = store_of(root)
    src = write_source(root, "extra/nan.jpg", 100)
    feats = features_for(100, dtype=dtype)
    feats.view(-1)[777] = bad
    _put(store, "extra/nan.jpg", feats, entry_metadata(["extra/nan.jpg"], [src]))
    report = verify_store(root)
    assert report.keys_with("corrupt") == ["extra/nan.jpg"], report.summary()
    assert "its features hold NaN or infinite values" in report.summary()
    assert collect_garbage(root).keys["corrupt"] == ["extra/nan.jpg"]
    with FeatureStore(root) as s:
        assert "extra/nan.jpg" not in s


def test_fp8_nan_bytes_are_found_and_finite_fp8_passes():
    from featstore.format.fp8 import all_finite as _all_finite

    x = torch.linspace(-448, 448, 1000).to(torch.float8_e4m3fn)
    assert _all_finite(x)
    for nan_byte in (0x7F, 0xFF):
        y = x.clone()
        y.view(torch.uint8)[500] = nan_byte
        assert not _all_finite(y), hex(nan_byte)
    assert _all_finite(torch.empty(0)) and _all_finite(torch.arange(5))


# -- a build that is still running -------------------------------------------------------------

# A build in progress, as `featstore build` leaves a store mid-way: the build lock held, 5 of 20
# entries committed, the manifest's state "in_progress"; it prints "ready" and waits to be killed.
_RUNNING_BUILD = r"""
import sys, time
sys.path.insert(0, sys.argv[2])
from _featstore_helpers import make_store
from featstore.store.lock import BuildLock, prepare_store_dir
store = sys.argv[1] + "/vggt_features.lmdb"
prepare_store_dir(store)
lock = BuildLock(store).acquire()
make_store(sys.argv[1], n=5, finish=False)
print("ready", flush=True)
time.sleep(120)
"""


def test_verify_of_a_store_whose_build_runs_says_so_and_after_a_kill_says_rerun(tmp_path):
    import subprocess
    import sys

    from _featstore_helpers import REPO

    data = tmp_path / "data"
    data.mkdir()
    tests = os.path.join(REPO, "tests")
    holder = subprocess.Popen([sys.executable, "-c", _RUNNING_BUILD, str(data), tests], stdout=subprocess.PIPE,
                              text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "ready"
        record = json.load(open(os.path.join(store_of(str(data)), "featstore-build.lock")))
        out = run_cli("verify", str(data))
        assert out.returncode == 2, out.stdout + out.stderr
        assert out.stderr == (f"featstore verify: error: {store_of(str(data))} is being written by a build (pid "
                              f"{holder.pid} on host {record['host']}, started {record['started']}): verify when it "
                              "finishes\n")
        assert "rerun" not in out.stdout + out.stderr
        with pytest.raises(FeatstoreError, match="is being written by a build"):  # the API, one set named
            verify_store(str(data), feature_set="vggt")
    finally:
        holder.kill()
        holder.wait()
    # Killed: the lock is gone with the process, its record stays; now it is a build to rerun.
    out = run_cli("verify", str(data))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "[build] the last build did not complete (killed or interrupted): rerun" in out.stdout


def test_a_probe_of_the_build_lock_never_turns_a_starting_build_away(tmp_path):
    import fcntl
    import threading

    from featstore.store.lock import BuildLock, live_build, prepare_store_dir

    store = str(tmp_path / "s")
    prepare_store_dir(store)
    assert live_build(store) is None  # no lock file yet: none is created
    assert os.listdir(store) == []
    fd = os.open(os.path.join(store, "featstore-build.lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_SH)  # what `live_build` holds for an instant
    threading.Timer(0.03, os.close, [fd]).start()
    with BuildLock(store):  # starts while the probe holds it: retried, not refused
        assert live_build(store)["pid"] == os.getpid()
    assert live_build(store) is None
