"""Recipe presets (`--recipe vgllm | janusvln`): build and training take every knob as the
published scripts set it, an explicit flag still wins, and the values agree with the references'
own files where those are vendored (.vendor/vgllm, .vendor/janusvln; skipped when absent)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from featstore.encoders.preprocess import view_size
from featstore.contract.spec import PreprocessSpec
from featstore.build.recipes import RECIPES, get_recipe

VENDOR = Path(__file__).resolve().parents[1] / ".vendor"


def _build_options(argv):
    from featstore.build.cli import configure_parser, options_from_args
    import argparse

    p = argparse.ArgumentParser()
    configure_parser(p)
    return options_from_args(p.parse_args(argv))


def test_build_recipe_sets_the_encoder_spec_and_a_flag_wins(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    janus = _build_options(["--data-root", str(root), "--recipe", "janusvln"]).spec_overrides
    assert janus == dict(layer=-2, attention="causal", frames_kept="last", target_size=644, preprocess_mode="crop",
                         reference_frame="first")
    vgllm = _build_options(["--data-root", str(root), "--recipe", "vgllm"]).spec_overrides
    assert (vgllm["attention"], vgllm["frames_kept"], vgllm["target_size"]) == ("full", "all", 518)
    mine = _build_options(["--data-root", str(root), "--recipe", "janusvln", "--target-size", "518"]).spec_overrides
    assert mine["target_size"] == 518 and mine["attention"] == "causal"
    assert _build_options(["--data-root", str(root)]).spec_overrides == {}  # no recipe: the presets' own defaults


def test_janusvln_views_are_644_wide():
    """JanusVLN's loader uses target_size 644: 640x480 -> 644x490, 46x35 = 1610 patch tokens a frame,
    the Qwen crop 644x476 (46x34 patches, 391 merged tokens)."""
    t = RECIPES["janusvln"].target_size
    w, h = view_size(640, 480, PreprocessSpec(target_size=t))
    assert (w, h) == (644, 490) and (w // 14) * (h // 14) == 1610
    assert (w // 28 * 28, h // 28 * 28) == (644, 476) and (w // 28) * (h // 28) == 391
    assert view_size(640, 480, PreprocessSpec(target_size=RECIPES["vgllm"].target_size)) == (518, 392)


def test_training_recipe_sets_every_knob_and_a_flag_wins(tmp_path):
    from training.args import parse_args, resolve_vggt

    base = ["--data_root", "sample_data", "--annotations", "sample_data/annotations.json", "--output_dir",
            str(tmp_path / "o"), "--use_cpu"]
    model_args, data_args, train_args = parse_args(["--recipe", "janusvln", *base])
    s = resolve_vggt(model_args, data_args)
    assert (train_args.learning_rate, train_args.mm_projector_lr, train_args.vision_tower_lr) == (2e-5, 1e-5, 1e-6)
    assert (train_args.weight_decay, train_args.warmup_steps) == (0.01, 0.03)
    assert getattr(train_args.lr_scheduler_type, "value", train_args.lr_scheduler_type) == "cosine"
    assert (s.mode, s.fusion, s.scale) == ("online_causal_stream", "last_to_all", 0.2)
    assert s.overrides["attention"] == "causal" and s.overrides["frames_kept"] == "last"
    assert s.overrides["target_size"] == 644 and s.overrides["reference_frame"] == "first"
    assert (data_args.min_pixels, data_args.max_pixels) == (16 * 28 * 28, 576 * 28 * 28)
    assert (model_args.tune_llm, model_args.tune_vision, model_args.tune_vision_merger, model_args.tune_merger) == (
        True, False, True, True)
    model_args, data_args, _ = parse_args(["--recipe", "vgllm", *base, "--vggt_scale", "0.5", "--use_vggt_cache"])
    s = resolve_vggt(model_args, data_args)
    assert (s.mode, s.fusion, s.scale, s.overrides["attention"]) == ("cached", "per_image", 0.5, "full")
    assert model_args.tune_vision_merger is False and s.overrides["target_size"] == 518
    model_args, data_args, _ = parse_args(base)  # no recipe: featstore's own defaults
    assert data_args.min_pixels is None and model_args.vggt_target_size is None


def test_unknown_recipe_is_named():
    with pytest.raises(ValueError, match="unknown recipe 'llava'; known: vgllm, janusvln"):
        get_recipe("llava")


# ---- against the references' own files (vendored; skipped when absent) ------------------------


def _read(repo: str, rel: str) -> str:
    path = VENDOR / repo / rel
    if not path.is_file():
        pytest.skip(f"{repo} not vendored at {path}")
    return path.read_text()


def _flag(script: str, name: str) -> str:
    m = re.search(rf"--{name}\s+(\S+)", script)
    assert m, name
    return m.group(1)


def _pixels(value: str) -> int:
    m = re.fullmatch(r"\$\(\((\d+)\*(\d+)\*(\d+)\)\)", value)
    assert m, value
    return int(m.group(1)) * int(m.group(2)) * int(m.group(3))


@pytest.mark.parametrize("name,repo,script", [("vgllm", "vgllm", "scripts/train/train_sr.sh"),
                                              ("janusvln", "janusvln", "scripts/train.sh")])
def test_recipe_values_match_the_published_scripts(name, repo, script):
    recipe = RECIPES[name]
    text = _read(repo, script)
    assert _flag(text, "reference_frame") == recipe.reference_frame
    assert _pixels(_flag(text, "max_pixels")) == recipe.max_pixels
    assert _pixels(_flag(text, "min_pixels")) == recipe.min_pixels
    assert (_flag(text, "tune_mm_llm") == "True") == recipe.tune_llm
    assert (_flag(text, "tune_mm_vision") == "True") == recipe.tune_vision
    assert (_flag(text, "tune_mm_mlp") == "True") == recipe.tune_vision_merger
    for flag in ("learning_rate", "mm_projector_lr", "vision_tower_lr", "weight_decay", "warmup_ratio"):
        assert float(_flag(text, flag)) == getattr(recipe, flag), flag
    assert _flag(text, "lr_scheduler_type").strip('"') == recipe.lr_scheduler_type
    load_fn = _read(repo, "src/qwen_vl/model/vggt/utils/load_fn.py")
    sizes = re.findall(r"^\s*target_size\s*=\s*(\d+)", load_fn, flags=re.M)
    assert sizes and int(sizes[-1]) == recipe.target_size
    modeling = _read(repo, "src/qwen_vl/model/modeling_qwen2_5_vl.py")
    assert re.search(r"aggregated_tokens(?:_list)?\[-2\]\[0,\s*:,\s*patch_start_idx:\]", modeling)
    lam = re.search(r'self\.lam = getattr\(config, "lam", ([0-9.]+)\)', modeling)
    assert (float(lam.group(1)) if lam else 1.0) == recipe.scale
    streams = "past_key_values_vggt" in modeling
    assert streams == (recipe.attention == "causal")


def test_the_mergers_train_at_mm_projector_lr_as_in_their_trainer(tmp_path):
    """--mm_projector_lr gives every parameter whose name holds 'merger' (geometry merger and
    visual.merger) that rate, --vision_tower_lr the other visual.* ones, the rest --learning_rate;
    decay on parameters outside LayerNorm without 'bias' (their transformers 4.50 rule)."""
    from _training_helpers import spec_for, tiny_model
    from training.args import parse_args
    from training.model import set_trainable
    from training.trainer import FeatstoreTrainer

    model = tiny_model(spec_for())
    set_trainable(model, merger=True, llm=True, vision=True, vision_merger=True)
    _, _, args = parse_args(["--data_root", "sample_data", "--output_dir", str(tmp_path / "o"), "--use_cpu",
                             "--learning_rate", "2e-5", "--mm_projector_lr", "1e-5", "--vision_tower_lr", "1e-6",
                             "--weight_decay", "0.01", "--report_to", "none"])
    trainer = FeatstoreTrainer(model=model, args=args)
    opt = trainer.create_optimizer()
    where = {id(p): g for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(where) == sum(1 for p in named.values() if p.requires_grad)  # each parameter once
    for name, p in named.items():
        g = where[id(p)]
        want_lr = 1e-5 if "merger" in name else 1e-6 if "visual" in name else 2e-5
        assert g["lr"] == want_lr, name
        want_decay = 0.0 if "bias" in name else 0.01
        assert g["weight_decay"] == want_decay, name
    assert any("merger.mlp" in n and not n.startswith("model.visual") for n in named)  # the geometry merger
    assert any(n.startswith("model.visual.merger") for n in named)
    _, _, plain = parse_args(["--data_root", "sample_data", "--output_dir", str(tmp_path / "p"), "--use_cpu",
                              "--report_to", "none"])
    opt = FeatstoreTrainer(model=model, args=plain).create_optimizer()
    assert {g["lr"] for g in opt.param_groups} == {plain.learning_rate}  # without it: one rate
