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
any) is attached with `attach_vggt` OUTSIDE the module tree (see training.vggt_online).
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

__all__ = ["Qwen2_5_VLWithGeometry", "GEOMETRY_CONFIG_KEY", "geometry_config", "set_trainable",
           "vggt_parameter_count"]

GEOMETRY_CONFIG_KEY = "vggt_geometry"  # the model config's attribute holding the merger settings
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

    def __init__(self, config):
        super().__init__(config)
        geo = dict(_DEFAULTS, **(getattr(config, GEOMETRY_CONFIG_KEY, None) or {}))
        self.fusion, self.scale = geo["fusion"], float(geo["scale"])
        self.merger = GeometryMerger(geo["in_channels"], config.text_config.hidden_size, geo["hidden"])
        self.post_init()

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

    # ---- forward --------------------------------------------------------------------------

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, pixel_values: Optional[Tensor] = None,
                image_grid_thw: Optional[Tensor] = None, mm_token_type_ids: Optional[Tensor] = None,
                vggt_source: Optional[Tensor] = None, vggt_grid: Optional[Tensor] = None,
                vggt_images: Optional[Tensor] = None, vggt_features: Optional[Tensor] = None,
                vggt_feature_frames: Optional[Tensor] = None, vggt_frames: Optional[Tensor] = None,
                vggt_frame_count: Optional[Tensor] = None, inputs_embeds: Optional[Tensor] = None, **kwargs):
        """The stock forward's arguments plus the VGGT batch keys of training.data (all optional:
        without pixel_values or VGGT keys this is plain Qwen2.5-VL)."""
        if pixel_values is None or vggt_source is None or inputs_embeds is not None:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                   pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                                   mm_token_type_ids=mm_token_type_ids, inputs_embeds=inputs_embeds, **kwargs)
        embeds = self.get_input_embeddings()(input_ids)
        image_out = self.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
        offsets = self.geometry_offsets(image_grid_thw, vggt_source, vggt_grid, vggt_images, vggt_features,
                                        vggt_feature_frames, vggt_frames, vggt_frame_count)
        fused = [img + off.to(img.dtype) for img, off in zip(image_out.pooler_output, offsets)]
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


def set_trainable(model: Qwen2_5_VLWithGeometry, *, merger: bool, llm: bool, vision: bool) -> Dict[str, int]:
    """Set requires_grad per part; returns trainable parameter counts per part."""
    parts = {"merger": (model.merger, merger), "llm": (model.model.language_model, llm),
             "lm_head": (model.lm_head, llm), "vision": (model.model.visual, vision)}
    counts = {}
    for name, (module, on) in parts.items():
        module.requires_grad_(on)
        # ZeRO-3 leaves each rank an empty local tensor; `ds_numel` is the parameter's full size.
        counts[name] = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters() if p.requires_grad)
    return counts


def vggt_parameter_count(model: torch.nn.Module) -> int:
    """Parameters of any VGGT module inside `model`'s tree (cached and online modes: 0)."""
    from featstore.encoders.vggt import VGGTAggregator

    return sum(p.numel() for m in model.modules() if isinstance(m, VGGTAggregator) for p in m.parameters())
