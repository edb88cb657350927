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

import math
from typing import Any, Dict, List, Optional, Tuple, Unpack

import torch
from torch import Tensor
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.conversion_mapping import (get_checkpoint_conversion_mapping,
                                             register_checkpoint_conversion_mapping)

from training.batch import (GEOMETRY_KEYS, SOURCE_FEATURES, SOURCE_FRAMES, TOWER_INDEX_KEYS, TOWER_MAXIMA_KEY,
                            ModelInputs)
from training.merger import GeometryMerger, merged_grid, merger_rows

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

    def _merger_rows(self, inputs: ModelInputs, device) -> Tuple[Tensor, List[tuple]]:
        """(patch rows [R, C] of every sample with images, in merger order and batch order;
        (sample, frames F, merged tokens M a frame, (h, w)) per such sample).

        Stored features arrive in merger order (training.batch) and are used as they are;
        frames are encoded online, samples of one frame shape in one call (as the build batches
        units), and their rows gathered into merger order."""
        sources, grids = inputs["vggt_source"].tolist(), inputs["vggt_grid"].tolist()
        feature_frames, frame_counts = inputs["vggt_feature_frames"].tolist(), inputs["vggt_frame_count"].tolist()
        features, frames = inputs["vggt_features"], inputs["vggt_frames"]
        samples, pieces, pending = [], [], []  # pending: (index in pieces, frames [S, 3, H, W])
        feats_at = frames_at = 0
        for i, source in enumerate(sources):
            h, w = grids[i]
            merged = math.prod(merged_grid(h, w))
            if source == 0:
                continue
            if source == SOURCE_FEATURES:
                n = feature_frames[i] * 4 * merged
                pieces.append(features[feats_at: feats_at + n])
                feats_at += n
                samples.append((i, feature_frames[i], merged, (h, w)))
            elif source == SOURCE_FRAMES:
                if self.online_vggt is None:
                    raise RuntimeError(
                        f"batch sample {i} carries frames for the online VGGT, but none is attached (cached mode "
                        "builds none unless --vggt_cache_miss compute)")
                s, patch = frame_counts[i], self.online_vggt.patch_size
                n = s * 3 * h * patch * w * patch
                raw = frames[frames_at: frames_at + n].reshape(s, 3, h * patch, w * patch)
                frames_at += n
                pending.append((len(pieces), raw.float().div(255) if raw.dtype == torch.uint8 else raw.float()))
                pieces.append(None)
                samples.append((i, None, merged, (h, w)))
            else:
                raise ValueError(f"batch sample {i}: unknown vggt_source {source}")
        if pending:
            encoded = self.online_vggt.features_many([f for _, f in pending], device)
            for (at, _), x in zip(pending, encoded):  # x [F, h*w, C]
                i, _, merged, (h, w) = samples[at]
                rows = torch.tensor(merger_rows(x.shape[0], h, w), device=x.device)
                pieces[at] = x.reshape(-1, x.shape[-1]).index_select(0, rows)
                samples[at] = (i, x.shape[0], merged, (h, w))
        if not pending and feats_at == features.shape[0]:
            return features, samples  # all stored, in order: the worker's rows as they are
        return (torch.cat([p.to(device) for p in pieces]) if pieces else features[:0]), samples

    def geometry_offsets(self, inputs: ModelInputs) -> Tensor:
        """The geometry offset of every Qwen image token of the batch [T, hidden], in the order
        of image_grid_thw's images: one norm and one MLP over all merged tokens of the batch
        (`GeometryMerger.forward_rows`), then one gather by a small index tensor that names,
        per image token, the merged token whose output is added (fusion: module docstring)."""
        image_grid_thw = inputs["image_grid_thw"]
        merge = self.config.vision_config.spatial_merge_size
        counts = inputs["vggt_images"].tolist()
        rows, samples = self._merger_rows(inputs, image_grid_thw.device)
        merged_out = self.merger.forward_rows(rows)  # [R / 4, hidden]
        got = (image_grid_thw.prod(-1) // (merge * merge)).tolist()
        index, image, base = [], 0, 0
        for i, frames, want, (h, w) in samples:
            n_images = counts[i]
            if any(g != want for g in got[image: image + n_images]):
                raise ValueError(f"batch sample {i}: Qwen image tokens {got[image: image + n_images]} differ from the "
                                 f"VGGT grid's merged tokens {want} ({h}x{w} patches trimmed to even)")
            if self.fusion == "per_image":  # frame k's tokens on image k
                if frames != n_images:
                    raise ValueError(f"batch sample {i}: per_image fusion needs one feature frame per image; "
                                     f"got {frames} frames for {n_images} images")
                index.append(torch.arange(base, base + n_images * want))
            else:  # last_to_all: this sample's last frame, on this sample's images only
                index.append(torch.arange(base + (frames - 1) * want, base + frames * want).repeat(n_images))
            base += frames * want
            image += n_images
        if image != image_grid_thw.shape[0]:
            raise ValueError(f"the batch has {image_grid_thw.shape[0]} images but its samples account for {image}")
        index = torch.cat(index) if index else torch.zeros(0, dtype=torch.long)
        return self.scale * merged_out.index_select(0, index.to(merged_out.device, non_blocking=True))

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

    def tower_image_features(self, pixel_values: Tensor, image_grid_thw: Tensor, index: Dict[str, Tensor]) -> Tensor:
        """The vision tower (and `visual.merger`) on pixel_values -> [sum N_i / 4, LLM hidden], the
        images' tokens in batch order: `get_image_features`' output, concatenated.

        `index`: the tower's index from the batch (`training.batch.TOWER_INDEX_KEYS` and
        `TOWER_MAXIMA_KEY`, made by the collator in the worker; the maxima on the host). Given,
        the tower takes it instead of computing it from image_grid_thw, which on a GPU waits for
        the GPU several times per forward; the same integers, so the same features. Empty: the
        stock `get_image_features`."""
        if not index:
            return torch.cat(list(self.model.get_image_features(pixel_values, image_grid_thw,
                                                                 return_dict=True).pooler_output))
        if len(index) != len(TOWER_INDEX_KEYS) + 1:
            raise ValueError(f"the batch has the vision tower index keys {sorted(index)} but not "
                             f"{sorted(set(TOWER_INDEX_KEYS + (TOWER_MAXIMA_KEY,)) - set(index))}; "
                             "training.batch.ModelInputs has all or none")
        visual = self.model.visual
        if index["vision_position_ids"].shape[0] != pixel_values.shape[0]:
            raise ValueError(f"vision_position_ids has {index['vision_position_ids'].shape[0]} rows but pixel_values "
                             f"{pixel_values.shape[0]}: the tower index was made for other images")
        max_seqlen, max_window_seqlen = index[TOWER_MAXIMA_KEY].tolist()  # a host tensor: no GPU sync
        out = visual(pixel_values.type(visual.dtype), grid_thw=image_grid_thw,
                     position_ids=index["vision_position_ids"], cu_seqlens=index["vision_cu_seqlens"],
                     window_index=index["vision_window_index"], cu_window_seqlens=index["vision_cu_window_seqlens"],
                     max_seqlen=max_seqlen, max_window_seqlen=max_window_seqlen)
        return out.pooler_output

    # ---- forward --------------------------------------------------------------------------

    def forward(self, **inputs: Unpack[ModelInputs]):
        """One batch as the worker hands it (`training.batch.ModelInputs`: the stock Qwen keys,
        `vision_features` in place of pixel_values with cached vision features, the geometry
        keys), plus any keyword of the stock forward (`inputs_embeds`, `use_cache`, ...). Without
        images or geometry keys this is plain Qwen2.5-VL.

        Example:
            >>> out = model(**batch)             # a batch from training.collate.Collator
            >>> out.loss
        """
        pixel_values, vision_features = inputs.pop("pixel_values", None), inputs.pop("vision_features", None)
        geometry = {key: inputs.pop(key) for key in GEOMETRY_KEYS if inputs.get(key) is not None}
        if geometry and len(geometry) != len(GEOMETRY_KEYS):
            raise ValueError(f"the batch has geometry keys {sorted(geometry)} but not "
                             f"{sorted(set(GEOMETRY_KEYS) - set(geometry))}; training.batch.ModelInputs has all or none")
        for key in GEOMETRY_KEYS:
            inputs.pop(key, None)
        tower_index = {key: inputs.pop(key) for key in (*TOWER_INDEX_KEYS, TOWER_MAXIMA_KEY) if key in inputs}
        if pixel_values is not None and (self.vision_cached or vision_features is not None):
            raise ValueError("pixel_values given, but " + (
                "this model holds no vision blocks (built for cached vision features): pass vision_features"
                if self.vision_cached else "vision_features too: pass one of them"))
        images = pixel_values is not None or vision_features is not None
        input_ids, image_grid_thw = inputs.pop("input_ids", None), inputs.get("image_grid_thw")
        if not images or inputs.get("inputs_embeds") is not None or (not geometry and vision_features is None):
            return super().forward(input_ids=input_ids, pixel_values=pixel_values, **inputs)
        embeds = self.get_input_embeddings()(input_ids)
        if vision_features is not None:
            fused = torch.cat(self.cached_image_features(vision_features, image_grid_thw))
        else:
            fused = self.tower_image_features(pixel_values, image_grid_thw, tower_index)
        if geometry:
            fused = fused + self.geometry_offsets(dict(geometry, image_grid_thw=image_grid_thw)).to(fused.dtype)
        fused = fused.to(embeds.device, embeds.dtype)
        mask = (input_ids == self.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        if int(mask[..., 0].sum()) != fused.shape[0]:
            raise ValueError(f"the batch has {int(mask[..., 0].sum())} image tokens but its images give "
                             f"{fused.shape[0]}")
        embeds = embeds.masked_scatter(mask, fused)  # the one scatter
        inputs.pop("inputs_embeds", None)
        return super().forward(input_ids=input_ids, pixel_values=None, inputs_embeds=embeds, **inputs)


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
