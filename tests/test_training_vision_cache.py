"""Cached Qwen vision features (--use_vision_cache): the model without vision blocks gives the
frozen tower's loss and gradients, loads checkpoints, and the dataset reads a real LMDB store
(DataLoader workers included); bad flags, misses and shape mismatches are named.

The cached features are what the frozen tower computes: the hidden states after the last vision
block, before `visual.merger`, in the image processor's patch order. Here they come from the
tiny model's own tower (`tower_features`), stored per frame with featstore's StoreWriter.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from _training_helpers import (annotations, build_store, collate, dataset, max_rel, model_inputs, online,
                               sample_root, spec_for)


def tower_features(model, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """The vision tower's last-block output [patches, C_vis] in pixel_values' (canonical) order.

    The tower runs its blocks on patches permuted into attention windows (groups of 4, one per
    merged token) and un-permutes only after the merger: capture the merger's input and undo it."""
    visual = model.model.visual
    captured = {}
    hook = visual.merger.register_forward_pre_hook(lambda module, args: captured.update(x=args[0]))
    try:
        with torch.no_grad():
            model.model.get_image_features(pixel_values, grid_thw)
    finally:
        hook.remove()
    try:  # transformers >= 5.23
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(grid_thw, visual.spatial_merge_size, visual.window_size,
                                                  visual.patch_size)
    except ImportError:  # earlier 5.x: a method of the tower
        window_index, _ = visual.get_window_index(grid_thw)
    x = captured["x"]
    unit = visual.spatial_merge_size ** 2
    return x.reshape(-1, unit, x.shape[-1])[torch.argsort(window_index)].reshape(-1, x.shape[-1])


def frame_features(model, ds) -> dict:
    """frame key -> [N, C_vis] for every frame of `ds`, from `model`'s tower (one call per sample)."""
    out = {}
    for i, unit in enumerate(ds.units):
        item = ds[i]
        feats = tower_features(model, item["pixel_values"], item["image_grid_thw"])
        for key, f in zip(unit.frames, feats.split(int(item["image_grid_thw"][0].prod()))):
            out[key] = f
    return out


def _merger_input(model, item) -> torch.Tensor:
    captured = {}
    hook = model.model.visual.merger.register_forward_pre_hook(lambda module, args: captured.update(x=args[0]))
    with torch.no_grad():
        model.model.get_image_features(item["pixel_values"], item["image_grid_thw"])
    hook.remove()
    return captured["x"]


def write_vision_store(path: str, features: dict, dtype: torch.dtype) -> str:
    """A real LMDB store: one entry per frame key, features [1, N, C], stored for [that frame]."""
    from featstore.store.writer import StoreWriter

    with StoreWriter(path, spec=None) as w:
        for key, f in features.items():
            w.put(key, {"features": f[None].to(dtype).contiguous()}, {"frames": json.dumps([key])})
        w.finish(report={"failed": []})
    return path


def windowed_model(spec, *, vision_cached: bool = False):
    """The tiny model with 56 px attention windows (2x2 merged tokens): the tiny preset's 112 px
    window holds a whole tiny image, where the tower's window permutation would be the identity."""
    from training.model import Qwen2_5_VLWithGeometry, geometry_config
    from training.presets import tiny_config, tiny_tokenizer

    cfg = tiny_config(tiny_tokenizer(), vggt_geometry=geometry_config(2 * spec.config["embed_dim"]),
                      vision_cached=vision_cached)
    cfg.vision_config.window_size = 56
    torch.manual_seed(0)
    return Qwen2_5_VLWithGeometry._from_config(cfg)


def vision_model(full, spec):
    """The cached-vision model with `full`'s weights (its blocks' keys unexpected, nothing missing)."""
    model = windowed_model(spec, vision_cached=True)
    result = model.load_state_dict(full.state_dict(), strict=False)
    assert not result.missing_keys
    assert result.unexpected_keys and all(k.startswith(("model.visual.blocks.", "model.visual.patch_embed."))
                                          for k in result.unexpected_keys)
    return model


