"""Build throughput on one GPU, side by side in one run on the same images and card.

Measures, for VGGT-1B-sized features (random weights: no download) on generated 640x480 JPEGs
preprocessed to 518x392 (37x28 patches, layer 22, bf16 storage = 4.24 MB per frame):
  (a) bare      the aggregator forward alone on pre-decoded frames already on the GPU
  (b) featstore `featstore build` end to end (decode workers, batching, GPU, commit to LMDB)
  (c) naive     decode one image, encode it, torch.save a sidecar .pt, next
  (d) disk      sequential write bandwidth of the store's disk (1 GiB, fsync)
The ceiling of (b) is min((a), disk / bytes-per-frame).

    python benchmarks/build_bench.py --out $OUT [--images 2000] [--naive-images 200]
Writes build_bench.json and build_bench.md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from featstore.build.runner import BuildOptions, build  # noqa: E402
import _vggt_random  # noqa: E402,F401  (registers vggt-1b-random)


def stored_vs_direct(encoder, root: str, store: str, n: int = 8) -> dict:
    """What the build stored against the same encoder called directly on the same images (other
    batches, so equal within rounding, not bitwise): a copy read before it was written, or a
    buffer reused too early, would show as a cosine far from 1. Raises when one is below 0.999."""
    import torch.nn.functional as F

    from featstore import FeatureStore
    from featstore.build.encode import encode_unit
    from featstore.build.plan import plan_units

    units = plan_units(root)[:: max(1, len(plan_units(root)) // n)][:n]
    worst = {"min_cosine": 1.0, "max_abs_err": 0.0, "units": len(units)}
    with FeatureStore(store) as fs:
        for unit in units:
            want, _ = encode_unit(encoder, root, unit)
            got = fs.get(unit.key).features
            cos = F.cosine_similarity(got.double().flatten(), want.double().flatten(), dim=0).item()
            worst["min_cosine"] = min(worst["min_cosine"], cos)
            worst["max_abs_err"] = max(worst["max_abs_err"], (got.float() - want.float()).abs().max().item())
    if worst["min_cosine"] < 0.999:
        raise RuntimeError(f"the build stored features that differ from a direct encoder call: {worst}")
    return worst


def _make_image(job) -> None:
    from PIL import Image

    root, i = job
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:480, 0:640].astype(np.float32)
    d = os.path.join(root, f"ep{i // 50:04d}")
    os.makedirs(d, exist_ok=True)
    f = rng.uniform(5, 40, 3)
    img = 0.5 + 0.5 * np.sin(np.stack([x / f[0], y / f[1], (x + y) / f[2]], -1) + i)
    img = (img * 255 + rng.normal(0, 8, img.shape)).clip(0, 255).astype(np.uint8)
    Image.fromarray(img).save(os.path.join(d, f"{i:05d}.jpg"), quality=90)


def make_images(root: str, n: int) -> None:
    """n generated 640x480 JPEGs (image i from seed i), on every core."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        pool.map(_make_image, [(root, i) for i in range(n)], chunksize=16)


def timed_build(opts, encoder=None) -> dict:
    """One build into a fresh store: its report, with frames/s over the pipeline and steady."""
    shutil.rmtree(opts.store, ignore_errors=True)
    report = build(opts, encoder=encoder).to_dict()
    report["frames_per_s"] = report["frames"] / report["pipeline_s"]
    return report


