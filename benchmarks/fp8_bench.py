"""fp8 storage benchmark: fidelity against the bf16 entry, bytes on disk, warm read throughput.

Features of VGGT-1B's shape, one frame of a 4:3 image at 518 px: [1, 37*28 = 1036 tokens, 2048].
Two sources, both compared with the same values stored in bf16:

  vggt-arch   the VGGT-1B aggregator's real architecture (embed 1024, 16 heads, qk-norm, RoPE,
              frame + global attention) with seeded random weights at reduced depth (--depth,
              default 2; conv patch embed instead of the 24-block DINOv2 ViT-L, which dominates
              the CPU time), run on a sample_data photo; the stored layer's output, 2048 channels.
  realistic   synthetic features with the statistics ViT activations are known for:
              * per-channel scales log-normal (sigma 1: channel std spans ~50x, 2-98%), since
                LayerNorm'd residual streams have very unequal channel magnitudes;
              * 4 "massive activation" channels 60-100x the median channel, present in every
                token (Sun et al. 2024, "Massive Activations in LLMs"; Darcet et al. 2024,
                "Vision Transformers Need Registers", also seen in DINOv2, VGGT's backbone);
              * heavy-tailed values within a channel (Student-t, 4 degrees of freedom);
              * per-token norms log-normal (sigma 0.5) and 1% high-norm outlier tokens at 10x
                (the register-like tokens of the same papers).

Per source: relative error (max |fp8 - bf16| / max |bf16|), relative RMS error, cosine over the
whole entry and the worst per-token cosine. Then both stores (bf16 and fp8) are written with
--entries such entries and read warm with `read_into` in batches (entries/s, GB/s of bf16
output), same run, alternating rounds; bytes on disk are the manifests' value bytes and data.mdb.

Usage:
    python benchmarks/fp8_bench.py --out OUT_DIR            # ~1 min on 2 cores
Writes OUT_DIR/fp8_bench.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from featstore import FeatureStore, StoreWriter  # noqa: E402
from featstore.encoders import VGGTPreset, get_encoder, register_encoder, resolve_spec  # noqa: E402
from featstore.encoders.vggt.config import VGGT_1B_CONFIG  # noqa: E402
from featstore.format.fp8 import dequantize, quantize_fp8  # noqa: E402

TOKENS, CHANNELS = 37 * 28, 2048
SHAPE = (1, TOKENS, CHANNELS)


def realistic(seed: int) -> torch.Tensor:
    """One entry of ViT-like features (module docstring says what and why), bf16."""
    g = torch.Generator().manual_seed(seed)
    channel_scale = torch.exp(torch.randn(CHANNELS, generator=g))  # log-normal, sigma 1
    massive = torch.randperm(CHANNELS, generator=g)[:4]
    channel_scale[massive] = channel_scale.median() * torch.empty(4).uniform_(60, 100, generator=g)
    t = torch.distributions.StudentT(4.0)
    torch.manual_seed(seed)
    x = t.sample(SHAPE) * channel_scale
    token_scale = torch.exp(0.5 * torch.randn(1, TOKENS, 1, generator=g))
    outliers = torch.rand(1, TOKENS, 1, generator=g) < 0.01
    x = x * token_scale * torch.where(outliers, 10.0, 1.0)
    return x.to(torch.bfloat16)


def vggt_arch(depth: int) -> torch.Tensor:
    """The VGGT-1B architecture at `depth` with random weights on a sample photo, bf16 [1, 1036, 2048]."""
    from featstore.build.encode import read_unit_frames
    from featstore.build.plan import Unit

    name = f"vggt-1b-arch-depth{depth}"
    config = dict(VGGT_1B_CONFIG, depth=depth, patch_embed="conv")
    preset = VGGTPreset(name, config, default_target=518, random_seed=0)
    register_encoder(name, preset.build, spec=preset.spec, overwrite=True)
    enc = get_encoder(name, layer=-1)
    root = os.path.join(REPO, "sample_data")
    frames, _ = read_unit_frames(root, Unit("scene_a/000.jpg", ("scene_a/000.jpg",)), enc.spec, enc.patch_size)
    with torch.no_grad():
        feats = enc.encode(frames[None])[0]
    assert tuple(feats.shape) == SHAPE, feats.shape
    return feats.to(torch.bfloat16)


def fidelity(ref: torch.Tensor) -> dict:
    """fp8 round trip of `ref` (bf16) against `ref`."""
    q, scale = quantize_fp8(ref)
    got = dequantize(q, scale, torch.bfloat16).double()
    a = ref.double()
    err = (got - a)
    per_token = torch.nn.functional.cosine_similarity(got.reshape(-1, CHANNELS), a.reshape(-1, CHANNELS), dim=1)
    return {"rel_error": float(err.abs().max() / a.abs().max()),
            "rel_rms_error": float(err.norm() / a.norm()),
            "cosine": float((got.flatten() @ a.flatten()) / (got.norm() * a.norm())),
            "min_token_cosine": float(per_token.min()),
            "max_abs": float(a.abs().max()), "median_abs": float(a.abs().median())}


def write_store(path: str, storage_dtype: str, entries: list[torch.Tensor]) -> dict:
    spec = resolve_spec("vggt-tiny", storage_dtype=storage_dtype)  # only the dtype matters here
    with StoreWriter(path, spec=spec, handle_signals=False) as w:
        for i, e in enumerate(entries):
            w.put(f"e/{i:05d}", {"features": e}, {"frames": json.dumps([f"e/{i:05d}"])})
        w.finish(report={})
    with FeatureStore(path) as s:
        m = s.manifest
    return {"value_bytes": m["bytes"], "value_bytes_per_entry": m["bytes"] / len(entries),
            "data_mdb_bytes": os.path.getsize(os.path.join(path, "data.mdb"))}


def read_rate(path: str, n: int, batch: int, seconds: float) -> dict:
    keys = [f"e/{i:05d}" for i in range(n)]
    out = torch.empty((batch, *SHAPE), dtype=torch.bfloat16)
    with FeatureStore(path) as store:
        for i in range(0, n, batch):  # warm: every page read once
            store.read_into(keys[i:i + batch][:batch] if n - i >= batch else keys[:batch], out)
        g = torch.Generator().manual_seed(0)
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            idx = torch.randint(0, n, (batch,), generator=g).tolist()
            store.read_into([keys[i] for i in idx], out)
            done += batch
        elapsed = time.perf_counter() - t0
    return {"entries_per_s": done / elapsed, "out_gb_per_s": done * out[0].numel() * 2 / elapsed / 1e9}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for fp8_bench.json")
    ap.add_argument("--depth", type=int, default=2, help="aggregator depth of the vggt-arch source (default 2)")
    ap.add_argument("--entries", type=int, default=32, help="entries per store for the read test (default 32)")
    ap.add_argument("--batch", type=int, default=8, help="entries per read_into (default 8)")
    ap.add_argument("--seconds", type=float, default=3.0, help="timed seconds per read round (default 3)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating bf16/fp8 read rounds (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: one DataLoader worker)")
    ap.add_argument("--workdir", default=None, help="where the temporary stores go")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
              "torch": torch.__version__, "shape": list(SHAPE), "torch_threads": args.threads}
    result["fidelity"] = {"vggt_arch_depth%d" % args.depth: fidelity(vggt_arch(args.depth)),
                          "realistic": fidelity(realistic(0))}
    work = tempfile.mkdtemp(prefix="fp8_bench_", dir=args.workdir)
    try:
        entries = [realistic(1 + i) for i in range(args.entries)]
        stores = {d: os.path.join(work, f"{d}.lmdb") for d in ("bfloat16", "float8_e4m3fn")}
        result["bytes"] = {d: write_store(p, d, entries) for d, p in stores.items()}
        result["bytes"]["fp8_over_bf16"] = (result["bytes"]["float8_e4m3fn"]["value_bytes"]
                                            / result["bytes"]["bfloat16"]["value_bytes"])
        del entries
        rates: dict[str, list] = {d: [] for d in stores}
        for _ in range(args.rounds):
            for d, p in stores.items():
                rates[d].append(read_rate(p, args.entries, args.batch, args.seconds))
        result["read_warm"] = {d: {"entries_per_s": max(r["entries_per_s"] for r in rs),
                                   "out_gb_per_s": max(r["out_gb_per_s"] for r in rs), "rounds": rs}
                               for d, rs in rates.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with open(os.path.join(args.out, "fp8_bench.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "read_warm"}, indent=2))
    for d, r in result["read_warm"].items():
        print(f"read warm {d:14s} {r['entries_per_s']:8.1f} entries/s  {r['out_gb_per_s']:.2f} GB/s out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
