"""`--annotations` on build, verify and gc: repeatable (every file kept), and a STORE written after
the files is the STORE, not one more annotation file."""

from __future__ import annotations

import json
import os

import pytest

from _training_helpers import annotations, sample_root
from featstore.cli import main


@pytest.fixture
def built(tmp_path):
    """The sample data and a store of its annotated samples kept outside the data root."""
    root = sample_root(tmp_path)
    store = str(tmp_path / "elsewhere.lmdb")
    assert main(["build", "--data-root", root, "--annotations", annotations(root), "--store", store,
                 "--encoder", "vggt-tiny", "--workers", "0", "--no-progress"]) == 0
    return root, store


@pytest.mark.parametrize("command", [["verify"], ["gc", "--dry-run"]])
def test_a_store_after_the_annotation_files_is_the_store(built, capsys, command):
    root, store = built
    capsys.readouterr()
    code = main([*command, "--data-root", root, "--annotations", annotations(root), store])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "no such file" not in out.err
    if command == ["verify"]:
        assert f"store      {store}\n" in out.out and "result     OK: no problems found" in out.out


def test_verify_with_several_files_after_one_flag_and_the_store_last(built, tmp_path, capsys):
    root, store = built
    samples = json.load(open(annotations(root)))
    first, second = str(tmp_path / "first.json"), str(tmp_path / "second.json")
    json.dump(samples[:2], open(first, "w"))
    json.dump(samples[2:], open(second, "w"))
    capsys.readouterr()
    assert main(["verify", "--data-root", root, "--annotations", first, second, store]) == 0, capsys.readouterr().err
    assert main(["verify", "--data-root", root, "--annotations", first, "--annotations", second, store]) == 0
    # One file of the two: the other's units are unplanned, not missing; still clean.
    assert main(["verify", "--data-root", root, "--annotations", first, store]) == 0


def test_build_keeps_every_file_of_a_repeated_flag(tmp_path, capsys):
    from featstore.store.reader import FeatureStore

    root = sample_root(tmp_path)
    samples = json.load(open(annotations(root)))
    first, second = str(tmp_path / "first.json"), str(tmp_path / "second.json")
    json.dump(samples[:2], open(first, "w"))
    json.dump(samples[2:], open(second, "w"))
    assert main(["build", "--data-root", root, "--annotations", first, "--annotations", second,
                 "--encoder", "vggt-tiny", "--workers", "0", "--no-progress"]) == 0
    with FeatureStore(root) as s:
        assert sorted(s.keys()) == sorted(["misc/portrait.png", "scene_a_step1", "scene_a_step3", "scene_b_step1",
                                           "scene_b_step3"])


def test_a_missing_annotation_file_is_still_named(built, capsys):
    root, store = built
    capsys.readouterr()
    assert main(["verify", "--data-root", root, "--annotations", os.path.join(root, "nope.json"), store]) == 2
    assert "--annotations " + os.path.join(root, "nope.json") + ": no such file" in capsys.readouterr().err


def test_build_has_no_positional_store_so_a_directory_after_the_files_is_still_refused(tmp_path, capsys):
    root = sample_root(tmp_path)
    other = tmp_path / "not_a_store"
    other.mkdir()
    assert main(["build", "--data-root", root, "--annotations", annotations(root), str(other),
                 "--encoder", "vggt-tiny", "--workers", "0", "--no-progress"]) == 2
    assert f"--annotations {other}: no such file" in capsys.readouterr().err
    assert os.listdir(other) == []  # not taken for --store
