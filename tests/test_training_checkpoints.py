"""Checkpoints from and for VG-LLM / JanusVLN (tiny, CPU): their layout loads for continued
training (Qwen weights, merger, and vggt.* as the VGGT weights of build and training),
training.export writes it back (loaded strictly), and the merger's bf16 cast order is theirs."""

from __future__ import annotations

import json
import logging
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from _training_helpers import annotations, collate, dataset, model_inputs, online, sample_root, spec_for

VENDOR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".vendor")
VGLLM, JANUS = "Qwen2_5_VLForConditionalGenerationWithVGGT", "Qwen2_5_VLForConditionalGenerationForJanusVLN"


# ---- a checkpoint in their layout, written by hand (not by training.export) ------------------


def _tiny_qwen(seed=1):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from training.presets import tiny_config, tiny_tokenizer

    cfg = tiny_config(tiny_tokenizer())
    torch.manual_seed(seed)
    return cfg, Qwen2_5_VLForConditionalGeneration._from_config(cfg)


def _aggregator(seed=5):
    from featstore.encoders import TINY_CONFIG
    from featstore.encoders.vggt.model import VGGTAggregator, init_random_

    return init_random_(VGGTAggregator(**TINY_CONFIG), seed).eval()


def _flat_config(cfg, **fields) -> dict:
    """config.json as transformers 4.50 writes Qwen2.5-VL's: text fields at the top level."""
    t, v = cfg.text_config, cfg.vision_config
    rope = t.rope_parameters
    out = {k: getattr(t, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                      "num_attention_heads", "num_key_value_heads", "hidden_act",
                                      "max_position_embeddings", "rms_norm_eps", "bos_token_id", "eos_token_id")}
    out.update(model_type="qwen2_5_vl", torch_dtype="float32", tie_word_embeddings=False,
               rope_theta=rope["rope_theta"], rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]},
               image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
               vision_start_token_id=cfg.vision_start_token_id, vision_end_token_id=cfg.vision_end_token_id,
               vision_config={k: getattr(v, k) for k in ("depth", "hidden_size", "intermediate_size", "num_heads",
                                                         "out_hidden_size", "patch_size", "spatial_merge_size",
                                                         "temporal_patch_size", "window_size",
                                                         "fullatt_block_indexes")})
    out.update(fields)
    return out


