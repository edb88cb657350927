"""The `qwen2.5-vl-vision` build against its own bare forward, stock vs one-call vision attention.

    python benchmarks/vision_build_bench.py [--out DIR] [--images 576] [--batch-frames 16] [--compile]
                                            [--skip-stock] [--smoke]

One run, side by side, on the same images and the same random-weight checkpoint (the Qwen2.5-VL-3B
vision tower, written in the official `visual.*` layout with its config.json):
  build/<attention>   `featstore build --encoder qwen2.5-vl-vision --vision-attention <attention>`
                      as a subprocess on `--images` JPEGs of 504x392 (a fresh store each); its
                      report's steady frames/s (first commit to last), wall time and stage
                      times (decode wait, encode, device-to-host wait, serialise, commit)
  bare/<attention>    the encoder alone (`get_encoder(..., vision_attention=...)`): `encode` on
                      `--batch-frames` decoded images already in memory, median of `--iters` calls
                      after warm-up (host_ms: the host's part, until `encode` returns): the
                      ceiling the build's pipeline can reach; also the
                      same calls back to back with one sync at the end (pipelined_frames_per_s)
                      and how often one call makes the host wait for the GPU (host_syncs_per_call)
With `--compile` also one_call_compiled: one_call with the tower's blocks compiled (`build
--compile`; the bare forward's warm-up and the build's first batches pay the compile). Then the
largest relative difference (max |diff| / max |stock|) of each variant's bare features from stock. Writes DIR/vision_build_bench.json (DIR: --out, else $OUT, else ./bench_out).

`--smoke`: the tiny tower on CPU, a few small images, one call: checks the script runs
(tests/test_vision_attention.py); its timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from featstore.encoders import get_encoder  # noqa: E402
from featstore.encoders.qwen_vision.config import TINY_VISION_CONFIG  # noqa: E402
from featstore.encoders.qwen_vision.encoder import build_vision_tower, init_random_  # noqa: E402

# The same tower as benchmarks/vision_attention_bench.py (Qwen/Qwen2.5-VL-3B-Instruct's vision_config).
sys.path.insert(0, str(ROOT / "benchmarks"))
from _results import write_report  # noqa: E402
from vision_attention_bench import QWEN25_VL_3B_VISION  # noqa: E402

ATTENTIONS = ("stock", "one_call")


def write_images(folder: Path, count: int, width: int, height: int) -> None:
    """`count` JPEGs: smooth random colour fields (they compress like photos, unlike noise)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        small = rng.integers(0, 256, (height // 28, width // 28, 3), dtype=np.uint8)
        Image.fromarray(small).resize((width, height), Image.BILINEAR).save(folder / f"img_{i:05d}.jpg", quality=90)


def write_checkpoint(folder: Path, vision_config: dict) -> Path:
    """A random-weight tower in the official layout: model.safetensors (`visual.*`) + config.json."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tower = init_random_(build_vision_tower(vision_config), seed=0)
    state = {"visual." + k: v.contiguous() for k, v in tower.state_dict().items() if not k.startswith("merger.")}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl", "vision_config": vision_config}))
    return folder


def run_build(data: Path, store: Path, ckpt: Path, variant: str, device: str, batch_frames: int) -> dict:
    attention, compiled = variant.removesuffix("_compiled"), variant.endswith("_compiled")
    cmd = [sys.executable, "-m", "featstore", "build", "--data-root", str(data), "--store", str(store),
           "--encoder", "qwen2.5-vl-vision", "--weights", str(ckpt), "--vision-attention", attention,
           "--device", device, "--batch-frames", str(batch_frames), "--no-progress", "--json"]
    cmd += ["--compile"] if compiled else []
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if res.returncode != 0:
        raise RuntimeError(f"build ({attention}) failed with exit {res.returncode}: {res.stderr[-2000:]}")
    report = json.loads(res.stdout)  # --json prints the build report alone on stdout
    # The stage times say which stage binds when the build falls short of the bare forward.
    stages = ("decode_wait_s", "encode_s", "d2h_wait_s", "serialise_s", "commit_s")
    return {"wall_s": wall, "frames": report["frames"], "elapsed_s": report["elapsed_s"],
            "pipeline_s": report["pipeline_s"], "steady_frames_per_s": report["steady_frames_per_s"],
            "frames_per_s_pipeline": report["frames"] / report["pipeline_s"] if report["pipeline_s"] else None,
            **{k: report.get(k) for k in stages}}


def bare_forward(ckpt: Path, variant: str, device: str, images: list, warmup: int, iters: int,
                 inputs_on_device: bool = False, compile_mode: str | None = None):
    """The encoder alone on `images`: median call time with the GPU's work (batch_ms,
    frames_per_s) and the host's time until `encode` returns (host_ms: what launching costs).
    `inputs_on_device`: the images sit on the device already (else in host memory, the copy
    counted). `compile_mode`: a "_compiled" variant's blocks compiled with this torch.compile
    mode (e.g. "reduce-overhead": CUDA graphs) instead of the encoder's own --compile.
    Returns (those numbers, the features of the first call)."""
    attention, compiled = variant.removesuffix("_compiled"), variant.endswith("_compiled")
    encoder = get_encoder("qwen2.5-vl-vision", weights=str(ckpt), device=device, vision_attention=attention,
                          **({"compile": True} if compiled and compile_mode is None else {}))
    if compiled and compile_mode is not None:
        from featstore.encoders.qwen_vision.encoder import compile_tower_blocks

        compile_tower_blocks(encoder.model, mode=compile_mode)
    frames = torch.stack(images).unsqueeze(0)  # [1, B, 3, H, W], as the build batches them
    if inputs_on_device:
        frames = frames.to(device)

    def once():
        t = time.perf_counter()
        out = encoder.encode(frames)
        host = time.perf_counter() - t
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out, host, time.perf_counter() - t

    result = once()[0]
    for _ in range(warmup):
        once()
    hosts, times = zip(*(once()[1:] for _ in range(iters)))
    seconds = statistics.median(times)
    out = {"batch_ms": 1e3 * seconds, "frames_per_s": len(images) / seconds, "host_ms": 1e3 * statistics.median(hosts)}
    if device.startswith("cuda"):
        # Back to back, one sync at the end: what a pipeline that never waits could reach.
        t = time.perf_counter()
        for _ in range(iters):
            encoder.encode(frames)
        torch.cuda.synchronize()
        out["pipelined_frames_per_s"] = iters * len(images) / (time.perf_counter() - t)
        out["host_syncs_per_call"] = count_host_syncs(lambda: encoder.encode(frames))
    del encoder
    return out, result


def count_host_syncs(call) -> int:
    """How many times `call` makes the host wait for the GPU (torch's sync debug mode warns at
    each synchronising call: .item(), .tolist(), a blocking copy)."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message) for w in caught)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="output folder (default $OUT, else ./bench_out)")
    p.add_argument("--images", type=int, default=576, help="JPEGs of 504x392 the builds encode (default 576)")
    p.add_argument("--batch-frames", type=int, default=16, help="frames per forward, build and bare (default 16)")
    p.add_argument("--iters", type=int, default=10, help="timed bare forwards (default 10)")
    p.add_argument("--work", help="where images, checkpoint and stores go (default: a temporary folder)")
    p.add_argument("--compile", action="store_true", help="also one_call with the blocks compiled (build --compile)")
    p.add_argument("--skip-stock", action="store_true", help="leave out the stock variant (a shorter run)")
    p.add_argument("--smoke", action="store_true", help="tiny tower on CPU, a few small images (tests)")
    a = p.parse_args(argv)
    variants = ATTENTIONS + (("one_call_compiled",) if a.compile else ())
    if a.skip_stock:
        variants = variants[1:]
    if a.smoke:
        device, config, count, size, warmup, iters = "cpu", TINY_VISION_CONFIG, 4, (56, 56), 0, 1
        a.batch_frames = 2
    else:
        if not torch.cuda.is_available():
            p.error("needs a CUDA GPU; pass --smoke for the CPU check")
        device, config, count, size, warmup, iters = "cuda", QWEN25_VL_3B_VISION, a.images, (504, 392), 2, a.iters

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        data = work / "data"
        write_images(data, count, *size)
        ckpt = write_checkpoint(work / "qwen_vision_ckpt", config)
        report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                  "smoke": a.smoke, "images": count, "image_size": list(size), "batch_frames": a.batch_frames,
                  "date": time.strftime("%Y-%m-%d", time.gmtime()), "build": {}, "bare": {}}
        encoder = get_encoder("qwen2.5-vl-vision", weights=str(ckpt))
        batch = [encoder.load_image(data / f"img_{i:05d}.jpg") for i in range(min(a.batch_frames, count))]
        del encoder
        results = {}
        for variant in variants:
            report["bare"][variant], results[variant] = bare_forward(ckpt, variant, device, batch, warmup, iters)
            print("bare", variant, json.dumps(report["bare"][variant]), flush=True)
        for variant in variants:
            report["build"][variant] = run_build(data, work / f"store_{variant}", ckpt, variant, device,
                                                 a.batch_frames)
            print("build", variant, json.dumps(report["build"][variant]), flush=True)
        if "stock" in results:
            stock = results["stock"].float()
            for variant in variants[1:]:
                report[f"bare_max_rel_diff_{variant}_vs_stock"] = float(
                    (results[variant].float() - stock).abs().max() / stock.abs().max())
        for attention in variants:
            steady, bare = report["build"][attention]["steady_frames_per_s"], report["bare"][attention]["frames_per_s"]
            report["build"][attention]["of_bare_forward"] = steady / bare if steady else None

    write_report(a.out, "vision_build_bench.json", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
