"""Keys: one canonical spelling per file (NFC, POSIX, relative), and exact refusals."""

from __future__ import annotations

import pathlib
import re

import pytest

from featstore.errors import InvalidKeyError
from featstore.format.keys import MAX_KEY_BYTES, key_to_bytes, normalize_key, relative_key


@pytest.mark.parametrize(
    "given, canonical",
    [
        ("scene1/rgb/000.jpg", "scene1/rgb/000.jpg"),
        ("./scene1//rgb/./000.jpg", "scene1/rgb/000.jpg"),
        ("scene1/rgb/", "scene1/rgb"),
        ("scene 1/img 0.jpg", "scene 1/img 0.jpg"),  # spaces are part of file names
        ("cafe\u0301/e\u0301.jpg", "caf\u00e9/\u00e9.jpg"),  # NFD (macOS) -> NFC
        (pathlib.PurePosixPath("a/b.png"), "a/b.png"),
        ("a..b/c..jpg", "a..b/c..jpg"),  # '..' inside a name is fine
    ],
)
def test_normalize(given, canonical):
    assert normalize_key(given) == canonical
    assert key_to_bytes(given) == canonical.encode("utf-8")


def test_nfc_and_nfd_spellings_are_one_key():
    assert key_to_bytes("Gr\u00fc\u00dfe/\u00e4.jpg") == key_to_bytes("Gru\u0308\u00dfe/a\u0308.jpg")


@pytest.mark.parametrize(
    "given, message",
    [
        ("", "empty key: a key is an image path relative to the data root"),
        ("./", "key './' names no file; a key is an image path relative to the data root"),
        ("/data/a.jpg", "key '/data/a.jpg' is an absolute path; keys are paths relative to the data root "
         "(use relative_key(path, data_root))"),
        ("a/../../b.jpg", "key 'a/../../b.jpg' contains '..'; keys must stay inside the data root"),
        ("../b.jpg", "key '../b.jpg' contains '..'; keys must stay inside the data root"),
        ("a\x00b", "key 'a\\x00b' contains a NUL character; remove it from the path"),
        (b"a.jpg", "key b'a.jpg' is bytes; pass a str path relative to the data root"),
        (3, "key 3 is a int; pass a str path relative to the data root"),
        ("bad\udcff.jpg", "key 'bad\\udcff.jpg' is not valid Unicode (a file name that is not UTF-8?); "
         "rename the file to a UTF-8 name"),
    ],
)
def test_rejected_with_exact_message(given, message):
    with pytest.raises(InvalidKeyError) as e:
        normalize_key(given)
    assert str(e.value) == message


def test_lmdb_key_limit_is_checked_in_utf8_bytes():
    ok = "d/" + "\u00e9" * ((MAX_KEY_BYTES - 2) // 2) + "x" * ((MAX_KEY_BYTES - 2) % 2)
    assert len(ok.encode()) == MAX_KEY_BYTES
    assert normalize_key(ok) == ok
    too_long = ok + "x"
    with pytest.raises(InvalidKeyError) as e:
        normalize_key(too_long)
    assert str(e.value) == (
        f"key {too_long[:40] + '...' + too_long[-77:]!r} is 512 bytes in UTF-8; LMDB limits keys to 511 bytes. "
        "Shorten the path, or give the sample an explicit short id."
    )
    assert isinstance(e.value, ValueError)  # callers may catch it as a ValueError too


def test_relative_key(tmp_path):
    root = tmp_path / "data"
    assert relative_key(root / "scene" / "0.jpg", root) == "scene/0.jpg"
    with pytest.raises(InvalidKeyError, match=re.escape(f"{tmp_path}/other.jpg is not inside the data root {root}")):
        relative_key(tmp_path / "other.jpg", root)
