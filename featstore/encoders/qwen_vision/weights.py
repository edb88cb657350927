"""Qwen2.5-VL checkpoints for the vision encoders: locate them, hash them, load the tower strictly.

A checkpoint is a file (model.safetensors, its config.json beside it), a folder (config.json plus
model.safetensors, or model.safetensors.index.json and its shards) or a hub id
("Qwen/Qwen2.5-VL-3B-Instruct", fetched with huggingface_hub: config.json, the index and only the
shards that hold vision keys). The vision config is config.json's `vision_config`.

Keys: both layouts are read, `visual.*` (the hub's, and transformers' save_pretrained) and
`model.visual.*` (the 5.x module tree, e.g. a `torch.save(model.state_dict())`); a checkpoint
with both is refused. `*.merger.*` is skipped (the encoders run the tower without its merger).
Every key the tower expects must be present and the file may hold no other vision key; keys
outside the tower (language model, lm_head) are ignored. `transformers`' own loader would fill a
missing key with random init and only warn.

Digest (the spec's weights_sha256): the sha256 of the one file; for a sharded checkpoint the
sha256 of the lines "<shard file name> <shard sha256>\\n", sorted, over the shards holding vision
keys (a change of the language model's shards alone leaves it unchanged).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from featstore.errors import WeightsError

from featstore.encoders.checkpoint_files import check_keys, index_shards, looks_like_hub_id, read_weight_map, sha256_file

if TYPE_CHECKING:
    import torch

__all__ = ["QwenCheckpoint", "resolve_checkpoint", "load_vision_state", "load_vision_into", "VISION_PREFIXES"]

VISION_PREFIXES = ("visual.", "model.visual.")  # hub / save_pretrained, then the 5.x module tree
_MERGER = "merger."
_SINGLE, _INDEX, _CONFIG = "model.safetensors", "model.safetensors.index.json", "config.json"
_HINT = ("pass a Qwen2.5-VL checkpoint: its folder (e.g. --weights /path/to/Qwen2.5-VL-3B-Instruct, holding "
         "config.json and model.safetensors or model.safetensors.index.json with its shards), or the hub id "
         "Qwen/Qwen2.5-VL-3B-Instruct on a machine with internet")


@dataclasses.dataclass(frozen=True)
class QwenCheckpoint:
    """A located Qwen2.5-VL checkpoint (nothing loaded yet).

    Attributes:
        source: the checkpoint as given (path or hub id), for messages.
        files: the safetensors files holding its vision keys (one, or the shards that do).
        index: the model.safetensors.index.json of a sharded checkpoint, else None.
        vision_config: config.json's `vision_config`, or None when there is no config.json.
        config_path: that config.json, or None.
    """

    source: str
    files: Tuple[Path, ...]
    index: Optional[Path] = None
    vision_config: Optional[Dict[str, Any]] = None
    config_path: Optional[Path] = None

    def sha256(self) -> str:
        """The spec's weights_sha256 (module docstring); hashes are cached as `sha256_file` caches them."""
        if self.index is None:
            return sha256_file(self.files[0])
        lines = sorted(f"{f.name} {sha256_file(f)}\n" for f in self.files)
        return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()

    def where(self) -> str:
        """The file (or the index of the shards) as messages name it."""
        return str(self.index if self.index is not None else self.files[0])


def resolve_checkpoint(weights: str | os.PathLike) -> QwenCheckpoint:
    """Locate a checkpoint (module docstring) and read its config.json; no tensor is read.

    Raises:
        WeightsError: no such path, a folder without the files, an index that names no vision
            key, an unreadable config.json, or a hub id that cannot be fetched; each says what to pass.

    Example:
        >>> from featstore.encoders.qwen_vision.weights import resolve_checkpoint
        >>> resolve_checkpoint("no/such/folder/model.safetensors")
        Traceback (most recent call last):
        ...
        featstore.errors.WeightsError: Qwen2.5-VL weights 'no/such/folder/model.safetensors' do not exist; pass a ...
    """
    p = Path(os.path.expanduser(os.fspath(weights)))
    if p.is_dir():
        if (p / _INDEX).is_file():
            return _sharded(p / _INDEX, os.fspath(weights))
        if (p / _SINGLE).is_file():
            return _single(p / _SINGLE, os.fspath(weights))
        raise WeightsError(f"Qwen2.5-VL weights folder {str(p)!r} holds neither {_SINGLE} nor {_INDEX}; {_HINT}")
    if p.is_file():
        if p.name.endswith(".index.json"):
            return _sharded(p, os.fspath(weights))
        return _single(p, os.fspath(weights))
    s = os.fspath(weights)
    if not looks_like_hub_id(s):
        raise WeightsError(f"Qwen2.5-VL weights {s!r} do not exist; {_HINT}")
    return _from_hub(s)


def _read_config(folder: Path) -> Tuple[Optional[Dict[str, Any]], Optional[Path]]:
    path = folder / _CONFIG
    if not path.is_file():
        return None, None
    try:
        with open(path, "r", encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read the checkpoint config {str(path)!r}: {e}; re-download the "
                           "checkpoint") from None
    vision = cfg.get("vision_config") if isinstance(cfg, dict) else None
    if not isinstance(vision, dict):
        raise WeightsError(f"checkpoint config {str(path)!r} has no `vision_config` object: not a Qwen2.5-VL "
                           f"config.json; {_HINT}")
    return vision, path


