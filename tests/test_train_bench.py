"""The training benchmarks run for real in their smoke modes (tiny presets on CPU): every mode of
train_bench.py steps through the project's model and data code and reports its fields; the
DeepSpeed runs of train_zero_bench.py go through `python -m training.train` and prove that
ZeRO-3 leaves the online VGGT alone. Plus the pieces whose arithmetic the GPU numbers rest on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from _training_launch import child_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")
sys.path.insert(0, BENCH)

PHASES = ("vggt", "vision", "merger", "llm_forward", "forward_other", "backward", "optimizer")


def _run(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    # The training tests' environment: DeepSpeed's JIT-built CPU extension comes from (and goes
    # to) the same per-venv cache as test_training_*'s runs, so a fresh CI machine builds it once
    # (~2 minutes on 2 cores), not once here into ~/.cache and again there.
    env = child_env(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, os.path.join(BENCH, script), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """One work folder (frames, VGGT checkpoint, store) shared by both benchmarks, as on the GPU."""
    return str(tmp_path_factory.mktemp("bench_work"))


# ---- cheap: the arithmetic ---------------------------------------------------------------------


def test_step_clock_splits_a_step_into_phases():
    import torch
    from _step_timing import StepClock

    clock = StepClock(torch.device("cpu"))
    # marks at known times (ms): two VGGT spans, one vision span, merger, llm start, ends
    marks = [("forward:start", 0), ("vggt:start", 1), ("vggt:end", 4), ("vggt:start", 5), ("vggt:end", 7),
             ("vision:start", 8), ("vision:end", 18), ("merger:start", 18), ("merger:end", 20),
             ("llm:start", 21), ("forward:end", 51), ("backward:end", 111), ("optimizer:end", 121)]
    clock.marks = [(n, t / 1e3) for n, t in marks]
    got = clock.phases()
    want = {"vggt": 5, "vision": 10, "merger": 2, "llm_forward": 30, "forward_other": 51 - 47, "backward": 60,
            "optimizer": 10, "device_step": 121}
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-6), k


def test_budget_alarm_interrupts_a_long_step():
    from _step_timing import BudgetExceeded, alarm_at

    t0 = time.monotonic()
    with pytest.raises(BudgetExceeded):
        with alarm_at(time.monotonic() + 0.3):
            while time.monotonic() - t0 < 10:  # a step that would run far past the budget
                sum(range(1000))
    assert time.monotonic() - t0 < 5


def test_zero_run_check_flags_a_partitioned_or_gathered_vggt():
    from train_zero_bench import check_run

    good = {"logged_steps": 3, "probe": {"vggt_built": True, "vggt_partitioned": 0, "vggt_in_module_tree": 0,
                                          "vggt_empty_local": 0, "vggt_gathered": 0, "model_partitioned": 10,
                                          "zero3_fetched_params": 10}}
    assert check_run("zero3:online_full", "zero3", "online_full", good, 3) == []
    for key in ("vggt_partitioned", "vggt_gathered", "vggt_in_module_tree"):
        bad = json.loads(json.dumps(good))
        bad["probe"][key] = 2
        assert check_run("zero3:online_full", "zero3", "online_full", bad, 3), key
    no_zero3 = json.loads(json.dumps(good))
    no_zero3["probe"]["model_partitioned"] = 0
    assert check_run("zero3:online_full", "zero3", "online_full", no_zero3, 3)
    cached = {"logged_steps": 3, "cache_hits": 2, "cache_misses": 1, "probe": {"vggt_built": False}}
    assert check_run("zero2:cached", "zero2", "cached", cached, 3)


# ---- slow: the benchmarks themselves ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_bench_smoke_runs_every_mode(work, tmp_path):
    out = str(tmp_path / "out")
    res = _run("train_bench.py", "--smoke", "--out", out, "--work", work, "--budget-s", "400",
               "--paired-other", "unpinned,float32_pixels,no_slots", timeout=560)
    assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]
    with open(os.path.join(out, "train_bench.json")) as f:
        r = json.load(f)
    assert r["complete"] and r["smoke"] and r["notes"] == []
    assert r["model"]["tower_index_from_workers"] is True  # the collator makes the tower index, as training's does
    assert list(r["modes"]) == ["floor", "cached", "cached_blocking", "online_full", "online_causal_stream",
                                "vision_floor", "vision_cached"]
    for name, m in r["modes"].items():
        assert m["timed_steps"] == 2 and m["step_ms"] > 0 and m["data_ms"] >= 0, name
        assert set(m["phases_ms"]) == set(PHASES) | {"device_step"}, name
        for phase in ("vision", "merger", "llm_forward", "backward", "optimizer"):
            assert m["phases_ms"][phase] > 0, (name, phase)
        if name in ("cached", "cached_blocking", "online_full", "online_causal_stream"):
            assert m["vggt_parameters_in_model"] == 0, name  # VGGT never enters the model's module tree
        online = name.startswith("online")
        assert (m["phases_ms"]["vggt"] > 0) == online, name
        assert m["step_ms"] >= m["phases_ms"]["device_step"] * 0.99, name  # the wall step holds the device step
    assert r["modes"]["floor"]["data_ms"] < 1.0  # no data path at all
    slots = r["checks"]["batch_slots"]  # training's loader (slots) gives the ordinary loader's batches
    assert slots["ok"] and slots["unmatched"] == 0 and slots["through_slots"] == slots["batches"] > 0, slots
    cached = r["modes"]["cached"]
    assert (cached["cache_hits"], cached["cache_misses"]) == (3, 0)  # 1 warm-up + 2 timed, all from the store
    assert len(cached["blocks_step_ms"]) == 1 and r["cached_copies"]["cached_blocking"] == "blocking"
    assert r["summary"]["cached_blocking_over_floor"] > 0
    assert r["modes"]["online_full"]["vggt_parameters"] > 0
    both = r["modes"]["vision_cached"]
    assert both["vision_block_parameters"] == 0 and (both["cache_hits"], both["cache_misses"]) == (3, 0)
    # the vision phase is visual.merger alone there, far less than the tower's blocks on the cached step
    assert both["phases_ms"]["vision"] < r["modes"]["cached"]["phases_ms"]["vision"]
    vb = r["vision_build"]
    assert vb["build"]["computed"] == vb["images"] > 0 and vb["bare_frames_per_s"] > 0 and vb["bytes_per_image"] > 0
    assert r["summary"]["cached_over_floor"] > 0 and "speedup_cached_vs_online_causal_stream" in r["summary"]
    paired = r["paired"]["cached_vs_floor"]
    assert paired["pairs"] == 4 and len(paired["groups_ms"]) == 4
    arms = {"read", "floor", "settled", "loaded", "read_unpinned", "loaded_unpinned", "read_float32_pixels",
            "loaded_float32_pixels", "read_no_slots", "loaded_no_slots"}
    assert all(set(g) == arms and min(g.values()) > 0 for g in paired["groups_ms"])
    for key in ("ratio", "settled_ratio", "loaded_ratio", "read_unpinned_ratio", "loaded_float32_pixels_ratio"):
        low, high = paired[key + "_ci95"]
        assert low <= high and paired[key] > 0, key
    assert paired["batch"]["pixel_values"].startswith("float32") and paired["batch"]["total_mb"] > 0
    assert r["summary"]["paired_cached_vs_floor"] == paired["ratio"]
    vision_paired = r["paired"]["vision_cached_vs_vision_floor"]
    assert vision_paired["pairs"] == 4 and "pixel_values" not in vision_paired["batch"]
    att = r["vision_attention"]
    assert list(att) == ["sdpa", "one_call", "eager", "flash_attention_2"]
    for impl in ("sdpa", "one_call", "eager"):
        assert att[impl]["step_ms"] > 0 and 0 < att[impl]["vision_share"] < 1, impl
    assert att["flash_attention_2"].get("error") or att["flash_attention_2"]["step_ms"] > 0
    with open(os.path.join(out, "train_bench.md")) as f:
        table = f.read()
    for name in r["modes"]:
        assert f"| {name} | " in table
    assert ("| eager | " in table) and "cached_over_floor" in table
    if r["chart"].startswith("chart:"):
        assert os.path.getsize(os.path.join(out, "train_bench.png")) > 1000
    else:
        assert "matplotlib" in r["chart"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_train_zero_bench_smoke_zero3_leaves_vggt_alone(work, tmp_path):
    pytest.importorskip("deepspeed")
    out = str(tmp_path / "out")
    # ZeRO-3 with the online VGGT only: a ZeRO-2 run from the store (the benchmark's other kind)
    # is what test_training_distributed.py::test_zero2_two_ranks_through_the_single_node_script
    # runs (cache hits 6, misses 0, on two ranks), and check_run's rules for it are
    # test_zero_run_check_flags_a_partitioned_or_gathered_vggt's.
    res = _run("train_zero_bench.py", "--smoke", "--out", out, "--work", work, "--budget-s", "800",
               "--runs", "zero3:online_full", timeout=860)
    assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]
    with open(os.path.join(out, "train_zero_bench.json")) as f:
        r = json.load(f)
    assert r["complete"] and list(r["runs"]) == ["zero3:online_full"]
    for name, run in r["runs"].items():
        assert run["exit"] == 0 and run["logged_steps"] == 3 and run["step_ms"] > 0 and run["data_ms"] >= 0, name
    probe = r["runs"]["zero3:online_full"]["probe"]
    assert probe["vggt_built"] and probe["vggt_params"] > 0
    assert (probe["vggt_partitioned"], probe["vggt_gathered"], probe["vggt_in_module_tree"]) == (0, 0, 0)
    assert probe["zero3_fetch_instrumented"] and probe["zero3_fetch_calls"] > 0
    assert probe["model_partitioned"] == probe["model_params"] > 0  # ZeRO-3 did partition the model ...
    assert probe["zero3_fetched_params"] > 0  # ... and gathered it
    with open(os.path.join(out, "train_zero_bench.md")) as f:
        assert "| zero3:online_full | " in f.read()
