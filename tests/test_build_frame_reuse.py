"""Frame reuse in the build: a frame shared by several units of a batch (a JanusVLN-style file gives
every sample of an episode its first frame; `linspace` histories overlap) goes through VGGT's patch
embedding once. Built with the real tiny VGGT into real LMDB stores, with and without reuse, every
entry must be the same; the report counts the reuse."""

import json
import os

import numpy as np
import pytest
import torch

from featstore.build.pipeline import distinct_frames
from featstore.build.plan import Unit, frame_order, plan_units
from featstore.errors import PlanError
from featstore.build.runner import BuildOptions, build

from _featstore_helpers import make_images, read_store

EPISODES, STEPS, HISTORY = 3, 9, 4


def janus_samples(episodes: int = EPISODES, steps: int = STEPS, history: int = HISTORY) -> tuple[list[str], list[dict]]:
    """(image keys, samples) in the JanusVLN layout: per episode one sample per step t >= 1 whose
    frames are `history` frames spread over 0..t by linspace (the episode's first frame always
    among them, overlapping from step to step) and the current frame t last."""
    keys = [f"trajectory_data/R2R/train/{e}/{s:03d}_rgb.png" for e in range(episodes) for s in range(steps + 1)]
    samples = []
    for e in range(episodes):
        for t in range(1, steps + 1):
            picks = sorted(set(np.linspace(0, t - 1, min(history, t)).astype(int).tolist())) + [t]
            samples.append({"id": f"r2r_{e}_{t}", "images": [keys[e * (steps + 1) + s] for s in picks],
                            "conversations": [{"from": "human", "value": "<image>" * len(picks) + "Go?"},
                                              {"from": "gpt", "value": "Forward."}]})
    # In file order the episodes interleave (as merged R2R/RxR files do): the build must regroup them.
    samples.sort(key=lambda s: (int(s["id"].rsplit("_", 1)[1]), s["id"]))
    return keys, samples


@pytest.fixture(scope="module")
def janus(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("janus"))
    keys, samples = janus_samples()
    make_images(root, keys, size=(64, 48))
    ann = os.path.join(root, "train.json")
    with open(ann, "w") as f:
        json.dump(samples, f)
    return root, ann


def _build(root, ann, store, **kw):
    kw = {"encoder": "vggt-tiny", "workers": 0, "progress": False, "batch_frames": 16,
          "spec_overrides": {"storage_dtype": "float32"}, **kw}
    return build(BuildOptions(data_root=root, annotations=[ann], store=store, **kw))


def _max_rel_diff(a: dict, b: dict) -> float:
    return max(float((a[k][0] - b[k][0]).abs().max() / b[k][0].abs().max()) for k in b)


def test_reuse_stores_the_same_entries_as_the_per_unit_path_and_reports_the_reuse(janus, tmp_path):
    root, ann = janus
    reused = _build(root, ann, str(tmp_path / "reuse.lmdb"))
    plain = _build(root, ann, str(tmp_path / "plain.lmdb"), frame_reuse=False)
    a, b = read_store(str(tmp_path / "reuse.lmdb")), read_store(str(tmp_path / "plain.lmdb"))
    assert len(a) == EPISODES * STEPS and sorted(a) == sorted(b)
    for key in b:
        assert a[key][1] == b[key][1], key  # frames, sources, grid, fingerprint: the same metadata
    # On the CPU in float32 the shared patch embedding gives bit-identical entries (docs/BUILD.md).
    diffs = [k for k in b if not torch.equal(a[k][0], b[k][0])]
    assert not diffs, f"{len(diffs)} entries differ, e.g. {diffs[0]}: max rel diff {_max_rel_diff(a, b):.2e}"

    instances = sum(len(s) for s in (json.loads(m["frames"]) for _, m in b.values()))
    assert reused.frame_instances == plain.frame_instances == plain.distinct_frames == instances
    assert plain.frame_reuse == 1.0
    assert reused.distinct_frames < instances and reused.frame_reuse == instances / reused.distinct_frames > 1.5


