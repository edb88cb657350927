"""Container videos (.mp4, .avi, .mov, ...) decoded with PyAV: frame count, average fps and
the frames at exact indices.

VG-LLM reads a video with decord (`data_qwen.py`, `read_video_images`): `len(vr)` frames,
`vr.get_avg_fps()`, then `vr.get_batch(indices)`. Here:

- the frame count is the stream's `frames` from the container header (what decord's `len`
  reads too); when the header has none (some .avi/.mkv), the packets are counted by demuxing.
  decord then estimates duration x fps instead: the two can differ on such files;
- the fps is the stream's `average_rate` (decord's `get_avg_fps` reads the same
  avg_frame_rate), a float;
- frame i is the i-th frame the decoder outputs from the start (presentation order), found by
  decoding forward, never by seeking to a timestamp: a timestamp-to-index mapping drifts on
  variable-frame-rate files and after edits, and the build, `verify --recompute` and training
  must see the very same pixels. Decoding forward costs every frame up to the last index
  (docs/BENCHMARKS.md, "Video decode");
- frames are converted to RGB by PyAV (libswscale). decord converts with its own swscale
  settings, so a pixel may differ from VG-LLM's by a rounding step; featstore's three readers
  agree with each other exactly.

A file that cannot be opened or decoded, or that ends before an index asked for (truncated),
raises ImageDecodeError naming the file, as a corrupt JPEG does. Without PyAV installed,
VideoSupportError names the extra to install: ``pip install 'featstore[video]'``.

Example (needs PyAV):
    >>> from featstore.encoders.video import write_test_video, probe_video, decode_video_frames
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "clip.mp4")
    >>> write_test_video(path, 6, fps=3)
    >>> probe_video(path).frames, probe_video(path).fps
    (6, 3.0)
    >>> [im.size for im in decode_video_frames(path, [0, 5])]
    [(64, 48), (64, 48)]
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from featstore.errors import ImageDecodeError, VideoSupportError

__all__ = ["VideoInfo", "probe_video", "decode_video_frames", "write_test_video", "MISSING_AV"]

MISSING_AV = ("reading container videos (.mp4, .avi, .mov) needs PyAV: pip install 'featstore[video]' (or "
              "pip install 'av>=12'); folders of frames need nothing more")


def _av():
    try:
        import av
    except ImportError:
        raise VideoSupportError(MISSING_AV) from None
    return av


@dataclass(frozen=True)
class VideoInfo:
    """A video's frame count, average fps and frame size (width, height)."""

    frames: int
    fps: float
    width: int
    height: int


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Frame count, average fps and size of the first video stream (see the module docstring).

    Raises:
        ImageDecodeError: the file cannot be opened, has no video stream, or no frames.
        VideoSupportError: PyAV is not installed.
    """
    av = _av()
    path = os.fspath(path)
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ImageDecodeError(f"video {path!r} has no video stream; remove it from the annotations")
            stream = container.streams.video[0]
            count = int(stream.frames or 0)
            if count <= 0:  # no count in the header: count the packets that carry a frame
                count = sum(1 for packet in container.demux(stream) if packet.size > 0)
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0
            width, height = int(stream.codec_context.width), int(stream.codec_context.height)
    except ImageDecodeError:
        raise
    except Exception as e:  # PyAV's errors (av.error.FFmpegError and its kin) name no file we can trust
        raise ImageDecodeError(f"cannot open video {path!r} (truncated or corrupt?): {e}; re-encode or replace the "
                               "file, or remove its sample from the annotations") from None
    if count <= 0 or fps <= 0:
        raise ImageDecodeError(f"video {path!r}: no frames or no frame rate in its stream ({count} frames, {fps} fps); "
                               "re-encode or replace the file, or remove its sample from the annotations")
    return VideoInfo(count, fps, width, height)


def decode_video_frames(path: str | os.PathLike, indices: Sequence[int]):
    """The frames at `indices` (decoding order, from 0) as RGB PIL images, in the order asked.

    Decodes forward from the first frame and stops after the largest index.

    Raises:
        ImageDecodeError: the file cannot be decoded, or ends before an index (truncated); the
            message names the file.
        VideoSupportError: PyAV is not installed.
    """
    av = _av()
    path = os.fspath(path)
    wanted = sorted(set(int(i) for i in indices))
    if not wanted:
        return []
    last, got, seen = wanted[-1], {}, 0
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                seen = i + 1
                if i in wanted:
                    got[i] = frame.to_image()  # RGB24, converted by libswscale
                if i >= last:
                    break
    except Exception as e:
        raise ImageDecodeError(f"cannot decode video {path!r} (truncated or corrupt?) after {seen} frames: {e}; "
                               "re-encode or replace the file, or remove its sample from the annotations") from None
    if last not in got:
        raise ImageDecodeError(f"video {path!r} is truncated: frame {last} was asked for but only {seen} frames decode; "
                               "re-encode or replace the file, or remove its sample from the annotations")
    return [got[int(i)] for i in indices]


def write_test_video(path: str | os.PathLike, frames: int, *, fps: int = 3, size: tuple[int, int] = (64, 48),
                     codec: str = "mpeg4", faststart: bool = False) -> None:
    """Write a small video whose frame i is a flat colour made from i (tests, docs, benchmarks):
    frames can be told apart after lossy coding. `faststart` puts the index (moov) first, so a
    cut file still opens and fails while decoding, as a truncated download does."""
    import numpy as np

    av = _av()
    w, h = size
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(os.fspath(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            rgb = np.zeros((h, w, 3), dtype=np.uint8)
            rgb[..., 0] = (i * 37) % 256
            rgb[..., 1] = (i * 91 + 40) % 256
            rgb[: h // 2, : w // 2, 2] = 255  # a corner: the image is not flat (a real frame)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
