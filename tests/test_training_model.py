"""The model: cached == online, fusion semantics, merger token order, checkpoint layouts."""

from __future__ import annotations

import json
import os

import pytest
import torch

from _training_helpers import (build_store, collate, dataset, loss_and_merger_grads, max_rel, model_inputs,
                               online, sample_root, spec_for, tiny_model)


@pytest.mark.parametrize("fusion,mode", [("per_image", "online_full"), ("per_image", "online_causal_stream"),
                                         ("last_to_all", "online_full"), ("last_to_all", "online_causal_stream")])
def test_cached_loss_and_merger_grads_equal_online(tmp_path, fusion, mode):
    """Same batch (all five sample-data samples, 1 to 4 images each), same weights.

    online_full: BIT-IDENTICAL to the cache. The build and the online path run the same
    encode-one-unit code on the same preprocessed frames and cast to the same storage dtype
    (bf16 here, the default), so the merger receives the same bytes.
    online_causal_stream: the store holds ONE block-causal call (what `featstore build
    --attention causal` computes); the stream feeds one frame per call with a key/value cache.
    Equal in exact arithmetic, they differ in float summation order (~3e-7 relative on the
    features in fp32), which bf16 storage can turn into 1-ulp flips (~4e-3) on a few values. So
    the stream is compared with float32 storage, where the merger consumes exactly the storage
    dtype: loss within 1e-6 relative, merger gradients within 1e-5 relative.
    """
    stream = mode == "online_causal_stream"
    overrides = dict(attention="causal" if stream else "full", frames_kept="all" if fusion == "per_image" else "last",
                     storage_dtype="float32" if stream else "bfloat16")
    root = sample_root(tmp_path)
    store_path = build_store(root, **overrides)
    spec = spec_for(**overrides)
    from featstore.store.reader import FeatureStore

    cached = collate(dataset(root, spec, store=FeatureStore(store_path, expected_encoder=spec.to_dict())))
    live = collate(dataset(root, spec))
    assert cached["vggt_source"].tolist() == [1] * 5 and int(cached["cache_hits"]) == 5
    assert live["vggt_source"].tolist() == [2] * 5 and cached["vggt_features"].numel() > 0
    for key in ("input_ids", "labels", "pixel_values", "image_grid_thw", "mm_token_type_ids"):
        assert torch.equal(cached[key], live[key]), key

    model = tiny_model(spec, fusion=fusion, scale=0.2 if fusion == "last_to_all" else 1.0)
    model.attach_vggt(online(spec, stream=stream))
    loss_c, grads_c = loss_and_merger_grads(model, cached)
    loss_o, grads_o = loss_and_merger_grads(model, live)
    assert all(g.abs().sum() > 0 for g in grads_c.values())
    if not stream:
        assert torch.equal(loss_c, loss_o)
        for name in grads_c:
            assert torch.equal(grads_c[name], grads_o[name]), name
    else:
        assert max_rel(loss_o, loss_c) < 1e-6
        for name in grads_c:
            assert max_rel(grads_o[name], grads_c[name]) < 1e-5, name


