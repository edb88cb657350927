"""Names every layer agrees on: the store's default folder name, the primary feature set, and
what a feature set may be called (it names an LMDB sub-database and meta keys)."""

from __future__ import annotations

import re

from featstore.errors import InvalidFeatureSetError

__all__ = ["DEFAULT_STORE_NAME", "PRIMARY_FEATURE_SET", "FEATURE_SET_NAME", "check_feature_set", "feature_set_label"]

# The store's folder beside the data (`featstore build --data-root D` writes D/vggt_features.lmdb).
DEFAULT_STORE_NAME = "vggt_features.lmdb"
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
