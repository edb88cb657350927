"""The one-call vision attention (featstore.encoders.qwen_vision.attention) against transformers'
stock per-window `sdpa` path, on a real tiny Qwen2.5-VL vision tower in float32 on CPU: the same
outputs and gradients (pixels and every parameter) for several images of different grids, windowed
and full-attention layers; one attention call per layer; no segment sees another."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from featstore.encoders.qwen_vision import attention
from featstore.encoders.qwen_vision.attention import (AUTO_IMPLEMENTATION, ONE_CALL_IMPLEMENTATION,
                                                      one_call_attention, set_vision_attention)
from featstore.encoders.qwen_vision.config import TINY_VISION_CONFIG
from featstore.errors import EncoderError
from _featstore_helpers import weights_far_from_zero_

# Patch grids (t, h, w) of three images: 16x12 patches is 8x6 merged tokens, so windows of 4x4
# merged tokens of three sizes (4x4, 4x2); 8x8 one full window; 10x6 windows of 4x3 and 1x3.
GRIDS = [(1, 16, 12), (1, 8, 8), (1, 10, 6)]


def _tower(seed: int = 0):
    """transformers' tiny vision tower (merger included), weights far from zero, stock sdpa."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    config = Qwen2_5_VLVisionConfig(**copy.deepcopy(TINY_VISION_CONFIG))
    config._attn_implementation = "sdpa"
    model = Qwen2_5_VisionTransformerPretrainedModel(config).float()
    return weights_far_from_zero_(model, seed)


def _inputs(seed: int = 1):
    grid = torch.tensor(GRIDS)
    cfg = TINY_VISION_CONFIG
    width = 3 * cfg["temporal_patch_size"] * cfg["patch_size"] ** 2
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(int(grid.prod(-1).sum()), width, generator=gen)
    return pixels, grid


def _run(model, pixels, grid, weights):
    """Forward + backward of a fixed linear loss; returns (output, d pixels, {name: d param})."""
    model.zero_grad(set_to_none=True)
    x = pixels.clone().requires_grad_(True)
    out = model(x, grid_thw=grid).pooler_output
    (out * weights).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


class _CountSDPA:
    """Counts torch.nn.functional.scaled_dot_product_attention calls (transformers' sdpa function
    and the one-call path both look it up at call time)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = F.scaled_dot_product_attention

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)


@pytest.fixture(scope="module")
def towers():
    stock = _tower()
    one = copy.deepcopy(stock)
    assert set_vision_attention(one, "one_call") == ONE_CALL_IMPLEMENTATION
    return stock, one


def test_outputs_and_gradients_match_stock(towers):
    stock, one = towers
    assert stock.config._attn_implementation == "sdpa"
    pixels, grid = _inputs()
    weights = torch.randn(stock(pixels, grid_thw=grid).pooler_output.shape, generator=torch.Generator().manual_seed(2))
    ref_out, ref_dx, ref_dp = _run(stock, pixels, grid, weights)
    out, dx, dp = _run(one, pixels, grid, weights)
    assert ref_out.abs().max() > 1e-2 and ref_dx.abs().max() > 1e-6  # far from zero: the comparison says something
    assert _rel(out, ref_out) <= 1e-5
    assert _rel(dx, ref_dx) <= 1e-5
    assert set(dp) == set(ref_dp)
    for name in ref_dp:
        assert ref_dp[name] is not None and dp[name] is not None, name
        assert _rel(dp[name], ref_dp[name]) <= 1e-5, name
    # The attention parameters of the windowed (0) and full-attention (1) blocks both get gradients.
    assert TINY_VISION_CONFIG["fullatt_block_indexes"] == [1]
    for block in (0, 1):
        assert ref_dp[f"blocks.{block}.attn.qkv.weight"].abs().max() > 0


def test_one_attention_call_per_layer(towers, monkeypatch):
    stock, one = towers
    pixels, grid = _inputs()
    counter = _CountSDPA(monkeypatch)
    with torch.no_grad():
        stock(pixels, grid_thw=grid)
    stock_calls, counter.calls = counter.calls, 0
    with torch.no_grad():
        one(pixels, grid_thw=grid)
    depth = TINY_VISION_CONFIG["depth"]
    assert counter.calls == depth
    assert stock_calls > 2 * depth  # the stock path splits per window: the count above is a real difference


def test_language_model_keeps_its_implementation():
    from transformers import Qwen2_5_VLForConditionalGeneration

    from training.presets import tiny_config

    model = Qwen2_5_VLForConditionalGeneration._from_config(tiny_config(), attn_implementation="sdpa")
    set_vision_attention(model.model.visual, "one_call")
    assert model.model.visual.config._attn_implementation == ONE_CALL_IMPLEMENTATION
    assert model.model.visual.blocks[0].attn.config._attn_implementation == ONE_CALL_IMPLEMENTATION
    assert model.config.text_config._attn_implementation == "sdpa"
    assert model.model.language_model.config._attn_implementation == "sdpa"


def test_flash_request_and_stock_are_left_alone():
    tower = _tower()
    assert set_vision_attention(tower, "stock") == "sdpa"
    assert tower.config._attn_implementation == "sdpa"
    tower.config._attn_implementation = "flash_attention_2"
    assert set_vision_attention(tower, "one_call") == "flash_attention_2"
    with pytest.raises(EncoderError, match="not one of auto, stock, one_call"):
        set_vision_attention(tower, "fast")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_off_cuda_is_stock_bit_for_bit(dtype):
    """"auto" (the default) where the varlen kernel does not run (CPU here) makes transformers'
    own per-window calls: outputs and every gradient equal to stock's exactly, in fp32 and bf16."""
    stock = _tower().to(dtype)
    auto = copy.deepcopy(stock)
    assert set_vision_attention(auto, "auto") == AUTO_IMPLEMENTATION
    assert auto.blocks[0].attn.config._attn_implementation == AUTO_IMPLEMENTATION
    pixels, grid = _inputs()
    pixels = pixels.to(dtype)
    weights = torch.randn(stock(pixels, grid_thw=grid).pooler_output.shape,
                          generator=torch.Generator().manual_seed(2)).to(dtype)
    ref_out, ref_dx, ref_dp = _run(stock, pixels, grid, weights)
    out, dx, dp = _run(auto, pixels, grid, weights)
    assert torch.equal(out, ref_out) and torch.equal(dx, ref_dx)
    for name, grad in ref_dp.items():
        assert torch.equal(dp[name], grad), name