def _check_safetensors(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise WeightsError(f"cannot read weights file {str(path)!r}: {e.strerror}; check its permissions") from None
    if len(head) < 9 or head[8:9] != b"{":  # u64 header length, then the JSON header
        raise WeightsError(f"weights file {str(path)!r} is not a safetensors file; Qwen2.5-VL checkpoints are "
                           f"read from safetensors only ({_HINT})")


def _single(path: Path, source: str) -> QwenCheckpoint:
    _check_safetensors(path)
    vision, cfg = _read_config(path.parent)
    return QwenCheckpoint(source, (path,), None, vision, cfg)


def _index_shards(index: Path) -> List[str]:
    """The shard names that hold vision keys, from the index's weight_map."""
    weight_map = read_weight_map(index)
    shards = sorted({str(v) for k, v in weight_map.items() if k.startswith(VISION_PREFIXES)})
    if not shards:
        raise WeightsError(f"shard index {str(index)!r} names no vision key (visual.* or model.visual.*): not a "
                           f"Qwen2.5-VL checkpoint; {_HINT}")
    return shards


def _sharded(index: Path, source: str) -> QwenCheckpoint:
    files = index_shards(index, _index_shards(index), "vision keys", _check_safetensors)
    vision, cfg = _read_config(index.parent)
    return QwenCheckpoint(source, tuple(files), index, vision, cfg)


def _from_hub(repo: str) -> QwenCheckpoint:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:
        raise WeightsError(
            f"weights {repo!r} look like a Hugging Face hub id, but huggingface_hub is not installed. "
            "`pip install huggingface_hub` (or featstore[hub]), or download the checkpoint folder and pass its path"
        ) from e

    def fetch(filename: str, *, optional: bool = False) -> Optional[Path]:
        try:
            return Path(hf_hub_download(repo_id=repo, filename=filename))
        except Exception as e:  # network, auth, missing repo or file: all end the same way for the user
            if optional and "EntryNotFound" in type(e).__name__:
                return None
            raise WeightsError(
                f"cannot fetch {filename} of hub repo {repo!r}: {type(e).__name__}: {e}. Offline? Download the "
                "checkpoint on a machine with internet and pass its folder (--weights /path/to/Qwen2.5-VL-3B-Instruct)"
            ) from e

    config = fetch(_CONFIG)
    index = fetch(_INDEX, optional=True)
    if index is None:
        return _single(fetch(_SINGLE), repo)
    for name in _index_shards(index):
        fetch(name)  # into the same snapshot folder as the index; only the shards holding vision keys
    if config.parent != index.parent:  # the hub cache keeps one snapshot folder per revision
        raise WeightsError(f"hub repo {repo!r}: config.json and the index landed in different snapshot folders "
                           f"({str(config.parent)!r}, {str(index.parent)!r}); pass a downloaded folder instead")
    return _sharded(index, repo)


def load_vision_state(ckpt: QwenCheckpoint) -> Dict[str, "torch.Tensor"]:
    """The vision tower's tensors, keys without the layout prefix, the merger's left out.

    Raises:
        WeightsError: no vision key at all, both layouts in one checkpoint, an index naming a
            key its shard lacks, or an unreadable file (each names the file).
    """
    from safetensors import safe_open

    state: Dict[str, "torch.Tensor"] = {}
    prefixes = set()
    for path in ckpt.files:
        try:
            with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    prefix = next((p for p in VISION_PREFIXES if key.startswith(p)), None)
                    if prefix is None:
                        continue  # language model, lm_head: not the tower
                    prefixes.add(prefix)
                    name = key[len(prefix):]
                    if not name.startswith(_MERGER):
                        state[name] = f.get_tensor(key)
        except Exception as e:
            raise WeightsError(f"cannot read weights file {str(path)!r}: {type(e).__name__}: {e}; the file is "
                               "damaged or incomplete: re-download the checkpoint") from e
    if not prefixes:
        raise WeightsError(f"weights {ckpt.where()!r} hold no vision key (visual.* or model.visual.*): not a "
                           f"Qwen2.5-VL checkpoint; {_HINT}")
    if len(prefixes) > 1:
        raise WeightsError(f"weights {ckpt.where()!r} hold vision keys in both layouts (visual.* and model.visual.*): "
                           "the tower's weights are ambiguous; re-save the checkpoint with one of them")
    return state


def load_vision_into(model: "torch.nn.Module", state: Dict[str, "torch.Tensor"], ckpt: QwenCheckpoint) -> None:
    """`model.load_state_dict(state, strict=True)` with errors naming the keys (in the hub's
    `visual.*` spelling, whichever layout the file uses) and the file.

    Raises:
        WeightsError: a key the tower expects is missing, a vision key it lacks is present, or a
            shape differs from the config's.
    """
    expected = model.state_dict()
    check_keys(expected, state, ckpt.where(), what="the vision config", unexpected_name="unexpected vision key(s)",
               prefix="visual.",
               advice="Check that config.json belongs to these weights (depth, hidden_size), or re-download a "
                      "complete checkpoint")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise WeightsError(f"weights {ckpt.where()!r}: key visual.{k} has shape {tuple(v.shape)}, the vision "
                               f"config expects {tuple(expected[k].shape)}; check that config.json belongs to "
                               "these weights, or re-download the checkpoint")
    model.load_state_dict(state, strict=True)
