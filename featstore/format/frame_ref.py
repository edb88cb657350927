"""Frame references: what one frame of a unit names, a file or one frame of a video file.

A unit's frames (`featstore.build.plan.Unit.frames`, an entry's "frames" metadata) are strings
relative to the data root. Most are image files ("scene_a/000.jpg"). A frame decoded out of a
container video is not a file: it is named by the video's relative path and the frame's index
in decoding order, ``"clips/a.mp4#12"`` (`video_frame_ref`). The file behind either kind
(`frame_file`) is what freshness stats and what a build records the size and mtime of: for a
video frame, the video file.

The rule: a reference is a video frame when it ends in ``#<digits>`` right after a video
extension (VIDEO_EXTENSIONS, any case); anything else is a file path. A file actually named
"a.mp4#3" is therefore read as frame 3 of "a.mp4" (rename it to use it as an image). A video
path without ``#N`` is what the planner leaves when a video could not be opened to count its
frames: reading it as a frame fails with the video's own error (featstore.encoders.video).

Example:
    >>> from featstore.format.frame_ref import video_frame_ref, parse_frame_ref, frame_file
    >>> video_frame_ref("clips/a.mp4", 12)
    'clips/a.mp4#12'
    >>> parse_frame_ref("clips/a.mp4#12"), parse_frame_ref("scene_a/000.jpg")
    (('clips/a.mp4', 12), ('scene_a/000.jpg', None))
    >>> frame_file("clips/a.mp4#12")
    'clips/a.mp4'
"""

from __future__ import annotations

import re

__all__ = ["VIDEO_EXTENSIONS", "video_frame_ref", "parse_frame_ref", "frame_file", "is_video_path"]

# VG-LLM's container extensions (data_qwen.py read_video_images: .mp4, .avi, .mov) and two more
# that PyAV decodes alike.
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
_VIDEO_FRAME = re.compile(r"(.+(?:" + "|".join(re.escape(e) for e in VIDEO_EXTENSIONS) + r"))#(\d+)",
                          re.IGNORECASE)


def is_video_path(path: str) -> bool:
    """A container video by its extension (any case).

    Example:
        >>> from featstore.format.frame_ref import is_video_path
        >>> is_video_path("a/B.MP4"), is_video_path("a/b.jpg")
        (True, False)
    """
    return path.lower().endswith(VIDEO_EXTENSIONS)


def video_frame_ref(video: str, index: int) -> str:
    """The reference of frame `index` (decoding order, from 0, as the policy chose it) of the
    video at key `video`."""
    return f"{video}#{int(index)}"


def parse_frame_ref(ref: str) -> tuple[str, int | None]:
    """(file key, frame index) of a reference; index None for a plain file."""
    m = _VIDEO_FRAME.fullmatch(ref)
    if m is None:
        return ref, None
    return m.group(1), int(m.group(2))


def frame_file(ref: str) -> str:
    """The key of the file a reference reads: the video for a video frame, else itself."""
    m = _VIDEO_FRAME.fullmatch(ref)
    return ref if m is None else m.group(1)
