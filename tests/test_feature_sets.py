"""Feature sets: several named sets (each its own sub-database, manifest and spec) in one store.

Real LMDB on disk, real builds with tiny random encoders. The image-unit encoder is a real
VGGT-tiny preset registered with unit kind "image" and its own default set, so image planning
and a second set are exercised before a second encoder family exists."""

import json
import multiprocessing
import os
import pickle
import shutil
import subprocess
import sys

import lmdb
import pytest
import torch

from featstore import FeatureStore, StoreWriter
from featstore.build.runner import BuildOptions, build
from featstore.store.lock import BuildLock
from featstore.cli import main as cli_main
from featstore.ops.copy_store import copy_store
from featstore.encoders import TINY_CONFIG, VGGTPreset, register_encoder, resolve_spec
from featstore.encoders.vggt.config import TINY_TARGET_SIZE
from featstore.errors import (FeatureSetNotFoundError, FingerprintMismatchError, InvalidFeatureSetError, ManifestError,
                              MergeConflictError, StoreBusyError)
from featstore.format.blob import encode_entry
from featstore.ops.collect import collect_garbage
from featstore.ops.info import store_info
from featstore.ops.merge import merge_stores
from featstore.build.plan import plan_units
from featstore.store.layout import MAX_FEATURE_SETS, check_feature_set, features_db, manifest_key
from featstore.ops.verify import parse_weights, verify_store

from _featstore_helpers import REPO, core_spec

SAMPLE = os.path.join(REPO, "sample_data")
IMAGE_ENCODER = "vggt-tiny-images"  # registered below: unit "image", default set "test_images"
IMAGES = "test_images"
# The manifest fields a store written before feature sets existed carries (docs/FORMAT.md §2).
MANIFEST_FIELDS = {"format", "format_version", "featstore_version", "created", "encoder", "fingerprint", "entries",
                   "bytes", "build"}


@pytest.fixture(scope="module", autouse=True)
def image_encoder():
    preset = VGGTPreset(IMAGE_ENCODER, TINY_CONFIG, default_target=TINY_TARGET_SIZE, random_seed=5)
    register_encoder(preset.name, preset.build, spec=preset.spec, unit="image", feature_set=IMAGES, overwrite=True)
    return preset.name


@pytest.fixture
def data_root(tmp_path):
    root = tmp_path / "data"
    shutil.copytree(SAMPLE, root, ignore=shutil.ignore_patterns("*.lmdb"))
    return str(root)


def _build(root, encoder="vggt-tiny", **kw):
    kw.setdefault("annotations", [os.path.join(root, "annotations.json")])
    return build(BuildOptions(data_root=root, encoder=encoder, workers=0, progress=False, **kw))


def _raw_set(store, db=b"features", keys=(b"manifest", b"last_build")):
    """Every byte of one set, read as a featstore before feature sets did (plain py-lmdb,
    max_dbs=8, only `db` and `meta` opened)."""
    env = lmdb.open(store, readonly=True, lock=False, max_dbs=8, subdir=True)
    try:
        with env.begin() as txn:
            entries = dict(txn.cursor(db=env.open_db(db, txn=txn, create=False)))
            meta = env.open_db(b"meta", txn=txn, create=False)
            return entries, {k: txn.get(k, db=meta) for k in keys}
    finally:
        env.close()


def _blob(i, key, spec):
    """An entry consistent with `spec` (core_spec: 2 x embed_dim 32 channels) on a 2x2 grid."""
    g = torch.Generator().manual_seed(i)
    feats = torch.randn(1, 4, 64, generator=g).to(torch.bfloat16)
    return encode_entry({"features": feats}, {"frames": json.dumps([key]), "grid": "[2, 2]",
                                              "fingerprint": spec.fingerprint()})


def _write(path, feature_set, entries, spec=None, complete=True, seed=0):
    spec = spec or core_spec()
    with StoreWriter(path, spec=spec, feature_set=feature_set, handle_signals=False) as w:
        for i, key in enumerate(entries):
            w.put(key, _blob(seed + i, key, spec))
        if complete:
            w.finish(report={"failed": []})


# -- layout and compatibility ---------------------------------------------------------------