def test_reuse_under_janusvlns_causal_spec_stores_the_same_entries(janus, tmp_path):
    """JanusVLN's own spec (causal attention, the last frame kept), the files that motivate reuse:
    the shared embedding feeds the causal blocks as the per-unit path does."""
    root, ann = janus
    causal = {"storage_dtype": "float32", "attention": "causal", "frames_kept": "last"}
    reused = _build(root, ann, str(tmp_path / "reuse.lmdb"), spec_overrides=causal)
    plain = _build(root, ann, str(tmp_path / "plain.lmdb"), spec_overrides=causal, frame_reuse=False)
    a, b = read_store(str(tmp_path / "reuse.lmdb")), read_store(str(tmp_path / "plain.lmdb"))
    assert sorted(a) == sorted(b) and len(b) == EPISODES * STEPS
    assert all(torch.equal(a[k][0], b[k][0]) and a[k][1] == b[k][1] for k in b)
    assert plain.frame_reuse == 1.0 and reused.frame_reuse > 1.5


@pytest.mark.slow
def test_reuse_under_compile_stores_what_the_eager_per_unit_build_stores(janus, tmp_path):
    """--compile with reuse: the count of distinct frames changes from batch to batch (the patch
    embedding recompiles once, dynamic), the short last batch pads the index, not the frames;
    the entries equal the eager per-unit build's within float32 rounding of other kernels."""
    root, _ = janus
    # The samples of full history only (5 frames): one unit size, so that the test pays for one
    # set of compiled shapes; 18 units in batches of 4 leave a short last batch of 2.
    samples = [s for s in janus_samples()[1] if len(s["images"]) == HISTORY + 1]
    ann = str(tmp_path / "full_history.json")
    with open(ann, "w") as f:
        json.dump(samples, f)
    compiled = _build(root, ann, str(tmp_path / "compiled.lmdb"), compile=True, batch_frames=20)
    plain = _build(root, ann, str(tmp_path / "plain.lmdb"), frame_reuse=False, batch_frames=20)
    a, b = read_store(str(tmp_path / "compiled.lmdb")), read_store(str(tmp_path / "plain.lmdb"))
    assert sorted(a) == sorted(b) and len(b) == len(samples) == 18 and not compiled.failed
    assert compiled.frame_reuse > 1.2 and compiled.frame_instances == plain.frame_instances
    assert _max_rel_diff(a, b) < 1e-4


def test_frame_order_keeps_an_episode_together_and_the_plan_unchanged(janus):
    root, ann = janus
    units = plan_units(root, [ann])
    ordered = frame_order(units)
    assert sorted(ordered, key=lambda u: u.key) == sorted(units, key=lambda u: u.key)  # the same units
    episodes = [u.frames[0].split("/")[-2] for u in ordered]
    assert episodes == sorted(episodes)  # each episode's units are adjacent
    assert frame_order(list(reversed(units))) == ordered  # the order depends on the units alone


def test_shards_keep_episodes_together_so_a_shared_frame_is_embedded_on_one_host(janus, tmp_path):
    """`--shard I/3` over 3 episodes of 9 samples: each host gets one whole episode (every 3rd
    sample would give each host a third of every episode, and every host would embed every
    episode's first frame), so the hosts together embed as many frames as one host building
    everything does (batches large enough to hold a frame-count group whole); the parts are
    disjoint, hold every sample, and hold what the one-host build holds."""
    root, ann = janus
    keys, samples = janus_samples()
    one = str(tmp_path / "one.lmdb")
    whole_report = _build(root, ann, one, batch_frames=256)
    parts, distinct = [], 0
    for i in range(3):
        store = str(tmp_path / f"shard{i}.lmdb")
        report = _build(root, ann, store, shard=(i, 3), batch_frames=256)
        parts.append(read_store(store))
        distinct += report.distinct_frames
        assert len({k.rsplit("_", 1)[0] for k in parts[-1]}) == 1, sorted(parts[-1])  # one episode
    # Units are batched by frame count, so a frame shared by units of two counts is embedded twice.
    assert distinct == whole_report.distinct_frames < whole_report.frame_instances
    assert sorted(k for part in parts for k in part) == sorted(s["id"] for s in samples)  # disjoint, complete
    assert _max_rel_diff({k: v for part in parts for k, v in part.items()}, read_store(one)) < 1e-5
    with pytest.raises(PlanError, match=r"--shard must be I/N with 0 <= I < N. Found '3/3'"):
        _build(root, ann, str(tmp_path / "bad.lmdb"), shard=(3, 3))