def _merger_state(c=128, hidden=256, out=64, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {"merger.ln_q.weight": 1 + 0.1 * torch.randn(c, generator=g),
            "merger.mlp.0.weight": 0.02 * torch.randn(hidden, 4 * c, generator=g),
            "merger.mlp.0.bias": 0.01 * torch.randn(hidden, generator=g),
            "merger.mlp.2.weight": 0.02 * torch.randn(out, hidden, generator=g),
            "merger.mlp.2.bias": 0.01 * torch.randn(out, generator=g)}


def write_reference(folder, *, arch=VGLLM, sharded=False, merger=None, vggt_seed=5, **fields):
    """A VG-LLM / JanusVLN-style checkpoint folder of the tiny model: visual.*, model.*, lm_head,
    merger.*, vggt.aggregator.* (+ dense-head keys), flat config.json, tokenizer, processor.
    Returns (folder, stock 5.x model, written tensors)."""
    from training.presets import image_processor, tiny_tokenizer

    cfg, stock = _tiny_qwen()
    tensors = {}
    for k, v in stock.state_dict().items():  # the 4.50 names, spelled out here
        if k.startswith("model.visual."):
            k = "visual." + k[len("model.visual."):]
        elif k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model."):]
        tensors[k] = v.contiguous()
    tensors.update(merger if merger is not None else _merger_state())
    vggt = {"vggt.aggregator." + k: v.clone() for k, v in _aggregator(vggt_seed).state_dict().items()}
    vggt.update({"vggt.depth_head.scratch.output_conv2.2.weight": torch.randn(2, 8, 1, 1),
                 "vggt.point_head.scratch.output_conv2.2.weight": torch.randn(4, 8, 1, 1)})
    os.makedirs(folder, exist_ok=True)
    if sharded:
        save_file(tensors, os.path.join(folder, "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
        save_file(vggt, os.path.join(folder, "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
        weight_map = {k: "model-00001-of-00002.safetensors" for k in tensors}
        weight_map.update({k: "model-00002-of-00002.safetensors" for k in vggt})
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    else:
        save_file({**tensors, **vggt}, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    fields = dict({"use_vggt_feature": True, "reference_frame": "first", "vggt_merger_hidden_dim": 256}, **fields)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(_flat_config(cfg, architectures=[arch], **fields), f)
    tiny_tokenizer().save_pretrained(folder)
    image_processor().save_pretrained(folder)
    return str(folder), stock, {**tensors, **vggt}


# ---- in: their checkpoint continues training here --------------------------------------------


@pytest.mark.parametrize("sharded", [False, True])
def test_reference_checkpoint_loads_qwen_and_merger_with_nothing_missing(tmp_path, sharded):
    from transformers import AutoConfig

    from training.model import Qwen2_5_VLWithGeometry, geometry_config
    from training.presets import tiny_tokenizer
    from training.train import build_model

    folder, stock, written = write_reference(tmp_path / "ref", sharded=sharded)
    config = AutoConfig.from_pretrained(folder)  # 4.50's flat config.json, read by transformers 5
    assert config.text_config.hidden_size == 64 and config.vision_config.depth == 2
    config.vggt_geometry = geometry_config(128, hidden=256)
    model, info = Qwen2_5_VLWithGeometry.from_pretrained(folder, config=config, output_loading_info=True)
    # Nothing is legitimately lacking (their merger is ours); vggt.* lives outside the model.
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    state = model.state_dict()
    for k, v in stock.state_dict().items():  # LLM and vision really loaded
        assert torch.equal(state[k], v), k
    for k in ("merger.ln_q.weight", "merger.mlp.0.weight", "merger.mlp.2.bias"):
        assert torch.equal(state[k], written[k]), k
    assert not any(k.startswith("vggt.") for k in state)

    # The path training takes: the width comes from vggt_merger_hidden_dim, the merger loads.
    built = build_model(folder, tiny_tokenizer(), geometry_config(128), dtype=torch.float32)
    assert torch.equal(built.merger.mlp[0].weight, written["merger.mlp.0.weight"])


def test_merger_mismatch_fails_naming_the_key(tmp_path):
    from training.args import ArgumentError
    from training.model import geometry_config
    from training.presets import tiny_tokenizer
    from training.train import build_model

    folder, _, _ = write_reference(tmp_path / "ref", vggt_merger_hidden_dim=512)  # tensors are 256 wide
    with pytest.raises(ArgumentError, match=r"merger\.mlp\.0\.weight has shape \(256, 512\), this run builds \(512, 512\)"):
        build_model(folder, tiny_tokenizer(), geometry_config(128))
    folder, _, _ = write_reference(tmp_path / "ref2")
    with pytest.raises(ArgumentError, match=r"--vggt_merger_hidden 64 differs from .*merger width 256"):
        build_model(folder, tiny_tokenizer(), geometry_config(128, hidden=64))


@pytest.mark.parametrize("sharded", [False, True])
def test_vggt_of_a_reference_folder_is_the_encoders_weights_with_a_stable_identity(tmp_path, sharded):
    import hashlib

    from featstore.encoders import get_encoder, resolve_spec

    folder, _, written = write_reference(tmp_path / "ref", sharded=sharded, vggt_seed=9)
    spec = resolve_spec("vggt-tiny", weights=folder)
    enc = get_encoder("vggt-tiny", weights=folder)
    assert enc.spec.fingerprint() == spec.fingerprint() == resolve_spec("vggt-tiny", weights=folder).fingerprint()
    if sharded:  # the shards holding vggt.aggregator.*: name + sha256 lines, hashed
        shard = os.path.join(folder, "model-00002-of-00002.safetensors")
        line = f"model-00002-of-00002.safetensors {hashlib.sha256(open(shard, 'rb').read()).hexdigest()}\n"
        assert spec.weights_sha256 == hashlib.sha256(line.encode()).hexdigest()
        # Continued training rewrites the Qwen shard; the VGGT identity stays.
        qwen = os.path.join(folder, "model-00001-of-00002.safetensors")
        t = load_file(qwen)
        t["lm_head.weight"] = t["lm_head.weight"] + 1
        save_file(t, qwen, metadata={"format": "pt"})
        assert resolve_spec("vggt-tiny", weights=folder).weights_sha256 == spec.weights_sha256
    else:
        with open(os.path.join(folder, "model.safetensors"), "rb") as f:
            assert spec.weights_sha256 == hashlib.sha256(f.read()).hexdigest()

    # Same features as the official layout (aggregator.*) holding the same tensors.
    official = tmp_path / "official.safetensors"
    save_file({k[len("vggt."):]: v for k, v in written.items() if k.startswith("vggt.")}, str(official))
    x = torch.rand(1, 2, 3, 42, 56, generator=torch.Generator().manual_seed(0))
    assert torch.equal(enc.encode(x), get_encoder("vggt-tiny", weights=str(official)).encode(x))
    assert not torch.equal(enc.encode(x), get_encoder("vggt-tiny").encode(x))  # the weights matter


def test_a_qwen_checkpoint_without_vggt_is_refused_as_vggt_weights(tmp_path):
    from featstore.encoders import get_encoder
    from featstore.errors import WeightsError

    _, stock = _tiny_qwen()
    os.makedirs(tmp_path / "q")
    save_file({k: v.contiguous() for k, v in stock.state_dict().items()}, str(tmp_path / "q" / "model.safetensors"))
    with pytest.raises(WeightsError, match="Qwen2.5-VL checkpoint without VGGT weights"):
        get_encoder("vggt-tiny", weights=str(tmp_path / "q"))


def test_build_and_train_from_a_reference_folder(tmp_path, caplog):
    """`featstore build --weights FOLDER`, then training from FOLDER without --vggt_weights: the
    store's spec matches (same weights identity), the Qwen weights and merger load."""
    from featstore.build.runner import BuildOptions, build
    from training.train import run

    folder, _, written = write_reference(tmp_path / "ref", vggt_seed=9)
    root = sample_root(tmp_path)
    report = build(BuildOptions(data_root=root, annotations=[annotations(root)], encoder="vggt-tiny", weights=folder,
                                progress=False, workers=0))
    assert not report.failed
    caplog.set_level(logging.INFO, logger="training")
    trainer = run(["--model_name_or_path", folder, "--vggt_encoder", "vggt-tiny", "--data_root", root,
                   "--annotations", annotations(root), "--use_vggt_cache", "--output_dir", str(tmp_path / "out"),
                   "--max_steps", "1", "--use_cpu", "--report_to", "none", "--save_strategy", "no",
                   "--tune_llm", "False", "--learning_rate", "0"])
    assert f"VGGT weights: vggt.* of {folder}" in caplog.text
    assert torch.equal(trainer.model.merger.mlp[0].weight.float(), written["merger.mlp.0.weight"])  # lr 0
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["reference_frame"] == "first"  # recorded for training.export


def test_recipe_fields_are_honoured_or_named_in_the_log(caplog):
    from training.args import ModelArguments, VGGTSettings
    from training.checkpoints import apply_recipe, check_recipe_spec, read_recipe

    def settings(fusion, scale):
        return VGGTSettings(mode="cached", fusion=fusion, scale=scale, encoder="vggt-tiny", weights=None,
                            overrides={}, store_path=None, cache_miss="error")

    janus = read_recipe({"architectures": [JANUS], "lam": 0.3, "reference_frame": "last"})
    caplog.set_level(logging.INFO, logger="training")
    got = apply_recipe(janus, ModelArguments(vggt_fusion="last_to_all"), settings("last_to_all", 0.2), "ckpt")
    assert got.scale == 0.3  # lam honoured when --vggt_scale is not given
    got = apply_recipe(janus, ModelArguments(vggt_fusion="last_to_all", vggt_scale=0.5),
                       settings("last_to_all", 0.5), "ckpt")
    assert got.scale == 0.5 and "--vggt_scale 0.5 differs from ckpt's lam 0.3" in caplog.text
    apply_recipe(janus, ModelArguments(), settings("per_image", 1.0), "ckpt")
    assert "Pass --vggt_fusion last_to_all" in caplog.text
    check_recipe_spec(janus, spec_for(), "ckpt")
    assert "reference_frame 'last', this run's VGGT spec 'first'" in caplog.text


# ---- bf16: their order of casts ------------------------------------------------------------


def _their_merger_class():
    """VG-LLM's own VGGTMerger when the vendored code imports, else None."""
    src = os.path.join(VENDOR, "vgllm", "src")
    if not os.path.isdir(src):
        return None
    sys.path.insert(0, src)
    try:
        from qwen_vl.model.modeling_qwen2_5_vl import VGGTMerger
        return VGGTMerger
    except Exception:
        return None
    finally:
        sys.path.remove(src)


def _reference_offsets(features, h, w, merger_state, dtype, lam):
    """Their forward (vgllm modeling_qwen2_5_vl.py ~2021-2028, janusvln ~2036-2046): trim, group
    2x2, `.to(self.visual.dtype)`, the merger in that dtype, `.to(self.visual.dtype)`, times lam."""
    n, c = features.shape[0], features.shape[-1]
    hh, ww = h // 2, w // 2
    x = features.view(n, h, w, c)[:, :hh * 2, :ww * 2].contiguous()
    x = x.view(n, hh, 2, ww, 2, c).permute(0, 1, 3, 2, 4, 5).contiguous().to(dtype)
    cls = _their_merger_class()
    hidden, out = merger_state["mlp.0.weight"].shape[0], merger_state["mlp.2.weight"].shape[0]
    if cls is not None:
        m = cls(output_dim=out, hidden_dim=hidden, context_dim=c)
    else:  # the same modules, spelled out: Qwen2RMSNorm(eps 1e-6) then Linear, GELU, Linear
        class _Norm(nn.Module):
            def __init__(self):
                super().__init__()
                self.weight = nn.Parameter(torch.ones(c))

            def forward(self, s):
                d = s.dtype
                s = s.to(torch.float32)
                s = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6)
                return self.weight * s.to(d)

        m = nn.Module()
        m.ln_q, m.mlp = _Norm(), nn.Sequential(nn.Linear(4 * c, hidden), nn.GELU(), nn.Linear(hidden, out))
        m.forward = lambda s: m.mlp(m.ln_q(s).view(-1, 4 * c))
    m.load_state_dict(merger_state)
    m.to(dtype)
    with torch.no_grad():
        y = m(x).to(dtype).view(n, hh * ww, out)
    return y if lam is None else lam * y


@pytest.mark.parametrize("fusion", ["per_image", "last_to_all"])
@pytest.mark.parametrize("weights", ["bf16", "fp32_autocast"])
def test_bf16_image_token_embeddings_follow_their_cast_order(tmp_path, fusion, weights):
    """Their model is bf16 under --bf16; ours is bf16 too (build_model), or float32 master weights
    under bf16 autocast: either way the image-token embeddings are theirs bit for bit."""
    from training.model import geometry_config
    from training.presets import tiny_tokenizer
    from training.train import build_model

    spec = spec_for(**({"attention": "causal", "frames_kept": "last"} if fusion == "last_to_all" else {}))
    scale = 0.2 if fusion == "last_to_all" else 1.0
    model = build_model("qwen2.5-vl-tiny", tiny_tokenizer(), geometry_config(128, fusion=fusion, scale=scale),
                        seed=0, dtype=torch.bfloat16 if weights == "bf16" else torch.float32).eval()
    with torch.no_grad():  # a merger far from its init, so that roundings show
        for p in model.merger.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(p.dtype) * 0.05)
    model.attach_vggt(online(spec, stream=fusion == "last_to_all"))
    root = sample_root(tmp_path)
    batch = model_inputs(collate(dataset(root, spec)))
    seen = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"].detach()), with_kwargs=True)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if weights == "fp32_autocast" else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), ctx:
        model(**batch)
        image_feats = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"],
                                                     return_dict=True).pooler_output
        ds = dataset(root, spec)  # each sample's features as the model encodes them (one call a frame shape)
        encoded = model.online_vggt.features_many([ds[i]["frames"].float().div(255) for i in range(len(ds))], "cpu")
        per_sample = [(i, x, tuple(batch["vggt_grid"][i].tolist())) for i, x in enumerate(encoded)]
    hook.remove()
    # Their merger holds bf16 weights: ours rounded to bf16 (what DeepSpeed's / their bf16 copy holds).
    merger_state = {k: v.to(torch.bfloat16) for k, v in model.merger.state_dict().items()}
    want, image = [], 0
    for (i, x, (h, w)), n_images in zip(per_sample, batch["vggt_images"][[s for s, _, _ in per_sample]].tolist()):
        off = _reference_offsets(x, h, w, merger_state, torch.bfloat16, scale if fusion == "last_to_all" else None)
        for k in range(n_images):
            img = image_feats[image + k]
            assert img.dtype == torch.bfloat16
            want.append(img + (off[k] if fusion == "per_image" else off[-1]))  # bf16 + bf16, as theirs
        image += n_images
    want = torch.cat(want)
    got = seen["embeds"][batch["input_ids"] == model.config.image_token_id]
    assert got.shape == want.shape
    assert torch.equal(got.to(torch.bfloat16), want)
    assert torch.equal(got, got.to(torch.bfloat16).to(got.dtype))  # bf16 values, exactly


# ---- out: training.export ------------------------------------------------------------------


def _our_checkpoint(folder, *, fusion="per_image", scale=1.0, in_channels=128, hidden=256, vision_cached=False,
                    seed=0):
    """A checkpoint as training.train saves it (save_pretrained of the model, the tokenizer)."""
    from training.model import geometry_config
    from training.presets import image_processor, tiny_tokenizer
    from training.train import build_model

    model = build_model("qwen2.5-vl-tiny", tiny_tokenizer(), geometry_config(in_channels, hidden=hidden, fusion=fusion,
                                                                             scale=scale),
                        seed=seed, vision_cached=vision_cached)
    with torch.no_grad():
        for p in model.merger.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    model.config.reference_frame = "first"
    model.save_pretrained(str(folder))
    tiny_tokenizer().save_pretrained(str(folder))
    image_processor().save_pretrained(str(folder))
    return model


def _official_vggt_file(path, seed=5):
    """VGGT-1B's layout: aggregator.* and every head (the export keeps depth_head / point_head)."""
    sd = {"aggregator." + k: v.clone() for k, v in _aggregator(seed).state_dict().items()}
    for head in ("camera_head", "track_head", "depth_head", "point_head"):
        sd[f"{head}.proj.weight"] = torch.randn(3, 4)
    save_file(sd, str(path))
    return str(path), sd


class ReferenceLayout(nn.Module):
    """The attribute tree of their class (vgllm modeling_qwen2_5_vl.py ~1640-1676): `visual`,
    `model` (embed_tokens, layers, norm), `lm_head`, `merger` (ln_q, mlp.0, mlp.2), `vggt` with
    `aggregator`, `depth_head`, `point_head` (camera_head and track_head None'd)."""

    def __init__(self, stock, in_channels, hidden, out, heads):
        super().__init__()
        from featstore.encoders import TINY_CONFIG
        from featstore.encoders.vggt.model import VGGTAggregator

        self.visual = stock.model.visual
        self.model = stock.model.language_model
        self.lm_head = stock.lm_head
        self.merger = nn.Module()
        self.merger.ln_q = nn.Module()
        self.merger.ln_q.weight = nn.Parameter(torch.ones(in_channels))
        self.merger.mlp = nn.Sequential(nn.Linear(4 * in_channels, hidden), nn.GELU(), nn.Linear(hidden, out))
        self.vggt = nn.Module()
        self.vggt.aggregator = VGGTAggregator(**TINY_CONFIG)
        for name, shape in heads.items():
            setattr(self.vggt, name, nn.Module())
            getattr(self.vggt, name).proj = nn.Module()
            getattr(self.vggt, name).proj.weight = nn.Parameter(torch.empty(shape))


def _read_export(folder):
    tensors = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(folder, name)))
    return tensors


@pytest.mark.parametrize("fusion,shard", [("per_image", None), ("last_to_all", "20KB")])
def test_export_writes_their_layout_and_loads_strictly(tmp_path, fusion, shard):
    from transformers import AutoConfig

    from training.export import export

    scale = 0.2 if fusion == "last_to_all" else 1.0
    ours = _our_checkpoint(tmp_path / "ours", fusion=fusion, scale=scale)
    vggt_path, vggt = _official_vggt_file(tmp_path / "vggt.safetensors")
    report = export(str(tmp_path / "ours"), str(tmp_path / "out"), vggt_weights=vggt_path,
                    **({"max_shard_size": shard} if shard else {}))
    out = str(tmp_path / "out")
    if shard:
        assert len(report.files) > 2 and os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
        with open(os.path.join(out, "model.safetensors.index.json")) as f:
            weight_map = json.load(f)["weight_map"]
        assert set(weight_map) == set(_read_export(out))
        vggt_shards = {v for k, v in weight_map.items() if k.startswith("vggt.")}
        assert not vggt_shards & {v for k, v in weight_map.items() if not k.startswith("vggt.")}
    else:
        assert report.files == ["model.safetensors"]
    tensors = _read_export(out)
    assert not any(k.startswith(("vggt.camera_head.", "vggt.track_head.")) for k in tensors)

    stock = type(ours).__mro__[1]._from_config(ours.config)  # a fresh stock model of the same config
    mirror = ReferenceLayout(stock, 128, 256, 64, {"depth_head": (3, 4), "point_head": (3, 4)})
    mirror.load_state_dict(tensors, strict=True)  # every key there, none extra, every shape right
    src = ours.state_dict()
    assert torch.equal(mirror.model.layers[0].mlp.up_proj.weight, src["model.language_model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(mirror.visual.blocks[1].attn.qkv.weight, src["model.visual.blocks.1.attn.qkv.weight"])
    assert torch.equal(mirror.merger.mlp[2].weight, src["merger.mlp.2.weight"])
    assert torch.equal(mirror.vggt.aggregator.camera_token, vggt["aggregator.camera_token"])

    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == [VGLLM if fusion == "per_image" else JANUS]
    assert cfg["hidden_size"] == 64 and cfg["num_hidden_layers"] == 2 and "text_config" not in cfg  # 4.50's flat form
    assert cfg["rope_scaling"] == {"type": "mrope", "mrope_section": [2, 3, 3]}
    assert (cfg["use_vggt_feature"], cfg["reference_frame"], cfg["vggt_merger_hidden_dim"]) == (True, "first", 256)
    assert cfg.get("lam") == (0.2 if fusion == "last_to_all" else None)
    back = AutoConfig.from_pretrained(out)  # and transformers 5 reads it back as the same model
    assert back.text_config.to_dict()["num_key_value_heads"] == ours.config.text_config.num_key_value_heads
    assert back.vision_config.fullatt_block_indexes == ours.config.vision_config.fullatt_block_indexes
    assert os.path.isfile(os.path.join(out, "tokenizer_config.json"))
    assert os.path.isfile(os.path.join(out, "preprocessor_config.json"))
    # featstore reads the exported vggt.* too (build --weights / --vggt_weights of this folder).
    from featstore.encoders import get_encoder

    x = torch.rand(1, 2, 3, 42, 56, generator=torch.Generator().manual_seed(0))
    assert torch.equal(get_encoder("vggt-tiny", weights=out).encode(x), get_encoder("vggt-tiny", weights=vggt_path).encode(x))


@pytest.mark.parametrize("fusion,scale", [("last_to_all", 0.2), ("per_image", 0.5)])
def test_export_then_continue_here_computes_the_same_model(tmp_path, fusion, scale):
    """Out then in: the exported folder, loaded by build_model as a reference checkpoint, gives
    the trained model's loss (per_image's scale folded into merger.mlp.2; JanusVLN's as lam)."""
    from training.checkpoints import apply_recipe, read_recipe
    from training.args import ModelArguments, VGGTSettings
    from training.export import export
    from training.model import geometry_config
    from training.presets import tiny_tokenizer
    from training.train import build_model, checkpoint_recipe

    kw = {"attention": "causal", "frames_kept": "last"} if fusion == "last_to_all" else {}
    spec = spec_for(**kw)
    ours = _our_checkpoint(tmp_path / "ours", fusion=fusion, scale=scale).eval()
    vggt_path, _ = _official_vggt_file(tmp_path / "vggt.safetensors")
    export(str(tmp_path / "ours"), str(tmp_path / "out"), vggt_weights=vggt_path)
    out = str(tmp_path / "out")
    settings = VGGTSettings(mode="cached", fusion=fusion, scale={"per_image": 1.0, "last_to_all": 0.2}[fusion],
                            encoder="vggt-tiny", weights=None, overrides={}, store_path=None, cache_miss="error")
    settings = apply_recipe(checkpoint_recipe(out), ModelArguments(vggt_fusion=fusion), settings, out)
    assert settings.weights == out  # the exported vggt.* are the VGGT weights
    assert read_recipe(json.load(open(os.path.join(out, "config.json")))).fusion == fusion
    back = build_model(out, tiny_tokenizer(), geometry_config(128, fusion=fusion, scale=settings.scale)).eval()
    root = sample_root(tmp_path)
    batch = model_inputs(collate(dataset(root, spec)))
    for m in (ours, back):
        m.attach_vggt(online(spec, stream=fusion == "last_to_all"))
    with torch.no_grad():
        a, b = ours(**batch).loss, back(**batch).loss
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a, b)
    if scale != 1.0 and fusion == "per_image":
        assert not torch.equal(back.merger.mlp[2].weight, ours.merger.mlp[2].weight)  # folded


def test_export_refusals_name_what_to_pass(tmp_path):
    from training.checkpoints import CheckpointError
    from training.export import export, main

    _our_checkpoint(tmp_path / "cached", vision_cached=True)
    with pytest.raises(CheckpointError, match="holds no vision blocks .*pass --vision_weights"):
        export(str(tmp_path / "cached"), str(tmp_path / "o1"))
    # The base checkpoint's tower fills them (here: the tiny model's own tower, saved in the hub layout).
    folder, _, _ = write_reference(tmp_path / "base")
    report = export(str(tmp_path / "cached"), str(tmp_path / "o2"), vision_weights=folder)
    assert "visual.blocks.0.attn.qkv.weight" in _read_export(report.output)

    _our_checkpoint(tmp_path / "ours")
    agg_only = tmp_path / "agg.safetensors"
    save_file({"aggregator." + k: v for k, v in _aggregator().state_dict().items()}, str(agg_only))
    with pytest.raises(CheckpointError, match="holds no depth_head, point_head key"):
        export(str(tmp_path / "ours"), str(tmp_path / "o3"), vggt_weights=str(agg_only))
    with pytest.raises(CheckpointError, match="not empty"):
        export(str(tmp_path / "ours"), str(tmp_path / "o2"))
    with pytest.raises(CheckpointError, match="no vggt_geometry"):
        export(folder, str(tmp_path / "o4"))
    assert main(["--checkpoint", folder, "--output", str(tmp_path / "o5")]) == 2


# ---- their own classes (vendored; transformers 4.50 code) ------------------------------------


def _their_class(monkeypatch, which):
    """Their model class with a tiny VGGT, or a skip saying why it cannot be built here.

    Shims, each for a transformers-5 difference their 4.50 code meets: ROPE_INIT_FUNCTIONS
    lacks 'default' in 5.x, and 5.x's init reads vision_config.initializer_range. The VGGT is
    made small (their __init__ builds VGGT-1B, 1.2B parameters); the keys under vggt.* keep
    their names."""
    src = os.path.join(VENDOR, which, "src")
    if not os.path.isdir(src):
        pytest.skip(f"{src} absent (the vendored reference code is git-ignored)")
    monkeypatch.syspath_prepend(src)
    for name in [m for m in sys.modules if m == "qwen_vl" or m.startswith("qwen_vl.")]:
        monkeypatch.delitem(sys.modules, name)
    try:
        import qwen_vl.model.modeling_qwen2_5_vl as M
        from qwen_vl.model.configuration_qwen2_5_vl import Qwen2_5_VLConfig
        from qwen_vl.model.vggt.models.aggregator import Aggregator
        from featstore.encoders import TINY_CONFIG
    except Exception as e:  # noqa: BLE001 - any import failure is a reason to skip, reported
        pytest.skip(f"cannot import {which}'s modeling code with transformers here: {type(e).__name__}: {e}")

    class TinyVGGT(nn.Module):
        def __init__(self):
            super().__init__()
            self.aggregator = Aggregator(**TINY_CONFIG)  # featstore's tiny preset, in the official argument names
            self.camera_head, self.track_head = nn.Linear(2, 2), nn.Linear(2, 2)
            self.depth_head, self.point_head = nn.Linear(4, 2), nn.Linear(4, 4)

    def default_rope(config, device=None, **_):
        dim = config.hidden_size // config.num_attention_heads
        return 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2).float() / dim)), 1.0

    monkeypatch.setattr(M, "VGGT", TinyVGGT)
    monkeypatch.setattr(M, "ROPE_INIT_FUNCTIONS", dict(M.ROPE_INIT_FUNCTIONS, default=default_rope))
    return M, Qwen2_5_VLConfig, TinyVGGT


