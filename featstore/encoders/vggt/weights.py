"""Load VGGT aggregator weights (model.safetensors / model.pt / hub id) strictly, and hash them.

The official `VGGT.from_pretrained` and `load_state_dict(strict=False)` fill missing keys
silently with random init. Here every aggregator key the model expects must be in the file and
the file may hold no aggregator key the model lacks; other heads' keys (camera_head., depth_head.,
point_head., track_head.) are ignored. The sha256 of the file enters the encoder fingerprint; it
is streamed (files are ~5 GB) and cached by (real path, size, mtime_ns) in a small JSON file.

Key layouts: the official checkpoint's `aggregator.*`; a VG-LLM / JanusVLN checkpoint's
`vggt.aggregator.*` (their model holds VGGT as `self.vggt`; its folder is then the VGGT weights,
single model.safetensors or model.safetensors.index.json with shards); a bare aggregator
state_dict. A file with both prefixes is refused (ambiguous).

Identity (`weights_sha256`, the spec's weights_sha256): the sha256 of the one file; for a sharded
checkpoint (its index) the sha256 of the lines "<shard file name> <shard sha256>\n", sorted, over
the shards that hold aggregator keys (the rule featstore.encoders.qwen_vision.weights uses for the vision
tower). The same folder gives the same identity in `featstore build --weights` and training.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Mapping

from featstore.encoders.checkpoint_files import (check_keys, few, hash_cache_path, index_shards, looks_like_hub_id,  # noqa: F401
                                                 read_weight_map, sha256_file)
from featstore.errors import WeightsError

if TYPE_CHECKING:  # torch is imported where tensors are read: resolving and hashing need none
    import torch

__all__ = ["resolve_weights", "load_aggregator_state", "load_into", "sha256_file", "weights_sha256",
           "hash_cache_path", "HUB_FILENAME"]

PREFIX = "aggregator."
REFERENCE_PREFIX = "vggt.aggregator."  # VG-LLM / JanusVLN checkpoints: the VGGT is their model's `vggt`
INDEX_SUFFIX = ".index.json"  # model.safetensors.index.json: a sharded checkpoint's weight map
_QWEN_PREFIXES = ("visual.", "model.", "lm_head.")
HUB_FILENAME = "model.safetensors"


# ---- locating the file ------------------------------------------------------------------


def resolve_weights(weights: str | os.PathLike) -> Path:
    """A local weights file for `weights`: an existing path, or a hub id ("facebook/VGGT-1B").

    A directory is searched for model.safetensors, then model.safetensors.index.json (a sharded
    checkpoint, e.g. VG-LLM's or JanusVLN's: the index is returned and names the shards), then
    model.pt. A hub id is fetched with huggingface_hub (optional dependency; uses its cache, so a
    second run is offline).
    """
    p = Path(os.path.expanduser(os.fspath(weights)))
    if p.is_dir():
        for name in ("model.safetensors", "model.safetensors" + INDEX_SUFFIX, "model.pt"):
            if (p / name).is_file():
                if name.endswith(INDEX_SUFFIX):
                    _aggregator_shards(p / name)  # an index naming no VGGT key fails here, not at build time
                return p / name
        raise WeightsError(f"weights directory {str(p)!r} holds neither model.safetensors, "
                           "model.safetensors.index.json nor model.pt; pass the weights file itself "
                           "(--weights /path/to/model.safetensors)")
    if p.is_file():
        if p.name.endswith(INDEX_SUFFIX):
            _aggregator_shards(p)
            return p
        _check_format(p)
        return p
    s = os.fspath(weights)
    if not looks_like_hub_id(s):
        raise WeightsError(
            f"weights file {s!r} does not exist. Pass a path to model.safetensors / model.pt, "
            f"or a hub id such as 'facebook/VGGT-1B'."
        )
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:
        raise WeightsError(
            f"weights {s!r} looks like a Hugging Face hub id, but huggingface_hub is not installed. "
            f"`pip install huggingface_hub` (or featstore[hub]), or download {HUB_FILENAME} and pass its path."
        ) from e
    try:
        return Path(hf_hub_download(repo_id=s, filename=HUB_FILENAME))
    except Exception as e:  # network, auth, missing repo: all end the same way for the user
        raise WeightsError(
            f"cannot fetch {HUB_FILENAME} of hub repo {s!r}: {type(e).__name__}: {e}. Offline? Download "
            f"it on a machine with internet and pass the local path (--weights /path/model.safetensors)."
        ) from e


def _check_format(path: Path) -> None:
    """Refuse a file that is neither safetensors nor a torch checkpoint, before torch.load sees
    it (whose own error would advise weights_only=False: unpickling arbitrary code, wrong here)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise WeightsError(f"cannot read weights file {str(path)!r}: {e.strerror}; check its permissions") from None
    safetensors = len(head) >= 9 and head[8:9] == b"{"  # u64 header length, then the JSON header
    torch_zip = head[:4] == b"PK\x03\x04"  # torch.save's default format (a zip archive)
    torch_legacy = head[:1] == b"\x80"  # a pickle protocol marker: torch.save's legacy format
    if not (safetensors or torch_zip or torch_legacy):
        raise WeightsError(
            f"weights file {str(path)!r} is neither a safetensors file nor a torch checkpoint"
            f"{' (it is empty)' if not head else ''}; pass VGGT-1B's model.safetensors or model.pt "
            "(--weights /path/to/model.safetensors)")


# ---- reading ----------------------------------------------------------------------------


