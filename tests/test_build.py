"""featstore build on CPU with the tiny random encoder: content, resume, bad input, planning,
several processes, shards and merge."""

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from featstore import FeatureStore
from featstore.build.runner import BuildOptions, build
from featstore.build.encode import encode_unit
from featstore.encoders import get_encoder
from featstore.encoders.preprocess import preprocess_image
from featstore.encoders.vggt.model import VGGTAggregator
from featstore.encoders.vggt.weights import sha256_file
from featstore.errors import FingerprintMismatchError, MergeConflictError, PlanError
from featstore.ops.merge import merge_stores
from featstore.build.plan import plan_units

from _training_launch import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "sample_data")
ANNOTATIONS = "annotations.json"


def featstore_cli(*args, check=None, timeout=180, env=None):
    proc = subprocess.run([sys.executable, "-m", "featstore", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    if check is not None:
        assert proc.returncode == check, proc.stdout + proc.stderr
    return proc


@pytest.fixture
def data_root(tmp_path):
    root = tmp_path / "data"
    shutil.copytree(SAMPLE, root, ignore=shutil.ignore_patterns("*.lmdb"))
    return str(root)


def options(root, **kw):
    kw.setdefault("encoder", "vggt-tiny")
    kw.setdefault("workers", 0)
    kw.setdefault("progress", False)
    return BuildOptions(data_root=root, **kw)


def store_contents(path):
    with FeatureStore(path) as s:
        return {k: (s.get(k, copy=True).features, s.get(k).frames) for k in s.keys()}


def assert_same_contents(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k][0], b[k][0]), k
        assert a[k][1] == b[k][1], k


@pytest.mark.parametrize("mode", [
    dict(),
    dict(annotations=[ANNOTATIONS]),
    dict(annotations=[ANNOTATIONS], spec_overrides=dict(attention="causal", frames_kept="last")),
])
def test_stored_features_equal_a_direct_encoder_call(data_root, mode):
    if "annotations" in mode:
        mode = dict(mode, annotations=[os.path.join(data_root, a) for a in mode["annotations"]])
    report = build(options(data_root, **mode))
    assert not report.failed
    overrides = mode.get("spec_overrides", {})
    encoder = get_encoder("vggt-tiny", **overrides)
    units = plan_units(data_root, mode.get("annotations"))
    assert report.computed == len(units) > 0
    layer, kept_last = encoder.spec.layer_resolved, overrides.get("frames_kept") == "last"
    with FeatureStore(data_root) as store:
        assert len(store) == len(units)
        assert store.manifest["fingerprint"] == encoder.spec.fingerprint()
        for unit in units:
            # An independent reference: the preprocessed images through the aggregator itself,
            # patch tokens of the spec's layer, cast to bf16 (not the build's own encode path).
            paths = [os.path.join(data_root, f) for f in unit.frames]
            x = torch.stack([preprocess_image(p, encoder.spec.preprocess) for p in paths])[None]
            with torch.no_grad():
                out = encoder.model(x, attention=overrides.get("attention", "full"), keep_layers=[layer])[0][layer]
            expected = out[0, -1:] if kept_last else out[0]
            expected = expected[:, encoder.model.patch_start_idx:].to(torch.bfloat16)
            entry = store.get(unit.key, frames=unit.frames)
            assert entry.features.dtype == torch.bfloat16
            assert torch.equal(entry.features, expected), unit.key
            assert entry.features.shape[0] == (1 if kept_last else unit.num_frames)
            sources = [{"size": os.path.getsize(p), "mtime_ns": os.stat(p).st_mtime_ns,
                        "sha256": hashlib.sha256(open(p, "rb").read()).hexdigest()} for p in paths]
            assert json.loads(entry.metadata["sources"]) == sources


def test_multi_frame_units_differ_from_single_image_features(data_root):
    """The cached unit is one encoder call: frame 0 inside a 4-frame call != frame 0 alone."""
    build(options(data_root, annotations=[os.path.join(data_root, ANNOTATIONS)]))
    encoder = get_encoder("vggt-tiny")
    with FeatureStore(data_root) as store:
        seq = store.get("scene_a_step3", copy=True).features
        assert seq.shape[0] == 4
    alone, _ = encode_unit(encoder, data_root, plan_units(data_root)[2])  # scene_a/000.jpg by itself
    assert not torch.equal(seq[0], alone[0])


def test_rerun_computes_only_missing_and_changed_units(data_root):
    ann = [os.path.join(data_root, ANNOTATIONS)]
    first = build(options(data_root, annotations=ann))
    assert first.computed == 5
    again = build(options(data_root, annotations=ann))
    assert (again.computed, again.fresh) == (0, 5)
    # Change one frame: exactly the two samples that contain it are recomputed.
    path = os.path.join(data_root, "scene_a/001.jpg")
    Image.fromarray(np.full((72, 96, 3), 200, np.uint8)).save(path)
    after = build(options(data_root, annotations=ann))
    assert (after.stale, after.computed, after.fresh) == (2, 2, 3)
    encoder = get_encoder("vggt-tiny")
    with FeatureStore(data_root) as store:
        for unit in plan_units(data_root, ann):
            assert torch.equal(store.get(unit.key).features, encode_unit(encoder, data_root, unit)[0])


def test_corrupt_and_empty_images_are_reported_and_skipped(data_root):
    bad = os.path.join(data_root, "bad")
    os.makedirs(bad)
    open(os.path.join(bad, "empty.jpg"), "wb").close()
    with open(os.path.join(data_root, "scene_a/000.jpg"), "rb") as f:
        jpeg = f.read()
    with open(os.path.join(bad, "truncated.jpg"), "wb") as f:
        f.write(jpeg[: len(jpeg) // 3])
    with open(os.path.join(bad, "garbage.png"), "wb") as f:
        f.write(b"not an image at all" * 10)
    proc = featstore_cli("build", "--data-root", data_root, "--encoder", "vggt-tiny", "--no-progress",
                         "--workers", "1", check=1)
    for name in ("bad/empty.jpg", "bad/truncated.jpg", "bad/garbage.png"):
        assert f"failed {name}:" in proc.stderr
    with FeatureStore(data_root) as store:
        assert len(store) == 10 and "bad/empty.jpg" not in store
    info = json.loads(featstore_cli("info", data_root, "--json", check=0).stdout)
    assert sorted(f["key"] for f in info["last_build"]["failed"]) == ["bad/empty.jpg", "bad/garbage.png",
                                                                      "bad/truncated.jpg"]
    assert info["manifest"]["build"]["state"] == "complete"


def test_key_collision_between_samples_is_a_planning_error(data_root):
    # No ids: both are keyed by their last frame, which they share with different histories.
    samples = [{"images": ["scene_a/000.jpg", "scene_a/001.jpg"]},
               {"images": ["scene_b/000.jpg", "scene_a/001.jpg"]}]
    ann = os.path.join(data_root, "clash.json")
    with open(ann, "w") as f:
        json.dump(samples, f)
    with pytest.raises(PlanError, match="key collision: .*sample 1 .*sample 0 .*'scene_a/001.jpg'"):
        plan_units(data_root, [ann])
    proc = featstore_cli("build", "--data-root", data_root, "--annotations", ann, "--encoder", "vggt-tiny", check=2)
    assert "key collision" in proc.stderr and "distinct 'id'" in proc.stderr
    assert not os.path.exists(os.path.join(data_root, "vggt_features.lmdb"))


def _tiny_checkpoint(data_root):
    """Seed-0 tiny weights saved as a file (same features as vggt-tiny; another weights_sha256)."""
    path = os.path.join(os.path.dirname(data_root), "tiny.safetensors")
    if not os.path.exists(path):
        save_file(get_encoder("vggt-tiny").model.state_dict(), path)
    return path


def test_dry_run_builds_no_model(data_root, monkeypatch, caplog):
    build(options(data_root, store=os.path.join(data_root, "vggt_features.lmdb")))
    os.remove(os.path.join(data_root, "scene_b", "000.jpg"))
    Image.fromarray(np.full((72, 96, 3), 9, np.uint8)).save(os.path.join(data_root, "scene_a", "001.jpg"))
    Image.fromarray(np.full((72, 96, 3), 9, np.uint8)).save(os.path.join(data_root, "new.png"))

    def no_model(*args, **kwargs):
        raise AssertionError("--dry-run built the model")

    monkeypatch.setattr(VGGTAggregator, "__init__", no_model)
    with caplog.at_level(logging.INFO, logger="featstore"):  # the plan summary is logged
        report = build(options(data_root, dry_run=True))
    assert (report.planned, report.fresh, report.missing, report.stale, report.computed) == (10, 8, 1, 1, 0)
    err = caplog.text
    assert "fresh 8, missing 1, stale 1; to compute 2" in err and "MB per entry" in err and "GB to add" in err
    with pytest.raises(AssertionError, match="built the model"):  # the patch is live: a real build trips it
        build(options(data_root))


def test_dry_run_prints_the_split_and_writes_nothing(data_root):
    proc = featstore_cli("build", "--data-root", data_root, "--encoder", "vggt-tiny", "--dry-run", check=0)
    assert "fresh 0, missing 10, stale 0; to compute 10" in proc.stderr
    assert "GB free" in proc.stderr
    assert "dry run, nothing computed: 10 units would be computed, 0 are fresh" in proc.stderr
    assert "stages:" not in proc.stderr and "0 computed" not in proc.stderr  # no summary of a build that never ran
    assert not os.path.exists(os.path.join(data_root, "vggt_features.lmdb"))


def test_another_encoder_spec_is_refused_unless_forced(data_root):
    build(options(data_root))
    with pytest.raises(FingerprintMismatchError, match="preprocess.target_size: store has 112, expected 56"):
        build(options(data_root, spec_overrides=dict(target_size=56)))
    # Every differing field is listed with both values (none cut off), then how to proceed.
    store = os.path.join(data_root, "vggt_features.lmdb")
    with pytest.raises(FingerprintMismatchError) as e:
        build(options(data_root, spec_overrides=dict(layer=-1, attention="causal", frames_kept="last",
                                                     target_size=56, preprocess_mode="pad", storage_dtype="float16",
                                                     compute_dtype="float32"),
                      weights=_tiny_checkpoint(data_root)))
    assert str(e.value) == (
        f"{store}: the store was built with a different encoder spec (attention: store has 'full', expected "
        "'causal'; compute_dtype: store has 'bfloat16', expected 'float32'; frames_kept: store has 'all', "
        "expected 'last'; layer: store has -2, expected -1; layer_resolved: store has 2, expected 3; "
        "preprocess.mode: store has 'crop', expected 'pad'; preprocess.target_size: store has 112, expected 56; "
        "storage_dtype: store has 'bfloat16', expected 'float16'; weights_sha256: store has 'random-seed-0', "
        f"expected '{sha256_file(_tiny_checkpoint(data_root))}'). Pass --force to rebuild this store in place "
        "(drops its entries), or --store PATH to build a new store beside it.")
    report = build(options(data_root, spec_overrides=dict(target_size=56), force=True))
    assert report.computed == 10
    with FeatureStore(data_root) as store:
        assert store.manifest["encoder"]["preprocess"]["target_size"] == 56 and len(store) == 10


def test_two_process_build_equals_one_process_build(data_root, tmp_path):
    single = str(tmp_path / "single.lmdb")
    build(options(data_root, store=single))
    multi = str(tmp_path / "multi.lmdb")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
         str(free_port()), "-m", "featstore", "build", "--data-root", data_root,
         "--encoder", "vggt-tiny", "--store", multi, "--workers", "0", "--no-progress"],
        capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "2 rank(s)" in proc.stderr
    assert_same_contents(store_contents(single), store_contents(multi))
    with FeatureStore(multi) as s:
        assert s.manifest["build"]["state"] == "complete"
        assert s.manifest["entries"] == 10
        with FeatureStore(single) as one:
            assert s.manifest["bytes"] == one.manifest["bytes"]


def test_shards_of_two_hosts_merge_into_the_single_build(data_root, tmp_path):
    single = str(tmp_path / "single.lmdb")
    build(options(data_root, store=single, annotations=[os.path.join(data_root, ANNOTATIONS)]))
    shards = []
    for i in range(2):
        shards.append(str(tmp_path / f"host{i}" / "shard.lmdb"))
        report = build(options(data_root, store=shards[-1], shard=(i, 2),
                               annotations=[os.path.join(data_root, ANNOTATIONS)]))
        assert report.computed in (2, 3)
    merged = str(tmp_path / "merged.lmdb")
    merge_stores(merged, shards, progress=False)
    assert_same_contents(store_contents(single), store_contents(merged))
    # A shard built from other sources conflicts on the same key.
    Image.fromarray(np.zeros((72, 96, 3), np.uint8)).save(os.path.join(data_root, "scene_a/000.jpg"))
    other = str(tmp_path / "other.lmdb")
    build(options(data_root, store=other, annotations=[os.path.join(data_root, ANNOTATIONS)]))
    with pytest.raises(MergeConflictError, match="key 'scene_a_step1' differs between shards"):
        merge_stores(str(tmp_path / "bad.lmdb"), [shards[0], shards[1], other], progress=False)
    assert not os.path.exists(str(tmp_path / "bad.lmdb"))


def _put_entry(src: str, dst: str, key: str, change) -> None:
    """Put `key` of store `src` into store `dst` with `change(features, metadata)` applied (the
    new entry's own checksum), as another build of the same unit would have written it."""
    from featstore.store.writer import StoreWriter

    with FeatureStore(src) as fs:
        entry, spec = fs.get(key, copy=True), fs.manifest["encoder"]
    features, metadata = change(entry.features, {k: v for k, v in entry.metadata.items() if k != "checksum"})
    with StoreWriter(dst, spec=spec, handle_signals=False) as w:
        w.put(key, {"features": features}, metadata)
        w.finish()  # a complete build, as merge requires


@pytest.mark.parametrize("storage", ["bfloat16", "float8_e4m3fn"])
def test_merge_keeps_one_of_two_entries_that_are_one_computation_and_refuses_others(data_root, tmp_path, storage):
    """Two shards holding one key (a part built under another split, or after the data grew):
    entries of the same frames and source files whose features differ only in rounding (a GPU
    encoding the unit in a batch of another size) are kept once, the first shard's; other
    sources, or features beyond rounding, are a conflict and nothing is written. An fp8 store's
    entries are compared dequantised, as they are read."""
    ann = [os.path.join(data_root, ANNOTATIONS)]
    shards = [str(tmp_path / f"shard{i}.lmdb") for i in range(2)]
    overrides = {"storage_dtype": storage}
    for i, path in enumerate(shards):
        build(options(data_root, store=path, shard=(i, 2), annotations=ann, spec_overrides=overrides))
    key = next(iter(store_contents(shards[0])))
    rounded = str(tmp_path / "rounded.lmdb")  # shard 1, also holding `key` computed in other batches
    shutil.copytree(shards[1], rounded)
    first = store_contents(shards[0])[key][0]
    _put_entry(shards[0], rounded, key, lambda f, m: (first.float().mul(1 + 2 ** -7).to(first.dtype), m))
    assert not torch.equal(store_contents(rounded)[key][0], first)
    merged = str(tmp_path / "merged.lmdb")
    report = merge_stores(merged, [shards[0], rounded], progress=False)
    assert report["equivalent"] == 1 and report["written"] == 5
    assert torch.equal(store_contents(merged)[key][0], first)  # the first shard's entry
    single = str(tmp_path / "single.lmdb")
    build(options(data_root, store=single, annotations=ann, spec_overrides=overrides))
    assert_same_contents(store_contents(single), store_contents(merged))

    far = str(tmp_path / "far.lmdb")
    shutil.copytree(shards[1], far)
    _put_entry(shards[0], far, key, lambda f, m: (first.flip(1), m))
    with pytest.raises(MergeConflictError, match=rf"key {key!r} differs between shards .* \(features beyond "
                                                 r"rounding: max relative difference .*, cosine"):
        merge_stores(str(tmp_path / "bad1.lmdb"), [shards[0], far], progress=False)
    other = str(tmp_path / "other.lmdb")
    shutil.copytree(shards[1], other)
    sources = lambda m: json.dumps([dict(src, sha256="0" * 64) for src in json.loads(m["sources"])])  # noqa: E731
    _put_entry(shards[0], other, key, lambda f, m: (first, dict(m, sources=sources(m))))
    with pytest.raises(MergeConflictError, match=r"\(their sources differ\)"):
        merge_stores(str(tmp_path / "bad2.lmdb"), [shards[0], other], progress=False)
    # Into an existing store, a shard's entry replaces the one there (a part rebuilt since).
    merge_stores(merged, [other], progress=False)
    with FeatureStore(merged) as fs:
        assert {src["sha256"] for src in json.loads(fs.get(key).metadata["sources"])} == {"0" * 64}
        assert len(fs) == 5
    assert not os.path.exists(str(tmp_path / "bad1.lmdb")) and not os.path.exists(str(tmp_path / "bad2.lmdb"))


@pytest.mark.slow
def test_compiled_build_pads_the_short_last_batch_and_matches_eager(data_root, tmp_path):
    """--compile: 10 single-frame units in batches of 4 leave a last batch of 2, padded to 4 so
    that compiled code is not rebuilt; the stored features match the eager build's. Without frame
    reuse the frames are padded (with reuse the index is: tests/test_build_frame_reuse.py)."""
    eager = str(tmp_path / "eager.lmdb")
    build(options(data_root, store=eager, batch_frames=4))
    compiled = str(tmp_path / "compiled.lmdb")
    report = build(options(data_root, store=compiled, batch_frames=4, compile=True, frame_reuse=False))
    assert report.computed == 10 and not report.failed
    a, b = store_contents(eager), store_contents(compiled)
    assert sorted(a) == sorted(b)
    for k in a:
        x, y = a[k][0].float(), b[k][0].float()
        assert x.shape == y.shape
        assert torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0) > 0.9999, k
        assert (x - y).abs().max() <= 0.02 * x.abs().max(), k


@pytest.mark.parametrize("flags, message", [
    (["--device", "gpu"], "featstore build: error: device 'gpu' is not a torch device; pass cpu, cuda or cuda:N "
                          "(CLI: --device)"),
    (["--device", "cuda"], "featstore build: error: device 'cuda': this torch {torch} sees no CUDA GPU (a CPU-only "
                           "build, or no driver); pass --device cpu, or install a CUDA build of torch"),
    (["--weights", "README.md"], "featstore build: error: weights file 'README.md' is neither a safetensors file "
                                 "nor a torch checkpoint; pass VGGT-1B's model.safetensors or model.pt "
                                 "(--weights /path/to/model.safetensors)"),
])
def test_first_use_mistakes_get_one_line_naming_the_value(data_root, flags, message):
    if "cuda" in flags and torch.cuda.is_available():
        pytest.skip("needs a torch without CUDA")
    proc = subprocess.run([sys.executable, "-m", "featstore", "build", "--data-root", data_root, "--encoder",
                           "vggt-tiny", "--no-progress", *flags], capture_output=True, text=True, timeout=180, cwd=REPO)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [message.format(torch=torch.__version__)]
    assert "weights_only" not in proc.stderr
    assert not os.path.exists(os.path.join(data_root, "vggt_features.lmdb"))


def test_a_pickled_checkpoint_is_refused_without_torchs_weights_only_advice(tmp_path):
    from featstore.errors import WeightsError

    path = tmp_path / "model.pt"
    torch.save({"model": get_encoder("vggt-tiny").model}, path)  # a pickled module, not a state_dict
    with pytest.raises(WeightsError) as e:
        get_encoder("vggt-tiny", weights=str(path))
    assert str(e.value).startswith(f"weights file {str(path)!r} holds pickled objects besides tensors")
    assert "weights_only=False" not in str(e.value) and "\n" not in str(e.value)


STAGES = ("decode_wait_s", "encode_s", "d2h_wait_s", "serialise_s", "commit_s")


@pytest.mark.parametrize("workers", [0, 2])
def test_the_report_times_each_host_stage(data_root, workers):
    """Each stage's host time is in the report (and --json), positive, and the stages of each
    thread (GPU loop: decode wait + encode; serialiser: device->host wait + serialise; writer:
    commit) add up to no more than the pipeline time."""
    r = build(options(data_root, workers=workers))
    assert r.computed == 10
    times = {k: getattr(r, k) for k in STAGES}
    assert all(t > 0 for t in times.values()), times
    assert times["decode_wait_s"] + times["encode_s"] <= r.pipeline_s, (times, r.pipeline_s)
    assert times["d2h_wait_s"] + times["serialise_s"] <= r.pipeline_s, (times, r.pipeline_s)
    assert times["commit_s"] <= r.pipeline_s <= r.elapsed_s, (times, r.pipeline_s)
    assert times["encode_s"] > times["d2h_wait_s"]  # CPU: no device copy to wait for


def test_json_and_summary_carry_the_stage_times(data_root):
    proc = featstore_cli("build", "--data-root", data_root, "--encoder", "vggt-tiny", "--workers", "0",
                         "--no-progress", "--json", check=0)
    report = json.loads(proc.stdout)
    assert all(report[k] > 0 for k in STAGES) and report["pipeline_s"] > 0
    proc = featstore_cli("build", "--data-root", data_root, "--encoder", "vggt-tiny", "--workers", "0",
                         "--no-progress", "--force", check=0)
    line = [ln for ln in proc.stderr.splitlines() if ln.strip().startswith("stages:")]
    assert len(line) == 1 and "decode wait" in line[0] and "commit+fsync" in line[0] and "(pipeline" in line[0], proc.stderr


@pytest.mark.parametrize("workers", [0, 2])
def test_frames_cross_as_uint8_and_the_store_is_bit_identical_to_float32_frames(data_root, tmp_path, workers):
    """The decode workers hand frames over as uint8 where every value is k/255; the features
    stored are bit for bit those of the float32 path (a spec with extra_resize, whose values are
    not k/255, keeps float32 and builds alike)."""
    from featstore.build.frames import UnitDataset

    frames = UnitDataset(plan_units(data_root), data_root, get_encoder("vggt-tiny").spec, 14, True)[0][1]
    assert frames.dtype == torch.uint8
    for overrides in (dict(), dict(spec_overrides=dict(preprocess={"mode": "crop", "extra_resize": [56, 70]}))):
        spec = get_encoder("vggt-tiny", **overrides.get("spec_overrides", {})).spec
        kept = UnitDataset(plan_units(data_root), data_root, spec, 14, True)[0][1]
        assert kept.dtype == (torch.uint8 if not overrides else torch.float32)
        a = build(options(data_root, store=str(tmp_path / f"u8{len(overrides)}.lmdb"), workers=workers,
                          batch_frames=3, **overrides))
        b = build(options(data_root, store=str(tmp_path / f"f32{len(overrides)}.lmdb"), workers=workers,
                          batch_frames=3, uint8_frames=False, **overrides))
        assert a.computed == b.computed == 10
        assert_same_contents(store_contents(str(tmp_path / f"u8{len(overrides)}.lmdb")),
                             store_contents(str(tmp_path / f"f32{len(overrides)}.lmdb")))


def test_decode_benchmark_smoke(tmp_path):
    """benchmarks/decode_bench.py decodes both ways, checks they agree, and reports every row."""
    run = subprocess.run([sys.executable, "benchmarks/decode_bench.py", "--smoke", "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = json.loads((tmp_path / "decode_bench.json").read_text())["ms_per_frame"]
    assert set(rows) == {f"{e} {s}" for e in ("vggt", "qwen2.5-vl-vision") for s in ("640x480", "504x392")}
    assert all(r["float_then_check"] > 0 and r["uint8_at_source"] > 0 for r in rows.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the loader's pin-memory thread)")
@pytest.mark.parametrize("workers", [0, 2])
def test_frames_pinned_by_the_loader_build_what_the_gpu_loop_pinning_them_builds(data_root, tmp_path, workers):
    """On CUDA the loader's pin-memory thread receives and pins the decoded units
    (BuildOptions.pin_frames); the stored features are the very same as when the GPU loop does."""
    for pin in (True, False):
        report = build(options(data_root, store=str(tmp_path / f"pin{pin}.lmdb"), device="cuda", workers=workers,
                               batch_frames=3, pin_frames=pin))
        assert report.computed == 10 and not report.failed
    assert_same_contents(store_contents(str(tmp_path / "pinTrue.lmdb")), store_contents(str(tmp_path / "pinFalse.lmdb")))


def test_decode_workers_start_before_the_model_loads(data_root, tmp_path, monkeypatch):
    """The workers are forked before the encoder is built, so the first units are decoded while
    the model loads (on a GPU host: seconds of weights and compile)."""
    import featstore.build.encode
    import featstore.encoders

    marks = tmp_path / "decoded"
    marks.mkdir()
    read = featstore.build.encode.read_unit_frames

    def marked(data_root_, unit, *a, **kw):  # runs in the forked workers
        (marks / str(abs(hash(unit.key)))).touch()
        return read(data_root_, unit, *a, **kw)

    load = featstore.encoders.get_encoder
    seen = {}

    def slow_load(*a, **kw):
        for _ in range(200):  # up to 10 s for a worker to decode a unit while "loading"
            if any(marks.iterdir()):
                break
            time.sleep(0.05)
        seen["decoded while loading"] = len(list(marks.iterdir()))
        return load(*a, **kw)

    monkeypatch.setattr(featstore.build.encode, "read_unit_frames", marked)
    monkeypatch.setattr(featstore.encoders, "get_encoder", slow_load)
    r = build(options(data_root, workers=2))
    assert r.computed == 10 and not r.failed
    assert seen["decoded while loading"] > 0


def test_the_steady_rate_counts_from_the_first_commit(data_root):
    many = build(options(data_root, store=os.path.join(data_root, "many.lmdb"), batch_frames=2))
    # After the first batch, 10 images - 2 more frames in less time than the whole pipeline.
    assert many.steady_frames_per_s > (many.frames - 2) / many.pipeline_s > 0


def test_nan_or_infinite_features_are_never_stored_and_a_rerun_retries_them(data_root, monkeypatch):
    """A unit whose encoder output holds a NaN or an infinity is reported as failed, naming its key,
    and not committed; the others are; once the encoder is sound, a rerun computes exactly it."""
    import featstore.build.encode as encode_mod

    Image.new("RGB", (64, 48)).save(os.path.join(data_root, "black.png"))  # the unit the fault picks
    real = encode_mod.encode_frames

    def faulty(encoder, frames, index=None):
        feats = real(encoder, frames, index=index)
        units = frames if index is None else frames[index]  # frame reuse: the distinct frames and their index
        for b in range(units.shape[0]):
            if not bool(units[b].any()):  # the black image: its output turns NaN and infinite
                feats[b, 0, 0, 0] = float("nan")
                feats[b, -1, -1, -1] = float("inf")
        return feats

    monkeypatch.setattr(encode_mod, "encode_frames", faulty)
    report = build(options(data_root, batch_frames=4))
    assert [f["key"] for f in report.failed] == ["black.png"]
    assert "NaN or infinite features: not stored" in report.failed[0]["error"]
    with FeatureStore(data_root) as store:
        assert "black.png" not in store and len(store) == report.computed == report.planned - 1 == 10
        for key in store.keys():
            assert bool(torch.isfinite(store.get(key, copy=True).features.float()).all()), key
    monkeypatch.setattr(encode_mod, "encode_frames", real)
    again = build(options(data_root))
    assert (again.computed, again.fresh, again.failed) == (1, 10, [])
