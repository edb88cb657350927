"""Qwen2.5-VL vision tower: transformers' stock per-window attention vs one attention call a layer.

    python benchmarks/vision_attention_bench.py [--out DIR] [--images 9] [--iters 10] [--smoke]

The Qwen2.5-VL-3B vision tower (depth 32, hidden 1280, 16 heads, windows of 112 px, full attention
in blocks 7, 15, 23, 31) with random weights, in bf16 on CUDA, on `--images` images of 504x392
(36x28 patches: 20 windows each). Variants (`--vision_attention` and its internals):
    stock          attn_implementation "sdpa": one SDPA call per window / per image
    one_call       featstore.encoders.qwen_vision.attention: torch's varlen_attn where present
    one_call_sdpa  the same with the padded single-SDPA call forced (the path without varlen)
    flash_attn_2   transformers' flash_attention_2 (only where the flash_attn package is installed)
    one_call_compiled  (--compile) one_call with the frozen tower's blocks compiled (compile_tower_blocks:
                       build --compile, training --compile_vision), forward only
    one_call_whole_compiled  (--compile) one_call with the whole forward under torch.compile
                       (dynamic=False), forward only: what compiling the host-side start adds
Each variant: forward under no_grad (the frozen tower) and forward + backward with the tower's
parameters trainable (loss: mean of the squared output); CUDA-event milliseconds, median over
`--iters` after warm-up; the output's max relative difference (max |diff| / max |reference|) from
stock, and from the stock path run in float32 on the same weights and pixels (bf16's own noise:
stock's distance from float32 is the yardstick for the others). Writes DIR/
vision_attention_bench.json (DIR: --out, else $OUT, else ./bench_out). A variant that fails is
recorded with its error and the run goes on; exit 1 when any did.

`--smoke`: the tiny tower on CPU in float32, two small images, one iteration: checks the script
runs (tests/test_vision_attention.py); its timings mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _results import write_report  # noqa: E402
from featstore.encoders.qwen_vision import attention  # noqa: E402
from featstore.encoders.qwen_vision.config import TINY_VISION_CONFIG  # noqa: E402

# Qwen/Qwen2.5-VL-3B-Instruct config.json vision_config (the fields that shape the tower).
QWEN25_VL_3B_VISION = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048, patch_size=14,
    spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
    hidden_act="silu", in_channels=3,
)


def _tower(vision_config: dict, implementation: str, device, dtype):
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    config = Qwen2_5_VLVisionConfig(**copy.deepcopy(vision_config))
    config._attn_implementation = implementation
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VisionTransformerPretrainedModel(config)
    return model.to(dtype)


def _timer(device):
    if device.type == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
    else:
        def run(fn):
            t = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - t)
    return run


def _max_rel_diff(result, reference) -> float:
    """max |result - reference| over max |reference|, in float32."""
    return float((result.float() - reference.float()).abs().max() / reference.float().abs().max())


def _variant(name, model, pixels, grid, warmup, iters, timer, reference, fp32_reference=None, trains=True):
    out = {}
    model.requires_grad_(False)
    with torch.no_grad():
        result = model(pixels, grid_thw=grid).pooler_output
        for _ in range(warmup):
            model(pixels, grid_thw=grid)
        out["forward_ms"] = statistics.median(timer(lambda: model(pixels, grid_thw=grid)) for _ in range(iters))
    if reference is not None:
        out["max_rel_diff_vs_stock"] = _max_rel_diff(result, reference)
    if fp32_reference is not None:  # bf16 noise: stock's own distance from fp32 is the yardstick
        out["max_rel_diff_vs_fp32"] = _max_rel_diff(result, fp32_reference)
    if not trains:
        return out, result
    model.requires_grad_(True)

    def step():
        model.zero_grad(set_to_none=True)
        model(pixels, grid_thw=grid).pooler_output.float().pow(2).mean().backward()

    for _ in range(warmup):
        step()
    out["forward_backward_ms"] = statistics.median(timer(step) for _ in range(iters))
    return out, result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="output folder (default $OUT, else ./bench_out)")
    p.add_argument("--images", type=int, default=9, help="images of 504x392 (default 9)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per number (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first (default 3)")
    p.add_argument("--smoke", action="store_true", help="tiny tower on CPU, float32, one iteration (tests)")
    p.add_argument("--compile", action="store_true", help="also time the frozen one-call tower under torch.compile "
                   "(forward only; compiling takes a minute or two)")
    args = p.parse_args(argv)

    if args.smoke:
        device, dtype, vision_config = torch.device("cpu"), torch.float32, TINY_VISION_CONFIG
        grids, warmup, iters = [(1, 16, 12), (1, 8, 8)], 0, 1
    else:
        if not torch.cuda.is_available():
            p.error("needs a CUDA GPU (bf16 timings); pass --smoke for the CPU check")
        device, dtype, vision_config = torch.device("cuda"), torch.bfloat16, QWEN25_VL_3B_VISION
        grids, warmup, iters = [(1, 36, 28)] * args.images, args.warmup, args.iters
    grid = torch.tensor(grids, device=device)
    width = 3 * vision_config["temporal_patch_size"] * vision_config["patch_size"] ** 2
    gen = torch.Generator(device=device).manual_seed(1)
    pixels = torch.randn(int(grid.prod(-1).sum()), width, generator=gen, device=device).to(dtype)

    try:
        import flash_attn  # noqa: F401
        has_flash = device.type == "cuda"
    except ImportError:
        has_flash = False
    variants = [("stock", "sdpa", True), ("one_call", "sdpa", True), ("one_call_sdpa", "sdpa", False)]
    if has_flash:
        variants.append(("flash_attn_2", "flash_attention_2", True))

    timer = _timer(device)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""),
              "images": [list(g) for g in grids], "smoke": args.smoke, "iters": iters, "warmup": warmup,
              "varlen_attn_in_torch": attention.varlen_kernel() is not None, "variants": {}}
    import transformers

    report["transformers"] = transformers.__version__
    reference, failed = None, False
    base = _tower(vision_config, "sdpa", device, dtype)
    # The stock path in float32 on the same (bf16-rounded) weights and pixels: how far bf16 itself
    # moves the output, so that one_call's distance from stock can be read against it.
    fp32_reference = None
    if dtype != torch.float32:
        with torch.no_grad():
            fp32_tower = copy.deepcopy(base).float()
            fp32_reference = fp32_tower(pixels.float(), grid_thw=grid).pooler_output
            del fp32_tower
    if args.compile and not args.smoke:
        variants += [("one_call_compiled", "sdpa", True), ("one_call_whole_compiled", "sdpa", True)]
    for name, implementation, prefer_varlen in variants:
        try:
            model = copy.deepcopy(base)
            model.config._attn_implementation = implementation
            if name.startswith("one_call"):
                attention.set_vision_attention(model, "one_call")
            attention.PREFER_VARLEN = prefer_varlen
            trains = not name.endswith("_compiled")  # a compiled tower is frozen: forward only
            if name == "one_call_whole_compiled":
                model.forward = torch.compile(model.forward, dynamic=False)
            elif name.endswith("_compiled"):
                from featstore.encoders.qwen_vision.encoder import compile_tower_blocks

                compile_tower_blocks(model)
            numbers, result = _variant(name, model, pixels, grid, warmup, iters, timer, reference,
                                       fp32_reference, trains)
            reference = result if reference is None else reference
            report["variants"][name] = numbers
            del model
        except Exception as e:  # recorded; the other variants still run
            failed = True
            report["variants"][name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        finally:
            attention.PREFER_VARLEN = True
        print(name, json.dumps(report["variants"][name])[:300], flush=True)

    write_report(args.out, "vision_attention_bench.json", report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