def test_a_build_resumed_in_other_batches_computes_the_same_entries(janus, tmp_path):
    """Resume: a store holding some units gets the rest in other batches (other distinct frames);
    the finished store equals one built in one go."""
    root, ann = janus
    keys, samples = janus_samples()
    part = os.path.join(root, "part.json")
    with open(part, "w") as f:
        json.dump(samples[::3], f)
    store = str(tmp_path / "resumed.lmdb")
    first = _build(root, part, store)
    rest = _build(root, ann, store)
    assert (first.computed, rest.fresh, rest.computed) == (len(samples[::3]), first.computed,
                                                            len(samples) - first.computed)
    whole = str(tmp_path / "whole.lmdb")
    _build(root, ann, whole)
    a, b = read_store(store), read_store(whole)
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k][0], b[k][0]) and a[k][1] == b[k][1] for k in b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_reuse_on_cuda_stores_what_the_per_unit_cuda_build_stores(janus, tmp_path):
    """On CUDA (bf16 autocast, bf16 storage, the frame index copied without a stream sync) the
    reuse build's entries equal the per-unit build's within the recompute tolerance: the
    shared embedding runs in batches of another size, which may round differently."""
    from featstore.encoders import resolve_spec
    from featstore.ops.compare import compare_features

    root, ann = janus
    kw = {"device": "cuda", "spec_overrides": {}, "batch_frames": 16}
    reuse = _build(root, ann, str(tmp_path / "reuse.lmdb"), **kw)
    plain = _build(root, ann, str(tmp_path / "plain.lmdb"), frame_reuse=False, **kw)
    assert reuse.frame_reuse > 1.2 and plain.frame_reuse == 1.0 and not (reuse.failed or plain.failed)
    a, b = read_store(str(tmp_path / "reuse.lmdb")), read_store(str(tmp_path / "plain.lmdb"))
    assert sorted(a) == sorted(b) and len(b) == EPISODES * STEPS
    spec = resolve_spec("vggt-tiny")
    worst = [compare_features(a[k][0], b[k][0], spec.storage_dtype, spec.compute_dtype) for k in b]
    assert all(c["ok"] for c in worst), max(c["rel_error"] for c in worst)


def test_distinct_frames_tells_a_changed_file_apart():
    """One path read with two different contents (the file changed between two units' reads) is
    two frames, never one."""
    units = [Unit("a", ("e/0.png", "e/1.png")), Unit("b", ("e/0.png", "e/1.png"))]
    first, index = distinct_frames(units, [[{"sha256": "x"}, {"sha256": "y"}], [{"sha256": "x"}, {"sha256": "z"}]])
    assert first == [(0, 0), (0, 1), (1, 1)] and index == [[0, 1], [0, 2]]


def test_frame_reuse_benchmark_smoke(tmp_path):
    """benchmarks/frame_reuse_bench.py builds per unit and with reuse, compares, and writes its JSON."""
    import subprocess
    import sys

    from _featstore_helpers import REPO

    run = subprocess.run([sys.executable, "benchmarks/frame_reuse_bench.py", "--smoke", "--batch-frames", "8",
                          "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    entry = json.loads((tmp_path / "frame_reuse_bench.json").read_text())["runs"]["8"]
    per_unit, reuse = entry["per_unit"]["builds"][0], entry["reuse"]["builds"][0]
    assert per_unit["frame_reuse"] == 1.0 and per_unit["distinct_frames"] == per_unit["frame_instances"]
    assert reuse["frame_instances"] == per_unit["frame_instances"] and reuse["distinct_frames"] < reuse["frame_instances"]
    assert entry["compare"]["entries"] == reuse["computed"] == 10
    assert entry["compare"]["bit_identical"] == 10 and entry["compare"]["all_within_tolerance"]