def test_auto_takes_one_call_where_the_varlen_kernel_applies(monkeypatch):
    """Where `_varlen_applies` holds (CUDA bf16 on a GPU; forced here, with a CPU stand-in for the
    kernel), "auto" makes ONE kernel call a layer and gives stock's numbers."""
    calls = []

    def stand_in(q, k, v, cu_q, cu_k, max_q, max_k, scale=None):  # [S, H, D] packed, as varlen_attn
        calls.append(len(cu_q) - 1)
        outs = [F.scaled_dot_product_attention(*(x[a:b].transpose(0, 1)[None] for x in (q, k, v)), scale=scale)[0]
                for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist())]
        return torch.cat(outs, dim=1).transpose(0, 1)

    monkeypatch.setattr(attention, "_VARLEN", (stand_in, True))
    monkeypatch.setattr(attention, "_varlen_applies", lambda query, scaling, dropout: True)
    stock = _tower()
    auto = copy.deepcopy(stock)
    set_vision_attention(auto, "auto")
    pixels, grid = _inputs()
    with torch.no_grad():
        ref = stock(pixels, grid_thw=grid).pooler_output
        out = auto(pixels, grid_thw=grid).pooler_output
    assert len(calls) == TINY_VISION_CONFIG["depth"] and max(calls) > len(GRIDS)  # windows, one call a layer
    assert _rel(out, ref) < 1e-5


def test_auto_leaves_a_chosen_implementation_and_stock_undoes_ours():
    tower = _tower()
    tower.config._attn_implementation = "eager"
    assert set_vision_attention(tower, "auto") == "eager"  # eager (or flash, flex) as the user chose it
    tower.config._attn_implementation = "sdpa"
    assert set_vision_attention(tower, "auto") == AUTO_IMPLEMENTATION
    assert set_vision_attention(tower, "one_call") == ONE_CALL_IMPLEMENTATION
    assert set_vision_attention(tower, "stock") == "sdpa"
    assert tower.blocks[0].attn.config._attn_implementation == "sdpa"


def test_auto_is_the_encoders_default():
    from featstore.encoders import get_encoder

    encoder = get_encoder("qwen2.5-vl-vision-tiny")  # training's default: test_training_model_with_one_call_matches_stock
    assert encoder.model.config._attn_implementation == AUTO_IMPLEMENTATION


def _per_segment(q, k, v, cu, scale):
    """Reference: one SDPA call per segment, as transformers' stock path does."""
    outs = [F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], scale=scale)
            for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    return torch.cat(outs, dim=2).transpose(1, 2)


