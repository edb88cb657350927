"""Training data: conversation samples -> token ids, labels, Qwen pixels and the VGGT inputs.

Stages per sample (`ConversationDataset.__getitem__`, run in DataLoader workers):
  1. unit     `featstore.build.plan.plan_samples` (at construction, for every file): the samples
              kept (`FILE%N`), each with the key and ordered frame list that
              `featstore build --annotations` stored (the same code, so they agree)
  2. frames   each image read and preprocessed as the build does ([S, 3, H, W], one VGGT
              call); the Qwen image is that same view cropped to the VGGT grid trimmed to even
              (TRAINING.md grid rule: 518x392 -> 37x28 patches -> 36x28 -> the top-left 504x392
              pixels -> 252 tokens), given to the processor as a float crop with do_rescale=False,
              as VG-LLM and JanusVLN do
  3. features cached mode: the unit's key, its stored frame list checked against the sample's
              (compared as stored bytes): another list is a miss, never a wrong feature. A
              miss raises (naming key and sample) or, under policy compute, ships the frames
              so the model encodes them online (counted). Online modes ship the frames.
  3b. vision  with a `vision_store` (--use_vision_cache) the image processor does not run: the
              unit's frame keys give each frame's cached vision-tower output [1, N, C_vis]
              (each entry stored for exactly [that frame]); N must be the Qwen grid's patches
              (2hh x 2ww, the grid rule), and image_grid_thw is [1, 2hh, 2ww] per image
              without the processor. A miss raises naming the key and the sample.
              Store reads (3, 3b) of a batch: `__getitems__` (what the DataLoader calls) leaves
              them to the collator, which plans them all in one read transaction
              (`FeatureStore.plan_read`) and copies each feature byte ONCE, out of the map
              straight into the batch's memory (a shared-memory batch slot in a worker), the
              VGGT features in merger order. `__getitem__` (one sample) does them at once, into
              tensors of the item's own.
  4. text     `<|im_start|>role\\ncontent<|im_end|>\\n` turns; each `<image>` becomes
              `<|vision_start|>` + `<|image_pad|>` x tokens + `<|vision_end|>` ("<image>\\n" in the
              first turn first loses its newline); labels on what follows an assistant turn's
              header: its content, `<|im_end|>` and the closing newline (as VG-LLM and JanusVLN).
`training.collate.Collator` (also importable from here) makes the batch: its keys, shapes and
dtypes are `training.batch.ModelInputs`.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from featstore.encoders import frames_stored
from featstore.encoders.preprocess import qwen_view
from featstore.errors import MissingKeyError, StaleEntryError
from featstore.build.plan import describe_skipped, plan_samples
from training.merger import merged_grid
from training.batch import SOURCE_FEATURES, SOURCE_FRAMES, SOURCE_NONE
from training.vggt_online import read_unit_frames

__all__ = ["ConversationDataset", "Collator", "DataError", "IMAGE_PLACEHOLDER", "SOURCE_NONE",
           "SOURCE_FEATURES", "SOURCE_FRAMES", "CacheMissError", "VisionCacheMissError"]

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
IGNORE_INDEX = -100  # labels the loss skips (transformers' default ignore_index)

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(ValueError):
    """An annotation sample is unusable (the message names the file, index and id)."""


class CacheMissError(MissingKeyError):
    """A sample's features are not in the store (or were computed on another frame list)."""


class VisionCacheMissError(CacheMissError):
    """A frame's cached vision features are missing, or do not fit the sample's Qwen grid."""


