"""`python -m training.export`: a trained checkpoint of this package -> the layout VG-LLM and
JanusVLN load (their evaluation code, transformers 4.50, `load_state_dict(strict=True)`).

    python -m training.export --checkpoint runs/out --output runs/out-vgllm \\
        --vggt_weights /ckpt/VGGT-1B/model.safetensors

Written (training.checkpoints describes the layout):
  config.json       4.50's flat Qwen2.5-VL config (text fields at the top, `rope_scaling`
                    {"type": "mrope", ...}, `vision_config`), `architectures` the class of the
                    recipe (per_image: VG-LLM's Qwen2_5_VLForConditionalGenerationWithVGGT,
                    last_to_all: JanusVLN's Qwen2_5_VLForConditionalGenerationForJanusVLN), and
                    their fields: use_vggt_feature, use_dense_supervision (false), reference_frame,
                    vggt_merger_hidden_dim, lam (JanusVLN: the merger output's scale). This
                    package's `vggt_geometry` is kept (its reader ignores what theirs does not use).
  model.safetensors (or model-0000K-of-0000N.safetensors + model.safetensors.index.json past
                    --max_shard_size; vggt.* then starts a shard of its own, so those shard files
                    depend only on the VGGT weights and the shard count)
                    visual.*, model.*, lm_head.weight (written even when tied), merger.*, and with
                    --vggt_weights the frozen VGGT as vggt.aggregator.*, vggt.depth_head.*,
                    vggt.point_head.* (their VGGT keeps those; camera_head and track_head are None).
  the tokenizer, image processor, chat template and generation config files of the checkpoint.

Scale: JanusVLN reads `lam` from config.json. VG-LLM's forward adds the merger output unscaled,
so a per_image checkpoint trained with --vggt_scale s != 1 gets s folded into merger.mlp.2
(weight and bias times s): the same offsets, computed by their code.

Without --vggt_weights their class still builds a VGGT (`vggt.*`) that the folder lacks: load it
with their `from_pretrained(..., vggt_model_path=VGGT-1B)` (as their train_qwen.py does), not
strictly. A checkpoint trained with --use_vision_cache holds no vision blocks: --vision_weights
(the base Qwen2.5-VL checkpoint the cached features came from) supplies them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

from training.checkpoints import (JANUSVLN_ARCHITECTURE, VGLLM_ARCHITECTURE, CheckpointError, read_tensors,
                                  to_reference_key)

__all__ = ["export", "ExportReport", "reference_config", "build_parser", "main", "DEFAULT_MAX_SHARD_SIZE"]

logger = logging.getLogger("training")

DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers 4.50's save_pretrained default
_VGGT_KEPT = ("aggregator.", "depth_head.", "point_head.")  # their VGGT after camera_head/track_head = None
_VGGT_DROPPED = ("camera_head.", "track_head.")
# Files of a checkpoint folder that travel with the weights (tokenizer, processor, templates).
_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
               "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
               "generation_config.json")
_TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
                "use_cache", "use_sliding_window", "sliding_window", "max_window_layers", "attention_dropout",
                "bos_token_id", "eos_token_id", "pad_token_id")
_VISION_FIELDS = ("depth", "hidden_size", "hidden_act", "intermediate_size", "num_heads", "in_channels", "patch_size",
                  "spatial_merge_size", "temporal_patch_size", "tokens_per_second", "window_size", "out_hidden_size",
                  "fullatt_block_indexes", "initializer_range")
_TOKEN_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "vision_token_id")


@dataclasses.dataclass
class ExportReport:
    """What `export` wrote: the folder, its weight files, the architecture, the key count, and
    whether the VGGT is included."""

    output: Path
    files: List[str]
    architecture: str
    keys: int
    vggt_included: bool


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def reference_config(config, *, architecture: str, reference_frame: str, merger_hidden: int,
                     lam: Optional[float], geometry: dict, dtype: torch.dtype) -> dict:
    """config.json for their 4.50 classes from a transformers 5.x `Qwen2_5_VLConfig`.

    4.50's Qwen2_5_VLConfig reads the text fields at the top level (a nested `text_config` would be
    ignored and the model built at its default size), `rope_theta` and `rope_scaling` {"type":
    "mrope", "mrope_section": ...} where 5.x has `rope_parameters`, and `vision_config` with the
    4.50 names."""
    text, vision = config.text_config, config.vision_config
    out: Dict = {"architectures": [architecture], "model_type": "qwen2_5_vl", "torch_dtype": _dtype_name(dtype)}
    for k in _TEXT_FIELDS:
        if getattr(text, k, None) is not None:
            out[k] = getattr(text, k)
    rope = dict(getattr(text, "rope_parameters", None) or {})
    if "mrope_section" not in rope:
        raise CheckpointError("config.json: the text config has no mrope_section in rope_parameters; not a "
                              "Qwen2.5-VL config")
    out["rope_theta"] = float(rope.get("rope_theta", 1e6))
    out["rope_scaling"] = {"type": "mrope", "mrope_section": list(rope["mrope_section"])}
    out["tie_word_embeddings"] = bool(getattr(config, "tie_word_embeddings", False))
    for k in _TOKEN_FIELDS:
        if getattr(config, k, None) is not None:
            out[k] = getattr(config, k)
    out["vision_config"] = {k: getattr(vision, k) for k in _VISION_FIELDS if getattr(vision, k, None) is not None}
    out.update(use_vggt_feature=True, use_dense_supervision=False, reference_frame=reference_frame,
               vggt_merger_hidden_dim=int(merger_hidden))
    if lam is not None:
        out["lam"] = float(lam)
    out["vggt_geometry"] = dict(geometry)
    return out


def _expected_keys(config) -> Dict[str, tuple]:
    """The stock model's keys (every vision block included) in the 4.50 layout, with shapes."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        stock = Qwen2_5_VLForConditionalGeneration(config)
    return {to_reference_key(k): tuple(v.shape) for k, v in stock.state_dict().items()}


