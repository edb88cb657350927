"""Which weights each feature set's recompute encoder gets: `--weights [NAME=]PATH` values
parsed (`parse_weights`), then assigned to the sets being verified (`weights_per_set`)."""

from __future__ import annotations

import os
from typing import Sequence

from featstore.contract.naming import FEATURE_SET_NAME, PRIMARY_FEATURE_SET
from featstore.errors import FeatstoreError

__all__ = ["parse_weights", "weights_per_set"]


def parse_weights(values: Sequence[str] | None) -> dict[str | None, str] | None:
    """`--weights` values -> {set name: path}; a plain PATH is under None (the selected set).
    ``NAME=PATH`` names a set unless the whole value is an existing path (a file whose name
    holds '='); write such a path ``./NAME=...`` to be sure.

    Example:
        >>> from featstore.ops.verify import parse_weights
        >>> parse_weights(["/ckpt/vggt.safetensors", "qwen_vision=/ckpt/vision.safetensors"])
        {None: '/ckpt/vggt.safetensors', 'qwen_vision': '/ckpt/vision.safetensors'}
    """
    if not values:
        return None
    out: dict[str | None, str] = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if sep and rest and not os.path.exists(value) and FEATURE_SET_NAME.fullmatch(name):
            key, path = name, rest
        else:
            key, path = None, value
        if key in out:
            which = "two plain --weights PATHs" if key is None else f"two --weights for feature set {key!r}"
            raise FeatstoreError(f"{which} ({out[key]} and {path}); give each set's weights once, as NAME=PATH")
        out[key] = path
    return out


def weights_per_set(weights, chosen: list[str]) -> dict[str, str]:
    """{set: weights path} from `verify_store`'s `weights` argument: a path (for the one set of
    `chosen`, or the primary set when several are chosen) or {set name or None: path}.

    Example:
        >>> from featstore.ops.verify.weights import weights_per_set
        >>> weights_per_set("/ckpt/vggt.safetensors", ["qwen_vision", "vggt"])
        {'vggt': '/ckpt/vggt.safetensors'}
    """
    if weights is None:
        return {}
    given = {None: weights} if isinstance(weights, (str, os.PathLike)) else dict(weights)
    out: dict[str, str] = {}
    for name, path in given.items():
        if name is None:
            name = chosen[0] if len(chosen) == 1 else PRIMARY_FEATURE_SET
        elif name not in chosen:
            raise FeatstoreError(f"--weights {name}=...: feature set {name!r} is not being verified (verified: "
                                 f"{', '.join(chosen)}); check the name, or select it with --feature-set")
        if name in out and out[name] != os.fspath(path):
            raise FeatstoreError(f"--weights: two weights given for feature set {name!r} ({out[name]} and {path}); "
                                 "give each set's weights once")
        out[name] = os.fspath(path)
    return out
