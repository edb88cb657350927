"""Unit planning: which encoder calls a store holds, shared by `featstore build` and training.

A unit is ONE encoder call: an ordered list of frames (paths relative to the data root). VGGT's
global attention mixes all frames of a call, so a frame's features depend on the whole list and
on its order; build and training must enumerate units with this same code, so that a cache
whose frame lists differ from what training asks for is a miss, never a silent wrong answer.

Keys:
  - a single-frame unit: the image's own relative path (shared by every sample that uses it);
  - a multi-frame unit: the sample's "id" when it has one, else its anchor frame (the last,
    i.e. current, frame).
Two samples that map to one key with different frame lists are a PlanError, never an overwrite.

An encoder whose call covers one image (unit kind "image", `featstore.encoders.unit_of`, e.g. a
vision tower) gets one unit per distinct image instead: key = the image's path, frames = (image,),
from every image of every annotated sample (deduplicated, in order of first appearance) or from
the scan of the data root (`plan_units(..., unit="image")`).

Without annotations every image under the data root is its own unit (S=1): files whose
extension is in IMAGE_EXTENSIONS, skipping hidden files and folders (names starting with '.')
and any LMDB store directory. Symlinks to files are followed and keyed by the link's own path
(the path the data names); symlinked directories are not entered, so a link loop cannot hang
the scan and a linked tree is not planned twice.

Example:
    >>> from featstore.plan import plan_units
    >>> units = plan_units("data", ["data/annotations.json"])   # training's annotation file
    >>> [(u.key, u.num_frames) for u in units][:3]
    [('misc/portrait.png', 1), ('scene_a_step1', 2), ('scene_a_step3', 4)]
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from dataclasses import dataclass
from typing import Iterable, Sequence

from featstore.encoders import UNIT_KINDS
from featstore.errors import InvalidKeyError, PlanError
from featstore.keys import normalize_key, relative_key
from featstore.store import require_directory

__all__ = [
    "IMAGE_EXTENSIONS",
    "Unit",
    "scan_images",
    "load_annotations",
    "sample_frames",
    "sample_unit",
    "units_from_annotations",
    "image_units_from_annotations",
    "plan_units",
    "source_path",
    "file_sha256",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_IMAGE_FIELDS = ("images", "image")  # LLaVA/Qwen conversation JSON: a list, or one path


@dataclass(frozen=True)
class Unit:
    """One encoder call: `frames` (keys, in call order) stored under `key`.

    Example:
        >>> from featstore.plan import Unit
        >>> Unit("scene_a_step1", ("scene_a/000.jpg", "scene_a/001.jpg")).num_frames
        2
    """

    key: str
    frames: tuple[str, ...]

    @property
    def num_frames(self) -> int:
        return len(self.frames)


def scan_images(data_root: str | os.PathLike, *, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[str]:
    """Keys of every image under `data_root`, sorted (see module docstring for the rules).

    Args:
        data_root: the folder to scan; keys are paths relative to it.
        extensions: lower-case file extensions taken as images (default IMAGE_EXTENSIONS).

    Returns:
        Sorted keys (NFC, '/'-separated relative paths).

    Raises:
        PlanError: `data_root` is not a directory.

    Example:
        >>> from featstore.plan import scan_images
        >>> scan_images("data")[:3]
        ['misc/portrait.png', 'misc/rgba.png', 'scene_a/000.jpg']
    """
    root = os.fspath(data_root)
    require_directory(root, "data root", "pass the folder that holds the images", PlanError)
    exts = tuple(e.lower() for e in extensions)
    keys = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        # Prune in place: hidden folders, LMDB environments (ours or any other), never entered.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and not os.path.isfile(os.path.join(dirpath, d, "data.mdb")))
        for name in filenames:
            if name.startswith(".") or not name.lower().endswith(exts):
                continue
            path = os.path.join(dirpath, name)
            if os.path.islink(path) and not os.path.isfile(path):
                continue  # dangling link: nothing to encode
            keys.append(relative_key(path, root))
    return sorted(keys)


def load_annotations(path: str | os.PathLike) -> list[dict]:
    """Read a LLaVA/Qwen annotation file: a JSON list of samples, or JSONL (one per line).

    Args:
        path: the .json or .jsonl file.

    Returns:
        The samples (dicts), in file order.

    Raises:
        PlanError: unreadable file, invalid JSON/JSONL, or a sample that is not an object.

    Example:
        >>> from featstore.plan import load_annotations
        >>> load_annotations("data/annotations.json")[0]["id"]
        'scene_a_step3'
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise PlanError(f"cannot read annotations {path}: {e.strerror}; check the path and its permissions") from None
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            samples = json.loads(text)
        else:
            samples = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise PlanError(f"annotations {path}: not valid JSON or JSONL ({e}); fix the file: a JSON list of "
                        "samples, or one JSON object per line") from None
    for i, s in enumerate(samples):
        if not isinstance(s, dict):
            raise PlanError(f"annotations {path}: sample {i} is a {type(s).__name__}, not an object; make every "
                            "sample a JSON object with 'images' (or 'image') and 'conversations'")
    return samples


