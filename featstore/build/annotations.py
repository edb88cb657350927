"""Annotation files as every command names them: ``--annotations FILE[@IMAGE_DIR][%N]``.

`parse_annotation_source` reads one value: FILE, the LLaVA/Qwen conversation JSON or JSONL
file; IMAGE_DIR, the folder its relative image paths start from (inside the data root: store
keys stay relative to the root); %N, keep N percent of its samples, the same ones for every
caller (`subsample_indices`, seeded by the file's content). `load_annotations` reads a file's
samples. Planning the units of those samples is featstore.build.plan's part.

Example:
    >>> from featstore.build.annotations import annotation_sources, load_annotations
    >>> [s.percent for s in annotation_sources(["data/annotations.json%50"], "data")]
    [50]
    >>> len(load_annotations("data/annotations.json")) > 0
    True
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Sequence

from featstore.errors import PlanError
from featstore.format.keys import normalize_key

__all__ = ["ANNOTATION_SYNTAX", "AnnotationSource", "parse_annotation_source", "annotation_sources",
           "subsample_indices", "load_annotations", "read_annotations", "prefix_in_root"]

ANNOTATION_SYNTAX = "FILE, FILE@IMAGE_DIR, FILE%N or FILE@IMAGE_DIR%N"
_PERCENT = re.compile(r"%(\d+)$")  # VG-LLM's `name%N` (data/__init__.py parse_sampling_rate): digits only


@dataclass(frozen=True)
class AnnotationSource:
    """One annotation file of a plan, as `--annotations FILE[@IMAGE_DIR][%N]` gives it.

    Attributes:
        path: the JSON/JSONL file.
        image_dir: the folder its relative image paths start from (VG-LLM's per-dataset
            `data_path`), as given; None: the data root.
        percent: the share of its samples kept, 1 to 100 (100: all), chosen by `subsample_indices`.
        prefix: `image_dir` relative to the data root ('' for the data root itself); a frame key
            is prefix/path, so keys stay relative to the data root and one store serves every file.
        text: the argument as given, for messages.

    Example:
        >>> from featstore.build.annotations import parse_annotation_source
        >>> parse_annotation_source("data/annotations.json@data/scene_a%50", "data").prefix
        'scene_a'
    """

    path: str
    image_dir: str | None = None
    percent: int = 100
    prefix: str = ""
    text: str = ""


def parse_annotation_source(text: str | os.PathLike | AnnotationSource, data_root: str | os.PathLike, *,
                            flag: str = "--annotations") -> AnnotationSource:
    """Parse one `--annotations` value: ``FILE``, ``FILE@IMAGE_DIR``, ``FILE%N`` or ``FILE@IMAGE_DIR%N``.

    A value that names an existing file is that file, whatever characters it holds ('@' and '%'
    included). Otherwise a trailing ``%N`` (digits) keeps N percent of the samples, and the
    value is split at the one '@' whose left side is an existing file: the right side is
    IMAGE_DIR, the folder the file's relative image paths start from. IMAGE_DIR must lie inside
    the data root: store keys are paths relative to it, so that one store beside the data serves
    every annotation file. Paths are relative to the current directory, as any other path argument.

    Args:
        text: the value (an AnnotationSource passes through).
        data_root: the data root IMAGE_DIR must lie in.
        flag: how messages name the option.

    Returns:
        The AnnotationSource.

    Raises:
        PlanError: no such file, an IMAGE_DIR that is not a folder or is outside the data root, N
            outside 1..100, or two readings of the value (both named).

    Example:
        >>> from featstore.build.annotations import parse_annotation_source
        >>> s = parse_annotation_source("data/annotations.json%25", "data")
        >>> s.path, s.image_dir, s.percent
        ('data/annotations.json', None, 25)
    """
    if isinstance(text, AnnotationSource):
        return text
    text = os.fspath(text)
    if os.path.isfile(text):
        return AnnotationSource(text, text=text)
    rest, percent = text, 100
    match = _PERCENT.search(rest)
    if match:
        rest, percent = rest[:match.start()], int(match.group(1))
    path, image_dir = rest, None
    if not os.path.isfile(rest):
        splits = [i for i, c in enumerate(rest) if c == "@" and i > 0 and os.path.isfile(rest[:i])]
        if len(splits) > 1:
            readings = " or ".join(f"{rest[:i]!r} @ {rest[i + 1:]!r}" for i in splits)
            raise PlanError(f"{flag} {text}: ambiguous, it reads as {readings}; rename one of the files")
        if not splits:
            name = rest.split("@", 1)[0] if "@" in rest else rest
            raise PlanError(f"{flag} {text}: no such file {name!r}; pass training's JSON/JSONL annotation files "
                            f"as {ANNOTATION_SYNTAX} (IMAGE_DIR: the folder its image paths start from; "
                            "N: keep N percent of its samples)")
        path, image_dir = rest[:splits[0]], rest[splits[0] + 1:]
    if not 1 <= percent <= 100:
        raise PlanError(f"{flag} {text}: %{percent} must keep 1 to 100 percent of the file's samples")
    prefix = ""
    if image_dir is not None:
        if not os.path.isdir(image_dir):
            raise PlanError(f"{flag} {text}: image folder {image_dir!r} (after '@') is not a directory; pass the "
                            "folder the file's relative image paths start from (VG-LLM's data_path)")
        prefix = prefix_in_root(image_dir, data_root)
        if prefix is None:
            root = os.path.abspath(os.fspath(data_root))
            common = os.path.commonpath([root, os.path.abspath(image_dir)])
            raise PlanError(
                f"{flag} {text}: image folder {image_dir} is not inside --data-root {os.fspath(data_root)}. Store "
                "keys are image paths relative to the data root, so that one store beside the data serves every "
                f"annotation file: pass a --data-root that holds every IMAGE_DIR (here e.g. {common}), or move "
                "the images under the data root")
    return AnnotationSource(path, image_dir, percent, prefix, text)


def prefix_in_root(folder: str, data_root: str | os.PathLike) -> str | None:
    """`folder` as a key prefix relative to `data_root` ('' for the root), or None when outside.
    The path as written counts first (a symlinked folder inside the root keeps its own path, as
    scanned files do); the resolved paths second."""
    for resolve in (os.path.abspath, os.path.realpath):
        rel = os.path.relpath(resolve(folder), resolve(os.fspath(data_root)))
        if rel == ".":
            return ""
        if rel != os.pardir and not rel.startswith(os.pardir + os.sep):
            return normalize_key(rel)
    return None


def annotation_sources(values: Sequence[str | os.PathLike | AnnotationSource] | None, data_root: str | os.PathLike,
                       *, flag: str = "--annotations") -> list[AnnotationSource]:
    """`parse_annotation_source` of each value: every CLI calls this before any work starts.

    Example:
        >>> from featstore.build.annotations import annotation_sources
        >>> [s.path for s in annotation_sources(["data/annotations.json"], "data")]
        ['data/annotations.json']
    """
    return [parse_annotation_source(v, data_root, flag=flag) for v in values or []]


def subsample_indices(count: int, percent: int, seed: bytes) -> list[int]:
    """The indices of the samples `%percent` keeps out of `count`, sorted (file order).

    VG-LLM keeps ``random.sample(annotations, int(len(annotations) * N / 100.0))``, drawn anew
    each run from Python's random state. Here the same count is drawn from a generator seeded
    by `seed` (the file's sha256), so that build, verify and training all pick the same samples,
    run after run and on every host; a smaller N keeps a subset of a larger N's samples (one
    permutation, cut shorter). numpy's legacy RandomState is used because its stream is frozen
    across numpy versions (NEP 19); `Generator`'s is not.

    Args:
        count: samples in the file.
        percent: 1 to 100; 100 keeps every sample.
        seed: bytes naming the file's content (`file_sha256`'s digest, say).

    Returns:
        Sorted indices, ``int(count * percent / 100.0)`` of them (all for 100).

    Example:
        >>> from featstore.build.annotations import subsample_indices
        >>> subsample_indices(10, 100, b"x")
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
        >>> len(subsample_indices(1000, 3, b"x"))
        30
    """
    if percent >= 100:
        return list(range(count))
    import numpy as np

    keep = int(count * (percent / 100.0))  # VG-LLM's count, with its float rounding (29% of 100 is 28)
    words = np.frombuffer(hashlib.sha256(seed).digest(), dtype="<u4").astype(np.uint32)
    order = np.random.RandomState(words).permutation(count)
    return sorted(order[:keep].tolist())


def load_annotations(path: str | os.PathLike) -> list[dict]:
    """Read a LLaVA/Qwen annotation file: a JSON list of samples, or JSONL (one per line).

    Args:
        path: the .json or .jsonl file.

    Returns:
        The samples (dicts), in file order.

    Raises:
        PlanError: unreadable file, invalid JSON/JSONL, or a sample that is not an object.

    Example:
        >>> from featstore.build.annotations import load_annotations
        >>> load_annotations("data/annotations.json")[0]["id"]
        'scene_a_step3'
    """
    return read_annotations(path)[0]


def read_annotations(path: str | os.PathLike) -> tuple[list[dict], bytes]:
    """(samples, sha256 digest of the file's bytes): the digest seeds `%N` subsampling."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8")
    except OSError as e:
        raise PlanError(f"cannot read annotations {path}: {e.strerror}; check the path and its permissions") from None
    except UnicodeDecodeError as e:
        raise PlanError(f"annotations {path}: not UTF-8 ({e}); save the file as UTF-8") from None
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
    return samples, hashlib.sha256(raw).digest()
