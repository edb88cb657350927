"""Video decode cost per frame on CPU: a frame out of an .mp4 (PyAV, `featstore.encoders.video`)
against a JPEG of the same size (PIL, the image path), and what a unit pays end to end.

Three videos of the same content (a moving gradient with noise, so that the codec has work),
H.264 at --size, --fps, --seconds; their frames also written as JPEGs (quality 90). Timed, best
of --rounds, one thread (as one decode worker is):

  jpeg        PIL open + load + RGB of one JPEG frame                        per frame
  mp4 all     decode every frame of the video forward (to_image RGB)        per frame
  mp4 unit    `decode_video_frames` of the VG-LLM policy's indices           per CHOSEN frame
              (every frame up to the last index is decoded: the exact-index rule)
  probe       `probe_video` (open, header: frame count and fps)              per video

Usage:
    python benchmarks/video_decode_bench.py --out OUT_DIR     # ~1 min on 2 cores
Writes OUT_DIR/video_decode_bench.json and prints a table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time

import numpy as np


def _frames(n: int, w: int, h: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        base = ((xx + 3 * i) % 256 + (yy * 2 + i) % 256) // 2
        rgb = np.stack([base, (base + 85) % 256, (255 - base)], -1).astype(np.int16)
        rgb += rng.integers(-12, 13, rgb.shape)
        yield np.clip(rgb, 0, 255).astype(np.uint8)


def _write(path: str, n: int, w: int, h: int, fps: int, codec: str) -> None:
    import av

    with av.open(path, "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for rgb in _frames(n, w, h):
            for p in s.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _best(fn, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--codec", default="libx264")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import av
    import torch
    from PIL import Image

    from featstore.build.video import parse_video_policy
    from featstore.encoders.video import decode_video_frames, probe_video

    torch.set_num_threads(1)
    w, h = (int(x) for x in args.size.split("x"))
    n = args.fps * args.seconds
    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "clip.mp4")
    _write(path, n, w, h, args.fps, args.codec)
    jpegs = []
    for rgb in _frames(8, w, h):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())

    def jpeg():
        for data in jpegs:
            Image.open(io.BytesIO(data)).convert("RGB")

    def decode_all():
        with av.open(path) as c:
            s = c.streams.video[0]
            s.thread_type = "AUTO"
            for f in c.decode(s):
                f.to_image()

    info = probe_video(path)
    results = {"size": args.size, "fps": args.fps, "seconds": args.seconds, "codec": args.codec,
               "frames": info.frames, "mp4_bytes": os.path.getsize(path),
               "jpeg_bytes_mean": int(np.mean([len(j) for j in jpegs])), "av": av.__version__,
               "threads": os.cpu_count()}
    results["jpeg_ms_per_frame"] = 1e3 * _best(jpeg, args.rounds) / len(jpegs)
    results["mp4_all_ms_per_frame"] = 1e3 * _best(decode_all, args.rounds) / n
    results["probe_ms"] = 1e3 * _best(lambda: probe_video(path), args.rounds)
    for name in ("vgllm:2:4:8", "linspace:16", "linspace:32"):
        idx = parse_video_policy(name).indices(info.frames, info.fps)
        t = _best(lambda: decode_video_frames(path, idx), args.rounds)
        results[f"unit {name}"] = {"chosen": len(idx), "ms_per_unit": 1e3 * t, "ms_per_chosen_frame": 1e3 * t / len(idx)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "video_decode_bench.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