def test_last_to_all_adds_each_samples_own_features_to_its_images_only(tmp_path):
    spec = spec_for(attention="causal", frames_kept="last")
    root = sample_root(tmp_path)
    ds = dataset(root, spec)
    batch = collate(ds, [0, 2, 4])  # scene_a 4 images, scene_b 4 images, portrait 1 image
    model = tiny_model(spec, fusion="last_to_all", scale=0.2).eval()
    model.attach_vggt(online(spec))
    feats = [model.online_vggt.features(ds[i]["frames"].float().div(255), "cpu") for i in (0, 2, 4)]
    with torch.no_grad():
        offsets = _per_image(model, batch, model.geometry_offsets(batch))
        grids = batch["vggt_grid"].tolist()
        expect = [0.2 * model.merger(f, *g)[-1] for f, g in zip(feats, grids)]
    assert len(offsets) == 9
    owner = [0] * 4 + [1] * 4 + [2]
    # allclose, not equal: the model runs all samples through one MLP call, and a GEMM over more
    # rows may round differently from the per-sample call here (1e-7 level); samples differ at 1e-1.
    for k, off in enumerate(offsets):
        assert torch.allclose(off, expect[owner[k]], rtol=1e-5, atol=1e-7), k
        others = [expect[j] for j in range(3) if j != owner[k] and expect[j].shape == off.shape]
        assert all(not torch.allclose(off, o, rtol=1e-2, atol=1e-4) for o in others), k
    assert not torch.equal(expect[0], expect[1])  # the samples' features differ: no accidental sharing

    # End to end: changing sample 0's frames changes only row 0's logits.
    with torch.no_grad():
        base = model(**model_inputs(batch)).logits
        changed = dict(batch)
        n0 = int(batch["vggt_frame_count"][0]) * 3 * 84 * 112
        frames = batch["vggt_frames"].clone()
        frames[:n0] = 255 - frames[:n0]
        changed["vggt_frames"] = frames
        after = model(**model_inputs(changed)).logits
    assert not torch.allclose(base[0], after[0])
    assert torch.equal(base[1], after[1]) and torch.equal(base[2], after[2])


def test_per_image_adds_frame_k_to_image_k(tmp_path):
    spec = spec_for()
    root = sample_root(tmp_path)
    ds = dataset(root, spec)
    batch = collate(ds, [1, 4])  # 2 images, then 1
    model = tiny_model(spec).eval()
    model.attach_vggt(online(spec))
    with torch.no_grad():
        offsets = _per_image(model, batch, model.geometry_offsets(batch))
        f1 = model.online_vggt.features(ds[1]["frames"].float().div(255), "cpu")
        f4 = model.online_vggt.features(ds[4]["frames"].float().div(255), "cpu")
        m1, m4 = model.merger(f1, 6, 8), model.merger(f4, 8, 8)
    assert [o.shape[0] for o in offsets] == [12, 12, 16]
    close = dict(rtol=1e-5, atol=1e-7)  # one batched MLP call vs per-sample calls: GEMM rounding only
    assert torch.allclose(offsets[0], m1[0], **close) and torch.allclose(offsets[1], m1[1], **close)
    assert torch.allclose(offsets[2], m4[0], **close)
    assert not torch.allclose(offsets[0], m1[1], rtol=1e-2, atol=1e-4)


