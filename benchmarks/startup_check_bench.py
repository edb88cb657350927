"""Cost of training's start-up coverage check and of the per-read freshness check, on CPU.

1. Start-up: a generated store of N keys (default 600,000: a large VLN annotation set), every
   sample's key looked up once (`training.train.check_coverage` -> `FeatureStore.missing`, one
   read transaction, no value read). Reported: seconds for the whole check, microseconds a key.
2. Per read: `read_into` of one 9-frame entry with the frame-list check, with and without the
   freshness check (`data_root=`: one `stat` per frame against the entry's record).

Usage:
    python benchmarks/startup_check_bench.py [--keys 600000] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from types import SimpleNamespace

import torch


def _store_with_keys(path: str, n: int) -> list[str]:
    from featstore.format.blob import encode_entry
    from featstore.store.writer import StoreWriter

    blob = encode_entry({"features": torch.zeros(1, 4, 8, dtype=torch.bfloat16)}, {"frames": json.dumps(["x.jpg"])})
    keys = [f"ep{i // 100:05d}/step{i % 100:03d}" for i in range(n)]
    with StoreWriter(path, spec=None, batch_entries=20000, handle_signals=False) as w:
        for k in keys:
            w.put(k, blob)
        w.finish(report={"failed": []})
    return keys


def bench_startup(n: int) -> dict:
    from featstore.build.plan import Unit
    from featstore.store.reader import FeatureStore
    from training.train import check_coverage

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "s.lmdb")
        t0 = time.perf_counter()
        keys = _store_with_keys(path, n)
        write_s = time.perf_counter() - t0
        units = [Unit(k, ("x.jpg",)) for k in keys]
        ds = SimpleNamespace(units=units, wheres=[f"a.json sample {i}" for i in range(n)], data_root=tmp)
        store = FeatureStore(path)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            check_coverage(ds, store, None, "error")
            best = min(best, time.perf_counter() - t0)
        store.close()
    return {"keys": n, "write_s": round(write_s, 2), "check_s": round(best, 3), "us_per_key": round(best / n * 1e6, 2)}


def bench_freshness(reps: int = 2000) -> dict:
    import numpy as np
    from PIL import Image

    from featstore.build.runner import BuildOptions, build
    from featstore.store.reader import FeatureStore

    with tempfile.TemporaryDirectory() as root:
        frames = []
        for i in range(9):
            name = f"f{i}.jpg"
            Image.fromarray(np.random.default_rng(i).integers(0, 256, (72, 96, 3), dtype=np.uint8)).save(
                os.path.join(root, name))
            frames.append(name)
        ann = os.path.join(root, "a.json")
        with open(ann, "w") as f:
            json.dump([{"id": "s", "images": frames, "conversations": [
                {"from": "human", "value": "<image>" * 9}, {"from": "gpt", "value": "x"}]}], f)
        build(BuildOptions(data_root=root, annotations=[ann], encoder="vggt-tiny", progress=False, workers=0))
        store = FeatureStore(root)
        out = {}
        for label, kwargs in (("frames_check_us", {}), ("frames_and_freshness_us", {"data_root": root})):
            store.read_into(["s"], frames=[frames], **kwargs)
            t0 = time.perf_counter()
            for _ in range(reps):
                store.read_into(["s"], frames=[frames], **kwargs)
            out[label] = round((time.perf_counter() - t0) / reps * 1e6, 1)
        store.close()
    out["stat_us_per_frame"] = round((out["frames_and_freshness_us"] - out["frames_check_us"]) / 9, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=600_000)
    ap.add_argument("--out")
    args = ap.parse_args()
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "startup": bench_startup(args.keys), "per_read": bench_freshness()}
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
