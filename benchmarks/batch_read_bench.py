"""Training's batch read path on the CPU, before and after, in one run: host bytes written per
batch and batches/s of one worker.

    before  what training did until the batch-shaped read path: per sample
            `read_into([key], frames=[...], data_root=root)` (which skipped the memoised hot
            path and decoded every entry's header), then the collator's `torch.cat` of the
            samples' features, then the copy of the batch into its shared-memory slot: three
            host copies of each feature byte.
    after   `plan_read` of the batch's keys inside one snapshot (frame lists compared as stored
            bytes, freshness checked), then `ReadPlan.copy_into` of each entry straight into
            the slot, gathered into merger order (`training.merger.merger_rows`; an odd grid's
            last row and column are not copied): one host copy.

Both run in this process over the same warm store (real LMDB, real files under a data root
for the freshness stats), same keys, same order; the slot is one shared-memory buffer reused
for every batch, as a worker's slots are. The batches agree (checked: `after` equals `before`
gathered into merger order).

Usage:
    python benchmarks/batch_read_bench.py                       # ~1 min on 2 cores
    python benchmarks/batch_read_bench.py --samples 32 --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from featstore.store.reader import FeatureStore  # noqa: E402
from featstore.store.writer import StoreWriter  # noqa: E402
from training.merger import merger_rows  # noqa: E402

CONFIGS = {
    # name: (frames a sample, grid h, w, channels, samples a batch)
    "vggt-1b": (4, 28, 37, 2048, 2),  # 518x392 views: 37x28 patches, 5.3 MB a frame in bf16
    "small": (4, 8, 6, 128, 8),       # vggt-tiny-sized entries: 48 tokens, 12 KiB a frame
}


def make_store(workdir: str, name: str, samples: int) -> tuple[str, str, list]:
    frames_n, h, w, c, _ = CONFIGS[name]
    root = os.path.join(workdir, f"{name}_data")
    os.makedirs(root)
    path = os.path.join(workdir, f"{name}.lmdb")
    units = []
    g = torch.Generator().manual_seed(0)
    with StoreWriter(path, handle_signals=False) as writer:
        for s in range(samples):
            frames = [f"scene{s:03d}/{k:03d}.jpg" for k in range(frames_n)]
            sources = []
            for frame in frames:
                file = os.path.join(root, frame)
                os.makedirs(os.path.dirname(file), exist_ok=True)
                with open(file, "wb") as f:
                    f.write(b"\xff\xd8" + bytes(100))
                st = os.stat(file)
                sources.append({"mtime_ns": st.st_mtime_ns, "sha256": "0" * 64, "size": st.st_size})
            feats = torch.randn(frames_n, h * w, c, generator=g).to(torch.bfloat16)
            key = frames[-1]
            writer.put(key, {"features": feats}, {"frames": json.dumps(frames, ensure_ascii=False),
                                                  "sources": json.dumps(sources, sort_keys=True)})
            units.append((key, frames))
        writer.finish()
    return root, path, units


def before(store: FeatureStore, root: str, batch: list, slot: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The old path; returns (the slot's feature view, host bytes written)."""
    feats = [store.read_into([key], frames=[frames], data_root=root)[0] for key, frames in batch]
    written = sum(f.numel() * f.element_size() for f in feats)
    cat = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])  # the collator
    written += cat.numel() * cat.element_size()
    dst = slot[: cat.numel() * cat.element_size()].view(cat.dtype).view(cat.shape)
    dst.copy_(cat)  # the slot (SlotCollator's pack)
    return dst, written + cat.numel() * cat.element_size()


def after(store: FeatureStore, root: str, batch: list, slot: torch.Tensor, grid: tuple) -> tuple[torch.Tensor, int]:
    """The batch-shaped path; returns (the slot's feature view, host bytes written)."""
    with store.snapshot():
        plan = store.plan_read([k for k, _ in batch], frames=[f for _, f in batch], data_root=root, missing="skip")
        rows = [merger_rows(plan.shapes[j][0], *grid) for j in range(len(batch))]
        channels = plan.shapes[0][-1]
        total = sum(len(r) for r in rows)
        out = slot[: total * channels * plan.dtype.itemsize].view(plan.dtype).view(total, channels)
        at = 0
        for j, r in enumerate(rows):
            plan.copy_into(j, out[at: at + len(r)], r)  # the one copy out of the map
            at += len(r)
    return out, out.numel() * out.element_size()


def measure(name: str, samples: int, rounds: int, workdir: str) -> dict:
    frames_n, h, w, c, batch_size = CONFIGS[name]
    root, path, units = make_store(workdir, name, samples)
    store = FeatureStore(path)
    batches = [units[i: i + batch_size] for i in range(0, len(units) - batch_size + 1, batch_size)]
    slot = torch.empty(batch_size * frames_n * h * w * c * 2 + (1 << 20), dtype=torch.uint8).share_memory_()
    # The two paths agree: after == before gathered into merger order.
    old, _ = before(store, root, batches[0], slot)
    old = old.clone().view(batch_size, frames_n * h * w, c)
    new, _ = after(store, root, batches[0], slot, (h, w))
    want = torch.cat([o[torch.tensor(merger_rows(frames_n, h, w))] for o in old])
    assert torch.equal(new, want), "the batch-shaped read differs from the old path"
    result = {"config": name, "frames": frames_n, "grid": [h, w], "channels": c, "batch": batch_size,
              "feature_bytes_stored": batch_size * frames_n * h * w * c * 2}
    for label, run in (("before", lambda b: before(store, root, b, slot)),
                       ("after", lambda b: after(store, root, b, slot, (h, w)))):
        for b in batches:  # warm: every value and file in the page cache
            run(b)
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            for b in batches:
                _, written = run(b)
            best = min(best, time.perf_counter() - t0)
        result[label] = {"host_bytes_written_per_batch": written, "batches_per_s": len(batches) / best}
    store.close()
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=16, help="samples in each store (default 16)")
    p.add_argument("--rounds", type=int, default=5, help="timed passes over the batches; the best is kept")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # one DataLoader worker
    with tempfile.TemporaryDirectory() as workdir:
        results = [measure(name, args.samples, args.rounds, workdir) for name in CONFIGS]
    meta = {"date": dt.date.today().isoformat(), "torch": torch.__version__, "python": platform.python_version(),
            "cpus": os.cpu_count()}
    print(f"# batch read path, {meta}")
    print("| config | batch | bytes stored | host bytes written before | after | batches/s before | after |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['config']} ({r['frames']} frames {r['grid'][0]}x{r['grid'][1]}x{r['channels']}) | {r['batch']} | "
              f"{r['feature_bytes_stored'] / 1e6:.2f} MB | {r['before']['host_bytes_written_per_batch'] / 1e6:.2f} MB | "
              f"{r['after']['host_bytes_written_per_batch'] / 1e6:.2f} MB | {r['before']['batches_per_s']:.1f} | "
              f"{r['after']['batches_per_s']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
