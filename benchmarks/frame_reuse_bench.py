"""Frame reuse in the VGGT build: per-unit patch embedding vs once per distinct frame, one run,
same images, same card.

    python benchmarks/frame_reuse_bench.py --out DIR [--episodes 6] [--steps 40] [--history 8]
                                           [--batch-frames 16,72] [--repeats 2] [--compile] [--smoke]

Generates a JanusVLN-style data set: `--episodes` folders of `--steps`+1 640x480 JPEGs and one
annotation file with a sample per step t >= 1 whose frames are up to `--history` frames spread
over 0..t-1 by linspace (the episode's first frame always among them) and the current frame t,
the episodes interleaved in the file as merged R2R/RxR files are. Then, for each
`--batch-frames` value, builds it `--repeats` times with the VGGT-1B architecture (random
weights, `vggt-1b-random`: no download; full attention, bf16 storage) into a fresh store:
  per_unit   `BuildOptions(frame_reuse=False)`: every frame of every unit patch-embedded
  reuse      the default: each distinct frame of a batch patch-embedded once
alternating the two (`--compile`: the encoder's blocks under torch.compile, with one untimed
build of each mode first, so that the timed builds run compiled code), and records per build
the report's frame counts (`frame_instances`, `distinct_frames`, `frame_reuse`), `encode_s`,
`pipeline_s` and `steady_frames_per_s`; then
compares every entry of the last two stores (`featstore.ops.compare.compare_features` at the
storage tolerance: max relative difference, how many are bit-identical). Writes
DIR/frame_reuse_bench.json (DIR: --out, else $OUT, else ./bench_out).

`--smoke`: vggt-tiny on CPU, a few small images, one repeat: checks that the script runs
(tests/test_build_frame_reuse.py); its timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from featstore.build.runner import BuildOptions, build  # noqa: E402
from featstore.encoders import get_encoder  # noqa: E402
import _vggt_random  # noqa: E402  (registers vggt-1b-random)
from _results import write_report  # noqa: E402

MODES = {"per_unit": False, "reuse": True}  # mode -> BuildOptions.frame_reuse


def janus_data(root: Path, episodes: int, steps: int, history: int, size: tuple[int, int]) -> Path:
    """The images and the annotation file (see the module docstring); returns the file's path."""
    from PIL import Image

    rng = np.random.default_rng(0)
    samples = []
    for e in range(episodes):
        keys = [f"trajectory_data/R2R/train/{e}/{s:03d}_rgb.jpg" for s in range(steps + 1)]
        for key in keys:
            path = root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            # Smooth random colour fields: they compress like photos, unlike noise.
            small = rng.integers(0, 256, (size[1] // 32, size[0] // 32, 3), dtype=np.uint8)
            Image.fromarray(small).resize(size, Image.BILINEAR).save(path, quality=90)
        for t in range(1, steps + 1):
            picks = sorted(set(np.linspace(0, t - 1, min(history, t)).astype(int).tolist())) + [t]
            samples.append({"id": f"r2r_{e}_{t}", "images": [keys[s] for s in picks],
                            "conversations": [{"from": "human", "value": "<image>" * len(picks) + "Go?"},
                                              {"from": "gpt", "value": "Forward."}]})
    samples.sort(key=lambda s: (int(s["id"].rsplit("_", 1)[1]), s["id"]))  # episodes interleaved
    ann = root / "train.json"
    ann.write_text(json.dumps(samples))
    return ann


def one_build(encoder, root: Path, ann: Path, store: Path, *, reuse: bool, batch_frames: int, workers: int,
              compile: bool = False) -> dict:
    opts = BuildOptions(data_root=str(root), annotations=[str(ann)], store=str(store), workers=workers,
                        batch_frames=batch_frames, progress=False, force=True, frame_reuse=reuse, compile=compile)
    start = time.perf_counter()
    report = build(opts, encoder=encoder)
    wall = time.perf_counter() - start
    if report.failed:
        raise RuntimeError(f"the build failed {len(report.failed)} units, e.g. {report.failed[0]}")
    keep = ("computed", "frames", "frame_instances", "distinct_frames", "frame_reuse", "encode_s", "pipeline_s",
            "steady_frames_per_s", "decode_wait_s", "d2h_wait_s")
    return {"wall_s": wall, **{k: getattr(report, k) for k in keep}}


def compare_stores(a: Path, b: Path, storage_dtype: str, feature_set: str | None = None) -> dict:
    """Every entry of store `a` against store `b` (feature set `feature_set`; None: the primary):
    the largest relative difference, the lowest cosine, how many are bit-identical, and whether
    all are within the storage tolerance."""
    from featstore import FeatureStore
    from featstore.ops.compare import compare_features

    worst = {"entries": 0, "bit_identical": 0, "max_rel_diff": 0.0, "min_cosine": 1.0, "all_within_tolerance": True}
    with FeatureStore(str(a), feature_set=feature_set) as sa, FeatureStore(str(b), feature_set=feature_set) as sb:
        if sorted(sa.keys()) != sorted(sb.keys()):
            raise RuntimeError(f"the stores hold different keys: {sorted(set(sa.keys()) ^ set(sb.keys()))[:5]}")
        for key in sa.keys():
            x, y = sa.get(key, copy=True).features, sb.get(key, copy=True).features
            c = compare_features(x, y, storage_dtype)
            worst["entries"] += 1
            worst["bit_identical"] += int(torch.equal(x, y))
            worst["max_rel_diff"] = max(worst["max_rel_diff"], c["rel_error"])
            worst["min_cosine"] = min(worst["min_cosine"], c["cosine"])
            worst["all_within_tolerance"] &= bool(c["ok"])
    return worst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="output folder (default $OUT, else ./bench_out)")
    p.add_argument("--episodes", type=int, default=6, help="episodes (default 6)")
    p.add_argument("--steps", type=int, default=40, help="steps per episode, one sample each (default 40)")
    p.add_argument("--history", type=int, default=8, help="history frames per sample, by linspace (default 8)")
    p.add_argument("--batch-frames", default="16,72", help="comma-separated --batch-frames values (default 16,72)")
    p.add_argument("--repeats", type=int, default=2, help="builds per mode and batch size (default 2)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="decode workers (default min(8, CPUs))")
    p.add_argument("--work", help="where the images and stores go (default: a temporary folder)")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder's blocks (build --compile); "
                   "one untimed build per mode first")
    p.add_argument("--smoke", action="store_true", help="vggt-tiny on CPU, a few small images (tests)")
    a = p.parse_args(argv)
    batch_sizes = [int(x) for x in a.batch_frames.split(",")]
    if a.smoke:
        name, device, size = "vggt-tiny", "cpu", (64, 48)
        a.episodes, a.steps, a.history, a.repeats, a.workers = 2, 5, 3, 1, 0
    else:
        if not torch.cuda.is_available():
            p.error("needs a CUDA GPU; pass --smoke for the CPU check")
        name, device, size = _vggt_random.NAME, "cuda", (640, 480)

    encoder = get_encoder(name, device=device, **({"compile": True} if a.compile else {}))
    storage = encoder.spec.storage_dtype
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "encoder": name, "smoke": a.smoke, "episodes": a.episodes, "steps": a.steps, "history": a.history,
              "image_size": list(size), "storage_dtype": storage, "workers": a.workers, "compile": a.compile,
              "date": time.strftime("%Y-%m-%d", time.gmtime()), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        ann = janus_data(work / "data", a.episodes, a.steps, a.history, size)
        for bf in batch_sizes:
            runs = {mode: [] for mode in MODES}
            for mode, reuse in MODES.items() if a.compile else ():  # compiles for this batch size
                one_build(encoder, work / "data", ann, work / f"store_{mode}", reuse=reuse, batch_frames=bf,
                          workers=a.workers, compile=True)
            for r in range(a.repeats):
                for mode, reuse in MODES.items():  # alternating, so drift hits both alike
                    got = one_build(encoder, work / "data", ann, work / f"store_{mode}", reuse=reuse,
                                    batch_frames=bf, workers=a.workers, compile=a.compile)
                    runs[mode].append(got)
                    print(f"batch_frames {bf} {mode} #{r}", json.dumps(got), flush=True)
            entry = {mode: {"builds": builds,
                            "median_encode_s": statistics.median(b["encode_s"] for b in builds),
                            "median_pipeline_s": statistics.median(b["pipeline_s"] for b in builds),
                            "median_steady_frames_per_s": statistics.median(b["steady_frames_per_s"] for b in builds)}
                     for mode, builds in runs.items()}
            entry["frame_reuse"] = runs["reuse"][-1]["frame_reuse"]
            entry["encode_speedup"] = (entry["per_unit"]["median_encode_s"]
                                       / max(entry["reuse"]["median_encode_s"], 1e-9))
            entry["pipeline_speedup"] = (entry["per_unit"]["median_pipeline_s"]
                                         / max(entry["reuse"]["median_pipeline_s"], 1e-9))
            entry["compare"] = compare_stores(work / "store_reuse", work / "store_per_unit", storage)
            report["runs"][str(bf)] = entry
            print(f"batch_frames {bf}: frame reuse {entry['frame_reuse']:.2f}x, encode {entry['encode_speedup']:.2f}x, "
                  f"pipeline {entry['pipeline_speedup']:.2f}x; {json.dumps(entry['compare'])}", flush=True)

    write_report(a.out, "frame_reuse_bench.json", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
