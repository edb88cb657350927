"""What a new user hits first: a wrong --store, an empty data root, naming a store by its data
root in every subcommand, two builds on one store, counts in reports, logging. Real CLI
subprocesses where the failure was a crash or a silent wrong result."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from _featstore_helpers import FEATSTORE, REPO, make_images, run_cli

UNITS = 6


def _data(tmp_path, n=UNITS, name="data") -> str:
    data = str(tmp_path / name)
    make_images(data, [f"s{i // 4}/{i:03d}.png" for i in range(n)])
    return data


def _build(data: str, **kw):
    from featstore.build.runner import BuildOptions, build

    return build(BuildOptions(data_root=data, encoder="vggt-tiny", workers=0, progress=False, **kw))


# -- a wrong --store is refused ------------------------------------------------------------------
def test_store_pointed_at_an_image_folder_is_refused_and_the_folder_stays_planned(tmp_path):
    data = _data(tmp_path)
    before = sorted(os.listdir(os.path.join(data, "s0")))
    out = run_cli("build", "--data-root", data, "--store", os.path.join(data, "s0"), "--encoder", "vggt-tiny",
                  "--no-progress", "--workers", "0")
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"featstore build: error: store path {os.path.join(data, 's0')} is a folder that holds 4 other entries "
        "(000.png, 001.png, 002.png, ...) and no featstore store: pass a new or empty directory as the store "
        "(--store), or an existing store")
    assert sorted(os.listdir(os.path.join(data, "s0"))) == before  # no data.mdb written into it
    assert _build(data).planned == UNITS  # the next plain build still plans the whole folder


def test_store_pointed_at_a_file_is_refused(tmp_path):
    data = _data(tmp_path, 1)
    target = os.path.join(data, "s0", "000.png")
    out = run_cli("build", "--data-root", data, "--store", target, "--encoder", "vggt-tiny", "--no-progress")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert f"store path {target} is a file, not a store directory" in out.stderr


# -- nothing to build is an error ----------------------------------------------------------------
def test_an_empty_data_root_fails_and_leaves_no_store(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = run_cli("build", "--data-root", str(empty), "--encoder", "vggt-tiny", "--no-progress")
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == (f"featstore build: error: no images found under {empty} (looked for .jpg, "
                                  ".jpeg, .png, .bmp, .webp, .tif, .tiff files); check --data-root")
    assert os.listdir(empty) == []


def test_skipped_annotation_samples_are_counted_and_named(tmp_path):
    from featstore.errors import PlanError

    data = _data(tmp_path, 2)
    videos = tmp_path / "videos.json"
    videos.write_text(json.dumps([{"id": "v1", "videos": ["a.mp4"]}, {"id": "t1", "conversations": []}]))
    with pytest.raises(PlanError, match=r"no sample with images in --annotations .*videos.json: 2 samples skipped: "
                       r".*sample 0 \(id 'v1'\): a 'videos' sample \(only images are encoded\); .*sample 1 \(id 't1'\): "
                       r"no 'images' or 'image' field"):
        _build(data, annotations=[str(videos)])
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps([{"image": "s0/000.png"}, {"id": "v1", "videos": ["a.mp4"]}]))
    report = _build(data, annotations=[str(mixed)])
    assert report.computed == 1
    assert report.skipped == [{"sample": f"{mixed} sample 1 (id 'v1')",
                               "reason": "a 'videos' sample (only images are encoded)"}]


# -- one way to name a store ----------------------------------------------------------------------
def test_every_subcommand_finds_the_store_from_data_root(tmp_path):
    data = _data(tmp_path)
    _build(data)
    verify = run_cli("verify", "--data-root", data, "--json")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert json.loads(verify.stdout)["ok"] is True
    info = run_cli("info", "--data-root", data, "--json")
    assert info.returncode == 0 and json.loads(info.stdout)["entries"] == UNITS, info.stderr
    gc = run_cli("gc", "--data-root", data, "--dry-run", "--json")
    assert gc.returncode == 0, gc.stderr
    copy = run_cli("copy", "--data-root", data, str(tmp_path / "copy"), "--json")
    assert copy.returncode == 0 and json.loads(copy.stdout)["entries"] == UNITS, copy.stderr


def test_merge_reports_counts_and_json(tmp_path):
    data = _data(tmp_path)
    for i in range(2):
        _build(data, shard=(i, 2))
    shards = [os.path.join(data, f"vggt_features.shard-{i}-of-2.lmdb") for i in range(2)]
    out = run_cli("merge", "--data-root", data, *shards, shards[0], "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert [r["entries"] for r in report["merged"]] == [3, 3, 3]
    assert (report["read"], report["written"], report["identical"], report["entries"]) == (9, 6, 3, 6)
    assert report["out"] == os.path.join(data, "vggt_features.lmdb")
    again = run_cli("merge", os.path.join(data, "vggt_features.lmdb"), shards[1], "--no-progress")
    assert again.returncode == 0, again.stderr
    assert again.stderr.strip().endswith(f"1 shards (3 entries) -> {os.path.join(data, 'vggt_features.lmdb')}: "
                                         f"0 written, 3 identical skipped; 6 entries, "
                                         f"{report['bytes'] / 1e6:.1f} MB in the store")


# -- two builds on one store ----------------------------------------------------------------------
def test_a_second_build_is_refused_naming_the_running_one(tmp_path):
    from featstore.store.lock import BuildLock, prepare_store_dir

    data = _data(tmp_path, 2)
    store = os.path.join(data, "vggt_features.lmdb")
    prepare_store_dir(store)
    with BuildLock(store):  # this process plays the running build
        info = json.load(open(os.path.join(store, "featstore-build.lock")))
        out = run_cli("build", "--data-root", data, "--encoder", "vggt-tiny", "--no-progress")
    assert out.returncode == 2, out.stderr
    assert (f"{store} is being written by another build (pid {os.getpid()} on host {info['host']}, "
            f"started {info['started']}); wait for it to finish") in out.stderr
    assert not os.path.exists(os.path.join(store, "data.mdb"))  # refused before anything was written


def _lock_holder(store: str, timeout: float = 120) -> dict:
    path = os.path.join(store, "featstore-build.lock")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            raw = open(path).read()
            if raw.strip():
                return json.loads(raw)
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    raise AssertionError(f"no build took {path}")


def test_two_concurrent_builds_do_the_work_once(tmp_path):
    n = 16
    data = _data(tmp_path, n)
    store = os.path.join(data, "vggt_features.lmdb")
    args = [*FEATSTORE, "build", "--data-root", data, "--encoder", "vggt-tiny", "--no-progress", "--json",
            "--workers", "0", "--batch-frames", "1", "--commit-every", "1"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
             for _ in range(2)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    computed = 0
    for stdout, stderr, rc in results:
        if rc == 0:
            computed += json.loads(stdout)["computed"]
        else:  # started while the other one held the store
            assert rc == 2 and "is being written by another build (pid " in stderr, stderr
    assert computed == n, results
    from featstore.ops.verify import verify_store

    assert verify_store(store, data_root=data).exit_code == 0


def test_the_lock_of_a_killed_build_is_taken_over(tmp_path):
    data = _data(tmp_path, 24)
    store = os.path.join(data, "vggt_features.lmdb")
    proc = subprocess.Popen([*FEATSTORE, "build", "--data-root", data, "--encoder", "vggt-tiny", "--no-progress",
                             "--workers", "0", "--batch-frames", "1", "--commit-every", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO, start_new_session=True)
    holder = _lock_holder(store)
    assert holder["pid"] == proc.pid
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    out = run_cli("build", "--data-root", data, "--encoder", "vggt-tiny", "--no-progress", "--workers", "0")
    assert out.returncode == 0, out.stderr
    assert (f"featstore: taking over the build lock of pid {proc.pid} on host {holder['host']}, started "
            f"{holder['started']}, which is no longer running (killed?)") in out.stderr
    assert open(os.path.join(store, "featstore-build.lock")).read() == ""  # released cleanly


_HOLDER_WITH_A_CHILD = r"""
import os, signal, sys, time
from featstore.store.lock import BuildLock, prepare_store_dir
prepare_store_dir(sys.argv[1])
lock = BuildLock(sys.argv[1]).acquire()
child = os.fork()
if child == 0:  # a decode worker that outlives its build for a while (SIGKILL is delivered late)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(os.getpid(), flush=True)  # after os.fork() has returned here: its after-fork hooks ran
    time.sleep(60)
    os._exit(0)
