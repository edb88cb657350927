"""What one build decode worker spends on a frame: float32 then the uint8 check, vs uint8 at the source.

    python benchmarks/decode_bench.py [--out DIR] [--images 40] [--repeats 3] [--smoke]

The build's decode workers (featstore.build.frames.UnitDataset) hand frames to the GPU loop as
uint8. They used to decode each frame to float32 and then check that every value is exactly
k/255 before converting (`exact_uint8`: four passes over the frame); the readers now return the
uint8 values themselves where that is exact (`preprocess_image(..., uint8=True)`). Side by side,
one thread as in a worker, on the same generated JPEGs (smooth colour fields, 640x480 and
504x392), for the VGGT view and the Qwen image (both at target size 518):

  float_then_check   read_unit_frames(...) then exact_uint8 (the worker before)
  uint8_at_source    UnitDataset(...)[i] (the worker now)

Both must give the same uint8 frames (checked). Reports the best of `--repeats` passes, in ms a
frame, and the ratio. Writes DIR/decode_bench.json (DIR: --out, else $OUT, else ./bench_out).
`--smoke`: 4 images, one pass (tests); its timings mean little.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _results import write_report  # noqa: E402
from featstore.build.encode import read_unit_frames  # noqa: E402
from featstore.build.frames import UnitDataset, exact_uint8  # noqa: E402
from featstore.build.plan import plan_units  # noqa: E402
from featstore.encoders import resolve_spec  # noqa: E402
from vision_build_bench import write_images  # noqa: E402  (smooth colour fields, as photos compress)

ENCODERS = ("vggt-tiny", "qwen2.5-vl-vision-tiny")  # the preprocessing is the full-size presets'
SIZES = ((640, 480), (504, 392))


def time_per_frame(fn, units, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for unit in units:
            fn(unit)
        best = min(best, (time.perf_counter() - start) / len(units))
    return 1e3 * best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="output folder (default $OUT, else ./bench_out)")
    p.add_argument("--images", type=int, default=40, help="JPEGs of each size (default 40)")
    p.add_argument("--repeats", type=int, default=3, help="passes over them; the best counts (default 3)")
    p.add_argument("--smoke", action="store_true", help="4 images, one pass (tests)")
    a = p.parse_args(argv)
    count, repeats = (4, 1) if a.smoke else (a.images, a.repeats)
    torch.set_num_threads(1)  # as in a DataLoader worker
    report = {"smoke": a.smoke, "images": count, "date": time.strftime("%Y-%m-%d", time.gmtime()), "ms_per_frame": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for width, height in SIZES:
            root = Path(tmp) / f"{width}x{height}"
            write_images(root, count, width, height)
            units = plan_units(str(root))
            for name in ENCODERS:
                spec = resolve_spec(name, target_size=518)
                dataset = UnitDataset(units, str(root), spec, 14, True)
                index = {unit.key: i for i, unit in enumerate(units)}

                def before(unit):
                    return exact_uint8(read_unit_frames(str(root), unit, spec, 14)[0])

                def after(unit):
                    return dataset[index[unit.key]][1]

                for unit in units[:2]:  # the same frames both ways; also warms the file cache
                    old, new = before(unit), after(unit)
                    if not (old.dtype == new.dtype == torch.uint8 and torch.equal(old, new)):
                        raise AssertionError(f"{name} {unit.key}: the two readers disagree")
                row = {"float_then_check": time_per_frame(before, units, repeats),
                       "uint8_at_source": time_per_frame(after, units, repeats)}
                row["speedup"] = row["float_then_check"] / row["uint8_at_source"]
                report["ms_per_frame"][f"{name.removesuffix('-tiny')} {width}x{height}"] = row
                print(f"{name} {width}x{height}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
    write_report(a.out, "decode_bench.json", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
