"""How fast `featstore verify` reads a store: GB/s of values decoded and CRC-checked, warm (in
the page cache) and cold (pages dropped with POSIX_FADV_DONTNEED), per number of reader threads,
beside the two bounds it cannot beat: one core's CRC-32 and a plain sequential read of data.mdb.

Entries are VGGT-1B sized (one frame at 518 px: [1, 1369, 2048] bf16, 5.6 MB) unless --shape.

Example:
  python benchmarks/verify_throughput.py --gb 4 --dir /tmp --threads 1 2 4 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
import zlib

import torch

from featstore.ops.verify import verify_store
from featstore.store.writer import StoreWriter
from read_bench import _fadvise_dontneed  # same folder: scripts run from benchmarks/ on sys.path


def _sequential_read(path: str) -> float:
    t0 = time.perf_counter()
    n = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(16 << 20):
            n += len(chunk)
    return n / (time.perf_counter() - t0) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=4.0, help="store size in GB of values (default 4)")
    p.add_argument("--shape", type=int, nargs=3, default=[1, 1369, 2048], help="entry shape (bf16)")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where to write the store (default: $TMPDIR)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--keep", action="store_true", help="keep the store afterwards")
    args = p.parse_args()

    root = tempfile.mkdtemp(prefix="featstore-verify-bench-", dir=args.dir)
    path = os.path.join(root, "vggt_features.lmdb")
    try:
        base = torch.randn(*args.shape).to(torch.bfloat16)
        entry_bytes = base.numel() * 2
        n = max(1, int(args.gb * 1e9 / entry_bytes))
        t0 = time.perf_counter()
        with StoreWriter(path, batch_entries=32) as w:
            for i in range(n):
                feats = base.clone()
                feats.view(-1)[i % feats.numel()] = float(i)  # distinct values, same cost to write
                w.put(f"scene{i // 100:04d}/{i % 100:03d}.jpg", {"features": feats},
                      {"frames": json.dumps([f"scene{i // 100:04d}/{i % 100:03d}.jpg"])})
            w.finish()
        write_s = time.perf_counter() - t0
        data = os.path.join(path, "data.mdb")
        blob = os.urandom(256 << 20)
        t = time.perf_counter()
        zlib.crc32(blob)
        crc_one_core = len(blob) / (time.perf_counter() - t) / 1e9
        _fadvise_dontneed([data])
        seq_cold = _sequential_read(data)
        results = []
        for threads in args.threads:
            for state in ("cold", "warm"):
                if state == "cold":
                    _fadvise_dontneed([data])
                else:
                    _sequential_read(data)  # make sure every page is cached
                r = verify_store(path, workers=threads, structure=False)
                assert r.ok, r.summary()
                results.append({"threads": threads, "cache": state, "gb_per_s": round(r.gb_per_s, 3),
                                "seconds": round(r.read_seconds, 2)})
                print(json.dumps(results[-1]), flush=True)
        t = time.perf_counter()
        from lmdb import verify as audit

        assert not audit.verify(path, subdir=True)
        audit_s = time.perf_counter() - t
        out = {
            "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "date": time.strftime("%Y-%m-%d"),
            "entries": n, "entry_bytes": entry_bytes, "store_gb": round(n * entry_bytes / 1e9, 2),
            "write_gb_per_s": round(n * entry_bytes / write_s / 1e9, 3),
            "crc32_one_core_gb_per_s": round(crc_one_core, 3),
            "sequential_read_cold_gb_per_s": round(seq_cold, 3),
            "structure_audit_s": round(audit_s, 2),
            "verify": results,
        }
        print(json.dumps(out, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
