"""Aggregator throughput and parity: featstore's VGGTAggregator vs the official code, one GPU, one run.

    python benchmarks/encoder_bench.py [--out DIR] [--quick] [--no-compile] [--budget-s 330]

Needs the official package vendored at .vendor/vggt_official (see docs/ENCODER.md) or importable.
No downloads: VGGT-1B config with random weights (the official constructor's init, shared by both
implementations through one state_dict). Everything runs under bf16 autocast with fp32 weights,
as the official recipe. Writes DIR/encoder_bench.json and DIR/encoder_bench.md (DIR: --out, else
$OUT, else ./bench_out). Exits 1 when any measurement reported an error (a missing official
package is a skip, listed as such: parity and the official timings are then absent).

Variants timed per shape (B x S frames at 518x392 and 518x518):
    official       official Aggregator, eager (24 layers, all 24 outputs concatenated)
    ours_all       ours, eager, same work as official (24 layers, all outputs)
    ours_enc       ours as the encoder runs it: layers 0..22 only, only layer 22's output
    ours_compiled  ours_enc with each block torch.compile'd (optional)
    ours_causal    ours_enc with the block-causal mask (S > 1 only)
Each number: CUDA-event time per call, median of the timed iterations after warm-up.
A variant that fails is recorded with its error and the run continues.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
VENDOR = ROOT / ".vendor" / "vggt_official"
if VENDOR.is_dir():
    sys.path.insert(0, str(VENDOR))

from featstore.encoders.vggt.model import VGGT_1B_CONFIG, VGGTAggregator  # noqa: E402

RESOLUTIONS = {"518x392": (392, 518), "518x518": (518, 518)}  # name: (H, W)
SHAPES = [(1, 1), (1, 8), (1, 16), (8, 1)]  # (B, S)
LAYER = 22  # -2 at depth 24: what VG-LLM / JanusVLN read

T0 = time.time()
DEV = "cuda"
CONFIG = dict(VGGT_1B_CONFIG)


def log(msg):
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


# ---- FLOP model ---------------------------------------------------------------------------


def flops_per_call(b, s, h, w, layers_run, dino_layers=24, c=1024, patch=14, regs=4):
    """Matmul + attention FLOPs (2 per MAC) of one aggregator call; elementwise work ignored.

    Per token per block the linear layers cost 2*(3C^2 + C^2 + 8C^2) = 24 C^2; attention costs
    4 * N_q * N_k * C per sequence (QK^T and AV). Global blocks attend over S*P tokens.
    """
    hw = h * w
    p_dino, p = 1 + regs + hw, 1 + regs + hw
    frames = b * s
    conv = 2 * frames * hw * 3 * patch * patch * c
    dino = dino_layers * (frames * p_dino * 24 * c * c + frames * 4 * p_dino * p_dino * c)
    frame_blocks = layers_run * (frames * p * 24 * c * c + frames * 4 * p * p * c)
    global_blocks = layers_run * (frames * p * 24 * c * c + b * 4 * (s * p) ** 2 * c)
    return conv + dino + frame_blocks + global_blocks


# ---- timing -------------------------------------------------------------------------------


def time_call(fn, *, warmup=3, min_iters=5, max_iters=30, target_s=1.5):
    for _ in range(warmup):
        fn()
    if DEV == "cuda":
        torch.cuda.synchronize()
    times = []
    t_start = time.time()
    while len(times) < max_iters and (len(times) < min_iters or time.time() - t_start < target_s):
        if DEV != "cuda":  # --smoke on CPU: wall clock
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
            continue
        a, z = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        z.record()
        z.synchronize()
        times.append(a.elapsed_time(z))
    times.sort()
    return {"ms_median": times[len(times) // 2], "ms_min": times[0], "iters": len(times)}


def matmul_peak(n=8192, iters=20):
    if DEV != "cuda":
        n = 512
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    r = time_call(lambda: a @ b, warmup=5, min_iters=iters, max_iters=iters, target_s=0)
    return 2 * n ** 3 / (r["ms_min"] / 1e3) / 1e12


# ---- parity -------------------------------------------------------------------------------


def compare(ref, got):
    ref, got = ref.double(), got.double()  # float64 so cosines do not round past 1
    d = (got - ref)
    flat_r, flat_g = ref.flatten(), got.flatten()
    tok_cos = torch.nn.functional.cosine_similarity(ref.flatten(0, -2), got.flatten(0, -2), dim=-1)
    return {
        "max_abs": d.abs().max().item(),
        "rel_l2": (d.norm() / ref.norm()).item(),
        "max_rel_floor1e-2": (d.abs() / ref.abs().clamp_min(1e-2)).max().item(),
        "cosine": torch.nn.functional.cosine_similarity(flat_r, flat_g, dim=0).item(),
        "min_token_cosine": tok_cos.min().item(),
        "ref_abs_max": ref.abs().max().item(),
    }


def parity(official, ours, x, layers=None, autocast=True):
    layers = layers or (LAYER, LAYER + 1)
    with torch.inference_mode(), torch.autocast(DEV, dtype=torch.bfloat16, enabled=autocast):
        ref, psi = official(x)
        got, _ = ours(x, keep_layers=list(layers))
    return {f"layer{l}": compare(ref[l][:, :, psi:], got[l][:, :, psi:]) for l in layers}


# ---- main ---------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="518x392 only, S in {1, 8}")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (e.g. max-autotune-no-cudagraphs)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU code-path check with a tiny config (numbers meaningless)")
    ap.add_argument("--smoke-compile", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--budget-s", type=float, default=330.0,
                    help="stop starting new measurements after this many seconds (default 330)")
    ap.add_argument("--out", default=os.environ.get("OUT", "./bench_out"),
                    help="folder for encoder_bench.json and encoder_bench.md (default: $OUT, else ./bench_out)")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    global DEV, CONFIG, RESOLUTIONS, LAYER
    if args.smoke:
        DEV = "cpu"
        CONFIG = dict(VGGT_1B_CONFIG, embed_dim=384, depth=3, num_heads=6, patch_embed="dinov2_vits14_reg")
        LAYER = 1
        RESOLUTIONS = {"518x392": (56, 70), "518x518": (70, 70)}
        args.no_compile = not args.smoke_compile
    elif not torch.cuda.is_available():
        sys.exit("encoder_bench needs a CUDA GPU (or --smoke for a CPU code-path check)")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity must be fp32
    torch.backends.cudnn.allow_tf32 = False

    res = {
        "env": {
            "gpu": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu (smoke)",
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "capability": list(torch.cuda.get_device_capability(0)) if DEV == "cuda" else None,
        },
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in CONFIG.items()},
        "weights": "random (official Aggregator init, torch.manual_seed(0)); shared state_dict",
        "precision": "fp32 weights, torch.autocast(cuda, bfloat16)",
        "timings": [],
        "parity": {},
        "errors": [],
        "skipped": [],
    }
    resolutions = {"518x392": RESOLUTIONS["518x392"]} if args.quick else RESOLUTIONS
    shapes = [(1, 1), (1, 8)] if args.quick else SHAPES

    def over_budget():
        return time.time() - T0 > args.budget_s

    def record_error(what, e):
        log(f"FAILED {what}: {type(e).__name__}: {e}")
        res["errors"].append({"what": what, "error": f"{type(e).__name__}: {e}",
                              "traceback": traceback.format_exc()[-2000:]})
        if DEV == "cuda":
            torch.cuda.empty_cache()

    def save():
        (out_dir / "encoder_bench.json").write_text(json.dumps(res, indent=2))
        (out_dir / "encoder_bench.md").write_text(markdown(res))

    try:
        res["env"]["bf16_matmul_peak_tflops"] = matmul_peak()
        log(f"bf16 matmul peak: {res['env']['bf16_matmul_peak_tflops']:.0f} TFLOP/s on {res['env']['gpu']}")
    except Exception as e:
        record_error("matmul peak", e)
    peak = res["env"].get("bf16_matmul_peak_tflops")

    official = None
    try:
        from vggt.models.aggregator import Aggregator

        torch.manual_seed(0)
        official = Aggregator(**{k: (list(v) if isinstance(v, tuple) else v) for k, v in CONFIG.items()})
        official = official.to(DEV).eval()
    except ImportError as e:
        res["skipped"].append(f"official Aggregator not importable ({e}): vendor it at .vendor/vggt_official; "
                              "parity and the official timings are skipped")
        log(f"SKIPPED {res['skipped'][-1]}")
    except Exception as e:
        record_error("build official Aggregator (vendor it at .vendor/vggt_official)", e)
    ours = VGGTAggregator(**CONFIG)
    if official is not None:
        ours.load_state_dict(official.state_dict(), strict=True)
    ours = ours.to(DEV).eval()
    log("models built")

    # --- parity first: it is the claim the timings rest on ---
    if official is not None:
        g = torch.Generator(device=DEV).manual_seed(0)
        for name, (b, s, (hh, ww)) in {"bf16_518x392_S8": (1, 8, RESOLUTIONS["518x392"]),
                                        "bf16_518x518_B2_S4": (2, 4, RESOLUTIONS["518x518"])}.items():
            try:
                x = torch.rand(b, s, 3, hh, ww, device=DEV, generator=g)
                res["parity"][name] = parity(official, ours, x)
                with torch.inference_mode():
                    ref32 = official(x)[0]
                    with torch.autocast(DEV, dtype=torch.bfloat16):
                        off16 = official(x)[0]
                        our16 = ours(x, keep_layers=[LAYER])[0]
                psi = ours.patch_start_idx
                res["parity"][name + "_vs_fp32_official"] = {
                    "official_bf16": compare(ref32[LAYER][:, :, psi:], off16[LAYER][:, :, psi:]),
                    "ours_bf16": compare(ref32[LAYER][:, :, psi:], our16[LAYER][:, :, psi:]),
                }
                del ref32, off16, our16
                log(f"parity {name}: {res['parity'][name][f'layer{LAYER}']}")
            except Exception as e:
                record_error(f"parity {name}", e)
        try:
            x = torch.rand(1, 2, 3, *RESOLUTIONS["518x392"], device=DEV, generator=g)
            res["parity"]["fp32_518x392_S2"] = parity(official, ours, x, autocast=False)
            log(f"parity fp32: {res['parity']['fp32_518x392_S2'][f'layer{LAYER}']}")
        except Exception as e:
            record_error("parity fp32", e)
        if DEV == "cuda":
            torch.cuda.empty_cache()
    save()

    # --- timings ---
    def bench(variant, model_call, layers_run):
        for rname, (hh, ww) in resolutions.items():
            for b, s in shapes:
                if variant == "ours_causal" and s == 1:
                    continue
                what = f"{variant} {rname} B={b} S={s}"
                if over_budget():
                    res["timings"].append({"variant": variant, "res": rname, "B": b, "S": s,
                                           "skipped": "time budget"})
                    continue
                try:
                    x = torch.rand(b, s, 3, hh, ww, device=DEV)
                    t_compile = time.time()

                    def call():
                        with torch.inference_mode(), torch.autocast(DEV, dtype=torch.bfloat16):
                            out = model_call(x)
                        del out

                    r = time_call(call)
                    fl = flops_per_call(b, s, hh // 14, ww // 14, layers_run)
                    frames = b * s
                    row = {"variant": variant, "res": rname, "B": b, "S": s, **r,
                           "ms_per_frame": r["ms_median"] / frames,
                           "frames_per_s": frames / (r["ms_median"] / 1e3),
                           "tflops": fl / (r["ms_median"] / 1e3) / 1e12,
                           "warmup_plus_timing_s": time.time() - t_compile,
                           "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else None}
                    if peak:
                        row["frac_of_peak"] = row["tflops"] / peak
                    res["timings"].append(row)
                    log(f"{what}: {r['ms_median']:.1f} ms/call, {row['frames_per_s']:.1f} frames/s, "
                        f"{row['tflops']:.0f} TFLOP/s")
                    if DEV == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                except Exception as e:
                    res["timings"].append({"variant": variant, "res": rname, "B": b, "S": s,
                                           "error": f"{type(e).__name__}: {e}"})
                    record_error(what, e)
                save()

    if official is not None:
        bench("official", lambda x: official(x), CONFIG["depth"])
    bench("ours_all", lambda x: ours(x), CONFIG["depth"])
    bench("ours_enc", lambda x: ours(x, last_layer=LAYER, keep_layers=[LAYER]), LAYER + 1)
    bench("ours_causal", lambda x: ours(x, attention="causal", last_layer=LAYER, keep_layers=[LAYER]), LAYER + 1)
    if not args.no_compile:
        try:
            kw = {"mode": args.compile_mode} if args.compile_mode else {}
            ours.compile_blocks(**kw)
            bench("ours_compiled", lambda x: ours(x, last_layer=LAYER, keep_layers=[LAYER]), LAYER + 1)
            if official is not None and not over_budget():
                x = torch.rand(1, 8, 3, *RESOLUTIONS["518x392"], device=DEV)
                res["parity"]["compiled_bf16_518x392_S8"] = parity(official, ours, x, layers=(LAYER,))
        except Exception as e:
            record_error("ours_compiled", e)
    res["total_s"] = time.time() - T0
    save()
    log(f"done; wrote {out_dir / 'encoder_bench.json'} and encoder_bench.md")
    print(markdown(res))
    if res["errors"]:
        log(f"{len(res['errors'])} measurement(s) failed: " + "; ".join(e["what"] for e in res["errors"]))
        sys.exit(1)


def markdown(res) -> str:
    env = res["env"]
    peak = env.get("bf16_matmul_peak_tflops")
    lines = [f"## Encoder benchmark: {env.get('gpu')} (torch {env.get('torch')}, CUDA {env.get('cuda')})", "",
             f"VGGT-1B aggregator config, random weights, bf16 autocast. Measured bf16 matmul peak: "
             f"{peak:.0f} TFLOP/s." if peak else "bf16 matmul peak: not measured.", "",
             "| variant | res | B | S | ms/call | ms/frame | frames/s | TFLOP/s | % peak | x official |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    base = {(r["res"], r["B"], r["S"]): r["ms_median"] for r in res["timings"]
            if r["variant"] == "official" and "ms_median" in r}
    for r in res["timings"]:
        key = (r["res"], r["B"], r["S"])
        if "ms_median" not in r:
            lines.append(f"| {r['variant']} | {r['res']} | {r['B']} | {r['S']} | "
                         f"{r.get('error') or r.get('skipped')} | | | | | |")
            continue
        speed = f"{base[key] / r['ms_median']:.2f}" if key in base else ""
        frac = f"{100 * r['frac_of_peak']:.0f}%" if "frac_of_peak" in r else ""
        lines.append(f"| {r['variant']} | {r['res']} | {r['B']} | {r['S']} | {r['ms_median']:.1f} | "
                     f"{r['ms_per_frame']:.2f} | {r['frames_per_s']:.1f} | {r['tflops']:.0f} | {frac} | {speed} |")
    lines += ["", "Parity (patch tokens; reference = official):", "",
              "| case | layer / pair | max abs | rel L2 | cosine | min token cosine |", "|---|---|---|---|---|---|"]
    for case, d in res["parity"].items():
        for k, m in d.items():
            lines.append(f"| {case} | {k} | {m['max_abs']:.3e} | {m['rel_l2']:.3e} | {m['cosine']:.6f} | "
                         f"{m['min_token_cosine']:.6f} |")
    if res.get("skipped"):
        lines += ["", "Skipped:", ""] + [f"- {s}" for s in res["skipped"]]
    if res["errors"]:
        lines += ["", "Errors:", ""] + [f"- {e['what']}: {e['error']}" for e in res["errors"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
