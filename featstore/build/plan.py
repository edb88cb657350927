"""Unit planning: which encoder calls a store holds, shared by `featstore build` and training.

A unit is ONE encoder call: an ordered list of frames (paths relative to the data root). VGGT's
global attention mixes all frames of a call, so a frame's features depend on the whole list and
on its order; build and training must enumerate units with this same code, so that a cache
whose frame lists differ from what training asks for is a miss, never a silent wrong answer.

Keys:
  - a single-frame unit: the image's own relative path (shared by every sample that uses it);
  - a multi-frame unit: the sample's "id" when it has one, else its anchor frame (the last,
    i.e. current, frame); an id that samples give to different frame lists (JanusVLN's merged
    R2R/RxR files) is set aside for their anchor frames (`plan_samples`).
Two samples that map to one key with different frame lists are a PlanError, never an overwrite.

Annotation files are given as `--annotations` takes them, ``FILE[@IMAGE_DIR][%N]``
(featstore.build.annotations, whose names are importable from here too): IMAGE_DIR is the
folder the file's relative image paths start from (inside the data root: keys stay relative to
the root), %N keeps N percent of the samples, the same ones for every caller
(`subsample_indices`: seeded by the file's content). `plan_samples` gives every kept sample with its unit, refusing samples with `spar_info`
(VG-LLM's markers) and a data root that holds none of a file's first images.

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
    >>> from featstore.build.plan import plan_units
    >>> units = plan_units("data", ["data/annotations.json"])   # training's annotation file
    >>> [(u.key, u.num_frames) for u in units][:3]
    [('misc/portrait.png', 1), ('scene_a_step1', 2), ('scene_a_step3', 4)]
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
from dataclasses import dataclass
from typing import Iterable, Sequence

# The annotation-file names are part of planning's API (every caller plans from such files).
from featstore.build.annotations import (AnnotationSource, annotation_sources, load_annotations,  # noqa: F401
                                         parse_annotation_source, read_annotations, subsample_indices)
from featstore.encoders import UNIT_KINDS
from featstore.errors import InvalidKeyError, PlanError
# source_path lives with the keys (the store's freshness check needs it too); it stays importable here.
from featstore.format.frame_ref import frame_file
from featstore.format.keys import IMAGE_EXTENSIONS, normalize_key, relative_key, source_path
from featstore.store.layout import require_directory

__all__ = [
    "IMAGE_EXTENSIONS",
    "Unit",
    "AnnotationSource",
    "PlannedSample",
    "parse_annotation_source",
    "annotation_sources",
    "subsample_indices",
    "scan_images",
    "load_annotations",
    "plan_samples",
    "describe_skipped",
    "sample_frames",
    "sample_unit",
    "units_from_annotations",
    "image_units_from_annotations",
    "plan_units",
    "source_path",
    "file_sha256",
    "frame_order",
    "shard_part",
]

_IMAGE_FIELDS = ("images", "image")  # LLaVA/Qwen conversation JSON: a list, or one path


@dataclass(frozen=True)
class Unit:
    """One encoder call: `frames` (keys, in call order) stored under `key`.

    Example:
        >>> from featstore.build.plan import Unit
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
        >>> from featstore.build.plan import scan_images
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


# -- annotation samples -> units ------------------------------------------------------------

# Images looked for per annotation file before anything is built: a wrong --data-root (or
# IMAGE_DIR) then stops at once instead of "succeeding" with every unit failed or an empty store.
FAIL_FAST_IMAGES = 20
_MEDIA_FIELDS = ("videos", "audio")  # samples whose frames are not encoded ("video" is: featstore.build.video)

logger = logging.getLogger("featstore")


@dataclass(frozen=True)
class PlannedSample:
    """One annotation sample as the plan sees it: `unit` is what it asks the store for (None
    when it has no image), `skipped` why nothing of it is encoded (None when it has a unit)."""

    where: str  # "FILE sample I (id 'X')": I is the sample's index in its file
    sample: dict
    unit: Unit | None
    skipped: str | None = None
    source: AnnotationSource | None = None

    @property
    def media(self) -> bool:
        """A video (or audio) sample: its frames come from a medium that is not encoded yet."""
        return any(k in self.sample for k in _MEDIA_FIELDS)


