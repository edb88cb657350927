"""Video samples -> ordered frame lists: the sampling policy and the resolution of a `video` entry.

A sample's `video` (VG-LLM, Spatial-MLLM, VLM-3R) is either a folder of frame files or a
container file (.mp4, .avi, .mov, ...). It becomes an ordered frame list, after which the
sample is an image sample: one encoder call over those frames, one `<image>` per frame.

The policy picks which frames, from the video's frame count and fps. It is named and
parameterised, written as a string that every command takes (`--video-policy`, training's
`--video_policy`) and that the store's plan record keeps:

- ``vgllm:BASE_INTERVAL:MIN:MAX`` (default ``vgllm:2:4:8``, VG-LLM's shipped config): VG-LLM's
  `read_video_images` rule (src/qwen_vl/data/data_qwen.py): n = clamp(round(total / fps /
  BASE_INTERVAL), MIN, MAX), indices = unique(linspace(0, total - 1, n, dtype=int)); a folder's
  fps is 1.
- ``linspace:N``: N frames, unique(linspace(0, total - 1, N, dtype=int)) (Spatial-MLLM: 16,
  VLM-3R: 32).

A folder video's frames are its image files (extensions IMAGE_EXTENSIONS, hidden files skipped;
VG-LLM lists every file), sorted by name: the unit's frames are their relative paths, exactly
as an `images` sample's. A container video's frames are references "VIDEO#INDEX"
(`featstore.format.frame_ref`): decoded at build and read time at those exact indices.

The policy decides the frame lists, and the frame lists are the units' identity: a store built
under one policy holds other frame lists than a run under another asks for, a miss (the
frame-list check), never a wrong answer; the plan record names the policy (`featstore info`).

Example:
    >>> from featstore.build.video import parse_video_policy
    >>> p = parse_video_policy("vgllm")
    >>> p.name, p.indices(60, 30.0)          # 2 s of video: round(2 / 2) = 1 -> clamped to 4
    ('vgllm:2:4:8', [0, 19, 39, 59])
    >>> parse_video_policy("linspace:3").indices(10, 1.0)
    [0, 4, 9]
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from featstore.errors import PlanError
from featstore.format.frame_ref import VIDEO_EXTENSIONS, is_video_path, video_frame_ref
from featstore.format.keys import IMAGE_EXTENSIONS, normalize_key, source_path

__all__ = ["VideoPolicy", "parse_video_policy", "DEFAULT_VIDEO_POLICY", "VIDEO_POLICY_SYNTAX", "video_frames"]

DEFAULT_VIDEO_POLICY = "vgllm:2:4:8"
VIDEO_POLICY_SYNTAX = "vgllm[:BASE_INTERVAL:MIN_FRAMES:MAX_FRAMES] or linspace:N"


@dataclass(frozen=True)
class VideoPolicy:
    """Which frames of a video a sample uses. `kind` "vgllm" (params: base_interval, min, max)
    or "linspace" (params: count)."""

    kind: str
    params: tuple

    @property
    def name(self) -> str:
        """The canonical string (what the plan record keeps and messages name)."""
        return ":".join([self.kind] + [_num(p) for p in self.params])

    def indices(self, total: int, fps: float) -> list[int]:
        """The chosen frame indices of a video of `total` frames at `fps`, ascending, unique."""
        import numpy as np

        if total <= 0:
            return []
        if self.kind == "vgllm":
            interval, lo, hi = self.params
            n = min(max(round(total / fps / interval), lo), hi)  # VG-LLM's get_frame_indices
        else:
            n = self.params[0]
        return np.unique(np.linspace(0, total - 1, n, dtype=int)).tolist()


def _num(x) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def parse_video_policy(text: "str | VideoPolicy | None") -> VideoPolicy:
    """A policy from its string (None: DEFAULT_VIDEO_POLICY).

    Raises:
        PlanError: an unknown kind or bad parameters (the syntax is named).
    """
    if isinstance(text, VideoPolicy):
        return text
    text = DEFAULT_VIDEO_POLICY if text is None else str(text).strip()
    kind, *args = text.split(":")
    try:
        if kind == "vgllm" and not args:
            return parse_video_policy(DEFAULT_VIDEO_POLICY)
        if kind == "vgllm" and len(args) == 3:
            interval, lo, hi = float(args[0]), int(args[1]), int(args[2])
            if interval > 0 and 1 <= lo <= hi:
                return VideoPolicy("vgllm", (interval, lo, hi))
        elif kind == "linspace" and len(args) == 1 and int(args[0]) >= 1:
            return VideoPolicy("linspace", (int(args[0]),))
    except ValueError:
        pass
    raise PlanError(f"video policy {text!r} is not {VIDEO_POLICY_SYNTAX} (BASE_INTERVAL > 0 seconds, "
                    "1 <= MIN_FRAMES <= MAX_FRAMES, N >= 1); e.g. vgllm:2:4:8 (VG-LLM), linspace:16 (Spatial-MLLM), "
                    "linspace:32 (VLM-3R)")


def video_frames(value, data_root: str | os.PathLike, policy: VideoPolicy, *, where: str = "sample",
                 prefix: str = "") -> tuple[str, ...]:
    """The ordered frames of one `video` entry under `policy` (see the module docstring).

    Args:
        value: the sample's "video" field (a path relative to its IMAGE_DIR, or absolute).
        data_root: the folder keys are relative to.
        policy: the sampling policy.
        where: how errors name the sample.
        prefix: the sample's image folder relative to the data root ('' for the root).

    Returns:
        Frame keys in call order. A container video that cannot be opened gives (VIDEO,): its
        unit then fails when its frames are read, named with the video's error, like a
        corrupt image (planning does not stop for one bad file).

    Raises:
        PlanError: the field is not one path, the path is not a key, names neither a folder nor
            a container video, or a folder holds no image; VideoSupportError (no PyAV) for a
            container video.
    """
    from featstore.build.plan import sample_frames  # one path rule for images and videos

    if not isinstance(value, str):
        raise PlanError(f"{where}: 'video' is a {type(value).__name__}; give one path (a folder of frames or a "
                        ".mp4/.avi/.mov file)")
    key, = sample_frames({"image": value}, data_root, where=where, prefix=prefix)
    path = source_path(data_root, key)
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)
                       and os.path.isfile(os.path.join(path, n)))
        if not names:
            raise PlanError(f"{where}: video folder {path!r} holds no image file ({', '.join(IMAGE_EXTENSIONS)}); "
                            "fill it with the video's frames or remove the sample")
        return tuple(normalize_key(f"{key}/{names[i]}") for i in policy.indices(len(names), 1.0))
    if is_video_path(key):
        from featstore.encoders.video import probe_video
        from featstore.errors import ImageDecodeError

        try:
            info = probe_video(path)
        except ImageDecodeError:
            return (key,)  # reading it fails again, named (featstore.build.encode.read_unit_frames)
        return tuple(video_frame_ref(key, i) for i in policy.indices(info.frames, info.fps))
    if not os.path.exists(path):
        return (key,)  # a missing file: its unit fails like a missing image (and the plan's fail-fast sees it)
    raise PlanError(f"{where}: video {path!r} is neither a folder of frames nor a container video "
                    f"({', '.join(VIDEO_EXTENSIONS)}); fix the path or remove the sample")
