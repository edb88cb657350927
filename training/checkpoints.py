"""Checkpoints in the layout VG-LLM and JanusVLN publish: read their files, their recipe fields,
their merger and their VGGT; the key renames between that layout and this package's model.

Their layout (transformers 4.50 `save_pretrained` of `Qwen2_5_VLForConditionalGenerationWithVGGT`
(VG-LLM) or `Qwen2_5_VLForConditionalGenerationForJanusVLN`): config.json in 4.50's flat form
(text fields at the top, `vision_config`), model.safetensors or model.safetensors.index.json with
its shards, keys

    visual.*                    the Qwen vision tower, `visual.merger.*` included
    model.*                     the language model (embed_tokens, layers, norm)
    lm_head.weight
    merger.*                    the geometry merger: ln_q.weight, mlp.0.{weight,bias}, mlp.2.{weight,bias}
    vggt.aggregator.*           the frozen VGGT's aggregator
    vggt.depth_head.*, vggt.point_head.*   VGGT's dense heads (camera_head and track_head are None'd)

and config.json fields of the recipe: `use_vggt_feature` (VG-LLM), `reference_frame` ("first" or
"last"; which frame anchors VGGT), `lam` (JanusVLN's factor on the merger output),
`vggt_merger_hidden_dim` (the merger MLP's width, 4096 when absent), `use_dense_supervision`.

This package's model (transformers 5.x) holds `model.visual.*` and `model.language_model.*`; the
loader maps the 4.x names by the registered conversion mapping (training.model), and
`to_reference_key` maps back for the export (training.export). `merger.*` has the same names on
both sides (training.merger).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

__all__ = ["VGLLM_ARCHITECTURE", "JANUSVLN_ARCHITECTURE", "ARCHITECTURES", "ReferenceRecipe", "CheckpointError",
           "read_recipe", "checkpoint_files", "tensor_shapes", "read_tensors", "to_reference_key",
           "check_merger_shapes", "holds_vggt", "apply_recipe", "check_recipe_spec", "merger_hidden"]

logger = logging.getLogger("training")

VGLLM_ARCHITECTURE = "Qwen2_5_VLForConditionalGenerationWithVGGT"
JANUSVLN_ARCHITECTURE = "Qwen2_5_VLForConditionalGenerationForJanusVLN"
# The fusion each published class computes (their forward: VG-LLM adds frame k to image k,
# JanusVLN the last frame, times lam, to every image).
ARCHITECTURES = {VGLLM_ARCHITECTURE: "per_image", JANUSVLN_ARCHITECTURE: "last_to_all"}
# The merger width their class builds when config.json has no vggt_merger_hidden_dim.
REFERENCE_MERGER_HIDDEN = 4096
_SINGLE, _INDEX = "model.safetensors", "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read or does not fit the model (the message names the
    file, the key and what to do)."""


# ---- the recipe fields of config.json --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReferenceRecipe:
    """The recipe fields of a VG-LLM / JanusVLN config.json (None: the field is absent).

    Attributes:
        architecture: `architectures[0]` when it is one of the two published classes.
        fusion: the fusion that class computes ("per_image" / "last_to_all"), else None.
        reference_frame: "first" or "last".
        lam: JanusVLN's factor on the merger output.
        merger_hidden: `vggt_merger_hidden_dim`.
        use_vggt_feature: VG-LLM's switch for the geometry branch.
        use_dense_supervision: VG-LLM's distillation heads (not trained here).
    """

    architecture: Optional[str] = None
    fusion: Optional[str] = None
    reference_frame: Optional[str] = None
    lam: Optional[float] = None
    merger_hidden: Optional[int] = None
    use_vggt_feature: Optional[bool] = None
    use_dense_supervision: bool = False

    @property
    def name(self) -> str:
        return {"per_image": "VG-LLM", "last_to_all": "JanusVLN"}.get(self.fusion or "", "VG-LLM/JanusVLN")


def _get(config: Any, key: str):
    return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)


def read_recipe(config: Any) -> Optional[ReferenceRecipe]:
    """The recipe fields of `config` (a transformers config or config.json's dict), or None when
    it has none of them (a base Qwen2.5-VL checkpoint, or one of this package without them).

    Example:
        >>> read_recipe({"architectures": [JANUSVLN_ARCHITECTURE], "lam": 0.2, "reference_frame": "first"}).fusion
        'last_to_all'
    """
    archs = _get(config, "architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    fields = {k: _get(config, k) for k in ("reference_frame", "lam", "vggt_merger_hidden_dim", "use_vggt_feature",
                                           "use_dense_supervision")}
    if arch is None and all(v is None for v in fields.values()):
        return None
    ref = fields["reference_frame"]
    if ref is not None and ref not in ("first", "last"):
        raise CheckpointError(f"config.json: reference_frame {ref!r} is neither 'first' nor 'last'")
    return ReferenceRecipe(
        architecture=arch, fusion=ARCHITECTURES.get(arch), reference_frame=ref,
        lam=None if fields["lam"] is None else float(fields["lam"]),
        merger_hidden=None if fields["vggt_merger_hidden_dim"] is None else int(fields["vggt_merger_hidden_dim"]),
        use_vggt_feature=None if fields["use_vggt_feature"] is None else bool(fields["use_vggt_feature"]),
        use_dense_supervision=bool(fields["use_dense_supervision"]))