def sample_frames(sample: dict, data_root: str | os.PathLike, *, where: str = "sample",
                  prefix: str = "") -> tuple[str, ...]:
    """The ordered frame keys of one annotation sample ("images" list or "image" path).

    Args:
        sample: one annotation sample.
        data_root: the folder keys are relative to (absolute image paths are made relative).
        where: how errors name the sample (file and index).
        prefix: the sample's image folder relative to the data root ('' for the root:
            `AnnotationSource.prefix`); relative paths are joined to it.

    Returns:
        The frame keys in call order; () for a sample without images.

    Raises:
        PlanError: the image field is not a path or a list of paths, or a path is not a key.

    Example:
        >>> from featstore.build.plan import sample_frames
        >>> sample_frames({"images": ["./scene_a//000.jpg", "scene_a/001.jpg"]}, "data")
        ('scene_a/000.jpg', 'scene_a/001.jpg')
        >>> sample_frames({"image": "000.jpg"}, "data", prefix="scene_a")
        ('scene_a/000.jpg',)
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
            if os.path.isabs(p):
                frames.append(relative_key(p, data_root))
            elif prefix:
                joined = prefix + "/" + p
                if ".." in joined:  # a path that steps out of its image folder (still inside the root)
                    joined = os.path.normpath(joined).replace(os.sep, "/")
                frames.append(normalize_key(joined))
            else:
                frames.append(normalize_key(p))
        except InvalidKeyError as e:
            raise PlanError(f"{where}: image {p!r}: {e}") from None
    return tuple(frames)


def sample_unit(sample: dict, data_root: str | os.PathLike, *, where: str = "sample", prefix: str = "",
                video_policy=None) -> Unit | None:
    """The unit one annotation sample asks for on its own, or None when it has no image.

    `plan_samples` starts from this and re-keys the samples whose id is shared with another
    frame list (see there); call that for a whole file.

    Args:
        sample: one annotation sample ("images"/"image", optional "id").
        data_root: the folder keys are relative to.
        where: how errors name the sample.
        prefix: as for `sample_frames`.
        video_policy: for a sample with a "video": the sampling policy (a
            `featstore.build.video.VideoPolicy` or its string; None: the default, VG-LLM's).

    Returns:
        Unit(key, frames): key = the image for one frame, else the sample's id, else its last frame.

    Raises:
        PlanError: bad image field, or an id that is not usable as a key.

    Example:
        >>> from featstore.build.plan import sample_unit
        >>> sample_unit({"id": "ep7_step2", "images": ["scene_b/000.jpg", "scene_b/001.jpg"]}, "data")
        Unit(key='ep7_step2', frames=('scene_b/000.jpg', 'scene_b/001.jpg'))
        >>> sample_unit({"image": "scene_b/002.jpg"}, "data").key
        'scene_b/002.jpg'
    """
    if "video" in sample:  # VG-LLM: the video's chosen frames replace any "images" list
        from featstore.build.video import parse_video_policy, video_frames

        frames = video_frames(sample["video"], data_root, parse_video_policy(video_policy), where=where, prefix=prefix)
    else:
        frames = sample_frames(sample, data_root, where=where, prefix=prefix)
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


def _where(path: str, index: int, sample: dict) -> str:
    return f"{path} sample {index}" + (f" (id {sample['id']!r})" if "id" in sample else "")


def plan_samples(data_root: str | os.PathLike,
                 annotations: Sequence[str | os.PathLike | AnnotationSource], *,
                 video_policy=None) -> list[PlannedSample]:
    """Every annotation sample the plan keeps, with the unit it asks for: what training trains
    on and what `featstore build --annotations` encodes (one code path, so they agree).

    Per file (`--annotations FILE[@IMAGE_DIR][%N]`, `parse_annotation_source`): the samples,
    cut to N percent by `subsample_indices` (seeded by the file's content: build and training
    keep the same ones), in file order; relative image paths start from IMAGE_DIR.

    Keys: as `sample_unit`, with one exception. An id shared by samples with different frame
    lists is not used as a key: those samples are keyed by their last (current) frame instead.
    JanusVLN's `create_data.py` writes ids "EPISODE/FRAME.png", and R2R and RxR (and ScaleVLN
    and DAgger) number episodes alike, so its merged files repeat ids for other frames; the
    current frame's path is unique there. Two samples left on one key with different frame
    lists are a PlanError, never an overwrite.

    Args:
        data_root: the folder keys are relative to.
        annotations: the files (values as `--annotations` takes them, or AnnotationSources).
        video_policy: which frames of a "video" sample (`featstore.build.video`; None: VG-LLM's
            default, vgllm:2:4:8).

    Returns:
        One PlannedSample per kept sample, files in order, samples in file order.

    Raises:
        PlanError: a bad file or sample; samples with `spar_info` (markers this code does not
            draw, see `_refuse_marked`); none of a file's first FAIL_FAST_IMAGES images exists
            (a wrong data root or IMAGE_DIR); a key collision.

    Example:
        >>> from featstore.build.plan import plan_samples
        >>> [p.unit.key for p in plan_samples("data", ["data/annotations.json"])][:2]
        ['scene_a_step3', 'scene_a_step1']
    """
    planned: list[PlannedSample] = []
    marked: list[str] = []
    for src in annotation_sources(annotations, data_root):
        samples, digest = read_annotations(src.path)
        for i in subsample_indices(len(samples), src.percent, digest):
            sample = samples[i]
            where = _where(src.path, i, sample)
            if sample.get("spar_info") is not None:
                marked.append(where)
                continue
            media = [k for k in _MEDIA_FIELDS if k in sample]
            # A "video" sample is its video's chosen frames (featstore.build.video), as in VG-LLM.
            unit = None if media else sample_unit(sample, data_root, where=where, prefix=src.prefix,
                                                  video_policy=video_policy)
            skipped = None if unit is not None else _why_no_image(sample)
            planned.append(PlannedSample(where, sample, unit, skipped, src))
    _refuse_marked(marked)
    _check_images_exist(planned, data_root)
    return _rekey_shared_ids(planned)


def _refuse_marked(marked: list[str]) -> None:
    if marked:
        raise PlanError(
            f"{len(marked)} annotation sample(s) carry 'spar_info', e.g. {marked[0]}: VG-LLM draws visual markers "
            "on their images (draw_marker.py) before VGGT and Qwen see them, and featstore does not draw them yet, "
            "so their features would be computed on unmarked images, another model's inputs. Drop these samples "
            "from the annotation file (e.g. keep the lines without \"spar_info\") until marker drawing is supported")


def _check_images_exist(planned: list[PlannedSample], data_root: str | os.PathLike) -> None:
    """Stop when none of a file's first FAIL_FAST_IMAGES distinct images exists: the data root
    (or IMAGE_DIR) is not the folder its paths are relative to."""
    by_source: dict[int, tuple[AnnotationSource, dict[str, str]]] = {}
    for p in planned:
        if p.unit is None:
            continue
        src, seen = by_source.setdefault(id(p.source), (p.source, {}))
        for frame in p.unit.frames:
            if len(seen) < FAIL_FAST_IMAGES:
                seen.setdefault(frame, p.where)
    for src, seen in by_source.values():
        if not seen or any(os.path.exists(source_path(data_root, frame_file(k))) for k in seen):
            continue
        key, where = next(iter(seen.items()))
        written = key[len(src.prefix) + 1:] if src.prefix and key.startswith(src.prefix + "/") else key
        folder = (f"IMAGE_DIR {src.image_dir} (after '@')" if src.image_dir is not None
                  else f"--data-root {os.fspath(data_root)}")
        raise PlanError(
            f"--annotations {src.text or src.path}: none of the first {len(seen)} images it names exists "
            f"(e.g. {source_path(data_root, key)}, image {written!r} of {where}); nothing was built. {folder} must "
            f"be the folder the annotation's image paths are relative to: the one holding {written!r}")


def _rekey_shared_ids(planned: list[PlannedSample]) -> list[PlannedSample]:
    """Key by their last frame the samples whose id names several frame lists; then refuse
    what still collides (see `plan_samples`)."""
    first: dict[str, tuple[str, ...]] = {}  # id key -> the first frame list seen under it
    shared: set[str] = set()
    for p in planned:
        if p.unit is not None and p.unit.num_frames > 1 and p.unit.key != p.unit.frames[-1]:
            if first.setdefault(p.unit.key, p.unit.frames) != p.unit.frames:
                shared.add(p.unit.key)
    if shared:
        out = []
        for p in planned:
            if p.unit is not None and p.unit.key in shared and p.unit.num_frames > 1:
                p = PlannedSample(p.where, p.sample, Unit(p.unit.frames[-1], p.unit.frames), p.skipped, p.source)
            out.append(p)
        planned = out
        logger.info("featstore plan: %d sample id(s) name several frame lists (e.g. %r); those samples are keyed "
                    "by their last frame", len(shared), sorted(shared)[0])
    seen: dict[str, PlannedSample] = {}
    for p in planned:
        if p.unit is None:
            continue
        other = seen.setdefault(p.unit.key, p)
        if other.unit.frames != p.unit.frames:
            raise PlanError(
                f"key collision: {p.where} and {other.where} both map to key {p.unit.key!r} with different "
                f"frame lists ({list(p.unit.frames)} vs {list(other.unit.frames)}). Give the samples "
                "distinct 'id' fields: one key must name one encoder call.")
    return planned


def describe_skipped(skipped: Sequence[dict], *, limit: int = 3) -> str:
    """The one wording for annotation samples with nothing to encode (build's report, training's
    refusal of video samples): the count and the first `limit`, each with its reason.

    Example:
        >>> from featstore.build.plan import describe_skipped
        >>> describe_skipped([{"sample": "a.json sample 0", "reason": "a 'videos' sample (only images are encoded)"}])
        "1 annotation samples skipped (no image to encode), e.g. a.json sample 0: a 'videos' sample (only images are encoded)"
    """
    named = "; ".join(f"{s['sample']}: {s['reason']}" for s in skipped[:limit])
    return f"{len(skipped)} annotation samples skipped (no image to encode), e.g. {named}"


def units_from_annotations(annotation_files: Iterable[str | os.PathLike | AnnotationSource],
                           data_root: str | os.PathLike, *, skipped: list[dict] | None = None,
                           video_policy=None) -> list[Unit]:
    """One unit per sample with images (or a video), deduplicated, sorted by key.

    Args:
        annotation_files: training's annotation files (JSON or JSONL; values as `--annotations`).
        data_root: the folder keys are relative to.
        skipped: when given, receives ``{"sample": where, "reason": why}`` for each sample that
            has no image (a video sample, a text-only one): nothing of it is encoded.

    Returns:
        The units, sorted by key; samples asking for the same unit give it once.

    Raises:
        PlanError: as for `plan_samples` (e.g. two samples map to one key with different frame
            lists: both are named).

    Example:
        >>> from featstore.build.plan import units_from_annotations
        >>> [u.key for u in units_from_annotations(["data/annotations.json"], "data")]
        ['misc/portrait.png', 'scene_a_step1', 'scene_a_step3', 'scene_b_step1', 'scene_b_step3']
    """
    by_key: dict[str, Unit] = {}
    for p in plan_samples(data_root, list(annotation_files), video_policy=video_policy):
        if p.unit is None:
            if skipped is not None:
                skipped.append({"sample": p.where, "reason": p.skipped})
            continue
        by_key.setdefault(p.unit.key, p.unit)
    return [by_key[k] for k in sorted(by_key)]


def image_units_from_annotations(annotation_files: Iterable[str | os.PathLike | AnnotationSource],
                                 data_root: str | os.PathLike, *, skipped: list[dict] | None = None,
                                 video_policy=None) -> list[Unit]:
    """One single-image unit per distinct image of the annotated samples, for encoders that
    encode each image alone (unit kind "image").

    Args:
        annotation_files: training's annotation files (JSON or JSONL; values as `--annotations`).
        data_root: the folder keys are relative to.
        skipped: as for `units_from_annotations`.

    Returns:
        ``Unit(image, (image,))`` for every image of every sample, each once, in order of first
        appearance (file order, then frame order within a sample).

    Example:
        >>> from featstore.build.plan import image_units_from_annotations
        >>> [u.key for u in image_units_from_annotations(["data/annotations.json"], "data")][:3]
        ['scene_a/000.jpg', 'scene_a/001.jpg', 'scene_a/002.jpg']
    """
    images: dict[str, None] = {}  # ordered: the order of first appearance
    for p in plan_samples(data_root, list(annotation_files), video_policy=video_policy):
        if p.unit is None:
            if skipped is not None:
                skipped.append({"sample": p.where, "reason": p.skipped})
            continue
        for frame in p.unit.frames:
            images.setdefault(frame, None)
    return [Unit(k, (k,)) for k in images]


def _why_no_image(sample: dict) -> str:
    media = [k for k in _MEDIA_FIELDS if k in sample]
    if media:
        return f"a '{media[0]}' sample (only images are encoded)"
    return "no 'images' or 'image' field"


def plan_units(data_root: str | os.PathLike,
               annotations: Sequence[str | os.PathLike | AnnotationSource] | None = None, *,
               skipped: list[dict] | None = None, unit: str = "sequence", video_policy=None) -> list[Unit]:
    """All units of a data root for an encoder of unit kind `unit`. `featstore build`,
    `verify`, `gc` and training all call this (training through `plan_samples`).

    Args:
        data_root: the images' folder.
        annotations: training's annotation files, as `--annotations` takes them
            (``FILE[@IMAGE_DIR][%N]``, `parse_annotation_source`); None or empty: scan the data root.
        skipped: see `units_from_annotations`.
        unit: the encoder's unit kind (`featstore.encoders.unit_of(name)`). "sequence"
            (default): one unit per annotated sample, sorted by key. "image": one unit per
            distinct image of the annotated samples, in order of first appearance. Without
            annotations both give one unit per image under the data root (S=1), sorted.
        video_policy: which frames of a "video" sample (`featstore.build.video`; None: vgllm:2:4:8).

    Returns:
        The units.

    Raises:
        PlanError: as for `plan_samples`; ValueError: an unknown `unit`.

    Example:
        >>> from featstore.build.plan import plan_units
        >>> len(plan_units("data")), plan_units("data")[0]
        (10, Unit(key='misc/portrait.png', frames=('misc/portrait.png',)))
        >>> len(plan_units("data", ["data/annotations.json"], unit="image"))  # each image once
        9
    """
    if unit not in UNIT_KINDS:
        raise ValueError(f"unit must be one of {UNIT_KINDS}. Found {unit!r}")
    if annotations:
        if unit == "image":
            return image_units_from_annotations(annotations, data_root, skipped=skipped, video_policy=video_policy)
        return units_from_annotations(annotations, data_root, skipped=skipped, video_policy=video_policy)
    return [Unit(k, (k,)) for k in scan_images(data_root)]


def frame_order(units: Iterable[Unit]) -> list[Unit]:
    """`units` in the order the build encodes them: grouped by their first frame's folder (an
    episode), then by that frame (a video's frames by the video), then by key.

    A JanusVLN-style file gives every sample of an episode the episode's first frame, and
    `linspace` histories overlap; adjacent units then land in one batch, whose patch embedding
    runs once per distinct frame (featstore.build.pipeline). The order only decides which
    units share a batch: which keys are computed and what they hold are the plan's, so a build
    resumed after a kill computes the same entries whatever it did before.

    Example:
        >>> from featstore.build.plan import Unit, frame_order
        >>> units = [Unit("a1", ("ep1/0.png", "ep1/3.png")), Unit("b1", ("ep2/0.png",)),
        ...          Unit("a2", ("ep1/0.png", "ep1/5.png"))]
        >>> [u.key for u in frame_order(units)]
        ['a1', 'a2', 'b1']
    """
    def order(unit: Unit) -> tuple[str, str, str]:
        first = frame_file(unit.frames[0])
        return posixpath.dirname(first), first, unit.key

    return sorted(units, key=order)


def shard_part(units: Iterable[Unit], index: int, count: int) -> list[Unit]:
    """Part `index` of `count` (`featstore build --shard I/N`): the units in episode order
    (`frame_order`), cut into `count` contiguous parts whose sizes differ by at most one.

    Contiguous, so that an episode's units stay on one host (cut only where a part ends) and its
    shared frames are patch-embedded there once; every N-th unit would hand each host a slice of
    every episode and embed its shared frames on every host. The part depends on the planned
    units and `count` alone, not on what the store holds, so the parts of one plan are disjoint
    and together hold every unit, however often each host is rerun.

    Example:
        >>> from featstore.build.plan import Unit, shard_part
        >>> units = [Unit(f"{ep}_{t}", (f"{ep}/0.png", f"{ep}/{t}.png")) for ep in ("ep2", "ep1") for t in (1, 2)]
        >>> [[u.key for u in shard_part(units, i, 2)] for i in range(2)]
        [['ep1_1', 'ep1_2'], ['ep2_1', 'ep2_2']]
    """
    if not 0 <= index < count:
        raise PlanError(f"--shard must be I/N with 0 <= I < N. Found {f'{index}/{count}'!r}")
    ordered = frame_order(units)
    size, extra = divmod(len(ordered), count)
    start = index * size + min(index, extra)  # the first `extra` parts hold one unit more
    return ordered[start: start + size + (index < extra)]


def file_sha256(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    """sha256 of a file's content, streamed (for `verify --deep`).

    Example:
        >>> from featstore.build.plan import file_sha256
        >>> len(file_sha256("data/scene_a/000.jpg"))
        64
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
