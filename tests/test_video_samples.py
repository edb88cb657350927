"""Video samples (issue 26): a `video` entry, a folder of frames or a container file, planned
into an ordered frame list by a named policy, built, verified and trained on like images.

The .mp4 is written by PyAV at test time (`featstore.encoders.video.write_test_video`); frame i
of every test video carries a colour made from i, so a decoded frame tells its index.
"""

from __future__ import annotations

import json
import os
import sys
import types

import numpy as np
import pytest
import torch

from _featstore_helpers import REPO, make_images, read_store

av = pytest.importorskip("av")

VGLLM_SRC = os.path.join(REPO, ".vendor", "vgllm", "src")  # the vendored reference code, git-ignored
CONV = [{"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "A door opens."}]


def _vgllm_rule(total: int, fps: float, interval=2, lo=4, hi=8) -> list[int]:
    """VG-LLM's get_frame_indices (data_qwen.py, read_video_images), transcribed."""
    n = min(max(round(total / fps / interval), lo), hi)
    return np.unique(np.linspace(0, total - 1, n, dtype=int)).tolist()


# counts and fps around the clamp edges: below MIN (few frames, short), at MIN, between, at MAX,
# far above MAX, fewer frames than MIN (dedup), one frame; round-half-even at 5/2 and 7/2 s.
CASES = [(1, 1.0), (2, 1.0), (3, 1.0), (5, 1.0), (7, 1.0), (8, 1.0), (9, 1.0), (10, 1.0), (11, 1.0), (16, 1.0),
         (17, 1.0), (40, 1.0), (300, 1.0), (30, 10.0), (75, 10.0), (90, 10.0), (160, 10.0), (1000, 29.97),
         (240, 24.0), (25, 5.0), (35, 5.0)]


@pytest.mark.parametrize("total,fps", CASES)
def test_vgllm_policy_matches_the_transcribed_rule(total, fps):
    from featstore.build.video import parse_video_policy

    assert parse_video_policy("vgllm").indices(total, fps) == _vgllm_rule(total, fps)
    assert parse_video_policy("vgllm:4:2:16").indices(total, fps) == _vgllm_rule(total, fps, 4, 2, 16)
    assert parse_video_policy("linspace:16").indices(total, fps) == np.unique(
        np.linspace(0, total - 1, 16, dtype=int)).tolist()


def _vgllm_module(monkeypatch, videos: dict):
    """VG-LLM's data_qwen imported from the vendored tree, decord replaced by a reader that
    reports the counts and fps of `videos` (path -> (total, fps)) and returns frames whose
    pixel value is their index; skipped when the vendored tree is absent."""
    if not os.path.isdir(VGLLM_SRC):
        pytest.skip(f"{VGLLM_SRC} is absent (VG-LLM not vendored)")

    class FakeReader:
        def __init__(self, path, num_threads=1):
            self.total, self.fps = videos[path]

        def __len__(self):
            return self.total

        def get_avg_fps(self):
            return self.fps

        def get_batch(self, idx):
            frames = np.stack([np.full((4, 4, 3), int(i) % 256, dtype=np.uint8) for i in idx])
            return types.SimpleNamespace(asnumpy=lambda: frames)

    monkeypatch.setitem(sys.modules, "decord", types.SimpleNamespace(VideoReader=FakeReader))
    monkeypatch.syspath_prepend(VGLLM_SRC)
    for name in [m for m in sys.modules if m == "qwen_vl" or m.startswith("qwen_vl.")]:
        monkeypatch.delitem(sys.modules, name)
    try:
        import qwen_vl.data.data_qwen as dq
    except ImportError as e:
        pytest.skip(f"VG-LLM's data_qwen does not import here: {e}")
    return dq


def test_vgllm_policy_equals_vgllms_own_function(tmp_path, monkeypatch):
    """Their read_video_images on folders (fps 1) and on containers (count and fps as decord
    reports them), against the policy on the same counts."""
    from PIL import Image

    from featstore.build.video import parse_video_policy

    containers = {str(tmp_path / f"v{t}_{f}.mp4"): (t, f) for t, f in CASES}
    dq = _vgllm_module(monkeypatch, containers)
    owner = types.SimpleNamespace(data_args=types.SimpleNamespace(base_interval=2, video_min_frames=4,
                                                                  video_max_frames=8))
    policy = parse_video_policy("vgllm:2:4:8")
    for path, (total, fps) in containers.items():
        open(path, "wb").close()
        images = dq.LazySupervisedDataset.read_video_images(owner, {"data_path": str(tmp_path), "video": path})
        got = [im.getpixel((0, 0))[0] for im in images]
        assert got == [i % 256 for i in policy.indices(total, fps)], (total, fps)
    for total in (1, 3, 8, 9, 17, 40):
        folder = tmp_path / f"folder{total}"
        folder.mkdir()
        for i in range(total):
            Image.new("RGB", (4, 4), (i, 0, 0)).save(folder / f"{i:04d}.png")
        images = dq.LazySupervisedDataset.read_video_images(owner, {"data_path": str(tmp_path), "video": str(folder)})
        assert [im.getpixel((0, 0))[0] for im in images] == policy.indices(total, 1.0), total


def test_policy_strings_are_checked():
    from featstore.build.video import parse_video_policy
    from featstore.errors import PlanError

    assert parse_video_policy(None).name == "vgllm:2:4:8"
    assert parse_video_policy("vgllm:0.5:2:4").name == "vgllm:0.5:2:4"
    for bad in ("vgllm:2:8:4", "linspace:0", "uniform:3", "vgllm:2:4"):
        with pytest.raises(PlanError, match=r"video policy .* is not vgllm\[:BASE_INTERVAL:MIN_FRAMES:MAX_FRAMES\]"):
            parse_video_policy(bad)


# -- a data root with images, a folder video and an .mp4 ----------------------------------------------

def _frame_colour(i: int):
    return ((i * 37) % 256, (i * 91 + 40) % 256)


def make_video_data(root: str, *, mp4_frames: int = 30, fps: int = 10, folder_frames: int = 11) -> str:
    """Images, a folder video (frame i coloured by i), an .mp4 and an annotation file mixing
    them; returns the annotation file's path."""
    from PIL import Image

    from featstore.encoders.video import write_test_video

    make_images(root, [f"scene/{i:03d}.png" for i in range(3)])
    os.makedirs(os.path.join(root, "vids", "walk"))
    for i in range(folder_frames):
        rgb = np.zeros((48, 64, 3), dtype=np.uint8)
        rgb[..., 0], rgb[..., 1] = _frame_colour(i)
        Image.fromarray(rgb).save(os.path.join(root, "vids", "walk", f"{i:05d}.jpg"), quality=95)
    open(os.path.join(root, "vids", "walk", "notes.txt"), "w").write("not a frame")
    os.makedirs(os.path.join(root, "clips"))
    write_test_video(os.path.join(root, "clips", "door.mp4"), mp4_frames, fps=fps)
    samples = [
        {"image": "scene/000.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                     {"from": "gpt", "value": "A room."}]},
        {"id": "seq", "images": ["scene/001.png", "scene/002.png"],
         "conversations": [{"from": "human", "value": "<image><image>Where?"}, {"from": "gpt", "value": "Here."}]},
        {"id": "walk", "video": "vids/walk", "conversations": CONV},
        {"video": "clips/door.mp4", "conversations": CONV},
    ]
    ann = os.path.join(root, "ann.json")
    with open(ann, "w") as f:
        json.dump(samples, f)
    return ann


def _build(root, ann, policy=None, **kw):
    from featstore.build.runner import BuildOptions, build

    opts = BuildOptions(data_root=root, annotations=[ann], encoder="vggt-tiny", progress=False, workers=0,
                        video_policy=policy, **kw)
    return build(opts), opts.store_path()


def test_folder_and_mp4_videos_plan_to_vgllms_frames(tmp_path):
    from featstore.build.plan import plan_units

    root = str(tmp_path / "data")
    ann = make_video_data(root)
    units = {u.key: u.frames for u in plan_units(root, [ann])}
    # the folder: 11 image files (notes.txt is not a frame), fps 1 -> round(11/2)=6 frames
    walk = [f"vids/walk/{i:05d}.jpg" for i in _vgllm_rule(11, 1.0)]
    assert units["walk"] == tuple(walk)
    # the .mp4: 30 frames at 10 fps = 3 s -> round(1.5)=2 -> clamped to 4: [0, 9, 19, 29]
    door = tuple(f"clips/door.mp4#{i}" for i in _vgllm_rule(30, 10.0))
    assert door == ("clips/door.mp4#0", "clips/door.mp4#9", "clips/door.mp4#19", "clips/door.mp4#29")
    assert units["clips/door.mp4#29"] == door  # no id: keyed by its last (anchor) frame
    assert {u.key for u in plan_units(root, [ann], video_policy="linspace:3")} >= {"walk", "clips/door.mp4#29"}
    assert plan_units(root, [ann], video_policy="linspace:3")[-1].frames == ("vids/walk/00000.jpg",
                                                                             "vids/walk/00005.jpg",
                                                                             "vids/walk/00010.jpg")


def test_decoded_frames_are_the_exact_indices(tmp_path):
    from featstore.encoders.video import decode_video_frames, probe_video, write_test_video

    path = str(tmp_path / "a.mp4")
    write_test_video(path, 40, fps=8)
    assert (probe_video(path).frames, probe_video(path).fps) == (40, 8.0)
    idx = [39, 0, 13, 26]
    for i, im in zip(idx, decode_video_frames(path, idx)):
        r, g, _ = im.getpixel((60, 40))  # a flat part of the frame (mpeg4 keeps it within a few levels)
        want = _frame_colour(i)
        assert abs(r - want[0]) <= 6 and abs(g - want[1]) <= 6, (i, (r, g), want)


def test_build_verify_recompute_and_read_a_mixed_file(tmp_path):
    from featstore.ops.verify import verify_store

    root = str(tmp_path / "data")
    ann = make_video_data(root)
    report, store = _build(root, ann)
    assert not report.failed and report.computed == 4
    entries = read_store(store)
    door = entries["clips/door.mp4#29"]
    assert json.loads(door[1]["frames"]) == ["clips/door.mp4#0", "clips/door.mp4#9", "clips/door.mp4#19",
                                             "clips/door.mp4#29"]
    st = os.stat(os.path.join(root, "clips", "door.mp4"))
    sources = json.loads(door[1]["sources"])
    assert {(s["size"], s["mtime_ns"]) for s in sources} == {(st.st_size, st.st_mtime_ns)}
    assert door[0].shape[0] == 4 and entries["walk"][0].shape[0] == 6
    checked = verify_store(store, data_root=root, annotations=[ann], recompute=2, seed=0)
    assert checked.ok, checked.summary()
    again, _ = _build(root, ann)
    assert again.computed == 0  # fresh: nothing recomputed
    # a touched video makes its unit stale (its freshness covers the video file)
    os.utime(os.path.join(root, "clips", "door.mp4"), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third, _ = _build(root, ann)
    assert third.computed == 1


def test_a_changed_policy_parameter_is_a_miss_never_a_wrong_answer(tmp_path):
    from featstore.build.plan import plan_units
    from featstore.store.reader import FeatureStore

    root = str(tmp_path / "data")
    ann = make_video_data(root, mp4_frames=90)  # 9 s at 10 fps: vgllm:2:4:8 -> 4 frames, vgllm:1:4:8 -> 8
    _, store = _build(root, ann, "vgllm:2:4:8")
    other = {u.key: u for u in plan_units(root, [ann], video_policy="vgllm:1:4:8")}
    same = {u.key: u for u in plan_units(root, [ann], video_policy="vgllm:2:4:8")}
    assert other["walk"].frames != same["walk"].frames
    with FeatureStore(store) as fs, fs.snapshot():
        for key in ("walk", "clips/door.mp4#89"):
            hit = fs.plan_read([key], frames=[list(same[key].frames)], data_root=root, missing="skip")
            assert hit.errors == [None]
            miss = fs.plan_read([key], frames=[list(other[key].frames)], data_root=root, missing="skip")
            assert miss.errors[0] is not None and "frame" in str(miss.errors[0]), miss.errors
    report, _ = _build(root, ann, "vgllm:1:4:8")  # a build under the other policy recomputes both
    assert report.computed == 2 and not report.failed
    from featstore.build.plan_record import describe_plan, plan_of_manifest
    from featstore.store.layout import existing_manifest

    plan = plan_of_manifest(existing_manifest(store, "vggt"))
    assert plan["video_policy"] == "vgllm:1:4:8" and describe_plan(plan).endswith("(video policy vgllm:1:4:8)")


def test_a_truncated_mp4_is_a_named_failed_unit(tmp_path):
    from featstore.encoders.video import write_test_video

    root = str(tmp_path / "data")
    ann = make_video_data(root)
    for name, faststart in (("cut_tail.mp4", True), ("cut_index.mp4", False)):
        path = os.path.join(root, "clips", name)
        write_test_video(path, 30, fps=10, faststart=faststart)
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) * 2 // 3])
    samples = json.load(open(ann)) + [{"video": "clips/cut_tail.mp4", "conversations": CONV},
                                      {"id": "cut2", "video": "clips/cut_index.mp4", "conversations": CONV}]
    json.dump(samples, open(ann, "w"))
    report, _ = _build(root, ann)
    assert report.computed == 4
    failed = {f["key"]: f["error"] for f in report.failed}
    tail = os.path.join(root, "clips", "cut_tail.mp4")
    assert failed["clips/cut_tail.mp4#29"].startswith(f"video {tail!r} is truncated: frame 29 was asked for but only")
    index = os.path.join(root, "clips", "cut_index.mp4")
    # unplanned (no frame count): one frame, the video itself, keyed by its path
    assert failed["clips/cut_index.mp4"].startswith(f"cannot open video {index!r} (truncated or corrupt?)")


def test_missing_pyav_names_the_extra(monkeypatch, tmp_path):
    from featstore.encoders.video import probe_video
    from featstore.errors import VideoSupportError

    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(VideoSupportError, match=r"pip install 'featstore\[video\]'"):
        probe_video(str(tmp_path / "x.mp4"))


# -- training ---------------------------------------------------------------------------------------

def _dataset(root, ann, spec, **kw):
    from _training_helpers import tiny_parts
    from training.data import ConversationDataset

    tok, proc = tiny_parts()
    return ConversationDataset([ann], root, tok, proc, spec, **kw)


def test_video_placeholder_becomes_one_image_per_frame_from_the_decoded_frames(tmp_path):
    """VG-LLM's expansion: `<video>` -> one `<image>` per chosen frame; the Qwen images are the
    crop (qwen_view) of the same decoded frames the build encodes."""
    from _training_helpers import spec_for

    from featstore.build.encode import read_unit_frames
    from featstore.encoders.preprocess import qwen_view

    root = str(tmp_path / "data")
    ann = make_video_data(root)
    spec = spec_for()
    ds = _dataset(root, ann, spec)
    by_key = {u.key: i for i, u in enumerate(ds.units)}
    for key, count in (("walk", 6), ("clips/door.mp4#29", 4)):
        i = by_key[key]
        item = ds[i]
        assert item["images"] == count
        assert int((item["input_ids"] == ds.vision_start).sum()) == count
        assert "<video>" not in ds.samples[i]["conversations"][0]["value"]
        assert "<image>" * count in ds.samples[i]["conversations"][0]["value"]
        frames, _ = read_unit_frames(root, ds.units[i], spec, ds.patch)
        want = ds.image_processor(images=[qwen_view(f, patch_size=ds.patch) for f in frames], return_tensors="pt",
                                  do_rescale=False)["pixel_values"]
        assert torch.equal(item["pixel_values"], want)
    assert json.load(open(ann))[2]["conversations"][0]["value"] == "<video>\nWhat happens?"  # the file's own sample untouched


def test_cached_equals_online_features_and_loss_for_video_samples(tmp_path):
    from _training_helpers import collate, loss_and_merger_grads, online, spec_for, tiny_model

    from featstore.store.reader import FeatureStore

    root = str(tmp_path / "data")
    ann = make_video_data(root)
    report, store_path = _build(root, ann)
    assert not report.failed
    spec = spec_for()
    cached_ds = _dataset(root, ann, spec, store=FeatureStore(store_path, expected_encoder=spec.to_dict()))
    cached, live = collate(cached_ds), collate(_dataset(root, ann, spec))
    assert cached["vggt_source"].tolist() == [1] * 4 and live["vggt_source"].tolist() == [2] * 4
    for key in ("input_ids", "labels", "pixel_values", "image_grid_thw", "mm_token_type_ids"):
        assert torch.equal(cached[key], live[key]), key
    model = tiny_model(spec)
    model.attach_vggt(online(spec))
    loss_c, grads_c = loss_and_merger_grads(model, cached)
    loss_o, grads_o = loss_and_merger_grads(model, live)
    assert torch.equal(loss_c, loss_o)
    for name in grads_c:
        assert grads_c[name].abs().sum() > 0 and torch.equal(grads_c[name], grads_o[name]), name
    # another policy asks for other frame lists: a miss naming the key, never another sample's features
    from training.data import CacheMissError

    other = _dataset(root, ann, spec, store=FeatureStore(store_path), video_policy="linspace:3")
    with pytest.raises(CacheMissError, match=r"key 'walk'"):
        other[[u.key for u in other.units].index("walk")]


def test_vision_cache_reads_container_frames_by_video_path_and_index(tmp_path):
    """`featstore build --encoder qwen2.5-vl-vision-tiny` stores one entry per chosen frame, keyed
    "VIDEO#INDEX" for the .mp4; training with --use_vision_cache reads them for the video sample."""
    from _training_helpers import spec_for

    from featstore.build.runner import BuildOptions, build
    from featstore.store.reader import FeatureStore

    root = str(tmp_path / "data")
    ann = make_video_data(root)
    _, store_path = _build(root, ann)
    spec = spec_for()
    report = build(BuildOptions(data_root=root, annotations=[ann], encoder="qwen2.5-vl-vision-tiny", workers=0,
                                spec_overrides={"target_size": spec.preprocess.target_size}, progress=False))
    assert not report.failed and report.computed == 3 + 6 + 4
    vision = FeatureStore(store_path, feature_set="qwen_vision")
    assert {"clips/door.mp4#0", "clips/door.mp4#9", "clips/door.mp4#19", "clips/door.mp4#29"} <= set(vision.keys())
    ds = _dataset(root, ann, spec, store=FeatureStore(store_path), vision_store=vision)
    i = [u.key for u in ds.units].index("clips/door.mp4#29")
    item = ds[i]
    assert "pixel_values" not in item and item["hits"] == 1
    with vision.snapshot():
        want = torch.cat([vision.get(k).features[0] for k in ds.units[i].frames])
    assert torch.equal(item["vision_features"], want)


# -- kill -9 and resume -----------------------------------------------------------------------------

def test_a_mixed_image_and_video_build_resumes_after_sigkill(tmp_path):
    """The annotation file mixes images, folder videos and .mp4s; builds SIGKILLed at several
    points of their writes (decode workers in one of them) resume to the uninterrupted content."""
    import random
    import signal
    import time

    from test_reliability_kill import _build_args, _same_content, _Zygote

    from featstore.cli import main as featstore_main
    from featstore.encoders.video import write_test_video
    from featstore.ops.verify import verify_store

    root = str(tmp_path / "data")
    keys = [f"scene/{i:03d}.png" for i in range(12)]
    make_images(root, keys)
    samples = [{"image": k} for k in keys]
    os.makedirs(os.path.join(root, "clips"))
    for j in range(3):
        make_images(root, [f"vids/v{j}/{i:04d}.png" for i in range(5 + 4 * j)], seed=j + 1)
        samples.append({"id": f"folder{j}", "video": f"vids/v{j}"})
        write_test_video(os.path.join(root, "clips", f"c{j}.mp4"), 20 + 30 * j, fps=10)
        samples.append({"video": f"clips/c{j}.mp4"})
    ann = str(tmp_path / "mixed.json")
    json.dump(samples, open(ann, "w"))
    ref = str(tmp_path / "ref.lmdb")
    z = _Zygote(_build_args(root, ann, ref, 0), str(tmp_path / "ref.log"))
    z.go()
    rc, err = z.finish()
    assert rc == 0, err
    want = read_store(ref)
    assert len(want) == 18 and any("#" in k for k in want)
    size = os.path.getsize(os.path.join(ref, "data.mdb"))
    rng = random.Random(26)
    partial = 0
    for i, workers in enumerate((0, 2, 0)):
        store = str(tmp_path / f"trial{i}.lmdb")
        z = _Zygote(_build_args(root, ann, store, workers), str(tmp_path / f"t{i}.log"))
        z.go()
        data, target = os.path.join(store, "data.mdb"), rng.uniform(0.2, 0.8) * size
        while z.proc.poll() is None and not (os.path.exists(data) and os.path.getsize(data) >= target):
            time.sleep(0.001)
        z.proc.send_signal(signal.SIGKILL)
        rc, err = z.finish()
        assert rc in (0, -signal.SIGKILL), err
        if rc != 0 and os.path.isfile(data):
            left = verify_store(store)
            assert set(left.counts()) <= {"build"}, left.summary()
            partial += 1
        assert featstore_main(_build_args(root, ann, store, 0)) == 0
        report = verify_store(store, data_root=root, annotations=[ann])
        assert report.ok, report.summary()
        assert not _same_content(read_store(store), want), i
    assert partial >= 1  # at least one kill landed inside the build