def merger_hidden(recipe: Optional[ReferenceRecipe], flag: Optional[int], source: str) -> Optional[int]:
    """The merger MLP width to build: --vggt_merger_hidden, else the checkpoint's
    `vggt_merger_hidden_dim` (their class builds 4096 when it is absent), else None (our default).

    Raises:
        CheckpointError: the flag differs from the checkpoint's width (its merger would not load).
    """
    saved = None
    if recipe is not None and (recipe.architecture or recipe.use_vggt_feature is not None or recipe.lam is not None):
        saved = recipe.merger_hidden or REFERENCE_MERGER_HIDDEN
    if flag is not None and saved is not None and flag != saved:
        raise CheckpointError(f"--vggt_merger_hidden {flag} differs from {source}'s merger width {saved} (config.json "
                              f"vggt_merger_hidden_dim{'' if recipe.merger_hidden else ', absent: their default'}); "
                              "drop the flag to continue from its merger")
    return flag if flag is not None else saved


# ---- files and keys --------------------------------------------------------------------------


def checkpoint_files(folder: str | os.PathLike) -> Tuple[List[Path], Optional[Path]]:
    """(the safetensors files, the shard index or None) of a checkpoint folder.

    Raises:
        CheckpointError: no model.safetensors nor index, an unreadable index, or a missing shard.
    """
    p = Path(folder)
    if (p / _INDEX).is_file():
        try:
            with open(p / _INDEX, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"cannot read the shard index {str(p / _INDEX)!r} ({type(e).__name__}: {e}); "
                                  "re-save or re-download the checkpoint") from None
        files = [p / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"shard {str(f)!r} named by {str(p / _INDEX)!r} is missing; re-save or "
                                      "re-download the checkpoint")
        return files, p / _INDEX
    if (p / _SINGLE).is_file():
        return [p / _SINGLE], None
    raise CheckpointError(f"checkpoint folder {str(p)!r} holds neither {_SINGLE} nor {_INDEX}")


def tensor_shapes(folder: str | os.PathLike) -> Dict[str, Tuple[Tuple[int, ...], str, Path]]:
    """key -> (shape, safetensors dtype name, file) of every tensor, from the headers (no tensor read)."""
    from safetensors import safe_open

    out: Dict[str, Tuple[Tuple[int, ...], str, Path]] = {}
    for path in checkpoint_files(folder)[0]:
        try:
            with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
                for k in f.keys():
                    s = f.get_slice(k)
                    out[k] = (tuple(s.get_shape()), s.get_dtype(), path)
        except Exception as e:
            raise CheckpointError(f"cannot read {str(path)!r}: {type(e).__name__}: {e}; the file is damaged or "
                                  "incomplete") from e
    return out


