"""Keys are discoverable: `featstore info --keys` lists them (streamed), and a missing key's error
says what the store's keys are (sample ids or image paths) and names the nearest ones."""

from __future__ import annotations

import json
import os

import pytest

from _featstore_helpers import key_of, make_store, run_cli
from _training_helpers import build_store, sample_root
from featstore.errors import MissingKeyError
from featstore.store.reader import FeatureStore

ANNOTATED_KEYS = ["misc/portrait.png", "scene_a_step1", "scene_a_step3", "scene_b_step1", "scene_b_step3"]


@pytest.fixture(scope="module")
def annotated(tmp_path_factory):
    """The sample data built as the README's command 1 does (keyed by sample id)."""
    root = sample_root(tmp_path_factory.mktemp("keys"))
    return root, build_store(root)


def test_an_image_path_asked_of_a_store_keyed_by_sample_id_names_the_kind_and_the_nearest(annotated):
    root, store = annotated
    with FeatureStore(root) as s, pytest.raises(MissingKeyError) as e:
        s.get("scene_a/000.jpg")
    assert str(e.value) == (
        f"key 'scene_a/000.jpg' is not in the store {store}: its keys are sample ids (the 'id' of each multi-frame "
        "annotated sample) and image paths (single-image samples); the nearest are 'scene_a_step3', 'scene_a_step1', "
        f"'scene_b_step3' (`featstore info --keys {store}` lists them)")
    with FeatureStore(root) as s, pytest.raises(MissingKeyError, match="the nearest are 'scene_b_step1'"):
        s.read_into(["scene_a_step1", "scene_b_step1x"])  # the batch read names the same


def test_the_hint_reads_only_keys_near_the_missing_one(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    store = make_store(str(data), n=200)
    with FeatureStore(store) as s, pytest.raises(MissingKeyError) as e:
        s.get("scene07/004.jpeg")
    message = str(e.value)
    assert "its keys are image paths relative to the data root" in message
    assert "the nearest are 'scene07/004.jpg', " in message


def test_an_empty_store_says_so(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    store = make_store(str(data), n=0)
    with FeatureStore(store) as s, pytest.raises(MissingKeyError) as e:
        s.get("a.jpg")
    assert str(e.value) == f"key 'a.jpg' is not in the store {store}: it holds no entries (build it: featstore build)"


def test_info_keys_lists_every_key_in_order_and_limit_and_json(annotated):
    root, store = annotated
    out = run_cli("info", root, "--keys")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ANNOTATED_KEYS
    out = run_cli("info", root, "--keys", "--limit", "2")
    assert out.stdout.splitlines() == ANNOTATED_KEYS[:2]
    out = run_cli("info", root, "--keys", "--json", "--limit", "3")
    assert json.loads(out.stdout) == {"path": store, "feature_set": "vggt", "keys": ANNOTATED_KEYS[:3], "listed": 3,
                                      "limit": 3}
    out = run_cli("info", root)  # the summary says what the keys are
    assert ("keys         sample ids (the 'id' of each multi-frame annotated sample) and image paths (single-image "
            "samples); first 'misc/portrait.png', 'scene_a_step1', 'scene_a_step3', ... (--keys lists them)\n") in out.stdout
    info = json.loads(run_cli("info", root, "--json").stdout)
    assert info["feature_sets"][0]["first_keys"] == ANNOTATED_KEYS[:3]
    out = run_cli("info", root, "--limit", "2")
    assert out.returncode == 2 and "--limit and --feature-set select what --keys lists: add --keys" in out.stderr


def test_info_keys_streams_a_store_larger_than_one_read_chunk(tmp_path):
    from featstore.ops.info import iter_keys

    data = tmp_path / "data"
    data.mkdir()
    store = make_store(str(data), n=1100, batch_entries=512)  # keys() reads 1024 per transaction
    out = run_cli("info", store, "--keys", "--json")
    listed = json.loads(out.stdout)["keys"]
    assert listed == sorted(key_of(i) for i in range(1100))
    keys = iter_keys(store)
    assert next(keys) == key_of(0)  # a generator: the first key comes before the rest are read
    keys.close()
    assert list(iter_keys(store, limit=0)) == []
