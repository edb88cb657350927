"""Cold reads against the disk's own bandwidth: what the disk gives, and what featstore gets of it.

1. The disk, direct I/O (O_DIRECT, so the page cache is out of the way): a test file of --file-mb
   read sequentially and at random offsets in --block-kb blocks, with 1..max(--depths) threads
   each issuing preads (threads = queue depth: one outstanding request each).
2. featstore, cold: a store of --entries entries of --entry-kb on the same disk, its pages
   dropped (drop_caches as root, else posix_fadvise DONTNEED), then read in random order (the
   access pattern training makes) by one reader (`read_into`, batches of --batch) and by
   --workers DataLoader workers (fork), entries/s and MB/s; each as a fraction of the best
   random direct-read bandwidth measured in step 1 (pass --block-kb with the entry size to
   compare like with like).

Usage:
    python benchmarks/disk_bench.py --out OUT --workdir /nvme/tmp           # the GPU host's disk
    python benchmarks/disk_bench.py --out OUT --smoke                        # CPU smoke run, seconds
Writes OUT/disk_bench.json. The smoke run checks that the script works; its numbers describe a
tiny file on whatever disk holds the temp dir and support no claim about any target.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import json
import mmap
import os
import platform
import random
import shutil
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from featstore import FeatureStore, StoreWriter  # noqa: E402

ALIGN = 4096


def drop_cache(paths: list[str]) -> str:
    """Empty the page cache of `paths`: drop_caches when permitted, else DONTNEED per file."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "fadvise_dontneed"


def make_file(path: str, size: int) -> None:
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def direct_read(path: str, block: int, depth: int, seconds: float, pattern: str) -> dict:
    """Bytes/s of O_DIRECT preads of `block` bytes by `depth` threads, sequential or random."""
    size = os.path.getsize(path) // block * block
    blocks = size // block
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    deadline = time.perf_counter() + seconds

    def worker(seed: int) -> int:
        buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs
        rng = random.Random(seed)
        done, pos = 0, (seed * blocks // depth)
        while time.perf_counter() < deadline:
            i = rng.randrange(blocks) if pattern == "random" else pos % blocks
            pos += 1
            done += os.preadv(fd, [buf], i * block)
        return done

    t0 = time.perf_counter()
    try:
        with cf.ThreadPoolExecutor(depth) as pool:
            total = sum(pool.map(worker, range(depth)))
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - t0
    return {"pattern": pattern, "block": block, "depth": depth, "MB_per_s": total / elapsed / 1e6,
            "iops": total / block / elapsed}


def make_store(path: str, entries: int, entry_bytes: int) -> list[str]:
    keys = [f"e/{i:06d}" for i in range(entries)]
    channels = 2048
    tokens = max(1, entry_bytes // (2 * channels))
    g = torch.Generator().manual_seed(0)
    with StoreWriter(path, handle_signals=False) as w:
        for k in keys:
            w.put(k, {"features": torch.randn(1, tokens, channels, generator=g).to(torch.bfloat16)},
                  {"frames": json.dumps([k])})
        w.finish()
    return keys


class _Keys(torch.utils.data.Dataset):
    def __init__(self, store: FeatureStore, keys: list[str], batch: int):
        self.store, self.keys, self.batch = store, keys, batch

    def __len__(self) -> int:
        return -(-len(self.keys) // self.batch)

    def __getitem__(self, i: int) -> int:
        self.store.read_into(self.keys[i * self.batch:(i + 1) * self.batch])
        return len(self.keys[i * self.batch:(i + 1) * self.batch])


def cold_reads(path: str, keys: list[str], batch: int, workers: int, entry_bytes: int) -> dict:
    order = list(keys)
    random.Random(1).shuffle(order)
    how = drop_cache([os.path.join(path, "data.mdb")])
    store = FeatureStore(path)
    t0 = time.perf_counter()
    if workers == 0:
        for i in range(0, len(order), batch):
            store.read_into(order[i:i + batch])
        n = len(order)
    else:
        loader = torch.utils.data.DataLoader(_Keys(store, order, batch), batch_size=None, num_workers=workers,
                                             multiprocessing_context="fork")
        n = sum(loader)
    elapsed = time.perf_counter() - t0
    store.close()
    return {"readers": max(1, workers), "dataloader_workers": workers, "cold_method": how,
            "entries_per_s": n / elapsed, "MB_per_s": n * entry_bytes / elapsed / 1e6}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", default=None, help="a folder on the disk to measure (default: the temp dir)")
    ap.add_argument("--file-mb", type=int, default=8192, help="direct-I/O test file (default 8192 MB)")
    ap.add_argument("--block-kb", type=int, nargs="+", default=[128, 4096], help="read sizes (default 128 4096)")
    ap.add_argument("--depths", type=int, nargs="+", default=[1, 4, 16, 64], help="threads = queue depths")
    ap.add_argument("--seconds", type=float, default=5.0, help="per disk measurement (default 5)")
    ap.add_argument("--entries", type=int, default=2000, help="store entries (default 2000)")
    ap.add_argument("--entry-kb", type=int, default=4144, help="entry size (default 4144: a VGGT-1B frame)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", type=int, default=8, help="DataLoader workers for the concurrent case")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes for a CPU run (numbers mean nothing)")
    args = ap.parse_args()
    if args.smoke:
        args.file_mb, args.block_kb, args.depths, args.seconds = 64, [128], [1, 4], 0.5
        args.entries, args.entry_kb, args.workers = 64, 128, 2
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="disk_bench_", dir=args.workdir)
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.node()}, {os.cpu_count()} CPUs", "smoke": args.smoke,
              "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "disk": [], "featstore": []}
    try:
        test_file = os.path.join(work, "direct.bin")
        make_file(test_file, args.file_mb << 20)
        for block in args.block_kb:
            for pattern in ("sequential", "random"):
                for depth in args.depths:
                    r = direct_read(test_file, block << 10, depth, args.seconds, pattern)
                    result["disk"].append(r)
                    print(f"disk {pattern:10s} {block:5d} KiB depth {depth:3d}: {r['MB_per_s']:9.1f} MB/s", flush=True)
        os.remove(test_file)
        store = os.path.join(work, "store.lmdb")
        keys = make_store(store, args.entries, args.entry_kb << 10)
        for workers in (0, args.workers):
            r = cold_reads(store, keys, args.batch, workers, args.entry_kb << 10)
            near = [d for d in result["disk"] if d["pattern"] == "random"]
            best = max(near, key=lambda d: d["MB_per_s"]) if near else None
            if best:
                r["of_disk_random_best"] = r["MB_per_s"] / best["MB_per_s"]
            result["featstore"].append(r)
            print(f"featstore cold, {workers} workers: {r['entries_per_s']:.1f} entries/s, {r['MB_per_s']:.1f} MB/s"
                  + (f" ({100 * r['of_disk_random_best']:.0f}% of the best random direct read)" if best else ""),
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with open(os.path.join(args.out, "disk_bench.json"), "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
