"""The Qwen2.5-VL vision encoders (merger removed): pixels as the image processor makes them, the
merger applied to our output equals transformers' stock merged output, one image per unit,
strict checkpoint loading in both key layouts and sharded, and the spec / fingerprint.

Checkpoints are written here: a tiny random Qwen2_5_VLForConditionalGeneration
(training.presets.tiny_config()) saved with save_pretrained, the same weights in the other key
layout, and a sharded save."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from featstore.build.encode import encode_unit, read_frame
from featstore.encoders import encoder_for_spec, feature_set_of, get_encoder, resolve_spec, unit_of
from featstore.encoders.preprocess import preprocess_image, qwen_frame, qwen_view
from featstore.encoders.qwen_vision.config import IMAGE_MEAN, IMAGE_STD, TINY_VISION_CONFIG, spec_config
from featstore.contract.spec import PreprocessSpec
from featstore.errors import EncoderError, FingerprintMismatchError, ImageDecodeError, WeightsError
from featstore.build.plan import Unit
from _featstore_helpers import weights_far_from_zero_

TINY = "qwen2.5-vl-vision-tiny"
FULL = "qwen2.5-vl-vision"


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATSTORE_CACHE_DIR", str(tmp_path / "hash-cache"))


def _tiny_model(seed: int):
    """A tiny Qwen2.5-VL with weights large enough that the tower's output is far from zero."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from training.presets import tiny_config

    model = Qwen2_5_VLForConditionalGeneration(tiny_config()).eval()
    return weights_far_from_zero_(model, seed)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """{"model", "hub" (save_pretrained: visual.*), "tree" (model.visual.*, model.safetensors only +
    config.json), "sharded", "other" (another seed)} -> folders."""
    base = tmp_path_factory.mktemp("qwen_ckpts")
    model = _tiny_model(seed=1)
    out = {"model": model}
    out["hub"] = base / "hub"
    model.save_pretrained(out["hub"])
    out["tree"] = base / "tree"
    out["tree"].mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out["tree"] / "model.safetensors"))
    shutil.copy(out["hub"] / "config.json", out["tree"] / "config.json")
    out["sharded"] = base / "sharded"
    model.save_pretrained(out["sharded"], max_shard_size="20KB")
    out["other"] = base / "other"
    _tiny_model(seed=2).save_pretrained(out["other"])
    return out