def test_a_store_written_without_sets_is_the_vggt_set_unchanged(tmp_path):
    path = str(tmp_path / "s.lmdb")
    _write(path, None, ["a.jpg", "b.jpg"])  # an unregistered encoder, no set named: the primary set
    entries, meta = _raw_set(path)
    assert sorted(entries) == [b"a.jpg", b"b.jpg"]
    manifest = json.loads(meta[b"manifest"])
    assert set(manifest) == MANIFEST_FIELDS and manifest["format_version"] == 1 and manifest["entries"] == 2
    env = lmdb.open(path, readonly=True, lock=False, max_dbs=8)
    with env.begin() as txn:
        assert [bytes(k) for k, _ in txn.cursor()] == [b"features", b"meta"]  # the sub-databases, as before
    env.close()
    with FeatureStore(path) as fs:
        assert fs.feature_set == "vggt" and fs.feature_sets() == ["vggt"] and len(fs) == 2
        assert fs.manifest == manifest


def test_old_style_manifests_keep_opening_and_verifying(tmp_path):
    # A manifest as earlier featstores wrote it: a top-level storage_dtype beside the spec's.
    path = str(tmp_path / "old.lmdb")
    _write(path, None, ["a.jpg"], spec=core_spec(storage_dtype="bfloat16"))
    env = lmdb.open(path, max_dbs=8)
    with env.begin(write=True) as txn:
        meta = env.open_db(b"meta", txn=txn)
        m = json.loads(txn.get(b"manifest", db=meta))
        m.update(storage_dtype="bfloat16", featstore_version="0.0.9")
        txn.put(b"manifest", json.dumps(m).encode(), db=meta)
    env.close()
    report = verify_store(path)
    assert report.ok, report.summary()
    assert list(report.feature_sets) == ["vggt"] and report.manifest["featstore_version"] == "0.0.9"
    assert report.problems == [] and report.to_dict()["feature_sets"]["vggt"]["entries"] == 1


def test_sets_live_in_their_own_sub_database_and_meta_keys(tmp_path):
    path = str(tmp_path / "s.lmdb")
    _write(path, None, ["a.jpg"])
    before = _raw_set(path)
    _write(path, "extra", ["x.jpg", "y.jpg"], spec=core_spec(layer=20))
    assert _raw_set(path) == before  # an older reader sees the primary set exactly as it was
    entries, meta = _raw_set(path, b"features.extra", (b"manifest.extra", b"last_build.extra"))
    assert sorted(entries) == [b"x.jpg", b"y.jpg"]
    assert json.loads(meta[b"manifest.extra"])["encoder"]["layer"] == 20 and meta[b"last_build.extra"]
    assert features_db("extra") == b"features.extra" and manifest_key("vggt") == b"manifest"
    with FeatureStore(path, feature_set="extra") as fs:
        assert fs.feature_sets() == ["extra", "vggt"] and fs.manifest["entries"] == 2
        assert sorted(fs.keys()) == ["x.jpg", "y.jpg"] and "a.jpg" not in fs


@pytest.mark.parametrize("bad", ["Bad", "a-b", "a.b", "", "x" * 33, None, 3])
def test_feature_set_names_are_checked(tmp_path, bad):
    if bad is None:
        assert check_feature_set("qwen_vision_2") == "qwen_vision_2"
        return
    with pytest.raises(InvalidFeatureSetError, match=r"feature set name .* is not valid: use 1 to 32 characters"):
        check_feature_set(bad)
    with pytest.raises(InvalidFeatureSetError):
        StoreWriter(str(tmp_path / "s.lmdb"), feature_set=bad)
    assert not os.path.exists(tmp_path / "s.lmdb")  # refused before anything is created


def test_a_missing_set_names_the_set_the_store_and_the_sets_it_has(tmp_path):
    path = str(tmp_path / "s.lmdb")
    _write(path, "only", ["a.jpg"])
    with pytest.raises(FeatureSetNotFoundError) as e:
        FeatureStore(path).get("a.jpg")
    assert str(e.value).startswith(f"{path}: the store has no feature set 'vggt'; it has 'only'.")
    assert isinstance(e.value, ManifestError)
    with FeatureStore(path, feature_set="only") as fs:  # a store of a non-primary set only is valid
        assert fs.get("a.jpg").frames == ["a.jpg"]
    assert verify_store(path).ok and store_info(path)["feature_sets"][0]["name"] == "only"


def test_objects_for_several_sets_share_one_environment_and_pickle_with_their_set(tmp_path):
    path = str(tmp_path / "s.lmdb")
    _write(path, None, ["a.jpg"])
    _write(path, "extra", ["x.jpg"])
    a, b = FeatureStore(path), FeatureStore(path, feature_set="extra")
    try:
        assert len(a) == 1 and len(b) == 1 and a._rec is b._rec
        c = pickle.loads(pickle.dumps(b))
        assert c.feature_set == "extra" and list(c.keys()) == ["x.jpg"] and c._rec is a._rec
        assert repr(b) == f"FeatureStore({path!r}, feature_set='extra')"
        ctx = multiprocessing.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=_child_keys, args=(b, q))
        p.start()
        p.join(60)
        assert q.get(timeout=5) == ("extra", ["x.jpg"])
    finally:
        a.close()
        b.close()


