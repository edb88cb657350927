"""Read-path benchmark: featstore vs per-entry `.pt` sidecars vs per-entry safetensors vs memcpy.

Side by side in one run, one process, the same random order for every method. Each method
fills a batch tensor `out[B, *shape]` (what a DataLoader worker hands to collate):

    memcpy          out[i].copy_(tensor already in RAM)              (upper bound)
    featstore[...]  FeatureStore.read_into(keys, out)                (view + one copy)
    read_into before  the read_into hot loop as it was before the per-batch layout memo
                    (a layout lookup per entry), same transaction and copy: before/after, one run
    get (copy)      out[i].copy_(store.get(key).features)            (the safe default: two copies)
    view            with store.view(): out[i].copy_(v.get(key).features)   (zero-copy opt-in)
    sidecar .pt     out[i].copy_(torch.load(path))                   (the old way)
    safetensors     out[i].copy_(safetensors.torch.load_file(path)["features"])

Entry sizes: a VGGT-1B frame [1, 1369, 2048] bf16 (5.6 MB) and a 128 KiB entry [1, 32, 2048].
Page cache: warm (everything read once before timing) and cold (caches dropped before each
method: `sync; echo 3 > /proc/sys/vm/drop_caches` as root, else posix_fadvise(DONTNEED) on
every file; stores are closed first because pages mapped by a process are never dropped).
featstore runs with readahead on/off x prefetch (posix_fadvise WILLNEED of each value) on/off.

Usage:
    python benchmarks/read_bench.py --out OUT_DIR                 # ~3-5 min on 2 cores
    python benchmarks/read_bench.py --out OUT_DIR --large 1000 --small 10000 --workdir /nvme/tmp

Writes OUT_DIR/read_bench.json and OUT_DIR/read_bench.md. Test data goes to a temporary
directory under --workdir (default: the system temp dir) and is deleted afterwards.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import json
import mmap
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time

import safetensors.torch
import torch

from featstore.format.blob import tensor_span
from featstore.format.keys import key_to_bytes
from featstore.store.reader import FeatureStore
from featstore.store.writer import StoreWriter

SIZES = {
    # name: (shape [frames, tokens, channels], default entry count)
    "large": ((1, 1369, 2048), 300),  # VGGT-1B, one frame: 5,607,424 bytes in bf16
    "small": ((1, 32, 2048), 3000),  # 131,072 bytes = 128 KiB
}
LMDB_MODES = [  # (readahead, prefetch)
    (True, False),
    (False, False),
    (False, True),
    (True, True),
]


# -- machine --------------------------------------------------------------------------------
def _sh(cmd: str) -> str:
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return ""


def machine(workdir: str) -> dict:
    mem = _sh("awk '/MemTotal/ {printf \"%.1f GiB\", $2/1048576}' /proc/meminfo")
    dev = _sh(f"df --output=source {workdir} | tail -1")
    name = os.path.basename(dev)
    base = name.rstrip("0123456789") if not name.startswith("nvme") else name.split("p")[0]
    ra = _sh(f"cat /sys/block/{base}/queue/read_ahead_kb 2>/dev/null")
    rot = _sh(f"cat /sys/block/{base}/queue/rotational 2>/dev/null")
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "nproc": os.cpu_count(),
        "cpu": _sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip(),
        "ram": mem,
        "kernel": platform.release(),
        "disk": f"{dev} ({_sh(f'df --output=fstype {workdir} | tail -1')}, rotational={rot}, read_ahead_kb={ra})",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "lmdb": __import__("lmdb").__version__,
    }


# -- cold cache -----------------------------------------------------------------------------
def _drop_all() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _fadvise_dontneed(paths: list[str]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(path: str) -> float:
    """Fraction of `path`'s pages in the page cache (mincore), to prove a cold start is cold."""
    size = os.path.getsize(path)
    if size == 0:
        return 0.0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        try:
            if libc.mincore(addr, size, vec) != 0:
                return float("nan")
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec) / pages


# -- data -----------------------------------------------------------------------------------
def make_data(root: str, size: str, n: int, seed: int) -> dict:
    shape, _ = SIZES[size]
    gen = torch.Generator().manual_seed(seed)
    d = os.path.join(root, size)
    os.makedirs(os.path.join(d, "pt"))
    os.makedirs(os.path.join(d, "st"))
    keys = [f"scene{i // 100:03d}/{i:06d}.jpg" for i in range(n)]
    tensors = []
    t0 = time.perf_counter()
    store = os.path.join(d, "vggt_features.lmdb")
    with StoreWriter(store, batch_entries=32, handle_signals=False) as w:
        for i, key in enumerate(keys):
            t = torch.randn(shape, generator=gen).to(torch.bfloat16)
            tensors.append(t)
            w.put(key, {"features": t}, {"frames": json.dumps([key])})
            flat = key.replace("/", "_")
            torch.save(t, os.path.join(d, "pt", flat + ".vggt_cache.pt"))
            safetensors.torch.save_file({"features": t}, os.path.join(d, "st", flat + ".safetensors"))
        w.finish()
    os.sync()
    return {"dir": d, "store": store, "keys": keys, "tensors": tensors, "shape": shape,
            "write_s": time.perf_counter() - t0}


