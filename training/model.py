"""`Qwen2_5_VLWithGeometry`: Qwen2.5-VL plus the trainable geometry merger, fed by VGGT features.

Injection (TRAINING.md, identical on transformers 5.17 and 5.23+): the forward builds
`inputs_embeds` itself -- token embeddings, Qwen's image features, plus the merger output of
each image's VGGT features, scattered into the `<|image_pad|>` positions -- then calls the stock
forward with `input_ids` (so 3-D mRoPE is computed from `mm_token_type_ids`) and WITHOUT
`pixel_values` (which would scatter the plain image features again over the sum).

Fusion (per sample, B may hold several samples, each with its own images):
  per_image    frame k's merged features are added to image k's tokens (VG-LLM);
  last_to_all  the last frame's merged features are added to every image of that sample only
               (JanusVLN); `scale` multiplies the merger output in both.

Loading: a subclass defined outside transformers does not get the hub key renames
(`visual.*` -> `model.visual.*`, `model.*` -> `model.language_model.*`) and would silently leave
the LLM at random init, so the class registers Qwen2.5-VL's conversion mapping under its own
name at import. Loading a hub checkpoint then leaves exactly the merger's keys missing.

The merger lives at `merger.*` in the layout VG-LLM and JanusVLN publish; the online VGGT (if
any) is attached with `attach_vggt` OUTSIDE the module tree (see training.vggt_online). Their
checkpoints also hold the frozen VGGT as `vggt.*`: those keys are ignored when loading (not
reported as unexpected); `--vggt_weights` / `featstore build --weights` read them from the folder
(training.checkpoints, featstore.encoders.vggt.weights).

Cached vision features (`config.vision_cached`, set by `--use_vision_cache`): the frozen vision
tower's output is read from the store instead of computed. Per image it is the hidden state
after the LAST vision block, before `visual.merger`, in the image processor's patch order
(`pixel_values` rows, which the merger groups in 4s), [N_patches, C_vis]. The model then holds
no vision block: `visual.blocks` is an empty ModuleList and `visual.patch_embed` and
`visual.rotary_pos_emb` (used only by the blocks) are None, so neither the optimizer, ZeRO-3 nor
a checkpoint sees them; `visual.merger` stays (loaded from the checkpoint, trainable with
`set_trainable(vision_merger=True)`). The forward takes `vision_features` [sum N_i, C_vis]
instead of `pixel_values`: image embeddings = visual.merger(vision_features), split per image by
image_grid_thw (t*h*w/4 tokens each), then the same geometry fusion. Loading a checkpoint then
reports the dropped modules' keys as unexpected; missing keys are unchanged.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import Tensor
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.conversion_mapping import (get_checkpoint_conversion_mapping,
                                             register_checkpoint_conversion_mapping)

from training.data import SOURCE_FEATURES, SOURCE_FRAMES
from training.merger import GeometryMerger

__all__ = ["Qwen2_5_VLWithGeometry", "GEOMETRY_CONFIG_KEY", "VISION_CACHED_CONFIG_KEY", "geometry_config",
           "set_trainable", "vggt_parameter_count", "vision_block_parameter_count"]

GEOMETRY_CONFIG_KEY = "vggt_geometry"  # the model config's attribute holding the merger settings
# The model config's attribute saying the vision tower's output is cached: built without blocks.
VISION_CACHED_CONFIG_KEY = "vision_cached"
_DEFAULTS = {"in_channels": 2048, "hidden": None, "fusion": "per_image", "scale": 1.0}


def geometry_config(in_channels: int, *, hidden: Optional[int] = None, fusion: str = "per_image",
                    scale: float = 1.0) -> Dict[str, Any]:
    """The dict stored as `config.vggt_geometry` (saved with the checkpoint's config.json)."""
    if fusion not in ("per_image", "last_to_all"):
        raise ValueError(f"fusion must be 'per_image' or 'last_to_all'. Found {fusion!r}")
    return {"in_channels": int(in_channels), "hidden": hidden, "fusion": fusion, "scale": float(scale)}


class Qwen2_5_VLWithGeometry(Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL whose image tokens get `scale * merger(VGGT features)` added (module docstring).

    Example:
        >>> cfg = tiny_config(); cfg.vggt_geometry = geometry_config(128)
        >>> model = Qwen2_5_VLWithGeometry._from_config(cfg)
        >>> out = model(**batch)          # a batch from training.data.Collator
    """

    # VG-LLM / JanusVLN checkpoints hold their frozen VGGT as vggt.*; here it lives outside the model.
    _keys_to_ignore_on_load_unexpected = [r"^vggt\."]

    def __init__(self, config):
        super().__init__(config)
        geo = dict(_DEFAULTS, **(getattr(config, GEOMETRY_CONFIG_KEY, None) or {}))
        self.fusion, self.scale = geo["fusion"], float(geo["scale"])
        self.merger = GeometryMerger(geo["in_channels"], config.text_config.hidden_size, geo["hidden"])
        self.vision_cached = bool(getattr(config, VISION_CACHED_CONFIG_KEY, False))
        if self.vision_cached:
            self._drop_vision_blocks()
        self.post_init()

    def _drop_vision_blocks(self) -> None:
        """Remove everything of the vision tower but `visual.merger` (cached vision features).

        Done while constructing, so `from_pretrained` never materialises (nor ZeRO-3 gathers)
        them; their checkpoint keys then load as unexpected."""
        visual = self.model.visual
        visual.blocks = torch.nn.ModuleList()
        visual.patch_embed = None  # pixels -> patch tokens: only the blocks consume them
        visual.rotary_pos_emb = None  # the blocks' 2-D rotary embedding (buffers, no parameters)

    # ---- the online encoder, kept out of the module tree ---------------------------------

    def attach_vggt(self, online) -> None:
        """Use `online` (a training.vggt_online.OnlineVGGT) for samples that carry frames.

        Stored in `__dict__` directly: nn.Module would not register it anyway (it is no Module),
        and this makes plain that it is neither a submodule nor state."""
        self.__dict__["_online_vggt"] = online

    @property
    def online_vggt(self):
        return self.__dict__.get("_online_vggt")

    # ---- geometry -------------------------------------------------------------------------

    def _batch_features(self, vggt_source: Tensor, vggt_grid: Tensor, vggt_features: Tensor,
                        vggt_feature_frames: Tensor, vggt_frames: Tensor, vggt_frame_count: Tensor,
                        device) -> List[tuple]:
        """(sample index, features [F, h*w, C], (h, w)) of every sample with images, in batch order.

        Stored features are sliced out of `vggt_features`; frames are encoded online, samples of
        one frame shape in one call (as the build batches units)."""
        out, pending = [], []  # pending: (slot in out, frames [S, 3, H, W])
        feats_at = frames_at = 0
        sources, grids = vggt_source.tolist(), vggt_grid.tolist()
        for i, source in enumerate(sources):
            h, w = grids[i]
            if source == 0:
                continue
            if source == SOURCE_FEATURES:
                n = int(vggt_feature_frames[i]) * h * w
                x = vggt_features[feats_at: feats_at + n].reshape(int(vggt_feature_frames[i]), h * w, -1)
                feats_at += n
                out.append((i, x, (h, w)))
            elif source == SOURCE_FRAMES:
                if self.online_vggt is None:
                    raise RuntimeError(
                        f"batch sample {i} carries frames for the online VGGT, but none is attached (cached mode "
                        "builds none unless --vggt_cache_miss compute)")
                s, patch = int(vggt_frame_count[i]), self.online_vggt.patch_size
                n = s * 3 * h * patch * w * patch
                raw = vggt_frames[frames_at: frames_at + n].reshape(s, 3, h * patch, w * patch)
                frames_at += n
                pending.append((len(out), raw.float().div(255) if raw.dtype == torch.uint8 else raw.float()))
                out.append((i, None, (h, w)))
            else:
                raise ValueError(f"batch sample {i}: unknown vggt_source {source}")
        if pending:
            encoded = self.online_vggt.features_many([f for _, f in pending], device)
            for (slot, _), x in zip(pending, encoded):
                out[slot] = (out[slot][0], x, out[slot][2])
        return out

    def geometry_offsets(self, image_grid_thw: Tensor, vggt_source: Tensor, vggt_grid: Tensor,
                         vggt_images: Tensor, vggt_features: Tensor, vggt_feature_frames: Tensor,
                         vggt_frames: Tensor, vggt_frame_count: Tensor) -> List[Tensor]:
        """One offset [tokens_k, hidden] per image of the batch, in image_grid_thw order."""
        merge = self.config.vision_config.spatial_merge_size
        counts = vggt_images.tolist()
        per_sample = self._batch_features(vggt_source, vggt_grid, vggt_features, vggt_feature_frames, vggt_frames,
                                          vggt_frame_count, image_grid_thw.device)
        # One merger call for the whole batch (RMSNorm and the MLP act per token): fewer launches.
        merged = self.merger.forward_many([(x, h, w) for _, x, (h, w) in per_sample])
        offsets: List[Tensor] = []
        image = 0
        for (i, x, (h, w)), m in zip(per_sample, merged):
            n_images = counts[i]
            grid = image_grid_thw[image: image + n_images]
            want = (h // 2) * (w // 2)
            got = (grid.prod(-1) // (merge * merge)).tolist()
            if any(g != want for g in got):
                raise ValueError(f"batch sample {i}: Qwen image tokens {got} differ from the VGGT grid's merged "
                                 f"tokens {want} ({h}x{w} patches trimmed to even)")
            if self.fusion == "per_image":
                if m.shape[0] != n_images:
                    raise ValueError(f"batch sample {i}: per_image fusion needs one feature frame per image; "
                                     f"got {m.shape[0]} frames for {n_images} images")
                offsets.extend(self.scale * m[k] for k in range(n_images))
            else:  # last_to_all: this sample's last frame, on this sample's images only
                offsets.extend(self.scale * m[-1] for _ in range(n_images))
            image += n_images
        if image != image_grid_thw.shape[0]:
            raise ValueError(f"the batch has {image_grid_thw.shape[0]} images but its samples account for {image}")
        return offsets

    # ---- Qwen image features -----------------------------------------------------------------

    def cached_image_features(self, vision_features: Tensor, image_grid_thw: Tensor) -> List[Tensor]:
        """Cached vision-tower output [sum N_i, C_vis] -> one [N_i / 4, LLM hidden] per image:
        `visual.merger` on the rows, split by image_grid_thw, as `get_image_features` splits
        its `pooler_output`."""
        visual = self.model.visual
        sizes = (image_grid_thw.prod(-1)).tolist()
        if sum(sizes) != vision_features.shape[0]:
            raise ValueError(f"vision_features has {vision_features.shape[0]} rows but image_grid_thw "
                             f"{image_grid_thw.tolist()} needs {sum(sizes)} (one per patch)")
        merged = visual.merger(vision_features.to(visual.merger.mlp[0].weight.dtype))
        return list(merged.split([n // visual.spatial_merge_size ** 2 for n in sizes]))

    # ---- forward --------------------------------------------------------------------------

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, pixel_values: Optional[Tensor] = None,
                image_grid_thw: Optional[Tensor] = None, mm_token_type_ids: Optional[Tensor] = None,
                vision_features: Optional[Tensor] = None,
                vggt_source: Optional[Tensor] = None, vggt_grid: Optional[Tensor] = None,
                vggt_images: Optional[Tensor] = None, vggt_features: Optional[Tensor] = None,
                vggt_feature_frames: Optional[Tensor] = None, vggt_frames: Optional[Tensor] = None,
                vggt_frame_count: Optional[Tensor] = None, inputs_embeds: Optional[Tensor] = None, **kwargs):
        """The stock forward's arguments plus `vision_features` (cached vision-tower output, in
        place of pixel_values) and the VGGT batch keys of training.data (all optional: without
        images or VGGT keys this is plain Qwen2.5-VL)."""
        if pixel_values is not None and (self.vision_cached or vision_features is not None):
            raise ValueError("pixel_values given, but " + (
                "this model holds no vision blocks (built for cached vision features): pass vision_features"
                if self.vision_cached else "vision_features too: pass one of them"))
        images = pixel_values is not None or vision_features is not None
        if not images or inputs_embeds is not None or (vggt_source is None and vision_features is None):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                   pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                                   mm_token_type_ids=mm_token_type_ids, inputs_embeds=inputs_embeds, **kwargs)
        embeds = self.get_input_embeddings()(input_ids)
        if vision_features is not None:
            image_feats = self.cached_image_features(vision_features, image_grid_thw)
        else:
            image_feats = self.model.get_image_features(pixel_values, image_grid_thw, return_dict=True).pooler_output
        if vggt_source is None:  # cached vision features without geometry
            fused = list(image_feats)
        else:
            offsets = self.geometry_offsets(image_grid_thw, vggt_source, vggt_grid, vggt_images, vggt_features,
                                            vggt_feature_frames, vggt_frames, vggt_frame_count)
            fused = [img + off.to(img.dtype) for img, off in zip(image_feats, offsets)]
        fused = torch.cat(fused).to(embeds.device, embeds.dtype)
        mask = (input_ids == self.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        if int(mask[..., 0].sum()) != fused.shape[0]:
            raise ValueError(f"the batch has {int(mask[..., 0].sum())} image tokens but its images give "
                             f"{fused.shape[0]}")
        embeds = embeds.masked_scatter(mask, fused)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                               pixel_values=None, image_grid_thw=image_grid_thw,
                               mm_token_type_ids=mm_token_type_ids, inputs_embeds=embeds, **kwargs)


# Hub checkpoints of Qwen2.5-VL use the 4.x layout; give this class the stock class's renames.
register_checkpoint_conversion_mapping(
    Qwen2_5_VLWithGeometry.__name__,
    get_checkpoint_conversion_mapping("Qwen2_5_VLForConditionalGeneration"), overwrite=True)


def set_trainable(model: Qwen2_5_VLWithGeometry, *, merger: bool, llm: bool, vision: bool,
                  vision_merger: Optional[bool] = None) -> Dict[str, int]:
    """Set requires_grad per part; returns trainable parameter counts per part.

    Parts: `merger` (the geometry merger), `llm` (language model), `lm_head` (with llm),
    `vision` (the vision tower but its merger: nothing when built for cached vision features)
    and `vision_merger` (`visual.merger`; None: as `vision`)."""
    visual = model.model.visual
    vision_merger = vision if vision_merger is None else vision_merger
    model.merger.requires_grad_(merger)
    model.model.language_model.requires_grad_(llm)
    model.lm_head.requires_grad_(llm)
    visual.requires_grad_(vision)
    visual.merger.requires_grad_(vision_merger)  # after the tower: it may differ from the tower

    def trainable(params) -> int:
        # ZeRO-3 leaves each rank an empty local tensor; `ds_numel` is the parameter's full size.
        return sum(getattr(p, "ds_numel", p.numel()) for p in params if p.requires_grad)

    in_merger = {id(p) for p in visual.merger.parameters()}
    return {"merger": trainable(model.merger.parameters()),
            "llm": trainable(model.model.language_model.parameters()),
            "lm_head": trainable(model.lm_head.parameters()),
            "vision": trainable(p for p in visual.parameters() if id(p) not in in_merger),
            "vision_merger": trainable(visual.merger.parameters())}


def vision_block_parameter_count(model: Qwen2_5_VLWithGeometry) -> int:
    """Parameters of the vision tower outside `visual.merger` (0 when built for cached features)."""
    visual = model.model.visual
    in_merger = {id(p) for p in visual.merger.parameters()}
    return sum(getattr(p, "ds_numel", p.numel()) for p in visual.parameters() if id(p) not in in_merger)


def vggt_parameter_count(model: torch.nn.Module) -> int:
    """Parameters of any VGGT module inside `model`'s tree (cached and online modes: 0)."""
    from featstore.encoders.vggt.model import VGGTAggregator

    return sum(p.numel() for m in model.modules() if isinstance(m, VGGTAggregator) for p in m.parameters())
