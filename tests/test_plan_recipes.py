"""The references' data as-is: JanusVLN's `create_data.py` annotation files, VG-LLM's dataset
registry (one image folder per annotation file, `name%N` subsets), and what the planner refuses
(spar_info markers, video samples, a data root that holds none of the images).

Real stores (vggt-tiny builds), the real CLI entry (`featstore.cli.main`, in process) and the real
training entry (`training.train.run` / `main`, tiny presets, CPU). Parity checks import the
vendored reference code under .vendor/ and skip when it is absent."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import random

import numpy as np
import pytest

from _featstore_helpers import make_images

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENDOR = os.path.join(REPO, ".vendor")
JANUS_CREATE_DATA = os.path.join(VENDOR, "janusvln", "create_data", "create_data.py")
VGLLM_REGISTRY = os.path.join(VENDOR, "vgllm", "src", "qwen_vl", "data", "__init__.py")

# JanusVLN create_data.py: images under data/trajectory_data/<R2R|RxR>/train/<episode_id>/, paths
# written relative to the JanusVLN checkout (its registry's data_path is ""), at most 8 history
# frames then 9 evenly spaced ones, "<image>" per history frame then one for the current frame,
# ids "<episode_id>/<frame file name>".
JANUS_ROOTS = {"R2R": "data/trajectory_data/R2R/train", "RxR": "data/trajectory_data/RxR/train"}
MAX_HISTORY = 8
PROMPT = ("You are a visual language navigation model, and your should go to the locations to complete the given "
          "task. Compare the observation and instruction to infer your current progress, and then select the "
          "correct direction from the candidates to go to the target location and finish the task.\n This is "
          "your historical observation:{history}\n This is your current observation:<image>\n Your task is to "
          "{instruction}\n You should take one of the following actions:\n MOVE_FORWARD\n TURN_LEFT\n TURN_RIGHT\n "
          "STOP.")


def _load_module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _janus_episode(root: str, img_root: str, episode_id: str, instruction: str) -> list[dict]:
    """One VLN-CE episode's samples in create_data.py's format (process_episode_vlnce), paths
    relative to `root` (the folder create_data.py runs in)."""
    files = sorted(glob.glob(os.path.join(root, img_root, episode_id, "*.png")))
    rel = [os.path.relpath(f, root) for f in files]
    out = []
    for i in range(len(rel)):
        idxs = list(range(i + 1)) if i <= MAX_HISTORY else np.linspace(0, i, 9, dtype=int).tolist()
        images = [rel[j] for j in idxs]
        parts = os.path.basename(rel[i]).replace(".png", "").split("_")
        action = f"{parts[-2].upper()}_{parts[-1].upper()}" if len(parts) > 3 else parts[-1].upper()
        out.append({"id": f"{episode_id}/{os.path.basename(rel[i])}",
                    "conversations": [{"from": "human", "value": PROMPT.format(history="<image>" * (len(images) - 1),
                                                                              instruction=instruction)},
                                      {"from": "gpt", "value": action}],
                    "images": images})
    return out


def _janus_data(tmp_path) -> tuple[str, str, list[dict]]:
    """A JanusVLN checkout in miniature: R2R episode 1 with 11 frames (samples 9 and 10 take 9
    evenly spaced frames) and RxR episode 1 with 3 frames whose file names repeat R2R's, so
    the ids of the merged file repeat for other frame lists, as R2R and RxR episode numbers do.
    Returns (root, annotation file, samples)."""
    root = str(tmp_path / "JanusVLN")
    actions = ["move_forward", "turn_left", "move_forward", "turn_right"] * 3
    frames = {"R2R": 11, "RxR": 3}
    for name, n in frames.items():
        keys = [f"{JANUS_ROOTS[name]}/1/{s:03d}_rgb_{actions[s] if s < n - 1 else 'stop'}.png" for s in range(n)]
        make_images(root, keys, seed=len(name) + n)
    samples = (_janus_episode(root, JANUS_ROOTS["R2R"], "1", "walk to the sofa")
               + _janus_episode(root, JANUS_ROOTS["RxR"], "1", "go up the stairs"))
    ann = os.path.join(root, "train_r2r_rxr.json")
    with open(ann, "w", encoding="utf-8") as f:  # as create_data.py main() writes it
        json.dump(samples, f, ensure_ascii=False, indent=2)
    return root, ann, samples


def _train_argv(root: str, out: str, annotations: list, *extra: str, batch: int, steps: int = 2) -> list:
    return ["--data_root", root, "--annotations", *annotations, "--output_dir", out, "--max_steps", str(steps),
            "--per_device_train_batch_size", str(batch), "--use_cpu", "--report_to", "none", "--logging_steps", "1",
            "--save_strategy", "no", "--seed", "0", "--disable_tqdm", "true", *extra]


def _build(root: str, annotations: list, **overrides):
    from featstore.build.runner import BuildOptions, build

    return build(BuildOptions(data_root=root, annotations=list(annotations), encoder="vggt-tiny",
                              spec_overrides=overrides, progress=False, workers=0))


def _cli(capsys, *argv) -> tuple[int, str]:
    from featstore.cli import main

    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


# -- 1. JanusVLN's annotation file as create_data.py writes it ------------------------------------

@pytest.mark.skipif(not os.path.isfile(JANUS_CREATE_DATA), reason="vendored JanusVLN code absent (.vendor/)")
def test_the_generated_file_is_what_janusvln_create_data_writes(tmp_path, monkeypatch):
    """The generator of these tests against JanusVLN's own `process_episode_vlnce`, run where
    create_data.py runs (paths relative to the checkout)."""
    root, _, samples = _janus_data(tmp_path)
    create_data = _load_module(JANUS_CREATE_DATA, "janus_create_data")
    monkeypatch.chdir(root)
    theirs = []
    for name, instruction in (("R2R", "walk to the sofa"), ("RxR", "go up the stairs")):
        episode = {"episode_id": 1, "instruction": {"instruction_text": f" {instruction} "}}
        theirs += create_data.process_episode_vlnce(episode, img_root=JANUS_ROOTS[name])
    assert theirs == samples
    assert create_data.max_history_images == MAX_HISTORY


def test_janusvln_file_as_is_builds_causal_last_and_trains_cached_on_every_sample(tmp_path):
    from featstore.build.plan import plan_samples
    from featstore.store.reader import FeatureStore
    from featstore.ops.verify import verify_store
    from training.train import run

    root, ann, samples = _janus_data(tmp_path)
    ids = [s["id"] for s in samples]
    assert len(set(ids)) < len(ids)  # R2R's and RxR's ids repeat, for other frame lists
    assert max(len(s["images"]) for s in samples) == 9 and samples[-4]["images"][-1].startswith("data/")

    report = _build(root, [ann], attention="causal", frames_kept="last")
    planned = plan_samples(root, [ann])
    assert (report.planned, report.computed, report.failed, report.skipped) == (len(samples), len(samples), [], [])
    with FeatureStore(root) as store:
        assert len(store) == len(samples)
        for p in planned:  # every sample's own frame list, its last frame's tokens only
            entry = store.get(p.unit.key)
            assert json.loads(entry.metadata["frames"]) == p.sample["images"]
            assert entry.features.shape[0] == 1
    # Ids that name one frame list stay the keys; the repeated ones key by the current frame.
    keys = {p.where.split(" sample ")[1]: p.unit.key for p in planned}
    assert keys["3 (id '1/003_rgb_turn_right.png')"] == "1/003_rgb_turn_right.png"
    assert keys["1 (id '1/001_rgb_turn_left.png')"] == "data/trajectory_data/R2R/train/1/001_rgb_turn_left.png"
    assert verify_store(root, annotations=[ann]).ok

    trainer = run(_train_argv(root, str(tmp_path / "out"), [ann], "--use_vggt_cache", "--vggt_fusion", "last_to_all",
                              batch=len(samples) // 2))
    last = [r for r in trainer.state.log_history if "cache_hits" in r][-1]
    assert (last["cache_hits"], last["cache_misses"]) == (len(samples), 0)  # two steps: every sample once
    assert [u.key for u in trainer.train_dataset.units] == [p.unit.key for p in planned]


# -- 2. VG-LLM's registry: one image folder per file, name%N -------------------------------------

def _vgllm_data(tmp_path) -> tuple[str, str, str]:
    """data/media_a and data/media_b with their own relative paths; a.json (20 samples: one or
    two images) and b.jsonl (4 samples). Returns (data root, a.json, b.jsonl)."""
    root = str(tmp_path / "data")
    make_images(os.path.join(root, "media_a"), [f"s{i}/{j}.png" for i in range(10) for j in range(2)])
    make_images(os.path.join(root, "media_b"), [f"clip{i}.png" for i in range(4)], seed=1)
    os.makedirs(os.path.join(root, "train"))

    def conv(n):
        return [{"from": "human", "value": "<image>" * n + "\nWhat is here?"}, {"from": "gpt", "value": "A room."}]

    a = [{"id": f"a{i}", "images": [f"s{i}/0.png", f"s{i}/1.png"], "conversations": conv(2)} if i % 2 else
         {"id": f"a{i}", "image": f"s{i}/0.png", "conversations": conv(1)} for i in range(10)]
    a += [{"id": f"r{i}", "images": [f"s{i}/1.png", f"s{i}/0.png"], "conversations": conv(2)} for i in range(10)]
    b = [{"id": f"b{i}", "image": f"clip{i}.png", "conversations": conv(1)} for i in range(4)]
    a_path, b_path = os.path.join(root, "train", "a.json"), os.path.join(root, "train", "b.jsonl")
    with open(a_path, "w") as f:
        json.dump(a, f)
    with open(b_path, "w") as f:
        f.write("".join(json.dumps(s) + "\n" for s in b))
    return root, a_path, b_path


def test_image_folders_and_percent_build_and_train_the_same_samples(tmp_path, capsys):
    from featstore.build.plan import plan_samples, plan_units
    from featstore.store.reader import FeatureStore
    from training.train import run

    root, a, b = _vgllm_data(tmp_path)
    specs = [f"{a}@{root}/media_a%50", f"{b}@{os.path.join(root, 'media_b')}"]
    code, err = _cli(capsys, "build", "--data-root", root, "--annotations", *specs, "--encoder", "vggt-tiny",
                     "--no-progress", "--workers", "0")
    assert code == 0, err
    planned = plan_samples(root, specs)
    assert len(planned) == 10 + 4  # int(20 * 0.5) of a.json, all of b.jsonl
    assert {p.unit.frames[0].split("/")[0] for p in planned} == {"media_a", "media_b"}  # keys from the data root
    with FeatureStore(root) as store:
        assert sorted(store.keys()) == sorted(u.key for u in plan_units(root, specs))
        assert "media_b/clip0.png" in store
    code, err = _cli(capsys, "verify", root, "--annotations", *specs)
    assert code == 0, err
    # gc plans the same: nothing unplanned; at 20% the 6 samples of the 50% outside it are, once
    # the 20% plan replaces the recorded one (the recorded 50% plan keeps them otherwise).
    from featstore.cli import main

    assert main(["gc", root, "--annotations", *specs, "--unplanned", "--dry-run"]) == 0
    assert "would remove 0 entries" in capsys.readouterr().out
    narrower = [f"{a}@{root}/media_a%20", specs[1]]
    assert main(["gc", root, "--annotations", *narrower, "--unplanned", "--dry-run"]) == 0
    assert "would remove 0 entries" in capsys.readouterr().out
    assert main(["gc", root, "--annotations", *narrower, "--unplanned", "--replace-plan", "--dry-run"]) == 0
    assert "would remove 6 entries (0 orphan, 0 stale, 0 corrupt, 6 unplanned)" in capsys.readouterr().out

    random.seed(12345)  # the choice never depends on Python's random state
    np.random.seed(7)
    trainer = run(_train_argv(root, str(tmp_path / "out"), specs, "--use_vggt_cache", batch=7))
    dataset = trainer.train_dataset
    assert dataset.wheres == [p.where for p in planned] and dataset.units == [p.unit for p in planned]
    last = [r for r in trainer.state.log_history if "cache_hits" in r][-1]
    assert (last["cache_hits"], last["cache_misses"]) == (14, 0)


def test_percent_is_fixed_by_the_file_content_and_100_keeps_all(tmp_path):
    from featstore.build.annotations import subsample_indices
    from featstore.build.plan import plan_samples

    root, a, _ = _vgllm_data(tmp_path)
    whole = plan_samples(root, [f"{a}@{root}/media_a"])
    assert [p.where for p in plan_samples(root, [f"{a}@{root}/media_a%100"])] == [p.where for p in whole]
    assert len(whole) == 20
    chosen = [p.where for p in plan_samples(root, [f"{a}@{root}/media_a%30"])]
    random.seed(1)
    assert [p.where for p in plan_samples(root, [f"{a}@{root}/media_a%30"])] == chosen
    assert len(chosen) == 6 and chosen != [p.where for p in whole[:6]]  # not simply the first ones
    assert set(chosen) <= {p.where for p in plan_samples(root, [f"{a}@{root}/media_a%60"])}  # nested
    # Another content (one sample appended): another draw.
    draws = {tuple(subsample_indices(1000, 10, seed)) for seed in (b"one", b"two")}
    assert len(draws) == 2 and all(len(d) == 100 and list(d) == sorted(d) for d in draws)
    assert subsample_indices(7, 100, b"x") == list(range(7))


@pytest.mark.skipif(not os.path.isfile(VGLLM_REGISTRY), reason="vendored VG-LLM code absent (.vendor/)")
def test_percent_keeps_as_many_samples_as_vgllm(tmp_path):
    """VG-LLM: parse_sampling_rate('spar%3') = 0.03, then int(len(annotations) * rate) samples."""
    from featstore.build.annotations import subsample_indices

    registry = _load_module(VGLLM_REGISTRY, "vgllm_registry")
    for name, count in (("spar%3", 1000), ("llava_hound%25", 255), ("x%29", 100), ("x%7", 13), ("x%100", 9)):
        rate = registry.parse_sampling_rate(name)
        theirs = int(count * rate) if rate < 1.0 else count
        percent = int(name.rsplit("%", 1)[1])
        assert len(subsample_indices(count, percent, b"file")) == theirs, name


def test_annotation_values_that_cannot_be_read_one_way_are_refused(tmp_path, capsys):
    from featstore.errors import PlanError
    from featstore.build.annotations import parse_annotation_source

    root, a, _ = _vgllm_data(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    code, err = _cli(capsys, "build", "--data-root", os.path.join(root, "media_a"), "--annotations",
                     f"{a}@{outside}", "--encoder", "vggt-tiny", "--no-progress")
    assert code == 2
    assert err.strip() == (
        f"featstore build: error: --annotations {a}@{outside}: image folder {outside} is not inside --data-root "
        f"{root}/media_a. Store keys are image paths relative to the data root, so that one store beside the data "
        f"serves every annotation file: pass a --data-root that holds every IMAGE_DIR (here e.g. {tmp_path}), or "
        "move the images under the data root")
    assert not os.path.exists(os.path.join(root, "media_a", "vggt_features.lmdb"))
    for value, message in ((f"{a}%0", "%0 must keep 1 to 100 percent"), (f"{a}%101", "%101 must keep 1 to 100"),
                           (f"{a}@{root}/nothing", "is not a directory"), (f"{a}x@{root}", "no such file"),
                           (f"{root}/train/c.json", "no such file")):
        with pytest.raises(PlanError, match=message):
            parse_annotation_source(value, root)
    # A real file name holding '@' and '%' is that file.
    odd = os.path.join(root, "train", "v1@2%5")
    with open(odd, "w") as f:
        f.write("[]")
    assert parse_annotation_source(odd, root).path == odd
    assert parse_annotation_source(f"{odd}@{root}/media_b%5", root).image_dir == f"{root}/media_b"
    os.makedirs(os.path.join(root, "2%5"))
    open(os.path.join(root, "train", "v1"), "w").close()  # "v1" @ "2%5" and "v1@2%5" are both files now
    with pytest.raises(PlanError, match="ambiguous"):
        parse_annotation_source(f"{root}/train/v1@2%5@{root}", root)


# -- 3. spar_info: markers are drawn on the images in VG-LLM --------------------------------------

def test_samples_with_spar_info_are_refused_by_build_verify_and_training(tmp_path, capsys):
    from training.train import main

    root, a, _ = _vgllm_data(tmp_path)
    samples = json.load(open(a))
    samples[3]["spar_info"] = json.dumps({"type": "depth_prediction_oc", "red_point": [[0.5, 0.5]]})
    samples[5]["spar_info"] = json.dumps({"type": "depth_prediction_oc", "red_point": [[0.2, 0.2]]})
    samples[7]["spar_info"] = None  # VG-LLM: no markers
    spar = os.path.join(root, "train", "spar.json")
    with open(spar, "w") as f:
        json.dump(samples, f)
    value = f"{spar}@{root}/media_a"
    expected = (f"2 annotation sample(s) carry 'spar_info', e.g. {spar} sample 3 (id 'a3'): VG-LLM draws visual "
                "markers on their images (draw_marker.py) before VGGT and Qwen see them, and featstore does not draw "
                "them yet, so their features would be computed on unmarked images, another model's inputs. Drop "
                "these samples from the annotation file (e.g. keep the lines without \"spar_info\") until marker "
                "drawing is supported")
    code, err = _cli(capsys, "build", "--data-root", root, "--annotations", value, "--encoder", "vggt-tiny",
                     "--no-progress", "--workers", "0")
    assert (code, err.strip()) == (2, f"featstore build: error: {expected}")
    _build(root, [f"{a}@{root}/media_a"])
    code, err = _cli(capsys, "verify", root, "--annotations", value)
    assert (code, err.strip()) == (2, f"featstore verify: error: {expected}")
    assert main(_train_argv(root, str(tmp_path / "out"), [value], "--use_vggt_cache", batch=1)) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {expected}"


# -- 4. samples of several videos: the build skips them, training refuses them -----------------------
# (a sample with one "video" is its frames: tests/test_video_samples.py)

def test_multi_video_samples_are_refused_at_training_start_in_the_build_reports_words(tmp_path, capsys, monkeypatch):
    import training.train as T

    root, a, _ = _vgllm_data(tmp_path)
    samples = json.load(open(a))[:4] + [
        {"id": "v7", "videos": ["clips/7.mp4"], "conversations": [{"from": "human", "value": "<video>\nWhat happens?"},
                                                               {"from": "gpt", "value": "A door opens."}]}]
    mixed = os.path.join(root, "train", "mixed.json")
    with open(mixed, "w") as f:
        json.dump(samples, f)
    value = f"{mixed}@{root}/media_a"
    code, err = _cli(capsys, "build", "--data-root", root, "--annotations", value, "--encoder", "vggt-tiny",
                     "--no-progress", "--workers", "0")
    assert code == 0, err
    reported = [line.strip() for line in err.splitlines() if "skipped" in line]
    assert reported == [f"1 annotation samples skipped (no image to encode), e.g. {mixed} sample 4 (id 'v7'): a "
                        "'videos' sample (only images are encoded)"]

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built for a run that refuses its data")

    monkeypatch.setattr(T, "build_model", no_model)
    assert T.main(_train_argv(root, str(tmp_path / "out"), [value], "--use_vggt_cache", batch=1)) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {reported[0]}; training refuses them: samples of several videos ('videos') "
        "or of audio are not supported (no frames, no features). Remove them from the annotations")


# -- 5. a wrong data root stops before anything is built -------------------------------------------

def test_a_data_root_holding_none_of_the_images_stops_build_and_training_at_once(tmp_path, capsys, monkeypatch):
    import training.train as T

    root, ann, samples = _janus_data(tmp_path)
    wrong = os.path.join(root, "data")  # one level too deep: the paths start with data/
    first = samples[0]["images"][0]
    distinct = len({f for s in samples for f in s["images"]})
    assert distinct == 14  # fewer than FAIL_FAST_IMAGES (20): all of them are looked for
    expected = (f"--annotations {ann}: none of the first {distinct} images it names exists (e.g. {wrong}/{first}, image "
                f"{first!r} of {ann} sample 0 (id '1/000_rgb_move_forward.png')); nothing was built. --data-root "
                f"{wrong} must be the folder the annotation's image paths are relative to: the one holding {first!r}")
    code, err = _cli(capsys, "build", "--data-root", wrong, "--annotations", ann, "--encoder", "vggt-tiny",
                     "--no-progress", "--workers", "0")
    assert (code, err.strip()) == (2, f"featstore build: error: {expected}")
    assert not os.path.exists(os.path.join(wrong, "vggt_features.lmdb"))

    monkeypatch.setattr(T, "build_model", lambda *a, **k: pytest.fail("a model was built"))
    assert T.main(_train_argv(wrong, str(tmp_path / "out"), [ann], "--vggt_fusion", "last_to_all", batch=1)) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {expected}"

    # With an image folder: the message names IMAGE_DIR.
    vg_root, a, _ = _vgllm_data(tmp_path)
    code, err = _cli(capsys, "build", "--data-root", vg_root, "--annotations", f"{a}@{vg_root}/media_b",
                     "--encoder", "vggt-tiny", "--no-progress", "--dry-run")
    assert code == 2 and f"IMAGE_DIR {vg_root}/media_b (after '@') must be the folder" in err, err
    assert f"(e.g. {vg_root}/media_b/s0/0.png, image 's0/0.png' of {a} sample 0 (id 'a0'))" in err


def test_the_fail_fast_check_looks_at_the_first_20_images_only(tmp_path):
    from featstore.errors import PlanError
    from featstore.build.plan import FAIL_FAST_IMAGES, plan_samples

    root = str(tmp_path / "data")
    make_images(root, ["seen/20.png", "seen/19.png"])
    conv = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "ok"}]
    ann = str(tmp_path / "a.json")
    with open(ann, "w") as f:  # images 0-18 missing, 19 and 20 present
        json.dump([{"image": f"{'seen' if i >= 19 else 'gone'}/{i}.png", "conversations": conv} for i in range(21)], f)
    assert FAIL_FAST_IMAGES == 20 and len(plan_samples(root, [ann])) == 21  # 19.png is among the first 20
    os.remove(os.path.join(root, "seen", "19.png"))
    with pytest.raises(PlanError, match=r"none of the first 20 images it names exists \(e\.g\. .*/gone/0\.png"):
        plan_samples(root, [ann])
