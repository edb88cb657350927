"""The store remembers its plan: verify, gc and info plan the annotation files a set was built
from, so that `featstore verify DATA` and `featstore gc --unplanned` after README command 1 keep
every entry training needs (before, they planned one unit per image and gc deleted every
multi-frame entry). Stores written before the record keep opening, with a note and a guard."""

from __future__ import annotations

import json
import os

import pytest

from _training_helpers import annotations, build_store, sample_root


def _cli(argv, capsys):
    from featstore.cli import main

    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _keys(store: str) -> list[str]:
    from featstore.store.reader import FeatureStore

    with FeatureStore(store) as fs:
        return list(fs.keys())


def _drop_record(store: str) -> None:
    """Make the store what featstore wrote before plans were recorded: no "plan" in the manifest."""
    from featstore.store.layout import META_DB, manifest_key, open_env

    env = open_env(store, readonly=False)
    try:
        meta = env.open_db(META_DB)
        with env.begin(write=True, db=meta) as txn:
            manifest = json.loads(bytes(txn.get(manifest_key())))
            manifest.pop("plan")
            txn.put(manifest_key(), json.dumps(manifest, sort_keys=True).encode())
    finally:
        env.close()


def test_after_command_1_verify_and_gc_plan_the_recorded_annotations(tmp_path, capsys):
    root = sample_root(tmp_path)
    store = build_store(root)  # README command 1: --annotations, keys are sample ids
    before = _keys(store)
    rc, out, _ = _cli(["verify", root], capsys)
    assert rc == 0 and "result     OK" in out and "missing" not in out
    assert "plan: 5 units from the recorded plan (annotations annotations.json)" in out
    rc, out, err = _cli(["gc", root, "--unplanned"], capsys)
    assert rc == 0 and "removed 0 entries" in out
    assert _keys(store) == before  # the multi-frame entries training needs are all there
    rc, out, _ = _cli(["info", root], capsys)
    assert "plan         annotations annotations.json" in out


def test_a_store_without_a_record_keeps_opening_with_a_note_and_gc_refuses_to_guess(tmp_path, capsys):
    from featstore.ops.collect import collect_garbage

    root = sample_root(tmp_path)
    store = build_store(root)
    _drop_record(store)
    before = _keys(store)
    rc, out, _ = _cli(["verify", root], capsys)
    assert rc == 1 and "this store records no plan" in out and "rerun the same `featstore build`" in out
    rc, out, err = _cli(["gc", root, "--unplanned"], capsys)
    assert rc != 0 and "hold several frames" in err and "nothing was removed" in err
    assert _keys(store) == before
    # Given the files, gc plans them; rerunning the build records the plan (nothing recomputed).
    assert collect_garbage(root, annotations=[annotations(root)], unplanned=True).removed == 0
    report = _rebuild(root)
    assert report.computed == 0
    rc, out, _ = _cli(["verify", root], capsys)
    assert rc == 0 and "recorded plan" in out


def _rebuild(root: str, files=None):
    from featstore.build.runner import BuildOptions, build

    return build(BuildOptions(data_root=root, annotations=list(files or [annotations(root)]), encoder="vggt-tiny",
                              progress=False, workers=0))


def _subset(root: str, n: int, name: str = "subset.json") -> str:
    with open(annotations(root)) as f:
        samples = json.load(f)
    path = os.path.join(root, name)
    with open(path, "w") as f:
        json.dump(samples[:n], f)
    return path


def test_gc_keeps_the_recorded_plan_unless_replaced_and_says_what_it_removes(tmp_path, capsys):
    root = sample_root(tmp_path)
    store = build_store(root)
    sub = _subset(root, 2)
    rc, out, _ = _cli(["verify", root, "--annotations", sub], capsys)
    assert rc == 0 and "differ from the plan the store records" in out  # one line says it
    rc, out, err = _cli(["gc", root, "--annotations", sub, "--unplanned"], capsys)
    assert "removed 0 entries" in out and len(_keys(store)) == 5  # the recorded plan still needs them
    rc, out, err = _cli(["gc", root, "--annotations", sub, "--unplanned", "--replace-plan", "--dry-run"], capsys)
    assert "would remove 3 entries" in out and len(_keys(store)) == 5
    rc, out, err = _cli(["gc", root, "--annotations", sub, "--unplanned", "--replace-plan"], capsys)
    assert rc == 0 and "removed 3 entries" in out
    assert "featstore gc: removing 3 entries (3 unplanned)" in err and "MB of values" in err  # said before
    assert len(_keys(store)) == 2
    rc, out, _ = _cli(["info", root], capsys)
    assert "plan         annotations subset.json" in out