def _child_keys(store, q):
    q.put((store.feature_set, list(store.keys())))


def test_too_many_sets_are_refused(tmp_path):
    path = str(tmp_path / "s.lmdb")
    for i in range(MAX_FEATURE_SETS):
        StoreWriter(path, feature_set=f"s{i}", handle_signals=False).close()
    with pytest.raises(ManifestError, match=f"already holds {MAX_FEATURE_SETS} feature sets"):
        StoreWriter(path, feature_set="one_more", handle_signals=False)
    stores = [FeatureStore(path, feature_set=f"s{i}") for i in range(MAX_FEATURE_SETS)]
    assert [len(s) for s in stores] == [0] * MAX_FEATURE_SETS  # every set open at once in one process
    for s in stores:
        s.close()


# -- snapshot -------------------------------------------------------------------------------

_COMMIT_BETWEEN = """
import json, sys, torch
from featstore import StoreWriter
from featstore.format.blob import encode_entry
from _featstore_helpers import core_spec
path = sys.argv[1]
def blob(key, value):
    return encode_entry({"features": torch.full((1, 4, 8), value, dtype=torch.bfloat16)},
                        {"frames": json.dumps([key])})
with StoreWriter(path, spec=core_spec(), feature_set="extra", handle_signals=False) as w:
    w.put("x.jpg", blob("x.jpg", 2.0))
with StoreWriter(path, spec=core_spec(), handle_signals=False) as w:
    w.put("new.jpg", blob("new.jpg", 3.0))
"""


def test_a_snapshot_pins_one_state_for_every_set_until_the_block_ends(tmp_path):
    path = str(tmp_path / "s.lmdb")
    with StoreWriter(path, spec=core_spec(), handle_signals=False) as w:
        w.put("a.jpg", {"features": torch.zeros(1, 4, 8, dtype=torch.bfloat16)}, {"frames": '["a.jpg"]'})
    with StoreWriter(path, spec=core_spec(), feature_set="extra", handle_signals=False) as w:
        w.put("x.jpg", {"features": torch.ones(1, 4, 8, dtype=torch.bfloat16)}, {"frames": '["x.jpg"]'})
    vggt = FeatureStore(path, lock=True)
    extra = FeatureStore(path, feature_set="extra", lock=True)  # first used inside the block
    try:
        with vggt.snapshot() as outer:
            assert len(vggt) == 1
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")])}
            subprocess.run([sys.executable, "-c", _COMMIT_BETWEEN, path], check=True, env=env, timeout=120)
            # Committed by another process meanwhile, but not seen: one state for both sets.
            assert float(extra.get("x.jpg").features.float().mean()) == 1.0
            assert len(vggt) == 1 and "new.jpg" not in vggt and list(vggt.keys()) == ["a.jpg"]
            assert vggt.manifest["entries"] == 1
            assert float(extra.read_into(["x.jpg"]).float().mean()) == 1.0
            assert float(extra.get_many(["x.jpg"])[0].features.float().mean()) == 1.0
            with extra.snapshot():  # nested: the outer transaction, not a new one
                assert extra._rec.pinned() is outer._rec.pinned()
                with extra.view() as v:
                    assert float(v.get("x.jpg").features.float().mean()) == 1.0
            assert extra._rec.pinned() is not None  # still the outer block's
        assert vggt._rec.pinned() is None
        assert float(extra.get("x.jpg").features.float().mean()) == 2.0
        assert len(vggt) == 2 and "new.jpg" in vggt
    finally:
        vggt.close()
        extra.close()


# -- build, verify, gc, copy, merge, info -----------------------------------------------------

def test_image_units_are_each_distinct_image_once_in_order_of_first_appearance(data_root):
    ann = os.path.join(data_root, "annotations.json")
    units = plan_units(data_root, [ann], unit="image")
    assert [u.key for u in units] == ["scene_a/000.jpg", "scene_a/001.jpg", "scene_a/002.jpg", "scene_a/003.jpg",
                                      "scene_b/000.jpg", "scene_b/001.jpg", "scene_b/002.jpg", "scene_b/003.jpg",
                                      "misc/portrait.png"]
    assert all(u.frames == (u.key,) for u in units)
    assert len(plan_units(data_root, unit="image")) == 10  # the scan: every image
    with pytest.raises(ValueError, match="unit must be one of"):
        plan_units(data_root, unit="video")


