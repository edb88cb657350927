"""How the store's tools name a feature set in what they print.

A store of the primary set alone ("vggt", the layout from before feature sets) prints as it did
then, naming no set; every other set is named. One rule, asked here by verify, gc, info, copy
and merge (paths are named with `featstore.contract.naming.feature_set_label`).
"""

from __future__ import annotations

from typing import Iterable

from featstore.contract.naming import PRIMARY_FEATURE_SET

__all__ = ["labelled", "set_note"]


def labelled(names: Iterable[str]) -> bool:
    """Whether output about the sets `names` names each one: unless they are the primary set alone.

    Example:
        >>> from featstore.ops.labels import labelled
        >>> labelled(["vggt"]), labelled(["vggt", "qwen_vision"]), labelled(["qwen_vision"])
        (False, True, True)
    """
    return set(names) != {PRIMARY_FEATURE_SET}


def set_note(name: str | None, template: str = " (feature set {!r})") -> str:
    """`template` filled in with the set `name`; "" for the primary set, and for None (the
    whole store).

    Example:
        >>> from featstore.ops.labels import set_note
        >>> set_note("vggt"), set_note("qwen_vision"), set_note("extra", " of feature set {!r}")
        ('', " (feature set 'qwen_vision')", " of feature set 'extra'")
    """
    return "" if name in (None, PRIMARY_FEATURE_SET) else template.format(name)
