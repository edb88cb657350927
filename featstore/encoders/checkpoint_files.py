"""Checkpoint files every encoder family reads the same way: hub ids, safetensors shard indexes,
strict key checks, and the sha256 of a weights file with its cache.

The VGGT weights (featstore.encoders.vggt.weights) and the Qwen vision checkpoints
(featstore.encoders.qwen_vision.weights) both use these; a new family's weights module does too.
A file's sha256 enters the encoder fingerprint; it is streamed (files are ~5 GB) and cached by
(real path, size, mtime_ns) in a small JSON file (`hash_cache_path`). No torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Mapping

from featstore.errors import WeightsError

__all__ = ["looks_like_hub_id", "read_weight_map", "check_keys", "few", "hash_cache_path", "sha256_file"]

_CACHE_ENV = "FEATSTORE_CACHE_DIR"


def looks_like_hub_id(s: str) -> bool:
    """Whether `s` reads as a hub repository id ("owner/name"), not a file path."""
    parts = s.split("/")
    return (len(parts) == 2 and all(parts) and not s.startswith((".", "~"))
            and not s.endswith((".pt", ".pth", ".safetensors", ".bin")))


def read_weight_map(index: Path) -> dict:
    """A safetensors index's `weight_map` (tensor name -> shard file name); WeightsError naming
    the file when it cannot be read (the VGGT and the Qwen vision readers share it)."""
    try:
        with open(index, "r", encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"cannot read the shard index {str(index)!r} ({type(e).__name__}: {e}); re-download "
                           "the checkpoint") from None
    return weight_map


def index_shards(index: Path, names, what: str, check) -> list:
    """The shard files `names` of the safetensors index `index`, in order, each one present and
    passing `check(path)`; `what` says which keys they hold in the error ("VGGT keys").

    Raises:
        WeightsError: a shard the index names is missing (the message names it and the index).
    """
    shards = []
    for name in names:
        shard = index.parent / name
        if not shard.is_file():
            raise WeightsError(f"shard {str(shard)!r} named by {str(index)!r} (it holds {what}) is missing; "
                               "re-download the checkpoint")
        check(shard)
        shards.append(shard)
    return shards


def check_keys(expected: Mapping, state: Mapping, source: str, *, what: str, advice: str,
               unexpected_name: str = "unexpected key(s)", prefix: str = "") -> None:
    """Raise WeightsError naming the missing and the unexpected keys of `state` against the
    `expected` state dict (a few of each, named with the checkpoint's `prefix` so they can be
    grepped), the file `source`, `what` it should match, and `advice`."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key(s) {few(missing, prefix=prefix)}")
        if unexpected:
            parts.append(f"{unexpected_name} {few(unexpected, prefix=prefix)}")
        raise WeightsError(f"weights {source!r} do not match {what}: " + "; ".join(parts) + ". " + advice)


def few(keys, n=8, *, prefix: str = "") -> str:
    """The first `n` keys, each with `prefix`, and how many there are in all."""
    # Named as in the checkpoint (e.g. with the official `aggregator.` prefix) so they can be grepped.
    shown = ", ".join(prefix + k for k in keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}] ({len(keys)} in all)"


def hash_cache_path() -> Path:
    """$FEATSTORE_CACHE_DIR/sha256.json, else $XDG_CACHE_HOME (or ~/.cache)/featstore/sha256.json."""
    base = os.environ.get(_CACHE_ENV)
    if not base:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "featstore")
    return Path(base) / "sha256.json"


def sha256_file(path: str | os.PathLike, *, use_cache: bool = True, chunk: int = 8 << 20) -> str:
    """sha256 hex of a file, streamed in 8 MiB chunks; cached by (real path, size, mtime_ns).

    The cache is advisory: an unreadable or corrupt cache file is ignored and rewritten; a failed
    write only costs a re-hash next time. A file replaced in place with the same size and mtime
    would be missed (as with make); touch it to force a re-hash.
    """
    p = Path(path)
    try:
        st = p.stat()
        real = os.path.realpath(p)
    except OSError as e:
        raise WeightsError(f"cannot stat weights file {str(p)!r}: {e}; check the path and its permissions") from e
    stamp = [st.st_size, st.st_mtime_ns]
    cache_file = hash_cache_path()
    cache = _read_cache(cache_file) if use_cache else {}
    hit = cache.get(real)
    if isinstance(hit, dict) and hit.get("stamp") == stamp and isinstance(hit.get("sha256"), str):
        return hit["sha256"]
    h = hashlib.sha256()
    try:
        with open(p, "rb") as f:
            while True:
                b = f.read(chunk)
                if not b:
                    break
                h.update(b)
    except OSError as e:
        raise WeightsError(f"cannot read weights file {str(p)!r}: {e}; check its permissions, or download it "
                           "again") from e
    digest = h.hexdigest()
    if use_cache:
        cache = _read_cache(cache_file)  # re-read: another process may have added entries
        cache[real] = {"stamp": stamp, "sha256": digest}
        _write_cache(cache_file, cache)
    return digest


def _read_cache(path: Path) -> dict:
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, cache: dict) -> None:
    # Atomic replace so a concurrent reader never sees half a file.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".sha256.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(cache, f, sort_keys=True, indent=0)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except OSError as e:
        warnings.warn(f"featstore: could not write the weights hash cache {str(path)!r}: {e}", stacklevel=3)