def _files(data: dict, kind: str) -> list[str]:
    ext = {"pt": ".vggt_cache.pt", "st": ".safetensors"}[kind]
    return [os.path.join(data["dir"], kind, k.replace("/", "_") + ext) for k in data["keys"]]


# -- methods ---------------------------------------------------------------------------------

def read_into_before(store: FeatureStore, keys: list, out: torch.Tensor) -> None:
    """read_into's hot loop as before the per-batch memo: per entry a key decode, a layout
    lookup (`_LAYOUTS`: a header copy and search) and a slot check, then the same one copy."""
    import numpy as np

    kbs = [key_to_bytes(k) for k in keys]
    rows = out.reshape(out.shape[0], -1).view(torch.uint8).numpy()
    for i, (kb, value) in enumerate(store.raw_values(kbs)):  # one read transaction, values as stored
        dtype, shape, offset, nbytes = tensor_span(value, "features", key=kb.decode())
        if (dtype, shape) != (out.dtype, tuple(out.shape[1:])):
            raise ValueError(f"{kb!r}: {shape} {dtype}")
        np.copyto(rows[i], np.frombuffer(value, np.uint8, nbytes, offset))


_OPEN: dict[str, FeatureStore] = {}  # featstore method -> store kept open between warm passes


def _close_open_stores() -> None:
    while _OPEN:
        _OPEN.popitem()[1].close()


def run_method(name: str, data: dict, order: list[int], batch: int, out: torch.Tensor, cold: bool,
               cold_method: str) -> dict:
    keys = data["keys"]
    pt_files, st_files = _files(data, "pt"), _files(data, "st")
    store = None
    ra, pf = LMDB_MODES[int(name.split("#")[1])] if name.startswith("featstore") else LMDB_MODES[0]
    on_store = name.startswith("featstore") or name in ("get", "view", "before")
    if cold:
        if cold_method == "drop_caches":
            _drop_all()
        else:
            _fadvise_dontneed([os.path.join(data["store"], "data.mdb"), *pt_files, *st_files])
    check_file = {"pt": pt_files[0], "st": st_files[0]}.get(name, os.path.join(data["store"], "data.mdb"))
    resident = resident_fraction(check_file)
    if on_store:
        # Warm: the store stays open between the warm-up pass and the timed one, as in a
        # long-lived DataLoader worker (its page tables are populated too). Cold: a fresh open
        # after the drop (pages mapped by a process are never dropped).
        store = _OPEN.pop(name, None) if not cold else None
        if store is None:
            store = FeatureStore(data["store"], readahead=ra, prefetch=pf)
        len(store)  # open outside the timed region
    t0 = time.perf_counter()
    for b in range(0, len(order), batch):
        idx = order[b : b + batch]
        o = out[: len(idx)]
        if name == "memcpy":
            for j, i in enumerate(idx):
                o[j].copy_(data["tensors"][i])
        elif name == "get":
            for j, i in enumerate(idx):
                o[j].copy_(store.get(keys[i]).features)
        elif name == "before":
            read_into_before(store, [keys[i] for i in idx], o)
        elif name == "view":
            with store.view() as view:
                for j, i in enumerate(idx):
                    o[j].copy_(view.get(keys[i]).features)
        elif store is not None:
            store.read_into([keys[i] for i in idx], o)
        elif name == "pt":
            for j, i in enumerate(idx):
                o[j].copy_(torch.load(pt_files[i], weights_only=True))
        elif name == "st":
            for j, i in enumerate(idx):
                o[j].copy_(safetensors.torch.load_file(st_files[i])["features"])
    elapsed = time.perf_counter() - t0
    # Spot-check the last batch so a broken method cannot look fast.
    for j, i in enumerate(order[b : b + batch]):
        assert torch.equal(out[j], data["tensors"][i]), f"{name}: wrong data for entry {i}"
    if store is not None:
        if cold:
            store.close()
        else:
            _OPEN[name] = store
    nbytes = len(order) * out[0].numel() * out.element_size()
    return {"seconds": elapsed, "entries_per_s": len(order) / elapsed, "MB_per_s": nbytes / elapsed / 1e6,
            "resident_before": resident}


