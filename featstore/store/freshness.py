"""The freshness check of `read_into(..., data_root=)`: an entry's frames must be the files its
features were computed from.

`featstore build` records each frame's size and mtime in the entry's `sources` metadata
(`featstore.build.encode.unit_metadata`); `check_sources` stats each frame under the data root
now and compares. One `stat` a frame, a few microseconds (docs/OPERATIONS.md has the measured
cost).

Example:
    >>> from featstore.store.freshness import stat_frame
    >>> stat_frame("data", "scene_a/000.jpg").st_size > 0
    True
"""

from __future__ import annotations

import json
import os

from featstore.errors import StaleEntryError
from featstore.format.blob import Entry
from featstore.format.frame_ref import frame_file
from featstore.format.keys import source_path

__all__ = ["stat_frame", "check_sources"]


def stat_frame(root: str, frame: str) -> os.stat_result:
    """stat of the file a frame key names: the plain join first (one syscall), else the file
    stored under another Unicode form of its name (`featstore.format.keys.source_path`). A
    frame of a container video ("clips/a.mp4#12") is its video file's stat."""
    frame = frame_file(frame)
    try:
        return os.stat(os.path.join(root, frame))
    except FileNotFoundError:
        return os.stat(source_path(root, frame))


def check_sources(key: str, entry: Entry, data_root, where: str) -> None:
    """Each frame's size and mtime against the entry's record (`sources`): the image a
    training run reads now must be the one the features were computed from.

    Args:
        key: the entry's key, named in errors.
        entry: the entry (its metadata is enough: `frames` and `sources`).
        data_root: the folder the frame keys are relative to.
        where: how errors name the store and set.

    Raises:
        StaleEntryError: a frame changed, is gone, or the record is malformed.
    """
    if "sources" not in entry.metadata:
        return  # written without a record (StoreWriter.put by hand): nothing to compare against
    frames = entry.frames
    try:
        sources = json.loads(entry.metadata["sources"])
    except ValueError:
        sources = None
    if not isinstance(sources, list) or len(sources) != len(frames):
        raise StaleEntryError(f"key {key!r} in {where} has a malformed source record for its frames, so "
                              "their freshness cannot be checked; rebuild it (featstore build --force)")
    root = os.fspath(data_root)
    for frame, src in zip(frames, sources):
        try:
            st = stat_frame(root, frame)
        except OSError as e:
            raise StaleEntryError(f"key {key!r} in {where}: frame {frame!r} cannot be read now "
                                  f"({e.filename}: {e.strerror}); its features belong to a file that is "
                                  "gone") from None
        if not isinstance(src, dict) or src.get("size") != st.st_size or src.get("mtime_ns") != st.st_mtime_ns:
            raise StaleEntryError(
                f"key {key!r} in {where} is stale: frame {frame!r} changed since the features were "
                f"computed (size {src.get('size') if isinstance(src, dict) else '?'} -> {st.st_size}, mtime "
                "changed); rerun featstore build (it recomputes stale entries)")