@pytest.mark.parametrize("which,fusion", [("vgllm", "per_image"), ("janusvln", "last_to_all")])
def test_their_class_loads_the_export_strictly(tmp_path, monkeypatch, which, fusion):
    from training.export import export

    M, Config, TinyVGGT = _their_class(monkeypatch, which)
    # Their merger is built for 2048 channels (context_dim=2048): ours too here, 16 wide.
    ours = _our_checkpoint(tmp_path / "ours", fusion=fusion, scale=0.2 if fusion == "last_to_all" else 1.0,
                           in_channels=2048, hidden=16)
    vggt = {k: v.clone() for k, v in TinyVGGT().state_dict().items()}
    save_file(vggt, str(tmp_path / "vggt.safetensors"))
    export(str(tmp_path / "ours"), str(tmp_path / "out"), vggt_weights=str(tmp_path / "vggt.safetensors"))
    with open(tmp_path / "out" / "config.json") as f:
        cfg = json.load(f)
    cls = getattr(M, cfg["architectures"][0])
    cfg["vision_config"]["initializer_range"] = 0.02
    cfg.setdefault("pad_token_id", cfg["bos_token_id"])
    try:
        theirs = cls(Config(**cfg))
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"{which}'s {cls.__name__} cannot be built with transformers here: {type(e).__name__}: {e}")
    theirs.load_state_dict(_read_export(tmp_path / "out"), strict=True)
    assert torch.equal(theirs.merger.mlp[0].weight, ours.merger.mlp[0].weight)
    assert torch.equal(theirs.model.layers[1].self_attn.q_proj.weight,
                       ours.model.language_model.layers[1].self_attn.q_proj.weight)
    assert torch.equal(theirs.vggt.aggregator.camera_token, vggt["aggregator.camera_token"])
    if fusion == "last_to_all":
        assert theirs.lam == pytest.approx(0.2)