def loss_and_grads(model, batch: dict):
    model.zero_grad(set_to_none=True)
    out = model(**model_inputs(batch))
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Sample data with a VGGT store, the full tiny model, and every frame's tower features."""
    from featstore.store.reader import FeatureStore

    tmp = tmp_path_factory.mktemp("vision")
    root = sample_root(tmp)
    spec = spec_for()
    vggt_store = FeatureStore(build_store(root), expected_encoder=spec.to_dict())
    full = windowed_model(spec)
    ds = dataset(root, spec)
    item = ds[0]
    assert not torch.equal(tower_features(full, item["pixel_values"], item["image_grid_thw"]),
                           _merger_input(full, item))  # several windows per image: a real permutation
    feats = frame_features(full, ds)
    return dict(tmp=tmp, root=root, spec=spec, vggt_store=vggt_store, full=full, feats=feats)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cached_vision_and_vggt_give_the_online_towers_loss_and_gradients(parts, dtype):
    """All five samples (1 to 4 images each). Cached: vision features and VGGT features from
    stores; online: the frozen tower on pixel_values and VGGT on the frames. Trained: the
    geometry merger, the LLM and visual.merger.

    fp32 storage: the merger receives the tower's own values (only its rows permuted), so loss and
    gradients agree to float rounding; a wrong patch order fails both bounds. bf16 storage rounds each feature by <= 2^-9 relative."""
    from featstore.store.reader import FeatureStore
    from training.model import set_trainable

    root, spec, full = parts["root"], parts["spec"], parts["full"]
    path = write_vision_store(str(parts["tmp"] / f"vision_{str(dtype)[6:]}.lmdb"), parts["feats"], dtype)
    cached = collate(dataset(root, spec, store=parts["vggt_store"], vision_store=FeatureStore(path)))
    live = collate(dataset(root, spec))
    assert "pixel_values" not in cached and cached["vision_features"].dtype == dtype
    assert cached["vision_features"].shape == (live["pixel_values"].shape[0], 32)
    assert cached["vggt_source"].tolist() == [1] * 5 and live["vggt_source"].tolist() == [2] * 5
    for key in ("input_ids", "labels", "image_grid_thw", "mm_token_type_ids", "attention_mask", "vggt_grid",
                "vggt_images"):
        assert torch.equal(cached[key], live[key]), key

    model = vision_model(full, spec)
    full.attach_vggt(online(spec))
    for m in (full, model):
        set_trainable(m, merger=True, llm=True, vision=False, vision_merger=True)
    loss_o, grads_o = loss_and_grads(full, live)
    loss_c, grads_c = loss_and_grads(model, cached)
    assert set(grads_c) == set(grads_o)
    assert any(n.startswith("model.visual.merger.") for n in grads_c) and any(n.startswith("merger.") for n in grads_c)
    assert any(n.startswith("model.language_model.") for n in grads_c)
    assert all(grads_c[n].abs().sum() > 0 for n in grads_c if "visual.merger" in n or n.startswith("merger."))
    # measured: fp32 loss identical, gradients ~2e-7 (the same rows, permuted: GEMMs block their sums
    # differently); bf16 ~1e-7 on the loss, ~7e-4 on the largest gradient difference
    loss_tol, grad_tol = (1e-6, 1e-5) if dtype == torch.float32 else (1e-4, 1e-2)
    assert max_rel(loss_c, loss_o) < loss_tol
    for name in grads_c:
        assert max_rel(grads_c[name], grads_o[name]) < grad_tol, name