def sample_frames(sample: dict, data_root: str | os.PathLike, *, where: str = "sample") -> tuple[str, ...]:
    """The ordered frame keys of one annotation sample ("images" list or "image" path).

    Args:
        sample: one annotation sample.
        data_root: the folder keys are relative to (absolute image paths are made relative).
        where: how errors name the sample (file and index).

    Returns:
        The frame keys in call order; () for a sample without images.

    Raises:
        PlanError: the image field is not a path or a list of paths, or a path is not a key.

    Example:
        >>> from featstore.plan import sample_frames
        >>> sample_frames({"images": ["./scene_a//000.jpg", "scene_a/001.jpg"]}, "data")
        ('scene_a/000.jpg', 'scene_a/001.jpg')
    """
    for field in _IMAGE_FIELDS:
        if field in sample:
            value = sample[field]
            paths = [value] if isinstance(value, str) else value
            if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
                raise PlanError(f"{where}: '{field}' must be a path or a list of paths, found {value!r}")
            break
    else:
        return ()
    frames = []
    for p in paths:
        try:
            frames.append(relative_key(p, data_root) if os.path.isabs(p) else normalize_key(p))
        except InvalidKeyError as e:
            raise PlanError(f"{where}: image {p!r}: {e}") from None
    return tuple(frames)


def sample_unit(sample: dict, data_root: str | os.PathLike, *, where: str = "sample") -> Unit | None:
    """The unit one annotation sample asks for, or None when it has no image.

    Training calls this per sample to know which key to read and which frame list to expect.

    Args:
        sample: one annotation sample ("images"/"image", optional "id").
        data_root: the folder keys are relative to.
        where: how errors name the sample.

    Returns:
        Unit(key, frames): key = the image for one frame, else the sample's id, else its last frame.

    Raises:
        PlanError: bad image field, or an id that is not usable as a key.

    Example:
        >>> from featstore.plan import sample_unit
        >>> sample_unit({"id": "ep7_step2", "images": ["scene_b/000.jpg", "scene_b/001.jpg"]}, "data")
        Unit(key='ep7_step2', frames=('scene_b/000.jpg', 'scene_b/001.jpg'))
        >>> sample_unit({"image": "scene_b/002.jpg"}, "data").key
        'scene_b/002.jpg'
    """
    frames = sample_frames(sample, data_root, where=where)
    if not frames:
        return None
    if len(frames) == 1:
        return Unit(frames[0], frames)
    sample_id = sample.get("id")
    if sample_id is not None and str(sample_id) != "":
        try:
            key = normalize_key(str(sample_id))
        except InvalidKeyError as e:
            raise PlanError(f"{where}: id {sample_id!r} is not usable as a key: {e}") from None
    else:
        key = frames[-1]
    return Unit(key, frames)


def units_from_annotations(annotation_files: Iterable[str | os.PathLike], data_root: str | os.PathLike, *,
                           skipped: list[dict] | None = None) -> list[Unit]:
    """One unit per sample with images, deduplicated, sorted by key.

    Args:
        annotation_files: training's annotation files (JSON or JSONL).
        data_root: the folder keys are relative to.
        skipped: when given, receives ``{"sample": where, "reason": why}`` for each sample that
            has no image (a video sample, a text-only one): nothing of it is encoded.

    Returns:
        The units, sorted by key; samples asking for the same unit give it once.

    Raises:
        PlanError: two samples map to one key with different frame lists (both are named).

    Example:
        >>> from featstore.plan import units_from_annotations
        >>> [u.key for u in units_from_annotations(["data/annotations.json"], "data")]
        ['misc/portrait.png', 'scene_a_step1', 'scene_a_step3', 'scene_b_step1', 'scene_b_step3']
    """
    by_key: dict[str, tuple[Unit, str]] = {}
    for path in annotation_files:
        for i, sample in enumerate(load_annotations(path)):
            where = f"{os.fspath(path)} sample {i}" + (f" (id {sample['id']!r})" if "id" in sample else "")
            unit = sample_unit(sample, data_root, where=where)
            if unit is None:
                if skipped is not None:
                    skipped.append({"sample": where, "reason": _why_no_image(sample)})
                continue
            seen = by_key.get(unit.key)
            if seen is None:
                by_key[unit.key] = (unit, where)
            elif seen[0].frames != unit.frames:
                raise PlanError(
                    f"key collision: {where} and {seen[1]} both map to key {unit.key!r} with different "
                    f"frame lists ({list(unit.frames)} vs {list(seen[0].frames)}). Give the samples "
                    "distinct 'id' fields: one key must name one encoder call."
                )
    return [by_key[k][0] for k in sorted(by_key)]