def test_two_sets_build_into_one_store_and_a_forced_rebuild_of_one_leaves_the_other_byte_identical(data_root):
    store = os.path.join(data_root, "vggt_features.lmdb")
    first = _build(data_root)
    assert first.feature_set == "vggt" and first.computed == 5  # one unit per sample
    vggt_bytes = _raw_set(store)
    second = _build(data_root, IMAGE_ENCODER)  # default set: the encoder's
    assert second.feature_set == IMAGES and second.planned == 9 and second.computed == 9
    assert _raw_set(store) == vggt_bytes
    with FeatureStore(data_root, feature_set=IMAGES, expected_encoder=resolve_spec(IMAGE_ENCODER)) as fs:
        assert fs.manifest["encoder"]["encoder"] == IMAGE_ENCODER
        assert fs.get("scene_a/002.jpg").frames == ["scene_a/002.jpg"] and len(fs) == 9
    # Resume and freshness per set: nothing to do for either (a rerun rewrites its own manifest).
    assert _build(data_root).computed == 0 and _build(data_root, IMAGE_ENCODER).computed == 0
    vggt_bytes = _raw_set(store)
    forced = _build(data_root, IMAGE_ENCODER, force=True)
    assert forced.stale == 9 and forced.computed == 9
    assert _raw_set(store) == vggt_bytes
    # --feature-set overrides the encoder's default: a VGGT spec in another set.
    other = _build(data_root, feature_set="vggt_causal", spec_overrides={"attention": "causal"})
    assert other.computed == 5 and _raw_set(store) == vggt_bytes
    assert FeatureStore(data_root).feature_sets() == [IMAGES, "vggt", "vggt_causal"]
    # The build lock is per set: a build of another set proceeds, one of the same set is refused.
    with BuildLock(store, IMAGES):
        assert _build(data_root).computed == 0
        with pytest.raises(StoreBusyError, match=r"\(feature set 'test_images'\) is being written by another build"):
            _build(data_root, IMAGE_ENCODER)