time.sleep(60)
"""


def test_a_forked_child_of_a_killed_build_does_not_hold_its_lock(tmp_path):
    from featstore.store.lock import BuildLock

    store = str(tmp_path / "s")
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER_WITH_A_CHILD, store], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    child = int(proc.stdout.readline())
    try:
        proc.kill()
        proc.wait()
        os.kill(child, 0)  # the child still lives, with its copy of the lock's descriptor
        with BuildLock(store):  # the next build takes the lock at once
            pass
    finally:
        os.kill(child, signal.SIGKILL)


# -- counts under torchrun ------------------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_reports_each_unit_once(tmp_path):
    data = _data(tmp_path, 4)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "featstore",
           "build", "--data-root", data, "--encoder", "vggt-tiny", "--no-progress", "--workers", "0", "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert (report["planned"], report["missing"], report["computed"]) == (4, 4, 4)
    from featstore.ops.info import store_info

    assert store_info(data)["last_build"]["planned"] == 4
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert rerun.returncode == 0, rerun.stderr
    again = json.loads(rerun.stdout)
    assert (again["planned"], again["fresh"], again["computed"]) == (4, 4, 0)


# -- a library logs -------------------------------------------------------------------------------
def test_build_reports_through_the_featstore_logger(tmp_path, caplog):
    data = _data(tmp_path, 2)
    with caplog.at_level(logging.INFO, logger="featstore"):
        _build(data)
    plan = [r for r in caplog.records if r.name == "featstore" and "units planned" in r.getMessage()]
    assert len(plan) == 1 and plan[0].levelno == logging.INFO


def test_verify_logs_its_outcome_once_and_the_cli_prints_no_second_summary(tmp_path, caplog):
    from featstore.ops.verify import verify_store

    data = _data(tmp_path, 2)
    _build(data)
    with caplog.at_level(logging.INFO, logger="featstore"):
        assert verify_store(data).ok
    outcome = [r for r in caplog.records if r.name == "featstore" and r.getMessage().startswith("featstore verify:")]
    assert len(outcome) == 1 and outcome[0].levelno == logging.INFO and ": ok, " in outcome[0].getMessage()
    cli = run_cli("verify", "--data-root", data)
    assert cli.returncode == 0, cli.stderr
    assert "result     OK" in cli.stdout and "featstore verify:" not in cli.stderr


_WRITER = r"""
import sys, torch
from featstore.store.writer import StoreWriter
with StoreWriter(sys.argv[1], handle_signals=False, batch_entries=1) as w:
    for key in ("a.jpg", "b.jpg"):
        w.put(key, {"features": torch.zeros(1, 2, 2)})
        print(key, flush=True)
        sys.stdin.readline()
    w.finish()
    print("finished", flush=True)