class ConversationDataset(torch.utils.data.Dataset):
    """LLaVA/Qwen conversation samples with their VGGT inputs (see module docstring).

    Args:
        annotations: JSON/JSONL files, as `--annotations` takes them (``FILE[@IMAGE_DIR][%N]``,
            `featstore.build.plan.parse_annotation_source`); samples carry "images" (ordered) or
            "image", and "conversations" (from/value or role/content turns).
        data_root: the folder image paths and store keys are relative to.
        tokenizer, image_processor: Qwen's (see training.presets).
        spec: the `EncoderSpec` training uses (preprocessing, patch size, frames kept).
        store: a `featstore.FeatureStore` (cached mode) or None (online modes: frames only).
        vision_store: a `featstore.FeatureStore` of cached vision-tower features keyed by frame
            (--use_vision_cache) or None (the image processor makes pixel_values).
        cache_miss: "error" or "compute" (ship the frames of a missing sample, counted).
        system_prompt: a system turn added to samples that have none ("" for none).
        video_policy: which frames of a "video" sample (`featstore.build.video`; None: VG-LLM's
            vgllm:2:4:8). As in VG-LLM, `<video>` in the first turn becomes one `<image>` per
            chosen frame; from there the sample is an image sample.

    Attributes:
        pixel_dtype: the dtype pixel_values leave the worker in; None keeps the processor's
            float32. Training sets the dtype the vision tower's patch embedding computes in
            (`training.train.pixel_dtype`): the cast the tower makes on the GPU happens here
            instead, with the same rounding, so the tower's output is bit-identical and a
            cached step pins and copies 21 MB less per 9-frame sample.

    Raises:
        DataError: at construction, for a sample whose `<image>` count differs from its images
            or whose turns are malformed, and for samples of several videos or audio (not
            supported: they would train as text); every sample is checked before training starts.
        PlanError: what `featstore build` refuses too (`featstore.build.plan.plan_samples`): samples with
            `spar_info`, a data root (or IMAGE_DIR) that holds none of a file's first images, a
            key collision.
    """

    def __init__(self, annotations: Sequence[str], data_root: str, tokenizer, image_processor, spec, *,
                 store=None, vision_store=None, cache_miss: str = "error",
                 system_prompt: str = "You are a helpful assistant.", video_policy=None):
        if cache_miss not in ("error", "compute"):
            raise ValueError(f"cache_miss must be 'error' or 'compute'. Found {cache_miss!r}")
        self.data_root, self.tokenizer, self.image_processor = data_root, tokenizer, image_processor
        self.vision_store = vision_store
        self.pixel_dtype: Optional[torch.dtype] = None
        self.spec, self.store, self.cache_miss, self.system_prompt = spec, store, cache_miss, system_prompt
        self.patch = int(spec.config["patch_size"])
        self.merge = int(getattr(image_processor, "merge_size", 2))
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
               ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")}
        self.im_start, self.im_end = ids["<|im_start|>"], ids["<|im_end|>"]
        self.vision_start, self.vision_end, self.image_pad = (ids["<|vision_start|>"], ids["<|vision_end|>"],
                                                              ids["<|image_pad|>"])
        self.samples: List[Dict[str, Any]] = []
        self.wheres: List[str] = []
        self.units = []
        planned = plan_samples(data_root, annotations, video_policy=video_policy)
        videos = [{"sample": p.where, "reason": p.skipped} for p in planned if p.media]
        if videos:
            # Their frames would not be read: they would train as text with a literal "<video>".
            raise DataError(f"{describe_skipped(videos, limit=1)}; training refuses them: samples of several "
                            "videos ('videos') or of audio are not supported (no frames, no features). Remove them "
                            "from the annotations")
        for p in planned:
            sample = _expand_video(p.sample, p.unit)
            _check_turns(sample, p.where, 0 if p.unit is None else p.unit.num_frames)
            self.samples.append(sample)
            self.wheres.append(p.where)
            self.units.append(p.unit)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        """One sample, its store reads done: features [F, N, C] and vision_features in tensors
        of their own (a DataLoader takes `__getitems__` instead, which leaves the reads to the
        collator's batch buffer)."""
        item = self._prepare(index)
        if item["pending"] is not None:
            with self._snapshot():
                self._resolve([item])
                _materialise(item)
        return item

    def __getitems__(self, indices: Sequence[int]) -> List[Dict[str, Any]]:
        """The samples of one batch, their store reads left pending (`item["pending"]`): the
        collator does them, all in one read transaction, straight into the batch's memory
        (`training.collate.Collator`: one copy of each feature byte on the host). torch's
        DataLoader calls this in place of `__getitem__` for a batch."""
        return [self._prepare(i) for i in indices]

    def _prepare(self, index: int) -> Dict[str, Any]:
        """Everything of a sample but its store reads (`_Pending` in item["pending"], or None)."""
        sample, where, unit = self.samples[index], self.wheres[index], self.units[index]
        item: Dict[str, Any] = {"hits": 0, "misses": 0, "computed": 0, "source": SOURCE_NONE,
                                "grid": (0, 0), "features": None, "frames": None, "images": 0, "pending": None}
        token_counts: List[int] = []
        if unit is not None:
            frames = None
            if self.store is not None and self.vision_store is not None:
                # Both caches: no pixel is needed unless VGGT misses, so no image is decoded; the
                # grid comes from the files' headers (the worker's CPU stays off the step's).
                h, w = self._grid_from_headers(unit)
            else:
                frames, _ = read_unit_frames(self.data_root, unit, self.spec, self.patch)  # [S, 3, H, W]
                h, w = frames.shape[-2] // self.patch, frames.shape[-1] // self.patch
            item.update(grid=(h, w), images=unit.num_frames)
            if self.vision_store is not None:
                hh, ww = self._qwen_grid(h, w, where)
                item["image_grid_thw"] = torch.tensor([[1, 2 * hh, 2 * ww]] * unit.num_frames, dtype=torch.long)
            else:
                item.update(self._qwen_images(frames, h, w, where))
            token_counts = [int(t.prod()) // (self.merge ** 2) for t in item["image_grid_thw"]]
            if self.store is not None or self.vision_store is not None:
                item["pending"] = _Pending(self, unit, where, h, w, frames)
            else:
                item["source"], item["frames"] = SOURCE_FRAMES, _pack_frames(frames)
        item.update(self._tokenize(sample, token_counts))
        return item

    # ---- pieces --------------------------------------------------------------------------

    def _grid_from_headers(self, unit) -> tuple:
        """The VGGT patch grid (h, w) of the unit's frames from their image headers (PIL reads
        no pixel data for `size`), as `read_unit_frames` would make it after decoding.

        Raises:
            ImageDecodeError: a frame cannot be opened, or the frames give different sizes (one
                encoder call needs one size), as the decoding path says it.
        """
        from PIL import Image

        from featstore.encoders.preprocess import view_size
        from featstore.errors import ImageDecodeError
        from featstore.format.keys import source_path

        from featstore.format.frame_ref import frame_file, is_video_path

        sizes = set()
        for key in unit.frames:
            path = source_path(self.data_root, frame_file(key))
            if is_video_path(path):  # a container video's frame: the stream's size (no frame decoded)
                from featstore.encoders.video import probe_video

                info = probe_video(path)
                sizes.add(view_size(info.width, info.height, self.spec.preprocess, self.patch))
                continue
            try:
                with Image.open(path) as im:
                    sizes.add(view_size(*im.size, self.spec.preprocess, self.patch))
            except OSError as e:
                raise ImageDecodeError(f"image {path!r}: {e}; check that the file exists and is a readable "
                                       "image") from None
        if len(sizes) != 1:
            raise ImageDecodeError(f"unit {unit.key!r}: frames preprocess to different sizes {sorted(sizes)}; "
                                   "one encoder call needs frames of one size (use pad mode or extra_resize)")
        (width, height), = sizes
        return height // self.patch, width // self.patch

    def _snapshot(self):
        """One read transaction per store file for every store read of this sample or batch
        (`FeatureStore.snapshot`: it covers every feature set of the store file, so the VGGT
        and vision sets of one file share it; a vision store in a file of its own gets its own)."""
        import contextlib

        scope = contextlib.ExitStack()
        try:
            for store in (self.store, self.vision_store):
                if store is not None:
                    scope.enter_context(store.snapshot())
        except BaseException:
            scope.close()  # not yet inside a `with`: leave what was entered
            raise
        return scope

    def _qwen_grid(self, h: int, w: int, where: str) -> tuple:
        """(hh, ww): the merged Qwen grid of a VGGT patch grid h x w (trimmed to even, halved)."""
        hh, ww = merged_grid(h, w)
        if hh == 0 or ww == 0:
            raise DataError(f"{where}: the VGGT grid {h}x{w} is smaller than 2x2 patches: no Qwen token fits; use a "
                            "larger --vggt_target_size, or remove the image from the annotations")
        return hh, ww

    def _qwen_images(self, frames: torch.Tensor, h: int, w: int, where: str) -> Dict[str, torch.Tensor]:
        """Each VGGT view cropped to the even-trimmed grid -> pixel_values, image_grid_thw, by the
        processor call VG-LLM and JanusVLN make: the float crop in [0, 1], `do_rescale=False`."""
        hh, ww = self._qwen_grid(h, w, where)
        side = self.patch * self.merge  # 28 px per merged Qwen token
        size = (ww * side, hh * side)  # (width, height)
        # The one view rule, shared with featstore's Qwen vision encoders (their cached features match).
        images = [qwen_view(f, patch_size=self.patch, merge_size=self.merge) for f in frames]
        out = self.image_processor(images=images, return_tensors="pt", do_rescale=False)
        grid = out["image_grid_thw"]
        want = torch.tensor([1, 2 * hh, 2 * ww])
        if not all(torch.equal(g, want) for g in grid):
            raise DataError(
                f"{where}: the image processor made grids {grid.tolist()} for {size[0]}x{size[1]} images, expected "
                f"{want.tolist()} (the VGGT grid {h}x{w} trimmed to even): its pixel bounds must contain "
                f"{size[0]}x{size[1]} = {size[0] * size[1]} pixels (--min_pixels/--max_pixels; the references' "
                "code fails on such an image too), or choose a --vggt_target_size whose view lies within them"
            )
        pixels = out["pixel_values"]
        if self.pixel_dtype is not None:
            pixels = pixels.to(self.pixel_dtype)
        return {"pixel_values": pixels, "image_grid_thw": grid}

    def _resolve(self, items: List[Dict[str, Any]]) -> None:
        """The store reads of `items` (pending, in batch order), checked and planned inside the
        caller's snapshot block: each item gets its hit/miss counters and source, and
        `vision_read` / `feature_read` = (ReadPlan, entry indices) for the copy out of the map.

        Per sample, as a read per sample would: the vision features (each frame's entry stored
        for exactly [that frame]), then the VGGT features (the stored frame list must equal the
        unit's, its frames the files it was computed from). A miss raises naming key and sample
        or, for VGGT under policy compute, ships the frames for the online encoder (counted)."""
        pending = [it["pending"] for it in items]
        vision = vggt = None
        if self.vision_store is not None:
            keys = [k for p in pending for k in p.unit.frames]
            vision = self.vision_store.plan_read(keys, frames=[[k] for k in keys], data_root=self.data_root,
                                                 missing="skip")
        if self.store is not None:
            vggt = self.store.plan_read([p.unit.key for p in pending], frames=[list(p.unit.frames) for p in pending],
                                        data_root=self.data_root, missing="skip")
        first = 0
        for j, (item, p) in enumerate(zip(items, pending)):
            if vision is not None:
                indices = list(range(first, first + p.unit.num_frames))
                first += p.unit.num_frames
                self._check_vision(vision, indices, p)
                item["vision_read"] = (vision, indices)
            if vggt is not None and self._check_features(vggt, j, p, item):
                item["hits"], item["source"], item["feature_read"] = 1, SOURCE_FEATURES, (vggt, [j])
            else:
                if p.frames is None:  # a VGGT miss under --vggt_cache_miss compute: its frames after all
                    p.frames, _ = read_unit_frames(self.data_root, p.unit, self.spec, self.patch)
                item["source"], item["frames"] = SOURCE_FRAMES, _pack_frames(p.frames)
            item["pending"] = None

    def _check_vision(self, plan, indices: List[int], p: "_Pending") -> None:
        keys = [plan.keys[i] for i in indices]
        failed = [i for i in indices if plan.absent[i]] or [i for i in indices if plan.errors[i] is not None]
        if failed:
            e = plan.errors[failed[0]]
            if isinstance(e, StaleEntryError):
                raise VisionCacheMissError(
                    f"stale vision features for {p.where}: {e}. Rebuild the changed frames' vision features (featstore "
                    "build --encoder qwen2.5-vl-vision recomputes stale entries), or train without --use_vision_cache")
            raise VisionCacheMissError(
                f"vision feature cache miss for {p.where}: {e}. Build the vision features of every frame into "
                f"the store with the model's vision tower, or train without --use_vision_cache")
        shape = plan.shapes[indices[0]]
        for i in indices[1:]:  # one sample's frames in one tensor: one shape, as one read_into needs
            if plan.shapes[i] != shape or plan._spans[i][0] != plan._spans[indices[0]][0]:
                e = (f"entry {keys[indices.index(i)]!r} holds {plan.shapes[i]} {plan._spans[i][0]} but the output "
                     f"slot is {shape} {plan.dtype}; batch only entries of one shape")
                raise VisionCacheMissError(f"{p.where}: cached vision features of frames {keys}: {e}. The frames' "
                                           "vision features differ in shape or dtype (built with other preprocessing): "
                                           "rebuild them with this preprocessing (featstore build --encoder "
                                           "qwen2.5-vl-vision --force)")
        hh, ww = self._qwen_grid(p.h, p.w, p.where)
        patches = (2 * hh) * (2 * ww)
        if len(shape) != 3 or shape[0] != 1 or shape[1] != patches:
            raise VisionCacheMissError(
                f"{p.where}: cached vision features for key {keys[0]!r} have shape {shape}, expected "
                f"[1, {patches}, C] (the Qwen grid {2 * hh}x{2 * ww} patches of the VGGT grid {p.h}x{p.w}); the "
                "vision features were computed at another image size (rebuild them with this preprocessing)"
            )

    def _check_features(self, plan, j: int, p: "_Pending", item: Dict[str, Any]) -> bool:
        """Whether sample `p`'s VGGT features hit (checked); a miss is counted, and raises
        under policy error."""
        e = plan.errors[j]
        if e is not None:
            item["misses"] = 1
            if self.cache_miss == "error" and isinstance(e, StaleEntryError):
                raise CacheMissError(
                    f"stale VGGT features for {p.where}: {e}; or pass --vggt_cache_miss compute to encode such "
                    "samples online") from None
            if self.cache_miss == "error":
                raise CacheMissError(
                    f"VGGT feature cache miss for {p.where}: key {p.unit.key!r} ({e}). Build the store with "
                    f"`featstore build --data-root {self.data_root} --annotations ...` using the same encoder "
                    "flags, or pass --vggt_cache_miss compute to encode misses online"
                ) from None
            item["computed"] = 1
            return False
        shape, num_frames = plan.shapes[j], p.unit.num_frames
        kept = frames_stored(self.spec, num_frames)
        if len(shape) != 3 or shape[0] != kept or shape[1] != p.h * p.w:
            raise CacheMissError(
                f"{p.where}: stored features for key {p.unit.key!r} have shape {shape}, expected "
                f"[{kept}, {p.h * p.w}, C] for {num_frames} frames on this grid; the store does not match the "
                "data (rebuild it)"
            )
        return True

    def _text_ids(self, text: str) -> List[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _tokenize(self, sample: Dict[str, Any], token_counts: List[int]) -> Dict[str, torch.Tensor]:
        ids: List[int] = []
        labels: List[int] = []

        def add(tokens: List[int], supervised: bool) -> None:
            ids.extend(tokens)
            labels.extend(tokens if supervised else [IGNORE_INDEX] * len(tokens))

        turns = [(_ROLES[_turn_field(t, "from", "role")], _turn_field(t, "value", "content"))
                 for t in sample.get("conversations", [])]
        if turns:
            # As Qwen's finetuning code and VG-LLM / JanusVLN (`_get_item`): in the first turn an
            # image's trailing newline goes, "<image>\n" -> "<image>".
            turns[0] = (turns[0][0], turns[0][1].replace(IMAGE_PLACEHOLDER + "\n", IMAGE_PLACEHOLDER))
        if self.system_prompt and not any(role == "system" for role, _ in turns):
            turns.insert(0, ("system", self.system_prompt))
        newline = self._text_ids("\n")
        images = iter(token_counts)
        for role, content in turns:
            add([self.im_start] + self._text_ids(role + "\n"), False)
            pieces = content.split(IMAGE_PLACEHOLDER)
            for k, piece in enumerate(pieces):
                add(self._text_ids(piece), role == "assistant")
                if k < len(pieces) - 1:
                    add([self.vision_start] + [self.image_pad] * next(images) + [self.vision_end], False)
            # The references supervise all of an assistant turn after its "<|im_start|>assistant\n"
            # header: the content, <|im_end|> and the newline that closes the turn.
            add([self.im_end], role == "assistant")
            add(newline, role == "assistant")
        input_ids = torch.tensor(ids, dtype=torch.long)
        return {"input_ids": input_ids, "labels": torch.tensor(labels, dtype=torch.long),
                "mm_token_type_ids": (input_ids == self.image_pad).long()}


def _expand_video(sample: Dict[str, Any], unit) -> Dict[str, Any]:
    """A "video" sample as VG-LLM trains it (`data_qwen.py` `_get_item`): `<video>` in the first
    turn becomes one `<image>` per chosen frame (a copy; other samples come back as they are)."""
    if "video" not in sample or unit is None:
        return sample
    turns = [dict(t) for t in sample.get("conversations") or []]
    if turns and isinstance(turns[0], dict):
        field = "value" if "value" in turns[0] else "content"
        if isinstance(turns[0].get(field), str):
            turns[0][field] = turns[0][field].replace(VIDEO_PLACEHOLDER, IMAGE_PLACEHOLDER * unit.num_frames)
    return dict(sample, conversations=turns)


def _turn_field(turn: Dict[str, Any], *names: str) -> Any:
    for n in names:
        if n in turn:
            return turn[n]
    raise KeyError(names[0])


def _check_turns(sample: Dict[str, Any], where: str, num_images: int) -> None:
    turns = sample.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of turns")
    placeholders = 0
    for j, t in enumerate(turns):
        try:
            role, content = _turn_field(t, "from", "role"), _turn_field(t, "value", "content")
        except (KeyError, TypeError):
            raise DataError(f"{where}: turn {j} needs 'from'/'value' (or 'role'/'content')") from None
        if role not in _ROLES or not isinstance(content, str):
            raise DataError(f"{where}: turn {j} has role {role!r} (known: {sorted(_ROLES)}) or non-text content")
        placeholders += content.count(IMAGE_PLACEHOLDER)
    if placeholders != num_images:
        raise DataError(
            f"{where}: {placeholders} '{IMAGE_PLACEHOLDER}' placeholder(s) for {num_images} image(s); each image "
            "needs exactly one placeholder, paired in order"
        )


def _pack_frames(frames: torch.Tensor) -> torch.Tensor:
    """uint8 when the frames are exactly k/255 (the preprocessing without extra_resize): a 4x
    smaller batch that no float cast (DeepSpeed's bf16 input cast, say) can round."""
    u8 = (frames * 255).round().clamp_(0, 255).to(torch.uint8)
    return u8 if torch.equal(u8.float().div_(255), frames) else frames.float()


class _Pending:
    """A sample's store reads, not done yet (`ConversationDataset._resolve` does them)."""

    __slots__ = ("dataset", "unit", "where", "h", "w", "frames")

    def __init__(self, dataset, unit, where: str, h: int, w: int, frames: Optional[torch.Tensor]):
        self.dataset, self.unit, self.where, self.h, self.w, self.frames = dataset, unit, where, h, w, frames


def _materialise(item: Dict[str, Any]) -> None:
    """Copy a resolved item's planned reads into tensors of its own (inside the snapshot block):
    vision_features [S*N, C_vis], features [F, N, C] in stored token order."""
    plan, indices = item.pop("vision_read", (None, ()))
    if plan is not None:
        n, c = plan.shapes[indices[0]][1:]
        item["vision_features"] = out = torch.empty(len(indices) * n, c, dtype=plan.dtype)
        for k, i in enumerate(indices):
            plan.copy_into(i, out[k * n:(k + 1) * n])
    plan, (j,) = item.pop("feature_read", (None, (None,)))
    if plan is not None:
        item["features"] = plan.copy_into(j, torch.empty(plan.shapes[j], dtype=plan.dtype))


from training.collate import Collator  # noqa: E402  (re-exported: training.data.Collator)