def disk_write_gbps(directory: str, total: int = 1 << 30) -> float:
    path = os.path.join(directory, "ddtest.bin")
    block = os.urandom(64 << 20)
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(total // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    dt = time.perf_counter() - t
    os.remove(path)
    return total / dt / 1e9


def bare_forward(encoder, n_frames: int, batch: int, sync) -> float:
    """Frames/s of the forward alone, at the size the build's images preprocess to."""
    size = encoder.spec.preprocess.target_size
    h = round(480 * size / 640 / 14) * 14
    x = torch.rand(batch, 1, 3, h, size, device=encoder.device)
    for _ in range(3):
        encoder.encode(x)
    sync()
    steps = max(1, n_frames // batch)
    t = time.perf_counter()
    for _ in range(steps):
        y = encoder.encode(x).to(torch.bfloat16)
    sync()
    del y
    return steps * batch / (time.perf_counter() - t)


def naive_build(encoder, root: str, out_dir: str, n: int) -> float:
    paths = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(root) for f in fs if f.endswith(".jpg"))[:n]
    os.makedirs(out_dir, exist_ok=True)
    t = time.perf_counter()
    for i, p in enumerate(paths):
        x = encoder.load_image(p)[None, None]
        feats = encoder.encode(x)[0].to(torch.bfloat16).cpu()
        torch.save(feats, os.path.join(out_dir, f"{i:05d}.vggt_cache.pt"))
    return len(paths) / (time.perf_counter() - t)


def rank_worker(args) -> None:
    """One rank of a multi-GPU build (launched by torchrun from `--multi-gpu`)."""
    opts = BuildOptions(data_root=args.images_dir, store=args.store,
                        encoder="vggt-tiny" if args.smoke else "vggt-1b-random", device="auto",
                        workers=args.workers, batch_frames=args.batch_frames, progress=False,
                        compile=args.compile)
    report = build(opts)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(args.result, "w") as f:
            json.dump(report.to_dict(), f)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def multi_gpu_build(args, root: str, work: str, ranks: int) -> dict:
    import subprocess

    store = os.path.join(work, f"store{ranks}.lmdb")
    result = os.path.join(work, f"result{ranks}.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           os.path.abspath(__file__), "--rank-worker", "--images-dir", root, "--store", store,
           "--result", result, "--workers", str(args.workers), "--batch-frames", str(args.batch_frames)] + (["--smoke"] if args.smoke else [])
    subprocess.run(cmd, check=True)
    with open(result) as f:
        report = json.load(f)
    shutil.rmtree(store, ignore_errors=True)
    return {"ranks": ranks, "frames": report["frames"], "pipeline_s": report["pipeline_s"],
            "frames_per_s": report["frames"] / report["pipeline_s"], "failed": len(report["failed"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--naive-images", type=int, default=200)
    ap.add_argument("--workdir", default=None, help="where images and stores go (default: a temp dir)")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--batch-frames", type=int, default=16)
    ap.add_argument("--compile", action="store_true", help="also measure bare forward and build with torch.compile'd blocks")
    ap.add_argument("--multi-gpu", type=int, default=0,
                    help="also build with 1 and N ranks (torchrun, eager encoder) and compare")
    ap.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--images-dir", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="CPU smoke test of this script: vggt-tiny, few images")
    args = ap.parse_args()
    if args.rank_worker:
        return rank_worker(args)
    device = "cpu" if args.smoke else "cuda"
    encoder_name = "vggt-tiny" if args.smoke else "vggt-1b-random"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    os.makedirs(args.out, exist_ok=True)
    work = args.workdir or tempfile.mkdtemp(prefix="featstore-bench-")
    root = os.path.join(work, "images")
    results: dict = {"card": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "date": time.strftime("%Y-%m-%d"),
                     "images": args.images, "torch": torch.__version__, "cpus": os.cpu_count()}
    t = time.perf_counter()
    make_images(root, args.images)
    results["make_images_s"] = time.perf_counter() - t
    results["disk_write_GBps"] = disk_write_gbps(work)

    from featstore.encoders import get_encoder

    encoder = get_encoder(encoder_name, device=device)
    results["bare_frames_per_s"] = bare_forward(encoder, 512 if device == "cuda" else 32, args.batch_frames, sync)
    results["naive_frames_per_s"] = naive_build(encoder, root, os.path.join(work, "naive"), args.naive_images)
    shutil.rmtree(os.path.join(work, "naive"), ignore_errors=True)

    store = os.path.join(work, "store.lmdb")
    opts = BuildOptions(data_root=root, store=store, encoder=encoder_name, device=device,
                        workers=args.workers, batch_frames=args.batch_frames, progress=False)
    import dataclasses

    # "after": frames cross from the workers as uint8 (the default); "before": float32 frames, as
    # builds did until 2026-12-02. Same images, card and encoder object, one after the other.
    # Model loading is excluded (the encoder is passed in) except in "model_load".
    after = timed_build(opts, encoder)
    results["featstore_build"] = after
    results["featstore_frames_per_s_end_to_end"] = after["frames_per_s"]
    results["stored_vs_direct"] = stored_vs_direct(encoder, root, store)
    before = timed_build(dataclasses.replace(opts, uint8_frames=False), encoder)
    results["featstore_build_float32_frames"] = before
    results["featstore_frames_per_s_second_run"] = before["frames_per_s"]
    shutil.rmtree(store)
    frame_bytes = after["bytes"] / max(after["frames"], 1)
    results["bytes_per_frame"] = frame_bytes
    disk_ceiling = results["disk_write_GBps"] * 1e9 / frame_bytes
    ceiling = min(results["bare_frames_per_s"], disk_ceiling)
    results["disk_ceiling_frames_per_s"] = disk_ceiling
    results["ceiling_frames_per_s"] = ceiling
    best = results["featstore_frames_per_s_end_to_end"]
    results["featstore_vs_ceiling"] = best / ceiling
    results["featstore_steady_vs_ceiling"] = after["steady_frames_per_s"] / ceiling
    results["featstore_float32_frames_vs_ceiling"] = before["frames_per_s"] / ceiling
    results["featstore_vs_naive"] = best / results["naive_frames_per_s"]
    results["featstore_vs_bare"] = best / results["bare_frames_per_s"]
    del encoder
    if device == "cuda":
        torch.cuda.empty_cache()
    # As `featstore build` runs: the model is built inside build(), the decode workers started
    # before it (their first units wait for the GPU loop instead of the other way round).
    results["featstore_build_model_load"] = timed_build(opts)
    if args.compile:
        encoder = get_encoder(encoder_name, device=device, compile=True)
        t = time.perf_counter()
        bare_forward(encoder, 64, args.batch_frames, sync)  # compile + warm-up, not timed below
        results["compile_warmup_s"] = time.perf_counter() - t
        results["bare_compiled_frames_per_s"] = bare_forward(encoder, 512 if device == "cuda" else 32,
                                                             args.batch_frames, sync)
        copts = dataclasses.replace(opts, compile=True)
        report3 = timed_build(copts, encoder)
        results["featstore_compiled_frames_per_s"] = report3["frames_per_s"]
        results["featstore_compiled_build"] = report3  # its stage times say which stage binds
        results["stored_vs_direct_compiled"] = stored_vs_direct(encoder, root, store)
        report4 = timed_build(dataclasses.replace(copts, uint8_frames=False), encoder)
        results["featstore_compiled_build_float32_frames"] = report4
        shutil.rmtree(store, ignore_errors=True)
        ceiling_c = min(results["bare_compiled_frames_per_s"], disk_ceiling)
        results["compiled_ceiling_frames_per_s"] = ceiling_c
        results["featstore_compiled_vs_ceiling"] = results["featstore_compiled_frames_per_s"] / ceiling_c
        results["featstore_compiled_steady_vs_ceiling"] = report3["steady_frames_per_s"] / ceiling_c
        results["featstore_compiled_float32_frames_vs_ceiling"] = report4["frames_per_s"] / ceiling_c
        results["featstore_compiled_float32_frames_steady_vs_ceiling"] = report4["steady_frames_per_s"] / ceiling_c
        results["featstore_compiled_vs_naive"] = results["featstore_compiled_frames_per_s"] / results["naive_frames_per_s"]
        del encoder
    if args.multi_gpu > 1:
        if device == "cuda":
            torch.cuda.empty_cache()
        one = multi_gpu_build(args, root, work, 1)
        many = multi_gpu_build(args, root, work, args.multi_gpu)
        results["multi_gpu"] = {"one": one, "many": many, "speedup": many["frames_per_s"] / one["frames_per_s"]}
    shutil.rmtree(work, ignore_errors=True)

    with open(os.path.join(args.out, "build_bench.json"), "w") as f:
        json.dump(results, f, indent=2)
    lines = [f"Build throughput, {results['card']}, {results['date']}, {args.images} images 640x480 -> 518x392, "
             f"VGGT-1B config (random weights), layer 22, bf16 storage ({frame_bytes / 1e6:.2f} MB/frame)", "",
             "| what | frames/s | vs ceiling |", "|---|---|---|"]
    results["featstore_steady_frames_per_s"] = results["featstore_build"]["steady_frames_per_s"]
    for name, key in (("bare forward (a)", "bare_frames_per_s"),
                      ("featstore build, end to end (b)", "featstore_frames_per_s_end_to_end"),
                      ("featstore build, steady: first commit to last (b)", "featstore_steady_frames_per_s"),
                      ("featstore build, float32 frames (before)", "featstore_frames_per_s_second_run"),
                      ("naive sequential (c)", "naive_frames_per_s"),
                      ("disk ceiling (d)", "disk_ceiling_frames_per_s")):
        lines.append(f"| {name} | {results[key]:.1f} | {results[key] / ceiling:.2f} |")
    lines.append("")
    lines.append(f"disk write {results['disk_write_GBps']:.2f} GB/s; featstore/naive = {results['featstore_vs_naive']:.2f}x; "
                 f"featstore/bare = {results['featstore_vs_bare']:.2f}")
    m = results["featstore_build_model_load"]
    lines.append(f"build with the model loaded inside (workers decode meanwhile): {m['frames_per_s']:.1f} frames/s over "
                 f"the pipeline, decode wait {m['decode_wait_s']:.2f} s (encoder passed in: "
                 f"{results['featstore_build']['decode_wait_s']:.2f} s)")
    if "bare_compiled_frames_per_s" in results:
        c, c0 = results["featstore_compiled_build"], results["featstore_compiled_build_float32_frames"]
        lines.append(f"compiled build: steady {c['steady_frames_per_s']:.1f} frames/s = "
                     f"{results['featstore_compiled_steady_vs_ceiling']:.2f} of min(bare compiled, disk); float32 frames "
                     f"(before): {c0['frames_per_s']:.1f} end to end, {c0['steady_frames_per_s']:.1f} steady")
        lines.append(f"torch.compile'd blocks: bare {results['bare_compiled_frames_per_s']:.1f} frames/s, featstore build "
                     f"{results['featstore_compiled_frames_per_s']:.1f} frames/s = {results['featstore_compiled_vs_ceiling']:.2f} "
                     f"of min(bare, disk) and {results['featstore_compiled_vs_naive']:.2f}x naive "
                     f"(compile + warm-up {results['compile_warmup_s']:.0f} s, not counted)")
    if "multi_gpu" in results:
        m = results["multi_gpu"]
        lines.append(f"torchrun, same images: 1 rank {m['one']['frames_per_s']:.1f} frames/s, "
                     f"{m['many']['ranks']} ranks {m['many']['frames_per_s']:.1f} frames/s "
                     f"(x{m['speedup']:.2f}); all ranks commit into one LMDB")
    with open(os.path.join(args.out, "build_bench.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
