"""CPU build throughput against the CPU encoder's torch intra-op thread count.

Builds a store of N sample-sized images (96x72, like sample_data/) with the tiny random
encoder on the CPU, once per setting, in this process, and reports frames/s of the pipeline
(decode + encode + commit; model loading and planning excluded) for each encoder thread count
(featstore.build.pipeline.CPU_ENCODER_THREADS; None is featstore's choice). The decode workers run one
thread each in every setting: torch's DataLoader sets that in each worker.

Usage:
    python benchmarks/cpu_threads_bench.py --out OUT_DIR [--images 200] [--repeats 2]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile

import numpy as np
import torch

import featstore.build.pipeline as fb
from featstore.build.runner import BuildOptions, build

DEFAULT = os.cpu_count() or 1  # torch's default intra-op threads: one per core
SETTINGS = sorted({DEFAULT, 1, 2}) + [None]  # None: featstore's choice


def make_images(root: str, n: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        path = os.path.join(root, f"scene{i // 50:02d}", f"{i:04d}.jpg")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (72, 96, 3), dtype=np.uint8)).save(path, quality=90)


def run(data: str, store: str, workers: int, setting) -> float:
    fb.CPU_ENCODER_THREADS = setting
    shutil.rmtree(store, ignore_errors=True)
    report = build(BuildOptions(data_root=data, store=store, encoder="vggt-tiny", workers=workers, progress=False))
    return report.frames / report.pipeline_s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--repeats", type=int, default=2, help="runs per setting, interleaved; best kept")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    root = tempfile.mkdtemp(prefix="featstore_threads_")
    default_threads = torch.get_num_threads()
    try:
        data = os.path.join(root, "data")
        make_images(data, args.images)
        store = os.path.join(root, "store")
        best: dict = {}
        for _ in range(args.repeats):  # interleaved, so that load from other jobs hits all alike
            for setting in SETTINGS:
                torch.set_num_threads(default_threads)
                rate = run(data, store, args.workers, setting)
                best[setting] = max(best.get(setting, 0.0), rate)
                print(f"encoder threads {setting or 'featstore'}: {rate:.1f} frames/s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
              "nproc": os.cpu_count(), "torch": torch.__version__, "python": sys.version.split()[0],
              "images": args.images, "workers": args.workers, "torch_default_threads": default_threads,
              "results": [{"encoder_threads": s or "featstore", "frames_per_s": r} for s, r in best.items()]}
    with open(os.path.join(args.out, "cpu_threads_bench.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
