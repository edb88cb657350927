"""Training checks the store before step 1 and the frames at every read: a sample without an
entry is found at start-up (not at the step that reaches it), and an image replaced after the
build is stale (an error naming the key and the frame, or computed online), never served."""

from __future__ import annotations

import json
import logging
import os
import time

import pytest

from _training_helpers import annotations, build_store, dataset, sample_root, spec_for


def _samples(n: int) -> list:
    """n two-frame samples with their own ids (one unit each) over scene_a's four frames."""
    return [{"id": f"s{i:02d}", "images": [f"scene_a/00{i % 4}.jpg", f"scene_a/00{(i + 1) % 4}.jpg"],
             "conversations": [{"from": "human", "value": "<image><image>Where?"}, {"from": "gpt", "value": "Left."}]}
            for i in range(n)]


def _write(root: str, name: str, samples: list) -> str:
    path = os.path.join(root, name)
    with open(path, "w") as f:
        json.dump(samples, f)
    return path


def test_a_gap_in_the_store_stops_training_before_any_model_is_built(tmp_path, monkeypatch, caplog):
    """23 samples, 20 entries: the run stops at start-up naming the 3 samples' count and the first,
    without building the model; under --vggt_cache_miss compute it warns and goes on."""
    import training.train as train
    from training.data import CacheMissError

    root = sample_root(tmp_path)
    built = _write(root, "built.json", _samples(20))
    wanted = _write(root, "train.json", _samples(23))
    build_store(root, annotation_files=[built])
    models = []
    monkeypatch.setattr(train, "build_model", lambda *a, **k: models.append(1) or pytest.fail("model built"))
    argv = ["--data_root", root, "--annotations", wanted, "--use_vggt_cache", "--output_dir", str(tmp_path / "o"),
            "--use_cpu", "--report_to", "none", "--max_steps", "1"]
    with pytest.raises(CacheMissError) as e:
        train.run(argv)
    msg = str(e.value)
    assert "3 of 23 samples have no VGGT features" in msg and "3 of 23 keys missing" in msg
    assert f"{wanted} sample 20 (id 's20') (key 's20')" in msg and "--vggt_cache_miss compute" in msg
    assert models == []
    def stop(*args, **kwargs):
        raise RuntimeError("stop after the check")

    monkeypatch.setattr(train, "build_model", stop)
    with caplog.at_level(logging.WARNING, logger="training"):
        with pytest.raises(RuntimeError, match="stop after the check"):
            train.run(argv + ["--vggt_cache_miss", "compute"])
    assert any("3 of 23 samples have no VGGT features" in r.getMessage() and "encoded online" in r.getMessage()
               for r in caplog.records)


def test_a_complete_store_passes_the_check(tmp_path):
    from featstore.store.reader import FeatureStore
    from training.train import check_coverage

    root = sample_root(tmp_path)
    store = FeatureStore(build_store(root))
    ds = dataset(root, spec_for(), store=store)
    check_coverage(ds, store, None, "error")  # nothing missing: no error
    assert store.missing([u.key for u in ds.units if u is not None]) == []
    assert store.missing(["nope", ds.units[0].key]) == ["nope"]


def _replace_image(path: str, seed: int) -> None:
    """Another valid JPEG of the same size in pixels (different bytes), with a later mtime."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
    st = os.stat(path)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, "JPEG")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))


def test_a_replaced_image_is_stale_never_served(tmp_path):
    from featstore.store.reader import FeatureStore
    from training.data import CacheMissError

    root = sample_root(tmp_path)
    store = FeatureStore(build_store(root))
    spec = spec_for()
    assert dataset(root, spec, store=store)[0]["hits"] == 1
    _replace_image(os.path.join(root, "scene_a", "001.jpg"), seed=1)
    ds = dataset(root, spec, store=store)
    with pytest.raises(CacheMissError) as e:
        ds[0]
    assert "stale VGGT features" in str(e.value) and "'scene_a/001.jpg' changed" in str(e.value)
    item = dataset(root, spec, store=store, cache_miss="compute")[0]
    assert (item["hits"], item["misses"], item["computed"]) == (0, 1, 1) and item["frames"] is not None
    # The same size and a touched mtime: stale too (the check is size AND mtime).
    path = os.path.join(root, "scene_b", "000.jpg")
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    with pytest.raises(CacheMissError, match="'scene_b/000.jpg' changed"):
        ds[2]
    os.remove(os.path.join(root, "misc", "portrait.png"))
    with pytest.raises(Exception, match="portrait.png"):
        ds[4]


def test_the_stat_check_costs_microseconds(tmp_path):
    """The per-read freshness check is a stat per frame: measured, and bounded loosely here."""
    from featstore.store.reader import FeatureStore

    root = sample_root(tmp_path)
    store = FeatureStore(build_store(root))
    ds = dataset(root, spec_for(), store=store)
    unit = ds.units[0]
    reps = 200
    t0 = time.perf_counter()
    for _ in range(reps):
        store.read_into([unit.key], frames=[list(unit.frames)])
    plain = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        store.read_into([unit.key], frames=[list(unit.frames)], data_root=root)
    checked = (time.perf_counter() - t0) / reps
    assert checked - plain < 2e-3, (plain, checked)  # 4 stats: far below a millisecond on any disk