def read_tensors(folder: str | os.PathLike, prefixes: Optional[Tuple[str, ...]] = None) -> Dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder (or those whose key starts with one of `prefixes`)."""
    from safetensors import safe_open

    out: Dict[str, torch.Tensor] = {}
    for path in checkpoint_files(folder)[0]:
        try:
            with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
                for k in f.keys():
                    if prefixes is None or k.startswith(prefixes):
                        out[k] = f.get_tensor(k)
        except Exception as e:
            raise CheckpointError(f"cannot read {str(path)!r}: {type(e).__name__}: {e}; the file is damaged or "
                                  "incomplete") from e
    return out


def to_reference_key(key: str) -> str:
    """A key of this package's model (or of its save_pretrained, either layout) -> the 4.50 layout.

    Example:
        >>> to_reference_key("model.language_model.layers.0.mlp.up_proj.weight"), to_reference_key("model.visual.merger.ln_q.weight")
        ('model.layers.0.mlp.up_proj.weight', 'visual.merger.ln_q.weight')
    """
    if key.startswith("model.visual."):
        return key[len("model."):]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    return key


def holds_vggt(folder: str | os.PathLike) -> bool:
    """Whether a local checkpoint folder holds VGGT aggregator weights (`vggt.aggregator.*`)."""
    p = Path(folder)
    if not p.is_dir():
        return False
    try:
        return any(k.startswith("vggt.aggregator.") for k in tensor_shapes(p))
    except CheckpointError:
        return False


def check_merger_shapes(folder: str | os.PathLike, expected: Mapping[str, torch.Tensor]) -> int:
    """Check the checkpoint's `merger.*` tensors against the merger this run builds (`expected`:
    its state_dict, meta tensors will do). Returns how many merger keys the checkpoint holds (0: a
    base Qwen2.5-VL checkpoint, whose merger starts fresh).

    Raises:
        CheckpointError: a merger key missing, extra or of another shape (named, with both shapes).
    """
    shapes = {k[len("merger."):]: v for k, v in tensor_shapes(folder).items() if k.startswith("merger.")}
    if not shapes:
        return 0
    want = {k: tuple(v.shape) for k, v in expected.items()}
    missing, extra = sorted(set(want) - set(shapes)), sorted(set(shapes) - set(want))
    if missing or extra:
        raise CheckpointError(
            f"checkpoint {str(folder)!r}: its merger does not match this package's (ln_q.weight, mlp.0.*, mlp.2.*): "
            + "; ".join(s for s in (missing and f"missing merger.{', merger.'.join(missing)}",
                                    extra and f"unexpected merger.{', merger.'.join(extra)}") if s))
    for k, shape in want.items():
        got, _, path = shapes[k]
        if got != shape:
            raise CheckpointError(
                f"checkpoint {str(path)!r}: merger.{k} has shape {got}, this run builds {shape} (the merger takes "
                f"4 x VGGT channels -> --vggt_merger_hidden -> the LLM's hidden size); pass the --vggt_encoder / "
                "--vggt_merger_hidden it was trained with")
    return len(shapes)


# ---- reconciling the recipe with the flags ---------------------------------------------------


def apply_recipe(recipe: Optional[ReferenceRecipe], model_args, settings, source: str):
    """The run's `VGGTSettings` with the checkpoint's recipe honoured where the flags leave it
    open, and a warning naming the flag where they contradict it. Returns the (new) settings.

    - `lam` (JanusVLN): the merger output's factor, used as --vggt_scale unless that is given.
    - the architecture's fusion: a warning when --vggt_fusion differs (flags decide the spec).
    - VGGT weights: a local folder holding `vggt.aggregator.*` is the default --vggt_weights.
    """
    if recipe is not None:
        if recipe.fusion is not None and recipe.fusion != settings.fusion:
            logger.warning(f"{source} is a {recipe.name} checkpoint ({recipe.architecture}), which fuses "
                           f"{recipe.fusion}; this run fuses {settings.fusion}. Pass --vggt_fusion {recipe.fusion} to "
                           "continue its recipe")
        if recipe.lam is not None and settings.fusion == "last_to_all":
            if model_args.vggt_scale is None:
                if recipe.lam != settings.scale:
                    logger.info("merger output scale %g from %s's config.json (lam)", recipe.lam, source)
                settings = dataclasses.replace(settings, scale=float(recipe.lam))
            elif float(model_args.vggt_scale) != recipe.lam:
                logger.warning(f"--vggt_scale {model_args.vggt_scale:g} differs from {source}'s lam {recipe.lam:g} "
                               f"(config.json); training with {model_args.vggt_scale:g}. Drop --vggt_scale (or pass "
                               f"--vggt_scale {recipe.lam:g}) to continue its recipe")
        elif recipe.lam is not None and recipe.lam != 1.0:
            logger.warning(f"{source}'s config.json has lam {recipe.lam:g}, which only JanusVLN's last_to_all fusion "
                           f"applies; this run fuses per_image at scale {settings.scale:g}")
        if recipe.use_dense_supervision:
            logger.warning(f"{source} was trained with use_dense_supervision (VG-LLM's distillation heads); this "
                           "package trains without that loss")
    if settings.weights is None and holds_vggt(source):
        logger.info("VGGT weights: vggt.* of %s (pass --vggt_weights to use others)", source)
        settings = dataclasses.replace(settings, weights=os.fspath(source))
    return settings


def check_recipe_spec(recipe: Optional[ReferenceRecipe], spec, source: str) -> None:
    """Warn when the checkpoint's `reference_frame` differs from the VGGT spec this run uses."""
    if recipe is None or recipe.reference_frame is None:
        return
    ours = getattr(spec, "reference_frame", "first")
    if recipe.reference_frame != ours:
        ref = recipe.reference_frame
        logger.warning(f"{source}'s config.json has reference_frame {ref!r}, this run's VGGT spec {ours!r}: its merger "
                       f"was trained on features anchored at the {ref} frame. Pass --vggt_reference_frame {ref} (and "
                       f"build the store with featstore build --reference-frame {ref}) to continue its recipe")
