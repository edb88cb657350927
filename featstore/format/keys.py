"""Store keys: UTF-8, NFC-normalised, POSIX relative paths of at most 511 bytes.

A key names one unit: the image's path relative to the data root (or a sample id). The same
file must always give the same key, whatever form the caller spelled it in, so every key that
enters or leaves the store goes through `normalize_key`.
"""

from __future__ import annotations

import os
import re
import unicodedata

from featstore.errors import InvalidKeyError

__all__ = ["MAX_KEY_BYTES", "IMAGE_EXTENSIONS", "normalize_key", "key_to_bytes", "relative_key", "source_path",
           "key_kind"]

# File extensions taken as images (lower case): a scan of a data root plans these files
# (featstore.build.plan.scan_images), and a key ending in one names an image, not a sample id.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# LMDB's compile-time key limit (MDB_MAXKEYSIZE); a longer key raises BadValsizeError deep
# inside a write transaction, so it is checked here, before any work starts.
MAX_KEY_BYTES = 511
# ASCII keys that are already canonical: relative, no empty, '.' or '..' parts, no NUL
# (NFC leaves ASCII unchanged). Anything else takes the full path below.
_CANONICAL_ASCII = re.compile(r"(?!\.\.?(?:/|$))[\x01-\x2e\x30-\x7f]+(?:/(?!\.\.?(?:/|$))[\x01-\x2e\x30-\x7f]+)*")


def normalize_key(key: str | os.PathLike) -> str:
    """Return the canonical form of a store key.

    Args:
        key: a relative path such as ``"scene1/rgb/000.jpg"`` or ``"./scene1//rgb/000.jpg"``.

    Returns:
        The NFC-normalised path with ``/`` separators, no ``.`` parts and no empty parts.

    Raises:
        InvalidKeyError: the key is empty, absolute, leaves the root (``..``), holds a NUL
            byte, or is longer than 511 bytes in UTF-8.

    Example:
        >>> from featstore.format.keys import normalize_key
        >>> normalize_key("./a//b/c.jpg")
        'a/b/c.jpg'
    """
    if type(key) is str and len(key) <= MAX_KEY_BYTES and os.sep == "/" and _CANONICAL_ASCII.fullmatch(key):
        return key  # already canonical: the common case on every read, ~10x cheaper
    if isinstance(key, bytes):
        raise InvalidKeyError(f"key {key!r} is bytes; pass a str path relative to the data root")
    try:
        text = os.fspath(key)
    except TypeError:
        raise InvalidKeyError(f"key {key!r} is a {type(key).__name__}; pass a str path relative "
                              "to the data root") from None
    if isinstance(text, bytes):  # a PathLike that returns bytes
        raise InvalidKeyError(f"key {key!r} is bytes; pass a str path relative to the data root")
    if os.sep != "/":
        text = text.replace(os.sep, "/")
    text = unicodedata.normalize("NFC", text)
    if not text:
        raise InvalidKeyError("empty key: a key is an image path relative to the data root")
    if "\x00" in text:
        raise InvalidKeyError(f"key {text!r} contains a NUL character; remove it from the path")
    if text.startswith("/"):
        raise InvalidKeyError(
            f"key {text!r} is an absolute path; keys are paths relative to the data root "
            "(use relative_key(path, data_root))"
        )
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidKeyError(f"key {text!r} contains '..'; keys must stay inside the data root")
    if not parts:
        raise InvalidKeyError(f"key {text!r} names no file; a key is an image path relative to the data root")
    canonical = "/".join(parts)
    try:
        size = len(canonical.encode("utf-8"))
    except UnicodeEncodeError:
        # Lone surrogates: os.fsdecode() of a file name whose bytes are not UTF-8.
        raise InvalidKeyError(
            f"key {canonical!r} is not valid Unicode (a file name that is not UTF-8?); "
            "rename the file to a UTF-8 name"
        ) from None
    if size > MAX_KEY_BYTES:
        raise InvalidKeyError(
            f"key {_abbreviate(canonical)!r} is {size} bytes in UTF-8; LMDB limits keys to "
            f"{MAX_KEY_BYTES} bytes. Shorten the path, or give the sample an explicit short id."
        )
    return canonical


def _abbreviate(key: str) -> str:
    """A long key shortened in its middle, so that the file name at its end stays visible."""
    return key if len(key) <= 120 else f"{key[:40]}...{key[-77:]}"


def key_to_bytes(key: str | os.PathLike) -> bytes:
    """Normalise `key` and encode it as the UTF-8 bytes LMDB stores."""
    return normalize_key(key).encode("utf-8")


def relative_key(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """Key of file `path` under data root `root` (both may be absolute or relative to cwd).

    Symlinks inside the root are not resolved: the key is the path the data names, so a
    linked file and its target are two units (the link's key is what training will ask for).
    """
    abs_path = os.path.abspath(os.fspath(path))
    abs_root = os.path.abspath(os.fspath(root))
    rel = os.path.relpath(abs_path, abs_root)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        raise InvalidKeyError(f"{abs_path} is not inside the data root {abs_root}; move the image under it, or pass "
                              "the folder that holds every image as the data root")
    return normalize_key(rel)


def source_path(data_root: str | os.PathLike, key: str) -> str:
    """The file a frame key names. Keys are NFC; a file whose name is stored in another Unicode
    form (NFD from macOS, say) is found by comparing each path component in NFC. Returns the
    plain join when nothing matches, so that opening it gives the usual "no such file".

    Example:
        >>> from featstore.format.keys import source_path
        >>> source_path("data", "scene_a/000.jpg")
        'data/scene_a/000.jpg'
    """
    root = os.fspath(data_root)
    direct = os.path.join(root, key)
    if os.path.lexists(direct) or key.isascii():
        return direct
    path = root
    for part in key.split("/"):
        candidate = os.path.join(path, part)
        if not os.path.lexists(candidate):
            try:
                names = os.listdir(path)
            except OSError:
                return direct
            match = [n for n in names if unicodedata.normalize("NFC", n) == part]
            if not match:
                return direct
            candidate = os.path.join(path, match[0])
        path = candidate
    return path


def key_kind(keys) -> str:
    """What `keys` (some keys of one store) are, in words, for messages: image paths or sample ids.

    A build keys a single-image unit by the image's path (relative to the data root) and a
    multi-frame sample by its annotation "id" (`featstore.build.plan`), so a key that ends in an image
    extension is an image path and any other key a sample id. (A multi-frame sample without an
    "id" is keyed by its last frame: an image path too.)

    Example:
        >>> from featstore.format.keys import key_kind
        >>> key_kind(["scene_a/000.jpg", "scene_a/001.jpg"])
        'image paths relative to the data root (a build without --annotations, or of single-image samples)'
        >>> key_kind(["misc/portrait.png", "scene_a_step1"])
        "sample ids (the 'id' of each multi-frame annotated sample) and image paths (single-image samples)"
    """
    keys = list(keys)
    paths = sum(1 for k in keys if k.lower().endswith(IMAGE_EXTENSIONS))
    ids = len(keys) - paths
    if ids and paths:
        return "sample ids (the 'id' of each multi-frame annotated sample) and image paths (single-image samples)"
    if ids:
        return "sample ids (the 'id' of each annotated sample)"
    return "image paths relative to the data root (a build without --annotations, or of single-image samples)"