def test_verify_gc_copy_and_info_cover_every_set(data_root, tmp_path, capsys):
    store = os.path.join(data_root, "vggt_features.lmdb")
    _build(data_root)
    _build(data_root, IMAGE_ENCODER)
    ann = [os.path.join(data_root, "annotations.json")]
    report = verify_store(data_root, annotations=ann, recompute=1, seed=0)
    assert report.ok, report.summary()
    assert list(report.feature_sets) == [IMAGES, "vggt"] and report.entries == 14
    assert [r["feature_set"] for r in report.recomputed] == [IMAGES, "vggt"]
    assert "plan: 9 units from annotations, one per image" in " ".join(report.notes)
    # A damaged entry of one set is that set's finding, named so.
    flip_byte_in_value_of_set(store, IMAGES, "scene_b/001.jpg")
    report = verify_store(data_root, annotations=ann)
    assert report.counts() == {"corrupt": 1}
    [finding] = report.problems
    assert finding.feature_set == IMAGES and finding.message.startswith("[test_images] entry 'scene_b/001.jpg'")
    assert verify_store(data_root, annotations=ann, feature_set="vggt").ok  # --feature-set restricts
    with pytest.raises(FeatureSetNotFoundError, match="no feature set 'nope'"):
        verify_store(data_root, feature_set="nope")
    # gc: per set (the image set's plan is its images); a gone image is an orphan in both sets.
    os.remove(os.path.join(data_root, "scene_b", "003.jpg"))
    result = collect_garbage(data_root, annotations=ann)
    assert result.feature_sets[IMAGES] == {"orphan": ["scene_b/003.jpg"], "stale": [], "corrupt": ["scene_b/001.jpg"]}
    assert result.feature_sets["vggt"] == {"orphan": ["scene_b_step3"], "stale": [], "corrupt": []}
    assert result.removed_by_set == {IMAGES: 2, "vggt": 1} and result.removed == 3
    with FeatureStore(data_root, feature_set=IMAGES) as fs:
        assert len(fs) == 7 and fs.manifest["entries"] == 7 and fs.manifest["build"]["state"] == "complete"
    # copy: every set, each checked.
    copied = copy_store(data_root, str(tmp_path / "copy.lmdb"))
    assert copied["feature_sets"] == {IMAGES: 7, "vggt": 4} and copied["entries"] == 11
    with FeatureStore(str(tmp_path / "copy.lmdb"), feature_set=IMAGES) as fs:
        assert fs.manifest == FeatureStore(data_root, feature_set=IMAGES).manifest and len(fs) == 7
    # info: every set; --json lists them.
    assert cli_main(["info", store, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [(s["name"], s["encoder"], s["entries"], s["state"]) for s in info["feature_sets"]] == [
        (IMAGES, IMAGE_ENCODER, 7, "complete"), ("vggt", "vggt-tiny", 4, "complete")]
    assert info["manifest"]["encoder"]["encoder"] == "vggt-tiny"  # the top level: the primary set, as before
    assert cli_main(["info", store]) == 0
    assert "feature set  test_images" in capsys.readouterr().out
    assert cli_main(["verify", store, "--feature-set", IMAGES, "--json", "--no-structure"]) == 0
    assert list(json.loads(capsys.readouterr().out)["feature_sets"]) == [IMAGES]


def flip_byte_in_value_of_set(store, feature_set, key):
    """Flip a bit of `key`'s value in set `feature_set` (through the value's bytes in data.mdb)."""
    env = lmdb.open(store, readonly=True, lock=False, max_dbs=64)
    with env.begin() as txn:
        value = bytes(txn.get(key.encode(), db=env.open_db(features_db(feature_set), txn=txn, create=False)))
    env.close()
    with open(os.path.join(store, "data.mdb"), "r+b") as f:
        content = f.read()
        pos = content.find(value) + len(value) - 100
        f.seek(pos)
        f.write(bytes([content[pos] ^ 0x10]))


def test_verify_weights_per_set():
    assert parse_weights(None) is None
    assert parse_weights(["/w/a.safetensors"]) == {None: "/w/a.safetensors"}
    assert parse_weights(["qwen=/w/q.pt", "hub/id"]) == {"qwen": "/w/q.pt", None: "hub/id"}
    with pytest.raises(Exception, match="two --weights for feature set 'qwen'"):
        parse_weights(["qwen=/a", "qwen=/b"])


def test_verify_refuses_weights_for_a_set_it_does_not_verify(tmp_path):
    path = str(tmp_path / "s.lmdb")
    _write(path, None, ["a.jpg"])
    with pytest.raises(Exception, match="feature set 'other' is not being verified"):
        verify_store(path, weights={"other": "/w.pt"})


def test_merge_merges_each_set_and_names_the_set_of_a_conflict(tmp_path):
    shards = [str(tmp_path / f"shard{i}.lmdb") for i in range(2)]
    _write(shards[0], None, ["a.jpg"])
    _write(shards[0], "extra", ["x.jpg"], spec=core_spec(layer=20))
    _write(shards[1], None, ["b.jpg"])
    _write(shards[1], "extra", ["y.jpg"], spec=core_spec(layer=20))
    out = str(tmp_path / "merged.lmdb")
    report = merge_stores(out, shards, progress=False)
    assert report["entries"] == 4 and report["feature_sets"]["extra"]["entries"] == 2
    with FeatureStore(out, feature_set="extra") as fs:
        assert sorted(fs.keys()) == ["x.jpg", "y.jpg"] and fs.manifest["encoder"]["layer"] == 20
    assert verify_store(out).ok
    # The same key with other bytes in set "extra": a conflict named with its set, nothing written.
    bad = str(tmp_path / "bad.lmdb")
    _write(bad, "extra", ["x.jpg", "z.jpg"], spec=core_spec(layer=20))
    with StoreWriter(bad, feature_set="extra", handle_signals=False) as w:
        w.put("x.jpg", _blob(999, "x.jpg", core_spec(layer=20)))
        w.finish()
    with pytest.raises(MergeConflictError, match="key 'x.jpg' of feature set 'extra' differs between shards"):
        merge_stores(str(tmp_path / "m2.lmdb"), [shards[0], bad], progress=False)
    other_spec = str(tmp_path / "other.lmdb")
    _write(other_spec, "extra", ["w.jpg"], spec=core_spec(layer=21))
    with pytest.raises(FingerprintMismatchError, match=r"\[feature set 'extra'\].*layer: store has 21, expected 20"):
        merge_stores(str(tmp_path / "m3.lmdb"), [shards[0], other_spec], progress=False)


def test_cli_build_writes_the_named_set_and_refuses_a_bad_name(data_root, capsys):
    args = ["build", "--data-root", data_root, "--encoder", "vggt-tiny", "--workers", "0", "--no-progress"]
    assert cli_main(args + ["--feature-set", "Bad-Name"]) == 2
    assert "feature set name 'Bad-Name' is not valid" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(data_root, "vggt_features.lmdb"))
    assert cli_main(args + ["--feature-set", "scan_set", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["feature_set"] == "scan_set" and report["computed"] == 10
    assert FeatureStore(data_root, feature_set="scan_set").feature_sets() == ["scan_set"]
