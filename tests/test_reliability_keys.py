"""Awkward keys end to end: unicode (NFC vs NFD), spaces, '..', absolute paths, and keys over
LMDB's 511-byte limit, through the writer, the reader, a real build and verify."""

from __future__ import annotations

import os
import unicodedata

import pytest
import torch

from _featstore_helpers import entry_metadata, features_for, make_images, make_store, run_cli, write_source
from featstore.errors import InvalidKeyError, MissingKeyError
from featstore.store.reader import FeatureStore
from featstore.ops.verify import verify_store
from featstore.store.writer import StoreWriter

NFC = unicodedata.normalize("NFC", "café/été 1.jpg")
NFD = unicodedata.normalize("NFD", NFC)


@pytest.fixture
def root(tmp_path):
    make_store(str(tmp_path), n=2)
    return str(tmp_path)


def _writer(root):
    return StoreWriter(os.path.join(root, "vggt_features.lmdb"), handle_signals=False)


def test_unicode_and_spaces_round_trip_and_normalise(root):
    assert NFC != NFD
    keys = {NFD: 10, "with space/a b.jpg": 11, "日本語/画像 01.png": 12, "emoji/🙂.jpg": 13}
    with _writer(root) as w:
        for k, i in keys.items():
            src = write_source(root, unicodedata.normalize("NFC", k), i)
            w.put(k, {"features": features_for(i)}, entry_metadata([unicodedata.normalize("NFC", k)], [src]))
        w.finish()
    with FeatureStore(root) as fs:
        stored = set(fs.keys())
        assert NFC in stored and NFD not in stored  # stored in NFC whatever the caller spelled
        for k, i in keys.items():
            assert torch.equal(fs.get(k).features, features_for(i))
            assert torch.equal(fs.get(unicodedata.normalize("NFC", k)).features, features_for(i))
    assert verify_store(root).ok, verify_store(root).summary()


@pytest.mark.parametrize("bad", ["../escape.jpg", "a/../../b.jpg", "/abs/path.jpg", "", "a\x00b.jpg",
                                 "x" * 512, "é" * 256, "d/" * 300 + "f.jpg"])
def test_bad_keys_are_refused_before_any_write(root, bad):
    store = os.path.join(root, "vggt_features.lmdb")
    before = open(os.path.join(store, "data.mdb"), "rb").read()
    with _writer(root) as w:
        with pytest.raises(InvalidKeyError) as e:
            w.put(bad, {"features": features_for(0)}, {})
        w.finish()
    msg = str(e.value)
    assert any(s in msg for s in ("..", "absolute", "empty", "NUL", "511 bytes")), msg
    with FeatureStore(root) as fs:
        with pytest.raises(InvalidKeyError):
            fs.get(bad)
        assert len(fs) == 2
    assert verify_store(root).ok


def test_511_byte_key_is_the_limit(root):
    ok = "k/" + "é" * 254 + "x.jpg"  # 2 + 508 + 5 = 515 bytes: too long
    assert len(ok.encode()) == 515
    fits = "k/" + "é" * 252 + "x.jpg"  # 511 bytes
    assert len(fits.encode()) == 511
    with _writer(root) as w:
        w.put(fits, {"features": features_for(3)}, entry_metadata([fits], [write_source(root, "k/f.jpg", 3)]))
        with pytest.raises(InvalidKeyError, match="511 bytes"):
            w.put(ok, {"features": features_for(4)}, {})
        w.finish()
    with FeatureStore(root) as fs:
        assert torch.equal(fs.get(fits).features, features_for(3))
        with pytest.raises(MissingKeyError):
            fs.get("k/other.jpg")


def _build_and_verify(root: str, names: list[str]) -> None:
    make_images(root, names)
    r = run_cli("build", "--data-root", root, "--encoder", "vggt-tiny", "--workers", "0", "--no-progress")
    assert r.returncode == 0, r.stderr
    with FeatureStore(root) as fs:
        assert set(fs.keys()) == {unicodedata.normalize("NFC", n) for n in names}
    report = verify_store(root, deep=True)
    assert report.ok, report.summary()


def test_build_and_verify_with_awkward_file_names(tmp_path):
    """A real build over space / CJK / emoji / NFC-accented names builds and verifies clean."""
    _build_and_verify(str(tmp_path / "data"), ["plain/a.png", "with space/b c.png", "日本/画像.png",
                                               "emoji/🙂.png", NFC.replace(".jpg", ".png")])


def test_build_with_an_nfd_file_name(tmp_path):
    _build_and_verify(str(tmp_path / "data"), ["plain/a.png", NFD.replace(".jpg", ".png")])


def _data_root_with_a_too_long_path(tmp_path) -> str:
    root = str(tmp_path / "data")
    make_images(root, ["plain/a.png"])
    deep = "/".join(["d" * 60] * 9) + "/long.png"  # 558 bytes: over the 511-byte key limit
    make_images(root, [deep])
    return root


def test_build_with_a_path_over_511_bytes_is_a_clear_refusal(tmp_path):
    root = _data_root_with_a_too_long_path(tmp_path)
    r = run_cli("build", "--data-root", root, "--encoder", "vggt-tiny", "--workers", "0", "--no-progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "511 bytes" in r.stderr and "Shorten the path" in r.stderr


def test_build_refusal_names_the_file_with_the_long_path(tmp_path):
    root = _data_root_with_a_too_long_path(tmp_path)
    r = run_cli("build", "--data-root", root, "--encoder", "vggt-tiny", "--workers", "0", "--no-progress")
    assert "long.png" in r.stderr, r.stderr
