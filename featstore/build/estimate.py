"""How many bytes a build adds, and whether the disk holds them: checked before the model
loads, so that a build that cannot fit stops at once (and `--dry-run` prints the numbers).

The estimate reads the first readable image's size (its header only, no decode) and asks the
encoder family for the stored shape (`featstore.encoders.stored_shape`).

Example:
    >>> from featstore.build.estimate import estimate_size
    >>> from featstore.build.plan import plan_units
    >>> from featstore.encoders import resolve_spec
    >>> size = estimate_size(resolve_spec("vggt-tiny"), plan_units("data"), "data", "est.lmdb")
    >>> size.entry_bytes > 0, size.need == size.entry_bytes * 10
    (True, True)
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from featstore.build.plan import Unit
from featstore.format.keys import source_path
from featstore.format.codecs import codec_for
from featstore.errors import StoreFullError

__all__ = ["SizeEstimate", "estimate_size", "estimate_entry_bytes"]

HEADER_ESTIMATE = 1024  # bytes of safetensors header + metadata per entry, for size estimates


@dataclass(frozen=True)
class SizeEstimate:
    """The bytes one rank's build adds and the disk's free bytes where the store goes."""

    entry_bytes: int  # one entry, from the first readable image
    need: int  # entry_bytes x the units to compute
    free: int  # free bytes on the store's disk (its nearest existing folder)

    def require_space(self, store_path: str, world: int = 1) -> None:
        """Raise StoreFullError when `world` ranks of this size do not fit in the free space."""
        if self.need * world > self.free:
            raise StoreFullError(f"{store_path}: the build needs about {self.need * world / 1e9:.2f} GB but only "
                                 f"{self.free / 1e9:.2f} GB are free; free space or build into another --store")


def estimate_size(spec, todo: list[Unit], data_root: str, store_path: str, *,
                  sample: list[Unit] | None = None) -> SizeEstimate:
    """The size of computing `todo` into the store at `store_path` (which need not exist yet).

    Args:
        spec: the EncoderSpec.
        todo: the units to compute.
        data_root: the folder their frames are relative to.
        store_path: the store (its disk's free space is read).
        sample: units to take the entry size from when `todo` is empty (default: `todo`).
    """
    entry_bytes = estimate_entry_bytes(spec, todo or sample or [], data_root)
    free = shutil.disk_usage(_existing_ancestor(store_path)).free
    return SizeEstimate(entry_bytes, entry_bytes * len(todo), free)


def estimate_entry_bytes(spec, units: list[Unit], data_root: str) -> int:
    """Bytes of one entry, from the first readable image's size (headers only, no decode)."""
    from PIL import Image

    from featstore.encoders import stored_shape
    from featstore.errors import FeatstoreError
    from featstore.format.frame_ref import frame_file, is_video_path

    codec = codec_for(spec.storage_dtype)
    for unit in units[:32]:
        path = source_path(data_root, frame_file(unit.frames[0]))
        try:
            if is_video_path(path):  # a container video's frame: the stream's size
                from featstore.encoders.video import probe_video

                info = probe_video(path)
                w, h = info.width, info.height
            else:
                with Image.open(path) as im:
                    w, h = im.size
        except (OSError, FeatstoreError):
            continue
        kept, tokens, channels = stored_shape(spec, w, h, unit.num_frames)
        return kept * tokens * codec.bytes_per_token(channels) + HEADER_ESTIMATE
    return HEADER_ESTIMATE


def _existing_ancestor(path: str) -> str:
    """The nearest existing folder at or above `path` (the store and its parents may not exist yet)."""
    path = os.path.abspath(path)
    while not os.path.isdir(path):
        path = os.path.dirname(path)
    return path