def _vggt_state(weights: str) -> Dict[str, torch.Tensor]:
    """The VGGT's aggregator and dense heads from `weights` (VGGT-1B's file, folder or hub id, or a
    VG-LLM / JanusVLN checkpoint holding vggt.*), keys without the `vggt.` prefix."""
    from featstore.encoders.vggt import weights as W

    path = W.resolve_weights(weights)
    if path.name.endswith(W.INDEX_SUFFIX):
        raw = read_tensors(path.parent, prefixes=("vggt.",) + _VGGT_KEPT)
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw = load_file(os.fspath(path))
    else:
        raw = dict(W._unwrap_state_dict(torch.load(os.fspath(path), map_location="cpu", weights_only=True), path))
    if any(k.startswith("vggt.") for k in raw):
        raw = {k[len("vggt."):]: v for k, v in raw.items() if k.startswith("vggt.")}
    state = {k: v for k, v in raw.items() if k.startswith(_VGGT_KEPT)}
    absent = [p.rstrip(".") for p in _VGGT_KEPT if not any(k.startswith(p) for k in state)]
    if absent:
        raise CheckpointError(
            f"--vggt_weights {weights}: {str(path)!r} holds no {', '.join(absent)} key; VG-LLM's and JanusVLN's "
            "VGGT keeps its aggregator, depth_head and point_head and loads them strictly: pass the full VGGT-1B "
            "checkpoint (model.safetensors of facebook/VGGT-1B), or a VG-LLM / JanusVLN folder holding vggt.*")
    return state


def _fill_vision(tensors: Dict[str, torch.Tensor], expected: Dict[str, tuple], vision_weights: Optional[str],
                 checkpoint: str) -> None:
    """Add the vision tower's keys the checkpoint lacks (trained with --use_vision_cache) from
    `vision_weights`; `visual.merger.*` stays the trained one."""
    lacking = sorted(k for k in expected if k.startswith("visual.") and k not in tensors)
    if not lacking:
        if vision_weights:
            logger.info("--vision_weights not needed: %s holds the whole vision tower", checkpoint)
        return
    if not vision_weights:
        raise CheckpointError(
            f"--checkpoint {checkpoint} holds no vision blocks ({len(lacking)} keys such as {lacking[0]}; trained with "
            "--use_vision_cache); pass --vision_weights with the Qwen2.5-VL checkpoint the cached features were "
            "built from (e.g. the base model's folder)")
    from featstore.encoders.qwen_vision.weights import load_vision_state, resolve_checkpoint

    state = load_vision_state(resolve_checkpoint(vision_weights))
    for k in lacking:
        name = k[len("visual."):]
        if name not in state:
            raise CheckpointError(f"--vision_weights {vision_weights} lacks visual.{name}; pass the Qwen2.5-VL "
                                  "checkpoint of this model size")
        tensors[k] = state[name]


def _parse_size(text: str) -> int:
    units = {"KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "B": 1}
    t = str(text).strip().upper()
    for unit, factor in sorted(units.items(), key=lambda u: -len(u[0])):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * factor)
    return int(t)