def test_no_segment_sees_another():
    gen = torch.Generator().manual_seed(3)
    heads, total, dim = 2, 12, 8
    q, k, v = (torch.randn(1, heads, total, dim, generator=gen) for _ in range(3))
    cu = torch.tensor([0, 3, 7, 12], dtype=torch.int32)
    scale = dim ** -0.5
    out, _ = one_call_attention(None, q, k, v, scaling=scale, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=5)
    ref = _per_segment(q, k, v, cu, scale)
    assert _rel(out, ref) <= 1e-6
    # A case where a leak shows: attending across all tokens gives other numbers.
    leaky = _per_segment(q, k, v, torch.tensor([0, total]), scale)
    assert _rel(leaky, ref) > 1e-2
    # Changing the keys and values of the middle segment changes only the middle segment's output.
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 3:7] += 5.0
    v2[:, :, 3:7] += 5.0
    out2, _ = one_call_attention(None, q, k2, v2, scaling=scale, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    assert torch.equal(out2[:, :3], out[:, :3]) and torch.equal(out2[:, 7:], out[:, 7:])
    assert not torch.allclose(out2[:, 3:7], out[:, 3:7])


def test_zero_length_segment_keeps_gradients_finite():
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=gen, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 2, 2, 6], dtype=torch.int32)
    out, _ = one_call_attention(None, q, k, v, scaling=8 ** -0.5, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    ref = _per_segment(q.detach(), k.detach(), v.detach(), torch.tensor([0, 2, 6]), 8 ** -0.5)
    assert _rel(out.detach(), ref) <= 1e-6
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_bad_requests_are_refused():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(EncoderError, match="bidirectional"):
        one_call_attention(None, q, q, q, is_causal=True)
    cu, other = torch.tensor([0, 4], dtype=torch.int32), torch.tensor([0, 2, 4], dtype=torch.int32)
    with pytest.raises(EncoderError, match="segments differ"):
        one_call_attention(None, q, q, q, cu_seq_lens_q=cu, cu_seq_lens_k=other)


def test_encoder_option_keeps_the_fingerprint_and_the_features():
    from featstore.encoders import encoder_for_spec, get_encoder, resolve_spec
    from featstore.ops.compare import compare_features

    stock = get_encoder("qwen2.5-vl-vision-tiny", vision_attention="stock")
    one = get_encoder("qwen2.5-vl-vision-tiny", vision_attention="one_call")
    assert one.model.config._attn_implementation == ONE_CALL_IMPLEMENTATION
    assert stock.model.config._attn_implementation != ONE_CALL_IMPLEMENTATION
    assert one.spec.fingerprint() == stock.spec.fingerprint()
    assert resolve_spec("qwen2.5-vl-vision-tiny", vision_attention="one_call").fingerprint() == stock.spec.fingerprint()
    images = [torch.rand(3, 224, 168, generator=torch.Generator().manual_seed(5)),
              torch.rand(3, 112, 112, generator=torch.Generator().manual_seed(6))]
    for a, b in zip(one.encode_images(images), stock.encode_images(images)):
        assert _rel(a, b) <= 1e-5
        # ... so verify --recompute of a store built either way passes with the other.
        assert compare_features(b, a, stock.spec.storage_dtype, stock.spec.compute_dtype)["ok"]
    rebuilt = encoder_for_spec(stock.spec, vision_attention="one_call")
    assert rebuilt.model.config._attn_implementation == ONE_CALL_IMPLEMENTATION
    with pytest.raises(EncoderError, match="vision_attention 'fast' is not one of auto, stock, one_call"):
        get_encoder("qwen2.5-vl-vision-tiny", vision_attention="fast")
    with pytest.raises(EncoderError, match="build options"):
        encoder_for_spec(stock.spec, layer=0)


@pytest.mark.parametrize("tune_vision", [False, True])
def test_training_model_with_one_call_matches_stock(tune_vision):
    """The whole tiny Qwen2.5-VL (training.presets), pixels in: the same logits, and with a trainable
    tower the same tower gradients, under --vision_attention one_call as under stock."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from training.args import parse_args
    from training.presets import tiny_config

    model_args = parse_args(["--vision_attention", "one_call", "--output_dir", "/tmp/unused"])[0]
    assert model_args.vision_attention == "one_call"
    assert parse_args(["--output_dir", "/tmp/unused"])[0].vision_attention == "auto"  # the default

    cfg = tiny_config()
    torch.manual_seed(0)
    stock = Qwen2_5_VLForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").float()
    one = copy.deepcopy(stock)
    set_vision_attention(one.model.visual, model_args.vision_attention)
    pixels, grid = _inputs()
    ids = torch.tensor([sum(([cfg.vision_start_token_id] + [cfg.image_token_id] * (int(g.prod()) // 4)
                             + [cfg.vision_end_token_id] for g in grid), [])])  # one span per image
    results = []
    for model in (stock, one):
        model.requires_grad_(False)
        model.model.visual.requires_grad_(tune_vision)
        logits = model(input_ids=ids, pixel_values=pixels.clone().requires_grad_(True), image_grid_thw=grid,
                       mm_token_type_ids=(ids == cfg.image_token_id).long()).logits
        logits.float().pow(2).mean().backward()
        grads = {n: p.grad for n, p in model.model.visual.named_parameters() if p.grad is not None}
        results.append((logits.detach(), grads))
    (ref, ref_grads), (got, got_grads) = results
    assert _rel(got, ref) <= 1e-5
    assert set(got_grads) == set(ref_grads) and (bool(ref_grads) == tune_vision)
    for name in ref_grads:
        assert _rel(got_grads[name], ref_grads[name]) <= 1e-5, name


def test_choices_agree():
    from featstore.encoders.qwen_vision import attention, config

    assert attention.VISION_ATTENTION_CHOICES is config.VISION_ATTENTION_CHOICES


def test_benchmark_smoke(tmp_path):
    import json
    import subprocess
    import sys

    from _featstore_helpers import REPO

    run = subprocess.run([sys.executable, "benchmarks/vision_attention_bench.py", "--smoke", "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((tmp_path / "vision_attention_bench.json").read_text())
    assert report["smoke"] and set(report["variants"]) >= {"stock", "one_call", "one_call_sdpa"}
    for name in ("one_call", "one_call_sdpa"):
        assert report["variants"][name]["max_rel_diff_vs_stock"] <= 1e-5
        assert report["variants"][name]["forward_backward_ms"] > 0


def test_vision_build_benchmark_smoke(tmp_path):
    """benchmarks/vision_build_bench.py runs both builds and both bare forwards end to end."""
    import json
    import subprocess
    import sys

    from _featstore_helpers import REPO

    run = subprocess.run([sys.executable, "benchmarks/vision_build_bench.py", "--smoke", "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((tmp_path / "vision_build_bench.json").read_text())
    assert set(report["build"]) == set(report["bare"]) == {"stock", "one_call"}
    for attention in ("stock", "one_call"):
        assert report["build"][attention]["frames"] == report["images"] == 4
        assert report["bare"][attention]["frames_per_s"] > 0
        stages = [report["build"][attention][k] for k in ("decode_wait_s", "encode_s", "d2h_wait_s",
                                                          "serialise_s", "commit_s")]
        assert all(t >= 0 for t in stages) and report["build"][attention]["encode_s"] > 0
    assert report["bare_max_rel_diff_one_call_vs_stock"] <= 1e-5


def test_build_one_call_writes_the_stock_fingerprint_and_features(tmp_path):
    """`featstore build --vision-attention one_call` writes what the stock build writes (same
    fingerprint, features within the recompute tolerance); a VGGT encoder refuses the option."""
    from featstore.build.runner import BuildOptions, build
    from featstore.errors import EncoderError
    from featstore import FeatureStore
    from featstore.ops.compare import compare_features

    from _featstore_helpers import make_images

    keys = [f"s/{i}.png" for i in range(2)]
    stores = {}
    for how in (None, "one_call"):
        data = str(tmp_path / str(how))
        make_images(data, keys, size=(96, 80))
        report = build(BuildOptions(data_root=data, encoder="qwen2.5-vl-vision-tiny", device="cpu", progress=False,
                                    workers=0, vision_attention=how))
        assert report.computed == 2
        stores[how] = FeatureStore(data, feature_set="qwen_vision")
    a, b = stores[None], stores["one_call"]
    assert a.manifest["fingerprint"] == b.manifest["fingerprint"]
    for key in keys:
        result = compare_features(a.get(key).features.float(), b.get(key).features.float(), "bfloat16")
        assert result["ok"], result
    with pytest.raises(EncoderError, match="vision_attention is an option of the qwen2.5-vl-vision encoders"):
        build(BuildOptions(data_root=str(tmp_path / "None"), encoder="vggt-tiny", device="cpu", progress=False,
                           workers=0, vision_attention="one_call"))


def test_vision_build_probe_smoke(tmp_path):
    """benchmarks/vision_build_probe.py runs a bare forward and two builds through its child
    process (BuildOptions with pin_frames on and off; on the CPU the loader pins nothing) end to
    end, and compares the two vision stores entry by entry."""
    import json

    from _featstore_helpers import REPO

    # In this process (one interpreter start less); its build still runs as a child process.
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location("vision_build_probe",
                                                  os.path.join(REPO, "benchmarks", "vision_build_probe.py"))
    vision_build_probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vision_build_probe)
    assert vision_build_probe.main(["--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "vision_build_probe.json").read_text())
    assert report["smoke"] and report["bare_e16"]["host_ms"] > 0 and report["bare_e16"]["frames_per_s"] > 0
    assert report["build_e16_w4_nopin"]["frames"] == report["images"] == 6
    assert report["build_e16_w4_nopin"]["encode_s"] > 0
    same = report["same_e16_pin_vs_nopin"]
    assert same["entries"] == same["bit_identical"] == 6 and same["all_within_tolerance"]
