"""Where a `qwen2.5-vl-vision` build's time goes, against its bare forward (one GPU run).

    python benchmarks/vision_build_probe.py [--out DIR] [--images 768] [--steps "a b ..."] [--spy] [--smoke]

benchmarks/vision_build_bench.py says how far the build falls short of its bare forward; this
says why. Side by side, on the same JPEGs (504x392) and random-weight checkpoint (the
Qwen2.5-VL-3B vision tower), with one-call attention:

  bare_c16 / bare_e16     the encoder alone on 16 images already on the GPU, compiled blocks /
                          eager (vision_build_bench.bare_forward): host_ms (host time until
                          `encode` returns: what the host spends launching), batch_ms (with the
                          GPU's work), frames_per_s; on a GPU also pipelined_frames_per_s
                          (calls back to back, one sync at the end) and host_syncs_per_call
  bare_c16_graphs         bare_c16 with the blocks compiled in torch.compile's "reduce-overhead"
                          mode (CUDA graphs: a block's kernels replayed by one launch), and its
                          max_rel_diff_vs_eager: whether CUDA graphs would take the launching
                          off the compiled build's main thread. A failure is recorded as the
                          step's {"error": ...}; the steps after it still run
  build_<c|e>16_w<N>_pin  the build (in a child process, through featstore.build.runner.build),
                          compiled (c) or eager (e), 16 frames a forward, N decode workers, the
                          loader's pin-memory thread receiving the units (the default on CUDA)
  ..._nopin               the same with BuildOptions(pin_frames=False): the GPU loop's thread
                          receives every unit from the workers itself (the build before)
  same_pin_vs_nopin       the two compiled stores compared entry by entry
                          (frame_reuse_bench.compare_stores: bit-identical count, largest
                          relative difference, lowest cosine, all within the tolerance)
  same_e16_pin_vs_nopin   the same for the two eager stores

Each build reports its steady frames/s and stage times. `--spy` also records the compiled
pinned build with py-spy (carry its wheel; `py-spy` on PATH or in $SITE/bin), all threads and
the decode workers, as collapsed stacks in DIR/spy_<build>.txt: which thread is busy with what.
Writes DIR/vision_build_probe.json after every step (DIR: --out, else $OUT, else ./bench_out).

`--smoke`: the tiny tower on CPU, a few images, the eager steps only (compiling takes minutes
on a CPU; the loader pins only for a CUDA build, so there both builds take the same path and
their stores must be bit-identical): checks the script runs (tests/test_vision_attention.py);
its timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from featstore.encoders import feature_set_of, preprocess_frame, resolve_spec  # noqa: E402
from featstore.encoders.qwen_vision.config import TINY_VISION_CONFIG  # noqa: E402
from _results import write_report  # noqa: E402
from frame_reuse_bench import compare_stores  # noqa: E402
from vision_build_bench import QWEN25_VL_3B_VISION, bare_forward, write_checkpoint, write_images  # noqa: E402

STAGES = ("frames", "pipeline_s", "steady_frames_per_s", "decode_wait_s", "encode_s", "d2h_wait_s", "serialise_s",
          "commit_s")


def bare(ckpt: Path, data: Path, device: str, batch: int, compiled: bool, iters: int,
         compile_mode: str | None = None) -> dict:
    """`vision_build_bench.bare_forward` on `batch` of the images, already on the device.

    With `compile_mode` (the blocks compiled in that torch.compile mode), the features are also
    compared with the eager one-call forward's on the same images (max_rel_diff_vs_eager: the
    largest difference over the largest magnitude)."""
    spec = resolve_spec("qwen2.5-vl-vision", weights=str(ckpt))  # no model: the images as the build reads them
    images = [preprocess_frame(str(data / f"img_{i:05d}.jpg"), spec, int(spec.config["patch_size"]))
              for i in range(batch)]
    variant = "one_call_compiled" if compiled else "one_call"
    numbers, feats = bare_forward(ckpt, variant, device, images, warmup=3, iters=iters, inputs_on_device=True,
                                  compile_mode=compile_mode)
    if compile_mode is not None:
        eager = bare_forward(ckpt, "one_call", device, images, warmup=0, iters=1, inputs_on_device=True)[1]
        numbers["max_rel_diff_vs_eager"] = float((feats - eager).abs().max() / eager.abs().max().clamp_min(1e-12))
    return numbers


def build(options: dict, spy: Path | None = None) -> dict:
    """One build in a child process (`--child`), as `featstore build` runs it; its report."""
    shutil.rmtree(options["store"], ignore_errors=True)
    cmd = [sys.executable, __file__, "--child", json.dumps(options)]
    if spy is not None:
        exe = shutil.which("py-spy") or os.path.join(os.environ.get("SITE", "/tmp/site"), "bin", "py-spy")
        cmd = [exe, "record", "-r", "250", "--threads", "--idle", "--nonblocking", "--subprocesses",
               "--format", "raw", "-o", str(spy), "--"] + cmd
    start = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if run.returncode:
        raise RuntimeError(f"build failed with exit {run.returncode}: {run.stderr[-2000:]}")
    report = json.loads(run.stdout.strip().splitlines()[-1])  # the child prints the report last
    return {"wall_s": time.perf_counter() - start, **{k: report.get(k) for k in STAGES}}


def main(argv=None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--child":
        from featstore.build.runner import BuildOptions
        from featstore.build.runner import build as run

        print(json.dumps(run(BuildOptions(**json.loads(sys.argv[2]))).to_dict()))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="output folder (default $OUT, else ./bench_out)")
    p.add_argument("--images", type=int, default=768, help="JPEGs of 504x392 each build encodes (default 768)")
    p.add_argument("--steps", default="", help="run only these steps (names as in the docstring, space-separated)")
    p.add_argument("--spy", action="store_true", help="record the compiled pinned build with py-spy")
    p.add_argument("--smoke", action="store_true", help="tiny tower on CPU, eager steps only (tests)")
    a = p.parse_args(argv)
    if a.smoke:
        device, config, count, size, batch, iters = "cpu", TINY_VISION_CONFIG, 6, (56, 56), 2, 2
    else:
        if not torch.cuda.is_available():
            p.error("needs a CUDA GPU; pass --smoke for the CPU check")
        device, config, count, size, batch, iters = "cuda", QWEN25_VL_3B_VISION, a.images, (504, 392), 16, 8

    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "smoke": a.smoke, "images": count, "image_size": list(size), "batch_frames": batch,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "data"
        write_images(data, count, *size)
        ckpt = write_checkpoint(work / "qwen_vision_ckpt", config)
        storage = resolve_spec("qwen2.5-vl-vision", weights=str(ckpt)).storage_dtype
        feature_set = feature_set_of("qwen2.5-vl-vision")

        def store(tag):
            return str(work / f"store_{tag}.lmdb")

        def build_step(tag, workers, compiled, pin, spy=False):
            options = dict(data_root=str(data), store=store(tag), encoder="qwen2.5-vl-vision", weights=str(ckpt),
                           vision_attention="one_call", device=device, batch_frames=batch, workers=workers,
                           progress=False, compile=compiled, pin_frames=pin)
            return lambda: build(options, Path(a.out or os.environ.get("OUT") or "bench_out") / f"spy_{tag}.txt"
                                 if spy else None)

        steps = [("bare_c16", lambda: bare(ckpt, data, device, batch, True, iters)),
                 ("build_c16_w4_pin", build_step("c16_w4_pin", 4, True, True, spy=a.spy)),
                 ("build_c16_w4_nopin", build_step("c16_w4_nopin", 4, True, False)),
                 ("same_pin_vs_nopin",
                  lambda: compare_stores(store("c16_w4_pin"), store("c16_w4_nopin"), storage, feature_set)),
                 ("bare_e16", lambda: bare(ckpt, data, device, batch, False, iters)),
                 ("build_e16_w4_pin", build_step("e16_w4_pin", 4, False, True)),
                 ("build_c16_w8_pin", build_step("c16_w8_pin", 8, True, True)),
                 ("build_e16_w4_nopin", build_step("e16_w4_nopin", 4, False, False)),
                 ("same_e16_pin_vs_nopin",
                  lambda: compare_stores(store("e16_w4_pin"), store("e16_w4_nopin"), storage, feature_set)),
                 ("bare_c16_graphs", lambda: bare(ckpt, data, device, batch, True, iters, compile_mode="reduce-overhead"))]
        only = set(a.steps.split()) or {name for name, _ in steps}
        if a.smoke:  # compiling on CPU takes minutes: one bare forward, the eager builds and their comparison
            only = {"bare_e16", "build_e16_w4_pin", "build_e16_w4_nopin", "same_e16_pin_vs_nopin"}
        for name, step in steps:
            if name not in only:
                continue
            t = time.perf_counter()
            try:
                report[name] = step()
            except Exception as e:  # a probe: record it, and go on with the other steps
                report[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            print(name, f"{time.perf_counter() - t:.1f} s", json.dumps(report[name]), flush=True)
            write_report(a.out, "vision_build_probe.json", report)
        for tag in ("c16_w4", "c16_w8", "e16_w4"):
            if f"build_{tag}_pin" in report and f"bare_{tag[:3]}" in report:
                report[f"build_{tag}_pin"]["of_bare"] = (report[f"build_{tag}_pin"]["steady_frames_per_s"] or 0) / \
                    report[f"bare_{tag[:3]}"]["frames_per_s"]
    write_report(a.out, "vision_build_probe.json", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
