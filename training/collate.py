"""`Collator`: dataset items -> one batch (`training.batch.ModelInputs`), laid out before it is filled.

The collator first states the batch as a layout (each key's dtype and shape), asks an allocator
for memory of that layout, then fills it. In a DataLoader worker the allocator is a
shared-memory batch slot (training.batch_slots), so every byte is written once, where the main
process copies it to the GPU from; alone (`collator(items)`) it allocates plain tensors.

Store reads happen here for items that `ConversationDataset.__getitems__` left pending: all of
the batch's in one read transaction (`FeatureStore.snapshot`), planned first
(`FeatureStore.plan_read`: checks, shapes, misses) and then copied once out of the map into the
batch's memory (`ReadPlan.copy_into`); stored VGGT features are gathered into merger order on
that copy (`training.merger.merger_rows`), so the model's merger needs no regrouping.

Host bytes written per feature byte: 1 (before: 3, `read_into` into a per-sample tensor, `cat`,
the slot; docs/BENCHMARKS.md "Batch read path").
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, List, Tuple

import torch

from featstore.encoders.qwen_vision.tower_index import INDEX_MAXIMA, INDEX_TENSORS, TowerWindows, tower_index
from training.batch import SOURCE_NONE, TOWER_INDEX_KEYS, TOWER_MAXIMA_KEY, ModelInputs
from training.merger import merger_rows

__all__ = ["Collator", "Layout", "allocate"]

IGNORE_INDEX = -100  # labels the loss skips (transformers' default ignore_index)

# (key, dtype, shape) per tensor of a batch, in the batch's key order.
Layout = List[Tuple[str, torch.dtype, Tuple[int, ...]]]


def allocate(layout: Layout) -> Dict[str, torch.Tensor]:
    """Plain tensors for `layout` (the allocator outside a worker)."""
    return {key: torch.empty(shape, dtype=dtype) for key, dtype, shape in layout}


class Collator:
    """Pads and concatenates `ConversationDataset` items into one `ModelInputs` batch.

    Args:
        pad_token_id: the id `input_ids` are padded with (the tokenizer's pad token).
        tower_windows: the Qwen vision tower's merge/window/patch sizes (`TowerWindows.of(
            model.config.vision_config)`). Given, a batch with pixel_values also carries the
            tower's index (`training.batch.TOWER_INDEX_KEYS`), made here in the worker, so that
            the model's tower computes none of it on the GPU's time.

    Example:
        >>> batch = Collator(tokenizer.pad_token_id)(items)            # plain tensors
        >>> batch = Collator(tokenizer.pad_token_id).collate_into(items, slot_allocator)
    """

    def __init__(self, pad_token_id: int, tower_windows: TowerWindows | None = None):
        self.pad_token_id = int(pad_token_id)
        self.tower_windows = tower_windows

    def __call__(self, items: List[Dict[str, Any]]) -> ModelInputs:
        return self.collate_into(items, allocate)

    def collate_into(self, items: List[Dict[str, Any]],
                     alloc: Callable[[Layout], Dict[str, torch.Tensor]]) -> ModelInputs:
        """The batch of `items`, written into the memory `alloc(layout)` returns (one tensor per
        key of the layout, of its dtype and shape; views into one buffer, or not)."""
        pending = [it for it in items if it.get("pending") is not None]
        scope = pending[0]["pending"].dataset._snapshot() if pending else contextlib.nullcontext()
        with scope:  # the plans' views into the map are valid until it ends
            if pending:
                pending[0]["pending"].dataset._resolve(pending)
            layout, parts = self._layout(items)
            out = alloc(layout)
            self._fill(items, out, parts)
        for it in pending:  # the plans hold the transaction's views: not past the block
            it.pop("vision_read", None)
            it.pop("feature_read", None)
        return out

    # ---- layout ---------------------------------------------------------------------------

    def _layout(self, items: List[Dict[str, Any]]) -> Tuple[Layout, Dict[str, Any]]:
        n, length = len(items), max(len(it["input_ids"]) for it in items)
        long = torch.long
        layout: Layout = [("input_ids", long, (n, length)), ("labels", long, (n, length)),
                          ("mm_token_type_ids", long, (n, length)), ("attention_mask", long, (n, length))]
        parts: Dict[str, Any] = {}
        with_images = [it for it in items if it["source"] != SOURCE_NONE]
        if with_images:
            cached = ["vision_features" in it or "vision_read" in it for it in with_images]
            if any(cached) and not all(cached):
                raise ValueError("a batch mixes samples with cached vision features and samples with pixel_values: "
                                 "one dataset gives one kind")
            key = "vision_features" if cached[0] else "pixel_values"
            pieces = [_vision_piece(it) if cached[0] else it["pixel_values"] for it in with_images]
            layout.append((key, _one_dtype(key, [p[1] if cached[0] else p.dtype for p in pieces]),
                           (sum(_rows(p) for p in pieces), _width(pieces[0]))))
            parts[key] = pieces
            layout.append(("image_grid_thw", long, (sum(len(it["image_grid_thw"]) for it in with_images), 3)))
            if key == "pixel_values" and self.tower_windows is not None:
                index = tower_index(torch.cat([it["image_grid_thw"] for it in with_images]), self.tower_windows)
                layout += [(k, index[name].dtype, tuple(index[name].shape))
                           for k, name in zip(TOWER_INDEX_KEYS, INDEX_TENSORS)]
                layout.append((TOWER_MAXIMA_KEY, long, (len(INDEX_MAXIMA),)))
                parts["tower_index"] = index
        layout += [("vggt_source", long, (n,)), ("vggt_grid", long, (n, 2)), ("vggt_images", long, (n,))]
        feats = [(it, _feature_piece(it)) for it in items if "feature_read" in it or it["features"] is not None]
        if feats:
            rows = sum(len(merger_rows(f, *it["grid"])) for it, (f, _, _) in feats)
            layout.append(("vggt_features", _one_dtype("vggt_features", [d for _, (_, _, d) in feats]),
                           (rows, feats[0][1][1])))
        else:
            layout.append(("vggt_features", torch.float32, (0,)))
        parts["vggt_features"] = feats
        layout.append(("vggt_feature_frames", long, (n,)))
        frames = [it["frames"] for it in items if it["frames"] is not None]
        if len({f.dtype for f in frames}) > 1:  # one sample not exact in 8 bits: all as float
            frames = [f.float().div(255) if f.dtype == torch.uint8 else f for f in frames]
        layout.append(("vggt_frames", frames[0].dtype if frames else torch.float32,
                       (sum(f.numel() for f in frames),)))
        parts["vggt_frames"] = frames
        layout += [("vggt_frame_count", long, (n,)), ("cache_hits", long, ()), ("cache_misses", long, ()),
                   ("cache_computed", long, ())]
        return layout, parts

    # ---- fill -----------------------------------------------------------------------------

    def _fill(self, items: List[Dict[str, Any]], out: Dict[str, torch.Tensor], parts: Dict[str, Any]) -> None:
        for key, value in (("input_ids", self.pad_token_id), ("labels", IGNORE_INDEX), ("mm_token_type_ids", 0)):
            out[key].fill_(value)
            for i, it in enumerate(items):
                out[key][i, : len(it[key])] = it[key]
        out["attention_mask"].zero_()
        for i, it in enumerate(items):
            out["attention_mask"][i, : len(it["input_ids"])] = 1
        for key in ("vision_features", "pixel_values"):
            if key in parts:
                at = 0
                for piece in parts[key]:
                    at = _copy_vision(piece, out[key], at) if key == "vision_features" else _copy_rows(piece,
                                                                                                        out[key], at)
        if "image_grid_thw" in out:
            torch.cat([it["image_grid_thw"] for it in items if it["source"] != SOURCE_NONE], out=out["image_grid_thw"])
        if "tower_index" in parts:
            index = parts["tower_index"]
            for k, name in zip(TOWER_INDEX_KEYS, INDEX_TENSORS):
                out[k].copy_(index[name])
            out[TOWER_MAXIMA_KEY].copy_(torch.tensor([index[name] for name in INDEX_MAXIMA]))
        out["vggt_source"].copy_(torch.tensor([it["source"] for it in items]))
        out["vggt_grid"].copy_(torch.tensor([it["grid"] for it in items]).reshape(len(items), 2))
        out["vggt_images"].copy_(torch.tensor([it["images"] for it in items]))
        at = 0
        for it, (frames_kept, channels, _) in parts["vggt_features"]:
            rows = merger_rows(frames_kept, *it["grid"])
            dst = out["vggt_features"][at: at + len(rows)]
            if "feature_read" in it:
                plan, (j,) = it["feature_read"]
                plan.copy_into(j, dst, rows)  # the one copy out of the map, in merger order
            else:
                torch.index_select(it["features"].reshape(-1, channels), 0, torch.tensor(rows), out=dst)
            at += len(rows)
        out["vggt_feature_frames"].copy_(torch.tensor([_feature_frames(it) for it in items]))
        at = 0
        for f in parts["vggt_frames"]:
            out["vggt_frames"][at: at + f.numel()] = f.reshape(-1)
            at += f.numel()
        out["vggt_frame_count"].copy_(torch.tensor(
            [0 if it["frames"] is None else it["frames"].shape[0] for it in items]))
        for key in ("hits", "misses", "computed"):
            out[f"cache_{key}"].fill_(sum(it[key] for it in items))


def _feature_frames(item: Dict[str, Any]) -> int:
    if "feature_read" in item:
        plan, (j,) = item["feature_read"]
        return plan.shapes[j][0]
    return 0 if item["features"] is None else item["features"].shape[0]


def _feature_piece(item: Dict[str, Any]) -> Tuple[int, int, torch.dtype]:
    """(frames F, channels C, dtype) of an item's VGGT features, planned or in a tensor."""
    if "feature_read" in item:
        plan, (j,) = item["feature_read"]
        return plan.shapes[j][0], plan.shapes[j][-1], plan.dtype
    f = item["features"]
    return f.shape[0], f.shape[-1], f.dtype


def _vision_piece(item: Dict[str, Any]):
    """(source, dtype, rows, channels): an item's cached vision features, planned or in a tensor."""
    if "vision_read" in item:
        plan, indices = item["vision_read"]
        shape = plan.shapes[indices[0]]
        return ("plan", plan.dtype, len(indices) * shape[1], shape[-1], plan, indices)
    t = item["vision_features"]
    return ("tensor", t.dtype, t.shape[0], t.shape[-1], t)


def _rows(piece) -> int:
    return piece[2] if isinstance(piece, tuple) else piece.shape[0]


def _width(piece) -> int:
    return piece[3] if isinstance(piece, tuple) else piece.shape[-1]


def _one_dtype(key: str, dtypes: list) -> torch.dtype:
    if len(set(dtypes)) > 1:
        raise ValueError(f"{key}: the batch's samples give {sorted(map(str, set(dtypes)))}; one store gives one dtype "
                         "(samples read from stores of different storage dtypes cannot share a batch)")
    return dtypes[0]


def _copy_rows(src: torch.Tensor, dst: torch.Tensor, at: int) -> int:
    dst[at: at + src.shape[0]] = src
    return at + src.shape[0]


def _copy_vision(piece, dst: torch.Tensor, at: int) -> int:
    if piece[0] == "tensor":
        return _copy_rows(piece[4], dst, at)
    plan, indices = piece[4], piece[5]
    for i in indices:
        n = plan.shapes[i][1]
        plan.copy_into(i, dst[at: at + n])  # the one copy out of the map
        at += n
    return at