def _keys(path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def _rewrite(src_folder, dst_folder, edit) -> str:
    """A copy of a single-file checkpoint whose tensors dict went through `edit`; returns the folder."""
    os.makedirs(dst_folder, exist_ok=True)
    with safe_open(str(src_folder / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(edit(tensors), os.path.join(dst_folder, "model.safetensors"))
    shutil.copy(src_folder / "config.json", os.path.join(dst_folder, "config.json"))
    return str(dst_folder)


def _image(h: int, w: int, seed: int) -> torch.Tensor:
    """A Qwen image [3, h, w] in [0, 1], exactly k/255 (as read_frame makes it)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8).float().div(255)


def _pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray((x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


# ---- (a) pixels ---------------------------------------------------------------------------


def test_pixel_values_equal_the_image_processor():
    from training.presets import image_processor

    proc = image_processor()
    assert list(proc.image_mean) == list(IMAGE_MEAN) and list(proc.image_std) == list(IMAGE_STD)
    enc = get_encoder(TINY)
    images = [_image(224, 168, 0), _image(224, 168, 9), _image(56, 84, 1)]  # a run of one size: patchified together
    images[0][:, :2, :128] = torch.arange(256).float().div(255).view(2, 128)  # every uint8 value at least once
    ours, grid = enc.pixel_values(images)
    # The call VG-LLM and JanusVLN make: the float image, do_rescale=False.
    ref = proc(images=images, return_tensors="pt", do_rescale=False)
    assert torch.equal(grid, ref["image_grid_thw"])
    assert ours.dtype == ref["pixel_values"].dtype == torch.float32
    assert torch.equal(ours, ref["pixel_values"])  # bit for bit
    # Exactly k/255 images give the same through the processor's uint8 path.
    assert torch.equal(ours, proc(images=[_pil(x) for x in images], return_tensors="pt")["pixel_values"])


def test_the_qwen_image_is_the_training_rule(tmp_path):
    """read_frame of a Qwen spec == the VGGT view cropped as VG-LLM/JanusVLN crop it."""
    path = tmp_path / "a.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)).save(path)
    spec = resolve_spec(TINY, target_size=238)
    frame, source = read_frame(str(tmp_path), "a.png", spec, 14)
    view = preprocess_image(str(path), spec.preprocess)  # 238x182 -> 17x13 patches: both odd
    assert tuple(view.shape) == (3, 182, 238) and tuple(frame.shape) == (3, 168, 224)
    # data_qwen.py's arithmetic: width - (width // patch) % merge * patch, the same for height.
    height, width = 182 - (182 // 14) % 2 * 14, 238 - (238 // 14) % 2 * 14
    assert torch.equal(frame, view[:, :height, :width])  # a crop: the same pixels, top-left
    assert source["size"] == path.stat().st_size
    # An odd grid is trimmed to even: 518 x 392 -> 37x28 patches -> 36x28 -> 504x392.
    big = torch.rand(3, 392, 518)
    assert torch.equal(qwen_view(big), big[:, :392, :504])
    # The VGGT family reads the VGGT view, unchanged.
    vggt = resolve_spec("vggt-tiny")
    assert torch.equal(read_frame(str(tmp_path), "a.png", vggt, 14)[0], preprocess_image(str(path), vggt.preprocess))
    with pytest.raises(ImageDecodeError, match=r"VGGT grid 1x3 is smaller than 2x2"):
        qwen_view(torch.rand(3, 14, 42), name="thin.png")


# ---- (b) parity with the stock tower ----------------------------------------------------


def test_merger_of_our_output_equals_the_stock_merged_output(ckpts):
    from training.presets import image_processor

    model = ckpts["model"]
    enc = get_encoder(FULL, weights=str(ckpts["hub"]))
    assert not any("merger" in k for k in enc.model.state_dict())  # the encoder holds no merger parameter
    images = [_image(224, 168, 3), _image(112, 84, 4), _image(56, 280, 5)]  # several windows; one; odd shape
    ref = image_processor()(images=[_pil(x) for x in images], return_tensors="pt")
    with torch.no_grad():
        stock = model.model.visual(ref["pixel_values"], grid_thw=ref["image_grid_thw"]).pooler_output
        ours = enc.encode_images(images)
        merged = [model.model.visual.merger(o) for o in ours]
    sizes = [int(g.prod()) // 4 for g in ref["image_grid_thw"]]
    assert [o.shape for o in ours] == [torch.Size([int(g.prod()), 32]) for g in ref["image_grid_thw"]]
    assert stock.abs().mean() > 0.1  # weights large enough that a tolerance means something
    for got, want in zip(merged, stock.split(sizes)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_forward_takes_its_index_tensors_precomputed_and_computes_the_same(monkeypatch):
    """encode/encode_images hand the tower its position ids, cu_seqlens and window index made
    once per list of grids on the host (no host sync in the forward); the features are those of
    the forward computing them itself, bit for bit, and the tower computes none of them."""
    import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl as modeling
    from transformers import vision_utils

    enc = get_encoder(TINY)
    weights_far_from_zero_(enc.model, 7)
    images = [_image(224, 168, 10), _image(224, 168, 11), _image(112, 84, 12), _image(56, 280, 13)]
    pixels, grid = enc.pixel_values(images)
    with torch.no_grad():
        ref = enc.model(pixels, grid_thw=grid).pooler_output.reshape(pixels.shape[0], -1).split(
            [int(g[1] * g[2]) for g in grid])
    computed, made = [], []
    for name, key in (("get_vision_position_ids", "position_ids"), ("get_vision_attention_seqlens", "cu_seqlens"),
                      ("get_vision_window_index", "window_index")):
        def in_forward(*args, kwargs=None, _fn=getattr(modeling, name), _name=name, _key=key, **kw):
            if not kwargs or _key not in kwargs:
                computed.append(_name)  # the forward would compute it from grid_thw on the device
            return _fn(*args, kwargs=kwargs, **kw)
        monkeypatch.setattr(modeling, name, in_forward)
    monkeypatch.setattr(vision_utils, "get_vision_window_index",
                        lambda *a, _fn=vision_utils.get_vision_window_index, **k: made.append(1) or _fn(*a, **k))
    for got, want in zip(enc.encode_images(images), ref):
        assert torch.equal(got, want)
    assert computed == [] and len(made) == 1
    frames = torch.stack(images[:2]).reshape(1, 2, 3, 224, 168)
    out = enc.encode(frames)
    enc.encode(frames)  # a second batch of the same grids reuses the tensors made for the first
    assert computed == [] and len(made) == 2
    assert torch.equal(out[0, 1], ref[1])
    with torch.no_grad():
        enc.model(pixels, grid_thw=grid)  # the spies see a forward that computes them
    assert computed


# ---- (c) one image per unit ---------------------------------------------------------------


def test_each_image_alone_equals_one_batched_call():
    enc = get_encoder(TINY)
    images = [_image(224, 168, 6), _image(112, 112, 7), _image(84, 196, 8)]
    batched = enc.encode_images(images)
    for image, got in zip(images, batched):
        torch.testing.assert_close(got, enc.encode_images([image])[0], rtol=1e-5, atol=1e-6)
    frames = torch.stack([_image(112, 84, k) for k in range(4)]).reshape(2, 2, 3, 112, 84)  # [B, S, 3, H, W]
    out = enc.encode(frames)
    assert out.shape == (2, 2, 48, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out[1, 0], enc.encode_images([frames[1, 0]])[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(EncoderError, match="not a positive multiple of patch \\* merge = 28"):
        enc.encode(torch.rand(1, 1, 3, 98, 112))
    with pytest.raises(EncoderError, match="attends within one image only"):
        enc.encode_stream(frames)


# ---- (d) loading ------------------------------------------------------------------------


def test_both_key_layouts_and_shards_load_the_same_weights(ckpts):
    assert any(k.startswith("visual.") for k in _keys(ckpts["hub"] / "model.safetensors"))
    assert any(k.startswith("model.visual.") for k in _keys(ckpts["tree"] / "model.safetensors"))
    assert len([n for n in os.listdir(ckpts["sharded"]) if n.endswith(".safetensors")]) > 2
    want = {k[len("model.visual."):]: v for k, v in ckpts["model"].state_dict().items()
            if k.startswith("model.visual.") and ".merger." not in k}
    for name in ("hub", "tree", "sharded"):
        got = get_encoder(FULL, weights=str(ckpts[name])).model.state_dict()
        assert set(got) == set(want), name
        assert all(torch.equal(got[k], want[k]) for k in want), name
    # A file path (config.json beside it) and the index path work too.
    get_encoder(FULL, weights=str(ckpts["tree"] / "model.safetensors"))
    get_encoder(FULL, weights=str(ckpts["sharded"] / "model.safetensors.index.json"))


def test_only_the_shards_holding_vision_keys_are_read(ckpts, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(ckpts["sharded"], folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    vision = {v for k, v in index.items() if k.startswith("visual.")}
    others = sorted(set(index.values()) - vision)
    assert others
    before = resolve_spec(FULL, weights=str(folder)).weights_sha256
    for name in others:
        (folder / name).write_bytes(b"not a safetensors file")  # the language model's shards
    assert get_encoder(FULL, weights=str(folder)).spec.weights_sha256 == before
    os.unlink(folder / sorted(vision)[0])
    with pytest.raises(WeightsError, match=r"shard .* \(it holds vision keys\) is missing"):
        resolve_spec(FULL, weights=str(folder))


def test_strict_loading_names_the_keys_and_the_file(ckpts, tmp_path):
    def drop(t):
        return {k: v for k, v in t.items() if k != "visual.blocks.0.norm1.weight"}

    folder = _rewrite(ckpts["hub"], tmp_path / "missing", drop)
    with pytest.raises(WeightsError, match=r"model.safetensors' do not match the vision config: missing key\(s\) "
                                           r"\[visual.blocks.0.norm1.weight\] \(1 in all\)"):
        get_encoder(FULL, weights=folder)

    def extra(t):
        return {**t, "visual.blocks.2.norm1.weight": torch.ones(32)}

    folder = _rewrite(ckpts["hub"], tmp_path / "extra", extra)
    with pytest.raises(WeightsError, match=r"unexpected vision key\(s\) \[visual.blocks.2.norm1.weight\]"):
        get_encoder(FULL, weights=folder)

    def language_only(t):
        return {k: v for k, v in t.items() if not k.startswith("visual.")}

    folder = _rewrite(ckpts["hub"], tmp_path / "novision", language_only)
    with pytest.raises(WeightsError, match=r"hold no vision key \(visual.\* or model.visual.\*\)"):
        get_encoder(FULL, weights=folder)

    def both(t):
        return {**t, **{"model." + k: v.clone() for k, v in t.items() if k.startswith("visual.")}}

    folder = _rewrite(ckpts["hub"], tmp_path / "both", both)
    with pytest.raises(WeightsError, match="in both layouts"):
        get_encoder(FULL, weights=folder)

    def no_merger(t):  # the merger is not needed: a checkpoint without it still loads
        return {k: v for k, v in t.items() if ".merger." not in k}

    get_encoder(FULL, weights=_rewrite(ckpts["hub"], tmp_path / "nomerger", no_merger))


def test_weights_errors_say_what_to_pass(ckpts, tmp_path):
    with pytest.raises(WeightsError, match=r"needs weights: .*Qwen2.5-VL-3B-Instruct.*hub id "
                                           r"'Qwen/Qwen2.5-VL-3B-Instruct'"):
        resolve_spec(FULL)
    with pytest.raises(WeightsError, match=r"do not exist; pass a Qwen2.5-VL checkpoint"):
        resolve_spec(FULL, weights=str(tmp_path / "nowhere" / "model.safetensors"))
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(ckpts["hub"] / "model.safetensors", bare / "model.safetensors")
    with pytest.raises(WeightsError, match=r"no config.json beside them"):
        resolve_spec(FULL, weights=str(bare))
    # The tiny preset knows its config: a bare tiny checkpoint loads.
    enc = get_encoder(TINY, weights=str(bare / "model.safetensors"))
    assert enc.spec.config == resolve_spec(TINY).config
    (bare / "config.json").write_text(json.dumps({"vision_config": {**TINY_VISION_CONFIG, "window_size": 56}}))
    with pytest.raises(WeightsError, match=r"window_size: checkpoint 56, preset 112"):
        resolve_spec(TINY, weights=str(bare))
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match=r"holds neither model.safetensors nor model.safetensors.index.json"):
        resolve_spec(FULL, weights=str(tmp_path / "empty"))


# ---- (e) spec ---------------------------------------------------------------------------


def test_spec_resolves_without_a_model_and_fingerprints_what_decides_the_numbers(ckpts):
    spec = resolve_spec(FULL, weights=str(ckpts["hub"]))
    enc = get_encoder(FULL, weights=str(ckpts["hub"]))
    assert spec == enc.spec and spec.fingerprint() == enc.spec.fingerprint()
    assert resolve_spec(TINY) == get_encoder(TINY).spec
    assert spec.implementation == "transformers" and spec.code_version == "qwen-vision-1"
    assert spec.layer == -1 and spec.layer_resolved == 1 and spec.preprocess == PreprocessSpec(target_size=518)
    assert spec.config == spec_config(TINY_VISION_CONFIG)
    with open(ckpts["hub"] / "model.safetensors", "rb") as f:
        import hashlib

        assert spec.weights_sha256 == hashlib.sha256(f.read()).hexdigest()
    assert unit_of(FULL) == unit_of(TINY) == "image" and feature_set_of(FULL) == "qwen_vision"

    # The same weights in another file (layout, shards) are another checkpoint: another fingerprint.
    prints = {spec.fingerprint()}
    for other in ("tree", "sharded", "other"):
        prints.add(resolve_spec(FULL, weights=str(ckpts[other])).fingerprint())
    for changes in (dict(target_size=644), dict(storage_dtype="float16"), dict(compute_dtype="float16")):
        prints.add(resolve_spec(FULL, weights=str(ckpts["hub"]), **changes).fingerprint())
    assert len(prints) == 7
    assert resolve_spec(FULL, weights=str(ckpts["hub"]), target_size=644).diff(spec) == ["preprocess.target_size"]

    # A store's spec rebuilds its encoder; other weights are refused, naming the field.
    assert encoder_for_spec(spec, weights=str(ckpts["hub"])).spec == spec
    with pytest.raises(FingerprintMismatchError, match="weights_sha256"):
        encoder_for_spec(spec, weights=str(ckpts["other"]))


@pytest.mark.parametrize("option, message", [
    (dict(layer=-2), "offers layer=-1 only"),
    (dict(layer=1), "offers layer=-1 only"),
    (dict(attention="causal"), "offers attention='full' only"),
    (dict(frames_kept="last"), "offers frames_kept='all' only"),
    (dict(backend="official"), "backend must be 'transformers'"),
    (dict(depth=3), "unknown encoder option 'depth'"),
])
def test_refused_options(option, message):
    with pytest.raises(EncoderError, match=message):
        resolve_spec(TINY, **option)


@pytest.mark.slow
def test_compiled_tower_blocks_match_the_eager_tower_over_image_counts_and_sizes():
    """compile=True (build --compile): every block under torch.compile; a new token count
    recompiles (then dynamic), and the features stay those of the eager tower within rounding."""
    eager, compiled = get_encoder(TINY), get_encoder(TINY, compile=True)
    assert all(b._compiled_call_impl is not None for b in compiled.model.blocks)
    assert eager.spec == compiled.spec  # how it runs, not what it computes
    gen = torch.Generator().manual_seed(0)
    for shape in [(2, 2, 3, 56, 84), (1, 3, 3, 84, 112)]:  # then other image count and size: recompiled
        x = torch.rand(shape, generator=gen)
        want, got = eager.encode(x), compiled.encode(x)
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), shape


# ---- (f) one image as a unit --------------------------------------------------------------


def test_encode_unit_on_a_one_image_unit(tmp_path):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    enc = get_encoder(TINY, target_size=224)  # view 224x154 -> 16x11 patches -> 16x10 -> 224x140
    feats, meta = encode_unit(enc, str(tmp_path), Unit("img.png", ("img.png",)))
    frame = qwen_frame(str(tmp_path / "img.png"), enc.spec.preprocess)
    assert tuple(frame.shape) == (3, 140, 224)
    assert feats.dtype == torch.bfloat16 and feats.shape == (1, 10 * 16, 32)
    assert torch.equal(feats, enc.encode(frame[None, None])[0].to(torch.bfloat16))
    assert json.loads(meta["grid"]) == [10, 16] and json.loads(meta["frames"]) == ["img.png"]
    assert meta["fingerprint"] == enc.spec.fingerprint() and meta["encoder"] == TINY


@pytest.mark.parametrize("size, pre", [((150, 100), {}), ((100, 150), {}), ((150, 100), dict(preprocess_mode="pad")),
                                       ((300, 100), dict(target_size=224))])
def test_stored_shape_is_the_shape_encode_unit_stores(tmp_path, size, pre):
    from featstore.encoders import stored_shape
    from featstore.encoders.preprocess import view_size

    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(tmp_path / "img.png")
    for name in (TINY, "vggt-tiny"):
        enc = get_encoder(name, **pre)
        feats, _ = encode_unit(enc, str(tmp_path), Unit("img.png", ("img.png",)))
        assert stored_shape(enc.spec, *size) == tuple(feats.shape), name
    view = preprocess_image(str(tmp_path / "img.png"), enc.spec.preprocess)
    assert view_size(*size, enc.spec.preprocess) == (view.shape[2], view.shape[1])