"""


def test_manifest_follows_a_build_in_progress(tmp_path):
    from featstore import FeatureStore

    path = str(tmp_path / "s")
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=REPO)

    def step() -> str:
        line = writer.stdout.readline().strip()
        return line

    assert step() == "a.jpg"
    store = FeatureStore(path)
    assert store.manifest["entries"] == 1 and store.manifest["build"]["state"] == "in_progress"
    writer.stdin.write("\n")
    writer.stdin.flush()
    assert step() == "b.jpg"
    assert store.manifest["entries"] == 2  # read when asked, not when the store was opened
    writer.stdin.write("\n")
    writer.stdin.flush()
    assert step() == "finished"
    assert store.manifest["build"]["state"] == "complete"
    assert writer.wait(timeout=60) == 0
    store.close()


# -- CPU builds: torch thread counts ------------------------------------------------------------
def test_cpu_build_thread_counts(tmp_path, monkeypatch):
    """The CPU encoder runs on the cores the decode workers leave (the measured choice,
    docs/BENCHMARKS.md), the workers on one thread each, and the caller's setting comes back."""
    import torch

    import featstore.build.runner as fb
    import featstore.build.encode as fe
    from featstore.encoders import get_encoder

    data = _data(tmp_path, 4)
    seen = tmp_path / "threads"
    seen.mkdir()
    read_unit_frames = fe.read_unit_frames

    def recording_read_unit_frames(*args, **kw):  # runs in the forked decode workers
        (seen / f"worker-{os.getpid()}").write_text(str(torch.get_num_threads()))
        return read_unit_frames(*args, **kw)

    monkeypatch.setattr(fe, "read_unit_frames", recording_read_unit_frames)
    encoder = get_encoder("vggt-tiny")
    encoder_threads = []

    def recording(encode):  # the build calls encode, or encode_indexed with frame reuse
        def call(*args):
            encoder_threads.append(torch.get_num_threads())
            return encode(*args)
        return call

    encoder.encode, encoder.encode_indexed = recording(encoder.encode), recording(encoder.encode_indexed)
    before = torch.get_num_threads()
    report = fb.build(fb.BuildOptions(data_root=data, encoder="vggt-tiny", workers=2, progress=False),
                      encoder=encoder)
    assert report.computed == 4
    assert {p.read_text() for p in seen.iterdir()} == {"1"}
    assert set(encoder_threads) == {max(1, (os.cpu_count() or 1) - 2)}
    assert torch.get_num_threads() == before


def test_cli_logging_follows_the_current_stderr(tmp_path, monkeypatch, caplog):
    """`main()` run in-process twice, the first stderr closed in between (as pytest's capture and
    embedding callers do): the second run's messages reach the new stderr, logging reports no
    error about a closed file, and after `main()` featstore's logger is as it was (a library call
    then prints nothing on stderr)."""
    import io

    from featstore.cli import main

    data = _data(tmp_path, 2)
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    assert main(["build", "--data-root", data, "--encoder", "vggt-tiny", "--no-progress", "--workers", "0"]) == 0
    first.close()
    monkeypatch.setattr(sys, "stderr", second)
    assert main(["build", "--data-root", data, "--encoder", "vggt-tiny", "--no-progress", "--workers", "0"]) == 0
    text = second.getvalue()
    assert "units planned" in text and "Logging error" not in text
    import logging as _logging

    assert _logging.getLogger("featstore").handlers == []
    _build(data)
    assert second.getvalue() == text
