"""`featstore verify --recompute` on a GPU with the VGGT-1B architecture: does a store built
under bf16 autocast agree with a fresh encoder call within the verify thresholds?

Builds a small store on the GPU (generated 640x480 JPEGs -> 518x392, random VGGT-1B weights, bf16
autocast, bf16 storage), then re-encodes N units with a new encoder object on the GPU, and a few
on the CPU in fp32 (a different device and precision: the case verify's tolerances are for).

    python benchmarks/recompute_check.py --out $OUT [--images 24] [--recompute 12] [--recompute-cpu 2]
"""

import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _vggt_random  # noqa: E402  (registers vggt-1b-random)
from build_bench import make_images  # noqa: E402

from featstore.build.runner import BuildOptions, build  # noqa: E402
from featstore.ops.verify import verify_store  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--recompute", type=int, default=12)
    ap.add_argument("--recompute-cpu", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="CPU-only check of this script (vggt-tiny)")
    args = ap.parse_args()
    gpu = "cpu" if args.smoke else "cuda"
    name = "vggt-tiny" if args.smoke else _vggt_random.NAME
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="featstore-recompute-")
    root = os.path.join(work, "images")
    make_images(root, args.images)
    report = build(BuildOptions(data_root=root, encoder=name, device=gpu, workers=4, progress=False))
    result = {"card": torch.cuda.get_device_name(0) if gpu == "cuda" else "cpu", "built": report.computed}
    for device, n in (("cuda", args.recompute), ("cpu", args.recompute_cpu)):
        checked = verify_store(root, recompute=n, seed=0, device=gpu if device == "cuda" else "cpu")
        result[device] = {"verify_exit": checked.exit_code, "problems": [str(p) for p in checked.problems][:20],
                          "recomputed": checked.recomputed, "notes": checked.notes}
    with open(os.path.join(args.out, "recompute_check.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    for device in ("cuda", "cpu"):
        r = result[device]
        print(device, "verify exit", r["verify_exit"], r["problems"], r["notes"])
        for row in r["recomputed"]:
            print(" ", {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})


if __name__ == "__main__":
    main()