def _write_weights(tensors: Dict[str, torch.Tensor], output: Path, max_shard_size: int) -> List[str]:
    """model.safetensors, or shards of at most max_shard_size bytes (a tensor larger than that
    gets a shard of its own) with model.safetensors.index.json; vggt.* start a new shard."""
    from safetensors.torch import save_file

    order = sorted(k for k in tensors if not k.startswith("vggt.")) + sorted(k for k in tensors if k.startswith("vggt."))
    meta = {"format": "pt"}  # transformers 4.50 refuses safetensors without it
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total <= max_shard_size:
        save_file({k: tensors[k].contiguous() for k in order}, os.fspath(output / "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    shards: List[List[str]] = [[]]
    size = 0
    for k in order:
        n = tensors[k].numel() * tensors[k].element_size()
        vggt_starts = k.startswith("vggt.") and shards[-1] and not shards[-1][-1].startswith("vggt.")
        if shards[-1] and (size + n > max_shard_size or vggt_starts):
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    names, weight_map = [], {}
    for i, keys in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in keys}, os.fspath(output / name), metadata=meta)
        names.append(name)
        weight_map.update({k: name for k in keys})
    with open(output / "model.safetensors.index.json", "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    return names


def export(checkpoint: str, output: str, *, vggt_weights: Optional[str] = None, vision_weights: Optional[str] = None,
           reference_frame: Optional[str] = None, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
           dtype: Optional[str] = None) -> ExportReport:
    """Write `checkpoint` (a save of training.train) to `output` in the references' layout.

    Args:
        vggt_weights: VGGT weights to include as vggt.* (see `_vggt_state`); None: not included.
        vision_weights: the Qwen2.5-VL checkpoint supplying vision blocks a --use_vision_cache
            checkpoint lacks.
        reference_frame: "first" / "last"; default the checkpoint's config (training records its
            VGGT spec's), else "first" (what featstore computed before the field existed).
        max_shard_size: bytes, or "5GB" / "500MB" (their save_pretrained's default: 5GB).
        dtype: cast every floating tensor ("bfloat16", "float32"); None keeps each tensor's.

    Raises:
        CheckpointError: not a checkpoint of training.train, a key of unknown place, a shape that
            differs from the config, missing vision blocks or VGGT heads, or a non-empty output.
    """
    from transformers import AutoConfig

    from training.model import GEOMETRY_CONFIG_KEY

    src, out = Path(checkpoint), Path(output)
    try:
        with open(src / "config.json", encoding="utf-8") as f:
            raw_config = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"--checkpoint {checkpoint}: cannot read config.json ({e}); pass the folder "
                              "training.train saved (--output_dir) or one of its checkpoint-N folders") from None
    geometry = raw_config.get(GEOMETRY_CONFIG_KEY)
    if not isinstance(geometry, dict):
        raise CheckpointError(f"--checkpoint {checkpoint}: config.json has no {GEOMETRY_CONFIG_KEY}; not a checkpoint "
                              "of training.train (a VG-LLM / JanusVLN checkpoint is in their layout already)")
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"--output {output} exists and is not empty; pass a new folder")
    config = AutoConfig.from_pretrained(os.fspath(src))
    tensors = {to_reference_key(k): v for k, v in read_tensors(src).items()}
    expected = _expected_keys(config)
    _fill_vision(tensors, expected, vision_weights, checkpoint)
    if "lm_head.weight" not in tensors and getattr(config, "tie_word_embeddings", False):
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()  # strict loading wants the key
    want_merger = {"merger.ln_q.weight", "merger.mlp.0.weight", "merger.mlp.0.bias", "merger.mlp.2.weight",
                   "merger.mlp.2.bias"}
    missing = sorted((set(expected) | want_merger) - set(tensors))
    unknown = sorted(set(tensors) - set(expected) - want_merger)
    if missing or unknown:
        raise CheckpointError(f"--checkpoint {checkpoint}: " + "; ".join(
            s for s in (missing and f"missing {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}",
                        unknown and f"keys with no place in the layout {', '.join(unknown[:8])}") if s))
    for k, shape in expected.items():
        if tuple(tensors[k].shape) != shape:
            raise CheckpointError(f"--checkpoint {checkpoint}: {k} has shape {tuple(tensors[k].shape)}, its "
                                  f"config.json gives {shape}")

    in_channels = int(tensors["merger.ln_q.weight"].shape[0])
    hidden = int(tensors["merger.mlp.0.weight"].shape[0])
    fusion, scale = geometry.get("fusion", "per_image"), float(geometry.get("scale", 1.0))
    if in_channels != 2048:
        logger.warning(f"the merger takes {in_channels} channels; VG-LLM's and JanusVLN's classes build it for 2048 "
                       "(VGGT-1B, context_dim=2048) and will not load it")
    if fusion == "last_to_all":
        architecture, lam = JANUSVLN_ARCHITECTURE, scale
    else:
        architecture, lam = VGLLM_ARCHITECTURE, None
        if scale != 1.0:  # their forward adds the merger output unscaled: fold the scale into its last layer
            for k in ("merger.mlp.2.weight", "merger.mlp.2.bias"):
                tensors[k] = (tensors[k].float() * scale).to(tensors[k].dtype)
            logger.info("per_image scale %g folded into merger.mlp.2 (VG-LLM adds the merger output unscaled)", scale)
            scale = 1.0
    frame = reference_frame or raw_config.get("reference_frame") or geometry.get("reference_frame")
    if frame is None:
        frame = "first"
        logger.info("reference_frame: the checkpoint does not record it; writing 'first' (frames as given, what "
                    "featstore computes by default); pass --reference_frame to say otherwise")
    if frame not in ("first", "last"):
        raise CheckpointError(f"reference_frame must be 'first' or 'last'. Found {frame!r}")

    vggt = _vggt_state(vggt_weights) if vggt_weights else {}
    tensors.update({"vggt." + k: v for k, v in vggt.items()})
    if not vggt:
        logger.warning("no --vggt_weights: the export holds no vggt.*; their class builds a VGGT, so load it with "
                       "from_pretrained(..., vggt_model_path=<VGGT-1B>) (their train_qwen.py does), not strictly")
    if dtype is not None:
        target = getattr(torch, dtype)
        tensors = {k: v.to(target) if v.is_floating_point() else v for k, v in tensors.items()}
    model_dtype = tensors["model.embed_tokens.weight"].dtype
    geometry_out = dict(geometry, in_channels=in_channels, hidden=hidden, fusion=fusion, scale=scale,
                        reference_frame=frame)
    cfg = reference_config(config, architecture=architecture, reference_frame=frame, merger_hidden=hidden, lam=lam,
                           geometry=geometry_out, dtype=model_dtype)

    out.mkdir(parents=True, exist_ok=True)
    files = _write_weights(tensors, out, _parse_size(max_shard_size))
    with open(out / "config.json", "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    for name in _SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    logger.info("exported %s -> %s (%s, %d tensors in %d file(s), VGGT %s)", checkpoint, output, architecture,
                len(tensors), len(files), "included" if vggt else "not included")
    return ExportReport(out, files, architecture, len(tensors), bool(vggt))