def test_the_model_holds_no_vision_block_and_loads_a_hub_checkpoint(tmp_path):
    """In the hub's key layout: missing keys are exactly the geometry merger's, as without the
    cache; the blocks' keys are unexpected; the LLM and visual.merger load."""
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    from training.model import (Qwen2_5_VLWithGeometry, geometry_config, set_trainable,
                                vision_block_parameter_count)
    from training.presets import tiny_config, tiny_tokenizer

    cfg = tiny_config(tiny_tokenizer())
    torch.manual_seed(1)
    stock = Qwen2_5_VLForConditionalGeneration._from_config(cfg)
    renames = {"model.visual.": "visual.", "model.language_model.": "model."}
    hub = {next((new + k[len(old):] for old, new in renames.items() if k.startswith(old)), k): v.contiguous()
           for k, v in stock.state_dict().items()}
    ckpt = tmp_path / "hub"
    ckpt.mkdir()
    save_file(hub, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(str(ckpt))

    config = type(cfg).from_pretrained(str(ckpt))
    config.vggt_geometry, config.vision_cached = geometry_config(128), True
    model, info = Qwen2_5_VLWithGeometry.from_pretrained(str(ckpt), config=config, output_loading_info=True)
    assert set(info["missing_keys"]) == {"merger." + k for k in model.merger.state_dict()}
    assert info["unexpected_keys"] and all(k.startswith(("model.visual.blocks.", "model.visual.patch_embed."))
                                           for k in info["unexpected_keys"])
    assert vision_block_parameter_count(model) == 0 and len(model.model.visual.blocks) == 0
    assert not [n for n, _ in model.named_parameters() if n.startswith("model.visual.") and ".merger." not in n]
    state = model.state_dict()
    for k, v in stock.state_dict().items():
        if not k.startswith(("model.visual.blocks.", "model.visual.patch_embed.")):
            assert torch.equal(state[k], v), k
    assert any(k.startswith("model.visual.merger.") for k in state)

    counts = set_trainable(model, merger=False, llm=False, vision=False, vision_merger=True)
    assert counts["vision"] == 0 and counts["vision_merger"] == sum(p.numel() for p in model.model.visual.parameters())
    with_tower = Qwen2_5_VLWithGeometry._from_config(cfg)  # without the cache: the blocks are there
    assert vision_block_parameter_count(with_tower) > 0
    counts = set_trainable(with_tower, merger=False, llm=False, vision=True)
    assert counts["vision"] > 0 and counts["vision_merger"] > 0  # vision_merger follows vision by default
    with pytest.raises(ValueError, match="holds no vision blocks.*pass vision_features"):
        model(input_ids=torch.zeros(1, 4, dtype=torch.long), pixel_values=torch.zeros(16, 1176),
              image_grid_thw=torch.tensor([[1, 4, 4]]))


def test_use_vision_cache_with_tune_vision_is_refused_and_online_vggt_is_allowed(tmp_path, capsys):
    from training.args import ArgumentError, parse_args, resolve_vggt
    from training.train import main

    root = sample_root(tmp_path)
    base = ["--data_root", root, "--annotations", annotations(root), "--output_dir", str(tmp_path / "o")]
    with pytest.raises(ArgumentError) as e:
        resolve_vggt(*parse_args(base + ["--use_vision_cache", "--tune_vision"])[:2])
    assert str(e.value).startswith("--use_vision_cache contradicts --tune_vision: the cached vision features were "
                                   "computed by the frozen tower's weights, so a trained tower would make them stale")
    assert main(base + ["--use_vision_cache", "--tune_vision", "true"]) == 2
    assert "--use_vision_cache contradicts --tune_vision" in capsys.readouterr().err

    model_args, data_args, _ = parse_args(base + ["--use_vision_cache", "--vggt_cache_path", "/s.lmdb",
                                                  "--tune_vision_merger"])
    s = resolve_vggt(model_args, data_args)
    assert (s.mode, s.vision_cached, s.vision_store_path, s.store_path) == ("online_full", True, "/s.lmdb", None)
    assert model_args.tune_vision_merger is True
    s = resolve_vggt(*parse_args(base + ["--use_vision_cache", "--use_vggt_cache"])[:2])
    assert s.store_path == s.vision_store_path == os.path.join(root, "vggt_features.lmdb")
    with pytest.raises(ArgumentError, match="--vggt_cache_path is only read with"):
        resolve_vggt(*parse_args(base + ["--vggt_cache_path", "/s.lmdb"])[:2])


def test_dataloader_workers_read_the_vision_store(parts):
    """Two worker processes, online VGGT (frames shipped): the batch equals the one made in
    this process, and its vision features are the tower's."""
    from featstore.store.reader import FeatureStore
    from training.data import Collator

    root, spec = parts["root"], parts["spec"]
    path = write_vision_store(str(parts["tmp"] / "vision_workers.lmdb"), parts["feats"], torch.bfloat16)
    ds = dataset(root, spec, vision_store=FeatureStore(path))
    direct = collate(ds)
    loader = torch.utils.data.DataLoader(ds, batch_size=len(ds), num_workers=2, collate_fn=Collator(
        ds.tokenizer.pad_token_id), multiprocessing_context="fork")
    (batch,) = list(loader)
    assert set(batch) == set(direct) and "vision_features" in batch and "pixel_values" not in batch
    for key in batch:
        assert torch.equal(batch[key], direct[key]), key
    expect = torch.cat([parts["feats"][f] for unit in ds.units for f in unit.frames]).to(torch.bfloat16)
    assert torch.equal(batch["vision_features"], expect)
    assert batch["vggt_source"].tolist() == [2] * 5


def test_a_miss_or_a_shape_mismatch_names_the_key_and_the_sample(parts):
    from featstore.store.reader import FeatureStore
    from training.data import VisionCacheMissError

    root, spec, feats = parts["root"], parts["spec"], parts["feats"]
    partial = {k: v for k, v in feats.items() if k != "scene_a/001.jpg"}
    path = write_vision_store(str(parts["tmp"] / "vision_partial.lmdb"), partial, torch.bfloat16)
    ds = dataset(root, spec, vision_store=FeatureStore(path))
    with pytest.raises(VisionCacheMissError) as e:
        ds[0]  # scene_a_step3: frames 000-003
    assert str(e.value).startswith(f"vision feature cache miss for {annotations(root)} sample 0 (id 'scene_a_step3'): "
                                   f"key 'scene_a/001.jpg' is not in the store {path}")

    small = {k: v[: v.shape[0] // 2] for k, v in feats.items()}  # half the patches: another image size
    path = write_vision_store(str(parts["tmp"] / "vision_small.lmdb"), small, torch.bfloat16)
    ds = dataset(root, spec, vision_store=FeatureStore(path))
    with pytest.raises(VisionCacheMissError) as e:
        ds[4]  # misc/portrait.png: 8x8 Qwen patches
    assert str(e.value).startswith(f"{annotations(root)} sample 4 (id 'portrait_q'): cached vision features "
                                   "for key 'misc/portrait.png' have shape (1, 32, 32), expected [1, 64, C]")


def test_training_runs_without_vision_blocks_and_its_checkpoint_needs_the_cache(parts, tmp_path, caplog):
    import logging

    from featstore.store.reader import FeatureStore
    from training.args import ArgumentError
    from training.model import vision_block_parameter_count
    from training.train import run

    root = parts["root"]
    path = write_vision_store(str(parts["tmp"] / "vision_run.lmdb"), parts["feats"], torch.bfloat16)
    argv = ["--data_root", root, "--annotations", annotations(root), "--use_vggt_cache", "--use_vision_cache",
            "--tune_vision_merger", "--output_dir", str(tmp_path / "a"), "--max_steps", "2",
            "--per_device_train_batch_size", "2", "--use_cpu", "--report_to", "none", "--save_strategy", "no",
            "--disable_tqdm", "true"]
    with caplog.at_level(logging.INFO, logger="training"):
        trainer = run(argv, vision_store=FeatureStore(path))
    assert vision_block_parameter_count(trainer.model) == 0
    assert any(m.startswith("Qwen vision tower: cached features (blocks not built); vision-block parameters 0, "
                            "visual.merger parameters ") for m in caplog.messages)
    assert any("'vision': 0, 'vision_merger': " in m for m in caplog.messages)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a" / "model.safetensors"), "pt") as f:
        saved = list(f.keys())
    assert any(".merger." in k and "visual" in k for k in saved)
    assert not [k for k in saved if "visual.blocks" in k or "patch_embed" in k]
    with pytest.raises(ArgumentError, match="trained with --use_vision_cache and holds no vision blocks"):
        run(["--model_name_or_path", str(tmp_path / "a"), "--vggt_encoder", "vggt-tiny",
             *[a for a in argv if a not in ("--use_vision_cache", "--tune_vision_merger")]])


def test_featstore_builds_the_vision_set_beside_vggt_and_training_reads_both(parts, tmp_path):
    """`featstore build --encoder qwen2.5-vl-vision --weights <the model's checkpoint>` into the
    store that holds the VGGT features stores exactly the tower features training's model computes
    (in bf16), and training's own spec check accepts that set (and refuses another checkpoint)."""
    from featstore.build.runner import BuildOptions, build
    from featstore.errors import FingerprintMismatchError
    from featstore.store.reader import FeatureStore
    from training.args import parse_args, resolve_vggt
    from training.train import open_vision_cache, vision_spec

    ckpt = str(tmp_path / "qwen")
    parts["full"].save_pretrained(ckpt)
    root = sample_root(tmp_path)  # its own store: the module's is open in this process
    build_store(root)
    opts = BuildOptions(data_root=root, annotations=[annotations(root)], encoder="qwen2.5-vl-vision",
                        weights=ckpt, spec_overrides={"target_size": parts["spec"].preprocess.target_size},
                        progress=False, workers=0)
    report = build(opts)
    assert not report.failed and report.computed == len(parts["feats"])
    store = FeatureStore(root, feature_set="qwen_vision")
    assert store.feature_sets() == ["qwen_vision", "vggt"] and len(store) == len(parts["feats"])
    with store.snapshot():
        for key, want in parts["feats"].items():
            got = store.get(key).features
            assert got.dtype == torch.bfloat16 and got.shape == (1, *want.shape), key
            assert max_rel(got[0].float(), want.float()) < 2e-2, key  # bf16 storage of the same numbers

    argv = ["--data_root", root, "--annotations", annotations(root), "--use_vggt_cache", "--use_vision_cache",
            "--model_name_or_path", ckpt, "--vggt_encoder", "vggt-tiny", "--output_dir", str(tmp_path / "o")]
    settings = resolve_vggt(*parse_args(argv)[:2])
    assert (settings.vision_encoder, settings.vision_weights) == ("qwen2.5-vl-vision", ckpt)
    assert len(open_vision_cache(settings, vision_spec(settings, parts["spec"]))) == len(parts["feats"])
    from featstore.encoders import resolve_spec

    random_tower = resolve_spec("qwen2.5-vl-vision-tiny", target_size=parts["spec"].preprocess.target_size)
    with pytest.raises(FingerprintMismatchError, match="weights_sha256.*--vision_weights"):
        open_vision_cache(settings, random_tower)  # features of another tower: refused, naming the field


def test_with_both_caches_no_image_is_decoded(parts, tmp_path):
    """VGGT and vision features both cached: the dataset reads only the images' headers. The
    frames here are zeroed after their first 700 bytes (headers intact, size and mtime kept, so the
    freshness check passes, but the pixels are gone and decoding fails) and the batch equals the one
    made from the intact images; without the VGGT cache the frames are needed and the cut file is named."""
    import shutil

    from featstore.errors import ImageDecodeError
    from featstore.store.reader import FeatureStore

    root, spec = parts["root"], parts["spec"]
    vision = FeatureStore(write_vision_store(str(tmp_path / "vision.lmdb"), parts["feats"], torch.bfloat16))
    want = collate(dataset(root, spec, store=parts["vggt_store"], vision_store=vision))
    cut = str(tmp_path / "cut")
    shutil.copytree(root, cut, ignore=shutil.ignore_patterns("*.lmdb"))
    for key in parts["feats"]:
        path = os.path.join(cut, key)
        st = os.stat(path)
        with open(path, "r+b") as f:
            f.seek(700)
            f.write(b"\0" * (st.st_size - 700))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    got = collate(dataset(cut, spec, store=parts["vggt_store"], vision_store=vision))
    assert set(got) == set(want) and "pixel_values" not in got
    for key in want:
        assert torch.equal(got[key], want[key]), key
    with pytest.raises(ImageDecodeError, match="cut"):
        dataset(cut, spec, vision_store=vision)[0]  # online VGGT: the pixels are needed


def test_a_vision_set_built_with_the_old_resize_is_refused_and_the_vggt_set_still_opens(tmp_path):
    """A vision set written before the Qwen image became a crop (its spec: no qwen_view, the
    config's old `resize` rule) is refused at open, naming qwen_view and saying to rebuild that set;
    the VGGT set of the same store keeps opening."""
    from featstore.errors import FingerprintMismatchError
    from featstore.store.writer import StoreWriter
    from training.args import parse_args, resolve_vggt
    from training.train import open_feature_cache, open_vision_cache, vision_spec

    root = sample_root(tmp_path)
    store = build_store(root)
    argv = ["--data_root", root, "--annotations", annotations(root), "--use_vggt_cache", "--use_vision_cache",
            "--output_dir", str(tmp_path / "o")]
    settings = resolve_vggt(*parse_args(argv)[:2])
    vggt_spec = spec_for()
    now = vision_spec(settings, vggt_spec)
    assert now.qwen_view == "crop" and "resize" not in now.config
    old = now.replace(qwen_view=None, config={**now.config, "resize": "vggt-view-grid-trimmed-even-pil-bicubic"})
    assert "qwen_view" not in old.to_dict()  # as the old code wrote it
    with StoreWriter(store, spec=old, feature_set="qwen_vision") as w:
        w.put("scene_a/000.jpg", {"features": torch.zeros(1, 48, 32, dtype=torch.bfloat16)},
              {"frames": json.dumps(["scene_a/000.jpg"])})
        w.finish(report={"failed": []})
    with pytest.raises(FingerprintMismatchError) as e:
        open_vision_cache(settings, now)
    msg = str(e.value)
    assert "qwen_view" in msg and "rebuild that set" in msg and "qwen2.5-vl-vision" in msg
    assert len(open_feature_cache(store, vggt_spec)) == 5  # the VGGT set: unaffected


def test_a_store_without_vision_features_names_the_vision_encoder_and_its_advice_works(tmp_path, capsys):
    import re
    import shlex

    from featstore.cli import main as featstore_main
    from featstore.errors import FeatureSetNotFoundError
    from featstore.store.reader import FeatureStore
    from training.train import main

    root = sample_root(tmp_path)
    store = build_store(root)  # VGGT features only
    argv = ["--data_root", root, "--annotations", annotations(root), "--output_dir", str(tmp_path / "o"),
            "--use_vggt_cache", "--use_vision_cache", "--max_steps", "1", "--use_cpu", "--report_to", "none"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    # Not `--feature-set qwen_vision`: with the default encoder that writes VGGT features into the set.
    assert "--feature-set" not in err
    assert err == (f"error: --use_vision_cache: {store} holds no cached Qwen vision features (feature set "
                   f"'qwen_vision'); build them into it: featstore build --data-root DATA_ROOT --annotations FILE "
                   f"--store {store} --encoder qwen2.5-vl-vision-tiny (with the --target-size/--preprocess-mode of "
                   "the VGGT features), or train without --use_vision_cache\n")
    with pytest.raises(FeatureSetNotFoundError) as e:  # the library's own message names the encoder too
        FeatureStore(store, feature_set="qwen_vision").manifest
    assert str(e.value).endswith("or build this one into the store (`featstore build --encoder qwen2.5-vl-vision` "
                                 "(or qwen2.5-vl-vision-tiny), which writes this set)")
    # The advice, as printed (placeholders filled in), writes what training reads.
    command = re.search(r"featstore build (.*?) \(with", err).group(1)
    command = command.replace("DATA_ROOT", root).replace("FILE", annotations(root))
    assert featstore_main([*shlex.split("build " + command), "--workers", "0", "--no-progress"]) == 0
    assert main(argv) == 0