def image_units_from_annotations(annotation_files: Iterable[str | os.PathLike], data_root: str | os.PathLike, *,
                                 skipped: list[dict] | None = None) -> list[Unit]:
    """One single-image unit per distinct image of the annotated samples, for encoders that
    encode each image alone (unit kind "image").

    Args:
        annotation_files: training's annotation files (JSON or JSONL).
        data_root: the folder keys are relative to.
        skipped: as for `units_from_annotations`.

    Returns:
        ``Unit(image, (image,))`` for every image of every sample, each once, in order of first
        appearance (file order, then frame order within a sample).

    Example:
        >>> from featstore.plan import image_units_from_annotations
        >>> [u.key for u in image_units_from_annotations(["data/annotations.json"], "data")][:3]
        ['scene_a/000.jpg', 'scene_a/001.jpg', 'scene_a/002.jpg']
    """
    images: dict[str, None] = {}  # ordered: the order of first appearance
    for path in annotation_files:
        for i, sample in enumerate(load_annotations(path)):
            where = f"{os.fspath(path)} sample {i}" + (f" (id {sample['id']!r})" if "id" in sample else "")
            frames = sample_frames(sample, data_root, where=where)
            if not frames and skipped is not None:
                skipped.append({"sample": where, "reason": _why_no_image(sample)})
            for frame in frames:
                images.setdefault(frame, None)
    return [Unit(k, (k,)) for k in images]


def _why_no_image(sample: dict) -> str:
    media = [k for k in ("video", "videos", "audio") if k in sample]
    if media:
        return f"a '{media[0]}' sample (only images are encoded)"
    return "no 'images' or 'image' field"


def plan_units(data_root: str | os.PathLike, annotations: Sequence[str | os.PathLike] | None = None, *,
               skipped: list[dict] | None = None, unit: str = "sequence") -> list[Unit]:
    """All units of a data root for an encoder of unit kind `unit`. `featstore build`,
    `verify`, `gc` and training all call this.

    Args:
        data_root: the images' folder.
        annotations: training's annotation files; None or empty: scan the data root.
        skipped: see `units_from_annotations`.
        unit: the encoder's unit kind (`featstore.encoders.unit_of(name)`). "sequence"
            (default): one unit per annotated sample, sorted by key. "image": one unit per
            distinct image of the annotated samples, in order of first appearance. Without
            annotations both give one unit per image under the data root (S=1), sorted.

    Returns:
        The units.

    Raises:
        PlanError: as for `units_from_annotations`; ValueError: an unknown `unit`.

    Example:
        >>> from featstore.plan import plan_units
        >>> len(plan_units("data")), plan_units("data")[0]
        (10, Unit(key='misc/portrait.png', frames=('misc/portrait.png',)))
        >>> len(plan_units("data", ["data/annotations.json"], unit="image"))  # each image once
        9
    """
    if unit not in UNIT_KINDS:
        raise ValueError(f"unit must be one of {UNIT_KINDS}. Found {unit!r}")
    if annotations:
        if unit == "image":
            return image_units_from_annotations(annotations, data_root, skipped=skipped)
        return units_from_annotations(annotations, data_root, skipped=skipped)
    return [Unit(k, (k,)) for k in scan_images(data_root)]


def source_path(data_root: str | os.PathLike, key: str) -> str:
    """The file a frame key names. Keys are NFC; a file whose name is stored in another Unicode
    form (NFD from macOS, say) is found by comparing each path component in NFC. Returns the
    plain join when nothing matches, so that opening it gives the usual "no such file".

    Example:
        >>> from featstore.plan import source_path
        >>> source_path("data", "scene_a/000.jpg")
        'data/scene_a/000.jpg'
    """
    root = os.fspath(data_root)
    direct = os.path.join(root, key)
    if os.path.lexists(direct) or key.isascii():
        return direct
    path = root
    for part in key.split("/"):
        candidate = os.path.join(path, part)
        if not os.path.lexists(candidate):
            try:
                names = os.listdir(path)
            except OSError:
                return direct
            match = [n for n in names if unicodedata.normalize("NFC", n) == part]
            if not match:
                return direct
            candidate = os.path.join(path, match[0])
        path = candidate
    return path


def file_sha256(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    """sha256 of a file's content, streamed (for `verify --deep`).

    Example:
        >>> from featstore.plan import file_sha256
        >>> len(file_sha256("data/scene_a/000.jpg"))
        64
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