def _per_image(model, batch, offsets):
    """The model's [T, hidden] offsets split per image (image_grid_thw order)."""
    merge = model.config.vision_config.spatial_merge_size
    return list(offsets.split((batch["image_grid_thw"].prod(-1) // merge ** 2).tolist()))


def _old_offsets(model, per_sample, counts):
    """The geometry offsets as the model computed them before the batch-shaped read path: each
    sample's features [F, h*w, C] in stored token order, `forward_many` (norm and 2x2 grouping
    per sample, one MLP call), then per image `scale * m[k]` (per_image) or `scale * m[-1]`."""
    merged = model.merger.forward_many([(x, h, w) for _, x, (h, w) in per_sample])
    offsets = []
    for (i, _, _), m in zip(per_sample, merged):
        n = counts[i]
        offsets.extend(model.scale * m[k] for k in range(n)) if model.fusion == "per_image" else \
            offsets.extend(model.scale * m[-1] for _ in range(n))
    return torch.cat(offsets)


@pytest.mark.parametrize("fusion,frames_kept,target_size", [("per_image", "all", 112), ("per_image", "all", 126),
                                                            ("last_to_all", "last", 126), ("last_to_all", "all", 112)])
def test_merger_order_batch_equals_the_old_per_sample_path_bit_for_bit(tmp_path, fusion, frames_kept, target_size):
    """fp32 storage, fp32 model, CPU. The worker lays stored features out in merger order (one
    gather on the copy out of the map) and the model runs one norm, one MLP and one gather: the
    offsets equal the old per-sample path's bit for bit. target_size 126 gives odd 9x7 grids,
    whose last row and column the copy leaves out."""
    from featstore.store.reader import FeatureStore
    from training.merger import group_2x2

    overrides = dict(storage_dtype="float32", frames_kept=frames_kept, target_size=target_size,
                     **({"attention": "causal"} if fusion == "last_to_all" else {}))
    root = sample_root(tmp_path)
    spec = spec_for(**overrides)
    store = FeatureStore(build_store(root, **overrides))
    ds = dataset(root, spec, store=store)
    batch = collate(ds)
    assert batch["vggt_source"].tolist() == [1] * 5
    model = tiny_model(spec, fusion=fusion, scale=0.2 if fusion == "last_to_all" else 1.0).eval()
    with torch.no_grad():  # a merger far from its init, so that roundings would show
        for p in model.merger.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    grids = [tuple(g) for g in batch["vggt_grid"].tolist()]
    per_sample = [(i, store.get(ds.units[i].key).features, grids[i]) for i in range(len(ds))]
    with torch.no_grad():
        new = model.geometry_offsets(batch)
        old = _old_offsets(model, per_sample, batch["vggt_images"].tolist())
    assert new.dtype == torch.float32 and new.shape == old.shape
    assert torch.equal(new, old)
    # The layout: each sample's stored rows gathered into merger order, odd rows and columns left out.
    want = torch.cat([group_2x2(x, *g).reshape(-1, x.shape[-1]) for _, x, g in per_sample])
    assert torch.equal(batch["vggt_features"].view(-1, want.shape[-1] // 4), want.view(-1, want.shape[-1] // 4))
    assert (target_size == 126) == (batch["vggt_features"].shape[0] < sum(x.shape[0] * x.shape[1] for _, x, _ in per_sample))


def test_merger_order_embeddings_equal_the_old_path_with_online_samples_mixed_in(tmp_path):
    """A batch of cached samples and one encoded online (its entry deleted: a miss under policy
    compute) gives the image-token embeddings of the old path bit for bit (fp32, CPU)."""
    from featstore.store.reader import FeatureStore
    from featstore.store.writer import StoreWriter

    root = sample_root(tmp_path)
    spec = spec_for(storage_dtype="float32")
    path = build_store(root, storage_dtype="float32")
    ds = dataset(root, spec, store=FeatureStore(path), cache_miss="compute")
    with StoreWriter(path, handle_signals=False, spec=spec) as w:
        assert w.delete([ds.units[2].key]) == 1
        w.finish()
    batch = collate(ds, [0, 2, 4])
    assert batch["vggt_source"].tolist() == [1, 2, 1] and int(batch["cache_computed"]) == 1
    model = tiny_model(spec).eval()
    model.attach_vggt(online(spec))
    seen = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"].detach()), with_kwargs=True)
    store = FeatureStore(path)
    with torch.no_grad():
        model(**model_inputs(batch))
        image_feats = torch.cat(model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"],
                                                               return_dict=True).pooler_output)
        per_sample = []
        for slot, i in enumerate((0, 2, 4)):
            grid = tuple(batch["vggt_grid"][slot].tolist())
            x = (store.get(ds.units[i].key).features if i != 2 else
                 model.online_vggt.features(ds[i]["frames"].float().div(255), "cpu"))
            per_sample.append((slot, x, grid))
        old = image_feats + _old_offsets(model, per_sample, batch["vggt_images"].tolist())
    hook.remove()
    assert torch.equal(seen["embeds"][batch["input_ids"] == model.config.image_token_id], old)


def test_merger_groups_2x2_blocks_in_qwen_order_and_trims_odd_grids():
    from training.merger import group_2x2

    h, w = 5, 7  # odd: the last row and column are dropped
    x = torch.arange(h * w, dtype=torch.float32).reshape(1, h * w, 1)
    g = group_2x2(x, h, w)
    assert g.shape == (1, 2 * 3, 4)
    # merged token (r, c) holds patches (2r, 2c), (2r, 2c+1), (2r+1, 2c), (2r+1, 2c+1); row-major blocks
    expect = [[(2 * r) * w + 2 * c, (2 * r) * w + 2 * c + 1, (2 * r + 1) * w + 2 * c, (2 * r + 1) * w + 2 * c + 1]
              for r in range(2) for c in range(3)]
    assert g[0].tolist() == expect


def test_hub_layout_checkpoint_loads_with_exactly_the_merger_missing(tmp_path):
    """A checkpoint in the hub's key layout (`visual.*`, `model.*` for the LLM, `lm_head`)."""
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    from training.model import Qwen2_5_VLWithGeometry, geometry_config
    from training.presets import tiny_config, tiny_tokenizer

    cfg = tiny_config(tiny_tokenizer())
    torch.manual_seed(1)
    stock = Qwen2_5_VLForConditionalGeneration._from_config(cfg)
    hub = {}
    for k, v in stock.state_dict().items():
        if k.startswith("model.visual."):
            k = "visual." + k[len("model.visual."):]
        elif k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model."):]
        hub[k] = v.contiguous()
    assert any(k.startswith("model.layers.") for k in hub) and any(k.startswith("visual.blocks.") for k in hub)
    ckpt = tmp_path / "hub"
    ckpt.mkdir()
    save_file(hub, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(str(ckpt))
    with open(ckpt / "config.json") as f:
        assert "vggt_geometry" not in json.load(f)

    config = type(cfg).from_pretrained(str(ckpt))
    config.vggt_geometry = geometry_config(128)
    model, info = Qwen2_5_VLWithGeometry.from_pretrained(str(ckpt), config=config, output_loading_info=True)
    merger_keys = {"merger." + k for k in model.merger.state_dict()}
    assert set(info["missing_keys"]) == merger_keys
    assert not info["unexpected_keys"]
    for k, v in stock.state_dict().items():  # the LLM and vision weights really loaded
        assert torch.equal(model.state_dict()[k], v), k
    assert model.merger.ln_q.weight.eq(1).all()  # the missing merger is initialised, not left empty


def test_merger_in_published_layout_loads_and_continues(tmp_path):
    """A merger state dict as VG-LLM / JanusVLN write it: ln_q.weight, mlp.0.*, mlp.2.*."""
    spec = spec_for()
    c, hidden, out = 128, 256, 64
    g = torch.Generator().manual_seed(3)
    published = {"merger.ln_q.weight": 1 + 0.1 * torch.randn(c, generator=g),
                 "merger.mlp.0.weight": 0.02 * torch.randn(hidden, 4 * c, generator=g),
                 "merger.mlp.0.bias": torch.zeros(hidden),
                 "merger.mlp.2.weight": 0.02 * torch.randn(out, hidden, generator=g),
                 "merger.mlp.2.bias": torch.zeros(out)}
    model = tiny_model(spec)
    result = model.load_state_dict(published, strict=False)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if k.startswith("merger.")]
    assert torch.equal(model.merger.mlp[0].weight, published["merger.mlp.0.weight"])
    assert model.merger.ln_q.eps == 1e-6

    root = sample_root(tmp_path)
    model.attach_vggt(online(spec))
    batch = collate(dataset(root, spec))
    from training.model import set_trainable

    set_trainable(model, merger=True, llm=False, vision=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = model(**model_inputs(batch)).loss
        loss.backward()
        opt.step()
        losses.append(loss.detach().item())
    assert losses[-1] < losses[0]
    assert not torch.equal(model.merger.mlp[0].weight, published["merger.mlp.0.weight"])
    assert [n for n, p in model.named_parameters() if p.requires_grad] == list(published)


def test_text_only_samples_mix_with_image_samples(tmp_path):
    root = sample_root(tmp_path)
    path = os.path.join(root, "mixed.json")
    with open(path, "w") as f:
        json.dump([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
                   {"image": "misc/portrait.png",
                    "conversations": [{"from": "human", "value": "<image>Door?"}, {"from": "gpt", "value": "Open."}]}],
                  f)
    spec = spec_for()
    ds = dataset(root, spec, files=[path])
    model = tiny_model(spec)
    model.attach_vggt(online(spec))
    mixed = collate(ds)
    assert mixed["vggt_source"].tolist() == [0, 2] and mixed["image_grid_thw"].shape == (1, 3)
    assert torch.isfinite(model(**model_inputs(mixed)).loss)
    text_only = collate(ds, [0])
    assert "pixel_values" not in text_only
    assert torch.isfinite(model(**model_inputs(text_only)).loss)
