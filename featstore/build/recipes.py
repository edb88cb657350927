"""Recipe presets: every knob as VG-LLM's and JanusVLN's published training scripts set it.

`featstore build --recipe NAME` and `python -m training.train --recipe NAME` start from these
values; a flag given explicitly still wins (build: any encoder flag; training: the preset's
flags come first on the command line, so a later flag overrides them). Plain data, no torch.

Where each value comes from (the public repositories, LaVi-Lab/VG-LLM and MIV-XJTU/JanusVLN):
- layer -2: `aggregated_tokens_list[-2]` / `aggregated_tokens[-2]` in their
  `modeling_qwen2_5_vl.py`, patch tokens only (`[..., patch_start_idx:]`).
- attention and frames kept: VG-LLM runs all frames of a sample in one aggregator call and adds
  frame k's features to image k; JanusVLN streams the frames one per call with a key/value cache,
  keeps the last streamed frame and adds it, times `lam` 0.2, to every image.
- target size: the VGGT loader's `target_size`, 518 in VG-LLM's `vggt/utils/load_fn.py`, 644 in
  JanusVLN's (640x480 -> 644x490, 46x35 patches; its comments still say 518).
- reference_frame: both scripts pass `--reference_frame first` (the arguments' default is
  "last").
- min/max pixels: `--min_pixels $((16*28*28)) --max_pixels $((576*28*28))` in both scripts.
- what trains: VG-LLM `train_sr.sh` tune_mm_llm True, tune_mm_vision False, tune_mm_mlp False;
  JanusVLN `train.sh` the same but tune_mm_mlp True (Qwen's `visual.merger`); both always train
  the geometry merger and keep VGGT frozen.
- optimisation: `--learning_rate` 5e-6 (VG-LLM) / 2e-5 (JanusVLN), `--mm_projector_lr 1e-5
  --vision_tower_lr 1e-6` (training/optim.py groups), `--weight_decay 0.01 --warmup_ratio 0.03
  --lr_scheduler_type cosine` in both (transformers 5: `--warmup_steps 0.03`). Batch size,
  accumulation, epochs, DeepSpeed stage and `--bf16` depend on the hardware and are left to the
  command line.

Example:
    >>> from featstore.build.recipes import RECIPES
    >>> RECIPES["janusvln"].encoder_options()["target_size"], RECIPES["vgllm"].fusion
    (644, 'per_image')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

__all__ = ["Recipe", "RECIPES", "RECIPE_NAMES", "get_recipe"]


@dataclass(frozen=True)
class Recipe:
    """The values one published recipe uses (module docstring says where each comes from)."""

    name: str
    attention: str  # "full" (one call per sample) or "causal" (a stream, one frame per call)
    frames_kept: str  # "all" or "last"
    target_size: int  # the VGGT view's width in crop mode
    fusion: str  # training: "per_image" or "last_to_all"
    scale: float  # training: factor on the merger output before it is added (`lam`)
    tune_vision_merger: bool  # training: Qwen's visual.merger trains (their tune_mm_mlp)
    layer: int = -2
    preprocess_mode: str = "crop"
    reference_frame: str = "first"
    min_pixels: int = 16 * 28 * 28
    max_pixels: int = 576 * 28 * 28
    tune_llm: bool = True
    tune_vision: bool = False
    tune_merger: bool = True
    learning_rate: float = 2e-5
    mm_projector_lr: float = 1e-5
    vision_tower_lr: float = 1e-6
    weight_decay: float = 0.01
    warmup_ratio: float = 0.03
    lr_scheduler_type: str = "cosine"

    def encoder_options(self) -> Dict[str, object]:
        """The encoder spec options (`resolve_spec` / `featstore build` words) of this recipe."""
        return dict(layer=self.layer, attention=self.attention, frames_kept=self.frames_kept,
                    target_size=self.target_size, preprocess_mode=self.preprocess_mode,
                    reference_frame=self.reference_frame)

    def training_flags(self) -> List[str]:
        """`python -m training.train` flags that set this recipe (placed before the user's own)."""
        flags = {
            "--vggt_layer": self.layer, "--vggt_attention": self.attention, "--vggt_frames_kept": self.frames_kept,
            "--vggt_target_size": self.target_size, "--vggt_preprocess_mode": self.preprocess_mode,
            "--vggt_reference_frame": self.reference_frame, "--vggt_fusion": self.fusion,
            "--vggt_scale": self.scale, "--min_pixels": self.min_pixels, "--max_pixels": self.max_pixels,
            "--tune_llm": self.tune_llm, "--tune_vision": self.tune_vision,
            "--tune_vision_merger": self.tune_vision_merger, "--tune_merger": self.tune_merger,
            "--learning_rate": self.learning_rate, "--mm_projector_lr": self.mm_projector_lr,
            "--vision_tower_lr": self.vision_tower_lr, "--weight_decay": self.weight_decay,
            # transformers 5 takes the ratio as a float --warmup_steps in [0, 1) (--warmup_ratio is gone).
            "--warmup_steps": self.warmup_ratio, "--lr_scheduler_type": self.lr_scheduler_type,
        }
        return [str(x) for flag, value in flags.items() for x in (flag, value)]


RECIPES: Dict[str, Recipe] = {
    "vgllm": Recipe("vgllm", attention="full", frames_kept="all", target_size=518, fusion="per_image", scale=1.0,
                    tune_vision_merger=False, learning_rate=5e-6),
    "janusvln": Recipe("janusvln", attention="causal", frames_kept="last", target_size=644, fusion="last_to_all",
                       scale=0.2, tune_vision_merger=True),
}
RECIPE_NAMES = tuple(RECIPES)


def get_recipe(name: str) -> Recipe:
    """The recipe called `name`; ValueError naming the known ones otherwise."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPE_NAMES)}") from None
