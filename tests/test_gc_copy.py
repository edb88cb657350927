"""`featstore gc` removes exactly orphan/stale/corrupt entries; `featstore copy` writes a
compacted, verified copy and never overwrites."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from _featstore_helpers import make_data_root, features_for, flip_byte_in_value, key_of, make_store, read_store, run_cli
from featstore.ops.copy_store import copy_store
from featstore.errors import FeatstoreError, StoreFullError
from featstore.ops.collect import collect_garbage
from featstore.store.reader import FeatureStore
from featstore.ops.verify import verify_store


@pytest.fixture
def root(tmp_path):
    return make_data_root(tmp_path, n=30)


def _damage(root: str) -> None:
    os.remove(os.path.join(root, key_of(1)))                      # orphan
    with open(os.path.join(root, key_of(2)), "ab") as f:           # stale
        f.write(b"x")
    flip_byte_in_value(os.path.join(root, "vggt_features.lmdb"), key_of(3))  # corrupt


def test_gc_dry_run_changes_nothing(root):
    _damage(root)
    store = os.path.join(root, "vggt_features.lmdb")
    before = open(os.path.join(store, "data.mdb"), "rb").read()
    result = collect_garbage(root, dry_run=True)
    assert result.keys == {"orphan": [key_of(1)], "stale": [key_of(2)], "corrupt": [key_of(3)]}
    assert result.removed == 0
    assert open(os.path.join(store, "data.mdb"), "rb").read() == before
    r = run_cli("gc", root, "--dry-run")
    assert r.returncode == 0 and "would remove 3 entries" in r.stdout and key_of(3) in r.stdout


def test_gc_removes_exactly_the_bad_entries(root):
    _damage(root)
    good = {k: v for k, v in read_store_skip(root, {key_of(3)}).items() if k not in {key_of(1), key_of(2)}}
    r = run_cli("gc", root, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["removed"] == 3 and out["bytes_freed"] > 0
    report = verify_store(root)
    # Manifest counts and bytes right, still complete; the stale and corrupt units are now
    # missing (the next build computes them), the orphan's unit is gone from the plan.
    assert report.counts() == {"missing": 2}, report.summary()
    assert report.keys_with("missing") == [key_of(2), key_of(3)]
    after = read_store(os.path.join(root, "vggt_features.lmdb"))
    assert set(after) == set(good) and len(after) == 27
    for k, (feats, meta) in after.items():
        assert torch.equal(feats, good[k][0]) and meta == good[k][1]


def read_store_skip(root: str, skip: set) -> dict:
    out = {}
    with FeatureStore(root) as fs:
        for k in fs.keys():
            if k not in skip:
                e = fs.get(k, copy=True)
                out[k] = (e.features, dict(e.metadata))
    return out


def test_gc_unplanned(root, tmp_path):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"image": key_of(i)} for i in range(10)]))
    result = collect_garbage(root, annotations=[str(ann)], unplanned=True)
    assert result.removed == 20 and result.keys["unplanned"] == sorted(key_of(i) for i in range(10, 30))
    with FeatureStore(root) as fs:
        assert sorted(fs.keys()) == sorted(key_of(i) for i in range(10))


def test_gc_refusals(root, tmp_path):
    import shutil

    elsewhere = str(tmp_path / "elsewhere.lmdb")
    shutil.copytree(os.path.join(root, "vggt_features.lmdb"), elsewhere)
    with pytest.raises(FeatstoreError, match="needs the data root"):
        collect_garbage(elsewhere)
    partial = tmp_path / "partial"
    partial.mkdir()
    make_store(str(partial), n=3, finish=False)
    os.remove(os.path.join(partial, key_of(0)))
    r = run_cli("gc", str(partial))
    assert r.returncode == 2 and "in progress" in r.stderr
    assert collect_garbage(str(partial), force=True).removed == 1


# -- copy ------------------------------------------------------------------------------------

def test_copy_is_compacted_equal_and_opens(root, tmp_path):
    store = os.path.join(root, "vggt_features.lmdb")
    for i in range(0, 30, 2):
        os.remove(os.path.join(root, key_of(i)))
    assert collect_garbage(root).removed == 15
    dst = str(tmp_path / "nvme" / "vggt_features.lmdb")
    os.makedirs(os.path.dirname(dst))
    r = run_cli("copy", root, dst, "--verify", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["entries"] == 15 and out["verify"]["ok"]
    assert out["dst_bytes"] < out["src_bytes"]  # freed pages are dropped
    assert read_store(dst).keys() == read_store(store).keys()
    for k, (feats, meta) in read_store(dst).items():
        assert torch.equal(feats, features_for(int(k[5:7]) * 10 + int(k[8:11])))
    with FeatureStore(dst) as a, FeatureStore(store) as b:
        assert a.manifest == b.manifest
    assert not [n for n in os.listdir(os.path.dirname(dst)) if "partial" in n]


def test_copy_refuses_to_overwrite(root, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    r = run_cli("copy", root, str(dst))
    assert r.returncode == 2 and "refuses to overwrite" in r.stderr
    assert os.listdir(dst) == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert copy_store(root, str(empty))["entries"] == 30  # an empty folder is fine
    with pytest.raises(FeatstoreError, match="refuses to overwrite"):
        copy_store(root, str(empty))


@pytest.mark.parametrize("argv, message", [
    (["copy", "only_dst"], "copy takes SRC DST, or --data-root DATA_ROOT DST. Found ['only_dst'] with --data-root None"),
    (["copy", "--data-root", "d", "a", "b"], "copy takes SRC DST, or --data-root DATA_ROOT DST. Found ['a', 'b'] with "
                                             "--data-root d"),
    (["merge", "out.lmdb"], "merge takes OUT SHARD [SHARD ...], or --data-root DATA_ROOT SHARD [...]. Found "
                            "['out.lmdb']"),
])
def test_copy_and_merge_name_their_paths_or_say_how(argv, message, capsys):
    from featstore.cli import main

    assert main(argv) == 2
    assert capsys.readouterr().err == f"featstore {argv[0]}: error: {message}\n"


def test_copy_with_data_root_copies_the_store_build_made_there(root, tmp_path, capsys):
    from featstore.cli import main

    dst = str(tmp_path / "copy.lmdb")
    assert main(["copy", "--data-root", root, dst, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"featstore copy: 30 entries {os.path.join(root, 'vggt_features.lmdb')} -> {dst} (")
    assert read_store(dst).keys() == read_store(root).keys()


def test_copy_refuses_an_incomplete_build(tmp_path):
    make_store(str(tmp_path), n=4, finish=False)
    with pytest.raises(FeatstoreError, match="in_progress"):
        copy_store(str(tmp_path), str(tmp_path / "out"))
    result = copy_store(str(tmp_path), str(tmp_path / "out"), allow_incomplete=True)
    assert result["entries"] == 4


def _mount_tmpfs(path: str, size: str) -> bool:
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True)
    return r.returncode == 0


def test_copy_to_a_full_disk_leaves_nothing_behind(tmp_path):
    root = str(tmp_path / "data")
    os.makedirs(root)
    make_store(root, n=60)  # ~0.8 MB of values
    mnt = str(tmp_path / "small")
    if not _mount_tmpfs(mnt, "256k"):
        pytest.skip("cannot mount a tmpfs here (needs root); the free-space check is tested by the size estimate")
    try:
        with pytest.raises(StoreFullError, match="free"):
            copy_store(root, os.path.join(mnt, "feats.lmdb"))
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", mnt], check=True)