def _aggregator_prefix(keys, source: str) -> str | None:
    """The prefix of the aggregator's keys: `aggregator.` (official), `vggt.aggregator.` (VG-LLM /
    JanusVLN), or None for a bare aggregator state_dict."""
    keys = list(keys)
    official = any(k.startswith(PREFIX) for k in keys)
    reference = any(k.startswith(REFERENCE_PREFIX) for k in keys)
    if official and reference:
        raise WeightsError(f"weights {source!r} hold aggregator keys under both aggregator.* and vggt.aggregator.*: "
                           "ambiguous; pass a file with one VGGT")
    if official or reference:
        return PREFIX if official else REFERENCE_PREFIX
    if any(k.startswith(_QWEN_PREFIXES) for k in keys):
        raise WeightsError(f"weights {source!r} are a Qwen2.5-VL checkpoint without VGGT weights (no aggregator.* "
                           "nor vggt.aggregator.* key); pass VGGT-1B's model.safetensors, or a VG-LLM / JanusVLN "
                           "checkpoint folder that holds vggt.*")
    return None


def _aggregator_shards(index: Path) -> list:
    """The shard files of a safetensors index that hold aggregator keys, sorted by name."""
    weight_map = read_weight_map(index)
    prefix = _aggregator_prefix(weight_map, str(index))
    if prefix is None:
        raise WeightsError(f"shard index {str(index)!r} names no VGGT aggregator key (aggregator.* or "
                           "vggt.aggregator.*); pass VGGT-1B's model.safetensors or a checkpoint that holds VGGT")
    names = sorted({str(v) for k, v in weight_map.items() if k.startswith(prefix)})
    return index_shards(index, names, "VGGT keys", _check_format)


def load_aggregator_state(path: str | os.PathLike) -> Dict[str, "torch.Tensor"]:
    """The aggregator's tensors from a checkpoint, keys without the `aggregator.` (official) or
    `vggt.aggregator.` (VG-LLM / JanusVLN) prefix. `path` may be a safetensors index: its shards
    that hold aggregator keys are read.

    A file with neither prefix is taken as a bare aggregator state_dict (unless its keys are a
    Qwen2.5-VL checkpoint's: then it holds no VGGT, and that is said).
    """
    import torch

    path = Path(path)
    try:
        if path.name.endswith(INDEX_SUFFIX) or path.suffix == ".safetensors":
            from safetensors import safe_open

            raw = {}
            for file in (_aggregator_shards(path) if path.name.endswith(INDEX_SUFFIX) else [path]):
                # safe_open reads only the aggregator's tensors out of the multi-GB file.
                with safe_open(os.fspath(file), framework="pt", device="cpu") as f:
                    keys = list(f.keys())
                    prefix = _aggregator_prefix(keys, str(file))
                    wanted = [k for k in keys if k.startswith(prefix)] if prefix else keys
                    raw.update({k: f.get_tensor(k) for k in wanted})
        else:
            # weights_only: never unpickle arbitrary objects; mmap: don't read the heads' bytes.
            try:
                obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format cannot be mmapped
                obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
            raw = _unwrap_state_dict(obj, path)
    except WeightsError:
        raise
    except pickle.UnpicklingError:
        # torch's message advises weights_only=False, i.e. running the file's pickled code.
        raise WeightsError(
            f"weights file {str(path)!r} holds pickled objects besides tensors, which featstore does not "
            "unpickle (it loads with weights_only=True for safety); save a plain state_dict "
            "(torch.save(model.state_dict(), path)) or pass model.safetensors") from None
    except Exception as e:
        raise WeightsError(f"cannot read weights file {str(path)!r}: {type(e).__name__}: {e}; the file is "
                           "damaged or incomplete: download it again") from e
    prefix = _aggregator_prefix(raw, str(path))
    if prefix is not None:
        return {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
    return dict(raw)


def _unwrap_state_dict(obj, path: Path) -> Mapping[str, "torch.Tensor"]:
    import torch

    if isinstance(obj, Mapping):
        for wrapper in ("model", "state_dict"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise WeightsError(
        f"weights file {str(path)!r} is not a state_dict (expected a mapping of names to tensors, "
        f"possibly under 'model' or 'state_dict'); save one with torch.save(model.state_dict(), path), or pass "
        "VGGT-1B's model.safetensors"
    )


def load_into(model: "torch.nn.Module", state: Mapping[str, "torch.Tensor"], source: str) -> None:
    """`model.load_state_dict(state, strict=True)` with errors that name keys and the file."""
    expected = model.state_dict()
    check_keys(expected, state, source, what="the encoder config", prefix=PREFIX,
               advice="Check the encoder preset / config (depth, patch_embed, qk_norm, registers) against "
                      "the checkpoint, or re-download a complete file.")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise WeightsError(
                f"weights {source!r}: key {PREFIX}{k} has shape {tuple(v.shape)}, the encoder config "
                f"expects {tuple(expected[k].shape)}; these weights are of another model size: pass the "
                "checkpoint of the --encoder preset (vggt-1b: VGGT-1B)"
            )
    model.load_state_dict(state, strict=True)


# ---- hashing ----------------------------------------------------------------------------


def weights_sha256(path: str | os.PathLike, *, use_cache: bool = True) -> str:
    """The weights' identity for the spec (module docstring): `sha256_file` of the file, or for a
    safetensors index the sha256 of the sorted "<shard name> <shard sha256>\\n" lines of the shards
    holding aggregator keys (a change of the other shards alone leaves it unchanged).

    Example:
        >>> weights_sha256("ckpt/model.safetensors") == sha256_file("ckpt/model.safetensors")  # doctest: +SKIP
        True
    """
    p = Path(path)
    if not p.name.endswith(INDEX_SUFFIX):
        return sha256_file(p, use_cache=use_cache)
    lines = sorted(f"{f.name} {sha256_file(f, use_cache=use_cache)}\n" for f in _aggregator_shards(p))
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()