def test_edited_or_vanished_annotation_files_are_said_and_gc_will_not_guess(tmp_path, capsys):
    root = sample_root(tmp_path)
    sub = _subset(root, 3)
    build_store(root, annotation_files=[sub])
    _subset(root, 4, name="subset.json")  # edited after the build
    rc, out, _ = _cli(["verify", root], capsys)
    assert "recorded annotation file 'subset.json' changed since the build" in out
    assert "1 missing" in out or "missing" in out  # its new sample has no entry yet
    os.remove(sub)
    rc, out, _ = _cli(["verify", root], capsys)
    assert "recorded annotation file 'subset.json' (given as" in out and "is gone" in out
    rc, out, err = _cli(["gc", root, "--unplanned"], capsys)
    assert rc != 0 and "is gone" in err and "nothing was removed" in err


def test_shards_record_their_part_verify_checks_it_and_the_merge_checks_all(tmp_path, capsys):
    """Each shard records its part of the plan: `verify` of a finished shard is clean (the other
    part's units are another host's, not missing), with --annotations it checks every unit and
    says why some are missing; the merged store records the whole plan and verifies clean."""
    from featstore.build.runner import BuildOptions, build
    from featstore.ops.merge import merge_stores
    from featstore.store.reader import FeatureStore

    root = sample_root(tmp_path)
    shards = []
    for i in range(2):
        opts = BuildOptions(data_root=root, annotations=[annotations(root)], encoder="vggt-tiny", progress=False,
                            workers=0, shard=(i, 2))
        build(opts)
        shards.append(opts.store_path())
        build(opts)  # rerun of the same command: the part stays recorded
        with FeatureStore(shards[-1]) as fs:
            assert fs.manifest["plan"]["shard"] == [i, 2]
        rc, out, _ = _cli(["verify", shards[-1], "--data-root", root], capsys)
        assert rc == 0 and "result     OK" in out, out
        assert f"shard {i}/2: this store holds part of the plan, so coverage is checked for its {3 - i} units" in out
        assert f"(annotations annotations.json, shard {i}/2)" in out
    rc, out, _ = _cli(["verify", shards[1], "--data-root", root, "--annotations", annotations(root)], capsys)
    assert rc == 1 and "3 missing" in out and "this store is shard 1/2 of its recorded plan" in out
    out = str(tmp_path / "merged.lmdb")
    merge_stores(out, shards)
    with FeatureStore(out) as fs:
        plan = fs.manifest["plan"]
    assert [f["file"] for f in plan["annotations"]] == ["annotations.json"] and plan["scan"] is False
    assert "shard" not in plan
    rc, text, _ = _cli(["verify", out, "--data-root", root], capsys)
    assert rc == 0 and "result     OK" in text and "/2" not in text and "plan: 5 units" in text


def test_a_part_is_recorded_only_while_the_plan_is_the_one_it_is_part_of():
    from featstore.store.layout import merge_plan

    a = {"unit": "sequence", "scan": False, "annotations": [{"file": "a.json"}]}
    part = dict(a, shard=[1, 2])
    assert merge_plan(None, part)["shard"] == [1, 2]  # the first build of the set
    assert merge_plan(part, part)["shard"] == [1, 2]  # the same command again
    assert "shard" not in merge_plan(part, a)  # the whole plan built into it since
    assert "shard" not in merge_plan(part, dict(a, shard=[0, 2]))  # another part
    assert "shard" not in merge_plan(part, dict(part, annotations=[{"file": "b.json"}]))  # another plan
    assert "shard" not in merge_plan(part, dict(part, scan=True))