def method_label(name: str) -> str:
    if name.startswith("featstore"):
        ra, pf = LMDB_MODES[int(name.split("#")[1])]
        return f"featstore readahead={ra} prefetch={pf}"
    return {"get": "featstore get (copy, default) -> batch", "before": "featstore read_into before (per-entry layout)", "view": "featstore view (zero-copy) -> batch",
            "memcpy": "memcpy (RAM -> batch)", "pt": "sidecar .pt (torch.load)",
            "st": "safetensors file (load_file)"}[name]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for read_bench.json and read_bench.md")
    ap.add_argument("--workdir", default=None, help="where to write the test data (default: system temp dir); "
                    "put it on the disk you train from")
    ap.add_argument("--large", type=int, default=SIZES["large"][1], help="large entries (default %(default)s)")
    ap.add_argument("--small", type=int, default=SIZES["small"][1], help="small entries (default %(default)s)")
    ap.add_argument("--batch", type=int, default=8, help="entries per read_into / batch (default %(default)s)")
    ap.add_argument("--repeats", type=int, default=1, help="timed passes per warm method; best is kept")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold-cache runs")
    ap.add_argument("--cold", choices=("auto", "drop_caches", "fadvise"), default="auto",
                    help="how to empty the page cache: drop_caches (root; drops every file's pages, "
                    "disturbing other jobs), fadvise (POSIX_FADV_DONTNEED on the benchmark's own "
                    "files), or auto: drop_caches when permitted (default)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as in DataLoader "
                    "workers; more makes small copies slower on a busy host)")
    ap.add_argument("--keep", action="store_true", help="keep the generated data")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    root = tempfile.mkdtemp(prefix="featstore_read_bench_", dir=args.workdir)
    mach = machine(root)
    torch.set_num_threads(args.threads)
    cold_method = "none"
    if not args.no_cold:
        if args.cold == "fadvise":
            cold_method = "fadvise_dontneed"
        elif args.cold == "drop_caches" and not _drop_all():
            ap.error("--cold drop_caches: cannot write /proc/sys/vm/drop_caches (needs root)")
        else:
            cold_method = "drop_caches" if _drop_all() else "fadvise_dontneed"
    print(f"machine: {json.dumps(mach)}\ncold method: {cold_method}; data in {root}", flush=True)
    results = []
    methods = ["memcpy", "before", *[f"featstore#{i}" for i in range(len(LMDB_MODES))], "get", "view", "pt", "st"]
    try:
        for size, count in (("large", args.large), ("small", args.small)):
            if count <= 0:
                continue
            data = make_data(root, size, count, args.seed)
            print(f"[{size}] wrote {count} entries x 3 formats in {data['write_s']:.1f}s", flush=True)
            order = list(range(count))
            random.Random(args.seed).shuffle(order)
            out = torch.empty((args.batch, *data["shape"]), dtype=torch.bfloat16)
            for cache in ("warm", "cold"):
                if cache == "cold" and args.no_cold:
                    continue
                if cache == "warm":  # read every file once so that everything is in the page cache
                    for name in methods:
                        run_method(name, data, order, args.batch, out, False, cold_method)
                if cache == "cold":
                    _close_open_stores()
                for name in methods:
                    if cache == "cold" and name == "memcpy":
                        continue
                    reps = args.repeats if cache == "warm" else 1
                    r = min((run_method(name, data, order, args.batch, out, cache == "cold", cold_method)
                             for _ in range(reps)), key=lambda r: r["seconds"])
                    r.update(size=size, cache=cache, method=name, label=method_label(name), entries=count,
                             entry_bytes=out[0].numel() * 2)
                    results.append(r)
                    print(f"[{size} {cache}] {r['label']:<40} {r['MB_per_s']:9.1f} MB/s "
                          f"{r['entries_per_s']:9.1f} entries/s"
                          + (f"  (resident before: {r['resident_before']:.2f})" if r["resident_before"] is not None else ""),
                          flush=True)
            _close_open_stores()
            del data
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    # Ratios against the sidecars (entries/s) and memcpy (MB/s) of the same size and cache state.
    for r in results:
        same = {x["method"]: x for x in results if x["size"] == r["size"] and x["cache"] == r["cache"]}
        r["x_vs_sidecar"] = r["entries_per_s"] / same["pt"]["entries_per_s"] if "pt" in same else None
        mem = next((x for x in results if x["size"] == r["size"] and x["method"] == "memcpy"), None)
        r["frac_of_memcpy"] = r["MB_per_s"] / mem["MB_per_s"] if mem else None
    report = {"machine": mach, "cold_method": cold_method, "batch": args.batch, "threads": args.threads,
              "counts": {"large": args.large, "small": args.small}, "results": results}
    with open(os.path.join(args.out, "read_bench.json"), "w") as f:
        json.dump(report, f, indent=2)
    md = to_markdown(report)
    with open(os.path.join(args.out, "read_bench.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


def to_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram']} RAM, disk {m['disk']}, "
        f"kernel {m['kernel']}; torch {m['torch']}, lmdb {m['lmdb']}, safetensors {m['safetensors']}; "
        f"{m['date']}.",
        f"Cold cache by: {report['cold_method']}. Batch {report['batch']}; one process, "
        f"{report['threads']} torch thread(s); random order; "
        f"{report['counts']['large']} large / {report['counts']['small']} small entries.",
        "",
        "| size | cache | method | MB/s | entries/s | x sidecar (entries/s) | of memcpy |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        size = "5.6 MB" if r["size"] == "large" else "128 KiB"
        xs = f"{r['x_vs_sidecar']:.2f}x" if r["x_vs_sidecar"] else "-"
        fm = f"{100 * r['frac_of_memcpy']:.0f}%" if r["frac_of_memcpy"] else "-"
        lines.append(f"| {size} | {r['cache']} | {r['label']} | {r['MB_per_s']:.0f} | "
                     f"{r['entries_per_s']:.0f} | {xs} | {fm} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