def build_parser() -> argparse.ArgumentParser:
    """The parser of `python -m training.export` (docs/CLI.md shows its help)."""
    parser = argparse.ArgumentParser(
        prog="python -m training.export", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a checkpoint of training.train in the layout VG-LLM and JanusVLN load, strictly:\n"
                    "config.json in transformers 4.50's form with their fields, and visual.*, model.*,\n"
                    "lm_head.weight, merger.*, vggt.* (with --vggt_weights). See docs/TRAINING.md.",
        epilog="Examples:\n"
               "  # the quick start's tiny run (docs/TRAINING.md), without VGGT weights\n"
               "  python -m training.export --checkpoint /tmp/run --output /tmp/run-vgllm\n"
               "  # a real run, with the frozen VGGT-1B included as vggt.*\n"
               "  python -m training.export --checkpoint runs/out --output runs/out-vgllm \\\n"
               "      --vggt_weights /ckpt/VGGT-1B/model.safetensors --dtype bfloat16")
    parser.add_argument("--checkpoint", required=True, help="a folder training.train saved (--output_dir, or a "
                        "checkpoint-N folder in it)")
    parser.add_argument("--output", required=True, help="the folder to write (new, or empty)")
    parser.add_argument("--vggt_weights", help="VGGT weights to include as vggt.* (VGGT-1B's model.safetensors, its "
                        "folder or hub id, or a VG-LLM / JanusVLN checkpoint folder); without it the export holds no "
                        "VGGT and loads only with their vggt_model_path")
    parser.add_argument("--vision_weights", help="the Qwen2.5-VL checkpoint supplying the vision blocks of a "
                        "checkpoint trained with --use_vision_cache")
    parser.add_argument("--reference_frame", choices=("first", "last"), help="the config's reference_frame "
                        "(default: the checkpoint's, else first)")
    parser.add_argument("--max_shard_size", default=DEFAULT_MAX_SHARD_SIZE, help="shard the weights past this size "
                        "(default %(default)s, as their save_pretrained)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), help="cast every floating tensor "
                        "(default: keep the checkpoint's dtypes)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry of `python -m training.export`; returns the exit status (2 for bad input)."""
    from featstore.errors import FeatstoreError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    logger.setLevel(logging.INFO)
    try:
        export(args.checkpoint, args.output, vggt_weights=args.vggt_weights, vision_weights=args.vision_weights,
               reference_frame=args.reference_frame, max_shard_size=args.max_shard_size, dtype=args.dtype)
    except (CheckpointError, FeatstoreError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
