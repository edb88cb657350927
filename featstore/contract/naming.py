"""Names every layer agrees on: the store's default folder name, the primary feature set, what a
feature set may be called (it names an LMDB sub-database and meta keys), and which encoders
write which set.

The last is a table the encoder registry fills (`featstore.encoders.register_encoder` calls
`register_set_writer`), so that the store below the encoders can name a set's default and the
command that builds a set without importing them: a spec of a registered encoder comes from
`featstore.encoders` (`resolve_spec`), which registers the built-in families on import.
"""

from __future__ import annotations

import re
from typing import Iterable

from featstore.errors import InvalidFeatureSetError

__all__ = ["labelled", "set_note", "DEFAULT_STORE_NAME", "SHARD_STORES_GLOB", "shard_store_name", "is_shard_store_name",
           "PRIMARY_FEATURE_SET", "FEATURE_SET_NAME", "check_feature_set", "feature_set_label",
           "register_set_writer", "default_feature_set", "build_command_for_set"]

# The store's folder beside the data (`featstore build --data-root D` writes D/vggt_features.lmdb).
DEFAULT_STORE_NAME = "vggt_features.lmdb"
# `featstore build --shard I/N` writes D/vggt_features.shard-I-of-N.lmdb; merge joins them.
SHARD_STORES_GLOB = "vggt_features.shard-*-of-*.lmdb"
_SHARD_STORE_NAME = re.compile(r"vggt_features\.shard-(\d+)-of-(\d+)\.lmdb")


def shard_store_name(index: int, count: int) -> str:
    """The folder name of part `index` of `count` beside the data.

    Example:
        >>> from featstore.contract.naming import is_shard_store_name, shard_store_name
        >>> shard_store_name(1, 4), is_shard_store_name(shard_store_name(1, 4)), is_shard_store_name("x.lmdb")
        ('vggt_features.shard-1-of-4.lmdb', True, False)
    """
    return f"vggt_features.shard-{index}-of-{count}.lmdb"


def is_shard_store_name(name: str) -> bool:
    """Whether `name` is one `shard_store_name` gives."""
    return _SHARD_STORE_NAME.fullmatch(name) is not None
# The feature set VGGT encoders write: the store's original `features` sub-database.
PRIMARY_FEATURE_SET = "vggt"
# Feature set names: lower-case letters, digits and '_', 1 to 32 of them, so that the sub-database
# and meta key names built from them are unambiguous ('.' separates) and safe in file names.
FEATURE_SET_NAME = re.compile(r"[a-z0-9_]{1,32}")


def check_feature_set(name) -> str:
    """Return `name` when it is a valid feature set name, else raise InvalidFeatureSetError.

    A name is 1 to 32 characters of ``[a-z0-9_]``; "vggt" is the primary set (the store's
    original sub-database `features`).

    Example:
        >>> from featstore.contract.naming import check_feature_set
        >>> check_feature_set("qwen_vision")
        'qwen_vision'
    """
    if not isinstance(name, str) or not FEATURE_SET_NAME.fullmatch(name):
        raise InvalidFeatureSetError(
            f"feature set name {name!r} is not valid: use 1 to 32 characters of lower-case letters, digits "
            f"and '_' (e.g. {PRIMARY_FEATURE_SET!r}, 'qwen_vision')")
    return name


def feature_set_label(path: str, feature_set: str = PRIMARY_FEATURE_SET) -> str:
    """How messages name a set of a store: the path alone for the primary set (as before sets
    existed), ``PATH [feature set 'NAME']`` for the others."""
    return path if feature_set == PRIMARY_FEATURE_SET else f"{path} [feature set {feature_set!r}]"


# encoder name -> the feature set its builds write by default, in registration order (filled by
# featstore.encoders.registry.register_encoder).
_SET_OF_ENCODER: dict[str, str] = {}


def register_set_writer(encoder: str, feature_set: str) -> None:
    """Record that builds with `encoder` write `feature_set` unless told otherwise (the encoder
    registry calls it for every preset it registers)."""
    _SET_OF_ENCODER[encoder] = check_feature_set(feature_set)


def default_feature_set(encoder=None) -> str:
    """The feature set that features of `encoder` go to unless told otherwise: the set a
    registered encoder (a name, an EncoderSpec or its dict) writes, else the primary set "vggt"
    (an unregistered encoder, or none).

    Example:
        >>> import featstore.encoders  # registers the built-in presets
        >>> from featstore.contract.naming import default_feature_set
        >>> default_feature_set("qwen2.5-vl-vision"), default_feature_set({"encoder": "vggt-1b"}), default_feature_set()
        ('qwen_vision', 'vggt', 'vggt')
    """
    name = encoder.get("encoder") if isinstance(encoder, dict) else getattr(encoder, "encoder", encoder)
    return _SET_OF_ENCODER.get(name, PRIMARY_FEATURE_SET) if isinstance(name, str) else PRIMARY_FEATURE_SET


def build_command_for_set(feature_set: str) -> str:
    """The `featstore build` flags that write `feature_set`: the encoder whose features go there
    (`--encoder`), since the set alone does not choose the encoder (the default encoder would
    write VGGT features into any set named with --feature-set).

    Example:
        >>> import featstore.encoders  # registers the built-in presets
        >>> from featstore.contract.naming import build_command_for_set
        >>> build_command_for_set("qwen_vision")
        '`featstore build --encoder qwen2.5-vl-vision` (or qwen2.5-vl-vision-tiny), which writes this set'
        >>> build_command_for_set("mine")
        '`featstore build --feature-set mine --encoder ENCODER`'
    """
    writers = sorted(e for e, s in _SET_OF_ENCODER.items() if s == feature_set)
    if not writers:
        return f"`featstore build --feature-set {feature_set} --encoder ENCODER`"
    others = f" (or {', '.join(writers[1:])})" if len(writers) > 1 else ""
    return f"`featstore build --encoder {writers[0]}`{others}, which writes this set"


# How the store's tools name a set in what they print: a store of the primary set alone (the
# layout from before feature sets) prints as it did then, naming no set; every other set is named.

def labelled(names: Iterable[str]) -> bool:
    """Whether output about the sets `names` names each one: unless they are the primary set alone.

    Example:
        >>> from featstore.contract.naming import labelled
        >>> labelled(["vggt"]), labelled(["vggt", "qwen_vision"]), labelled(["qwen_vision"])
        (False, True, True)
    """
    return set(names) != {PRIMARY_FEATURE_SET}


def set_note(name: str | None, template: str = " (feature set {!r})") -> str:
    """`template` filled in with the set `name`; "" for the primary set, and for None (the
    whole store).

    Example:
        >>> from featstore.contract.naming import set_note
        >>> set_note("vggt"), set_note("qwen_vision"), set_note("extra", " of feature set {!r}")
        ('', " (feature set 'qwen_vision')", " of feature set 'extra'")
    """
    return "" if name in (None, PRIMARY_FEATURE_SET) else template.format(name)
