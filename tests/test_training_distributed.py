"""DeepSpeed ZeRO-2 and ZeRO-3 through torchrun on CPU (gloo), as the launch scripts run them:
two ranks log identical losses and summed cache totals; two simulated nodes run the two-node
script's own invocation; a ZeRO-3 checkpoint reloads and continues with the same losses; the
online VGGT stays out of ZeRO-3's partitioning and the optimizer.

Slow: each run starts 2 Python processes that import transformers and DeepSpeed (~25 s here),
and the first DeepSpeed run on a machine JIT-builds its CPU communication extension (g++ and
ninja, 1-2 minutes on 2 cores; cached per venv afterwards, see _training_launch.child_env).
"""

from __future__ import annotations

import json
import math
import os
import sys

import pytest

pytest.importorskip("deepspeed")

from _training_helpers import annotations, build_store, sample_root  # noqa: E402
from _training_launch import (REPO, child_env, free_port, kill_groups, read_metrics, run_group,  # noqa: E402
                              start_group, torchrun, wait_group)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ZERO3 = os.path.join(REPO, "training", "configs", "zero3.json")
RUN_TIMEOUT = 480  # seconds per launch, the first one's JIT build included


@pytest.fixture(scope="module")
def cached_root(tmp_path_factory):
    """A copy of the sample data with its feature store built by `featstore build` (vggt-tiny)."""
    root = sample_root(tmp_path_factory.mktemp("dist"))
    build_store(root)
    return root


def _script_env(root: str, out: str, **extra: str) -> dict:
    """Environment for scripts/train_*.sh: the tiny presets on CPU, bf16, real DataLoader workers."""
    settings = dict(PYTHON=sys.executable, MODEL="qwen2.5-vl-tiny", DATA_ROOT=root, OUTPUT_DIR=out,
                    USE_VGGT_CACHE="true", USE_CPU="true", BF16="true", GRAD_ACCUM="1", BATCH_SIZE="1",
                    LOGGING_STEPS="1", SAVE_STEPS="1000", WORKERS="2", LR="1e-3")
    return child_env(**{**settings, **extra})


def _losses(out: str, rank: int) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(os.path.join(out, f"metrics.rank{rank}.jsonl"))
            if "loss" in r]


def _last_train_log(out: str, rank: int) -> dict:
    return [r for r in read_metrics(os.path.join(out, f"metrics.rank{rank}.jsonl")) if "loss" in r][-1]


def _assert_same_losses_on_both_ranks(out: str, steps: list[int]) -> None:
    rank0, rank1 = _losses(out, 0), _losses(out, 1)
    assert [s for s, _ in rank0] == steps
    assert rank0 == rank1  # exact: the logged loss is the all-gathered mean
    assert all(math.isfinite(loss) for _, loss in rank0)


def _saved_merger(path: str) -> dict:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(path).items() if k.startswith("merger.")}


def test_zero2_two_ranks_through_the_single_node_script(cached_root, tmp_path):
    out = str(tmp_path / "zero2")
    env = _script_env(cached_root, out, NPROC_PER_NODE="2", MAX_STEPS="3", GRADIENT_CHECKPOINTING="true")
    res = run_group(["bash", os.path.join(REPO, "scripts", "train_h800.sh")], env=env, timeout=RUN_TIMEOUT)
    assert res.returncode == 0, res.stdout[-6000:]
    assert "VGGT feature cache enabled: " in res.stdout and "zero2.json" in res.stdout.splitlines()[0]
    _assert_same_losses_on_both_ranks(out, [1, 2, 3])
    for rank in (0, 1):
        # 2 ranks x 3 steps x 1 sample, all from the store; totals summed over the ranks
        last = _last_train_log(out, rank)
        assert (last["cache_hits"], last["cache_misses"], last["cache_hit_rate"]) == (6, 0, 1.0)
    merger = _saved_merger(os.path.join(out, "model.safetensors"))
    assert {"merger.ln_q.weight", "merger.mlp.0.weight", "merger.mlp.2.weight"} <= set(merger)


def test_two_simulated_nodes_through_the_two_node_script(cached_root, tmp_path):
    out = str(tmp_path / "2node")
    port = str(free_port())
    procs = []
    try:
        for node in (0, 1):
            env = _script_env(cached_root, out, NNODES="2", NODE_RANK=str(node), NPROC_PER_NODE="1",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=port, MAX_STEPS="2", WORKERS="0")
            procs.append(start_group(["bash", os.path.join(REPO, "scripts", "train_2node_h800.sh")], env=env,
                                     log_path=str(tmp_path / f"node{node}.out")))
        codes = wait_group(procs, timeout=RUN_TIMEOUT)
    finally:
        kill_groups(procs)
    outputs = [(tmp_path / f"node{n}.out").read_text() for n in (0, 1)]
    assert codes == [0, 0], "\n\n".join(o[-4000:] for o in outputs)
    for node, text in enumerate(outputs):
        first = text.splitlines()[0]
        assert f"--nnodes 2 --node_rank {node} --nproc_per_node 1 --master_addr 127.0.0.1 --master_port {port}" \
            in first and "zero2.json" in first  # ZeRO-2 by default
        assert os.path.isfile(os.path.join(out, f"train.node{node}.log"))
    _assert_same_losses_on_both_ranks(out, [1, 2])
    assert _last_train_log(out, 1)["cache_hits"] == 4


def _zero3_online(root: str, out: str, *extra: str) -> list[str]:
    """torchrun of the real entry (through the probe) under ZeRO-3 with VGGT online."""
    probe = os.path.join(REPO, "tests", "_train_probe.py")
    return torchrun("--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                    probe, "--model_name_or_path", "qwen2.5-vl-tiny", "--data_root", root,
                    "--annotations", annotations(root), "--vggt_encoder", "vggt-tiny", "--vggt_mode", "online_full",
                    "--output_dir", out, "--deepspeed", ZERO3, "--use_cpu", "--bf16", "--max_steps", "4",
                    "--save_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "1",
                    "--learning_rate", "1e-3", "--report_to", "none", *extra)


def test_zero3_online_vggt_checkpoint_reloads_and_vggt_is_not_partitioned(cached_root, tmp_path):
    first, resumed = str(tmp_path / "zero3"), str(tmp_path / "zero3_resumed")
    res = run_group(_zero3_online(cached_root, first), env=child_env(), timeout=RUN_TIMEOUT)
    assert res.returncode == 0, res.stdout[-6000:]
    _assert_same_losses_on_both_ranks(first, [1, 2, 3, 4])

    for rank in (0, 1):
        with open(os.path.join(first, f"probe.rank{rank}.json")) as f:
            probe = json.load(f)
        assert probe["vggt_built"] and probe["vggt_params"] > 0
        assert probe["model_partitioned"] > 0  # ZeRO-3 did partition the model ...
        assert probe["merger_in_optimizer"] == probe["merger_params"] > 0  # ... and optimises the merger
        assert (probe["vggt_partitioned"], probe["vggt_in_optimizer"], probe["vggt_in_module_tree"]) == (0, 0, 0)
        assert probe["vggt_names_in_model"] == []

    # The checkpoint holds the merger gathered to full size (16-bit weights on save), no VGGT.
    ckpt = os.path.join(first, "checkpoint-2")
    merger = _saved_merger(os.path.join(ckpt, "model.safetensors"))
    assert merger["merger.mlp.0.weight"].dim() == 2 and min(v.numel() for v in merger.values()) > 1
    from safetensors import safe_open

    with safe_open(os.path.join(ckpt, "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "vggt" in k or "aggregator" in k]

    # Reload: resuming from checkpoint-2 repeats steps 3 and 4 exactly (model, optimizer, RNG, data).
    res = run_group(_zero3_online(cached_root, resumed, "--resume_from_checkpoint", ckpt), env=child_env(),
                    timeout=RUN_TIMEOUT)
    assert res.returncode == 0, res.stdout[-6000:]
    _assert_same_losses_on_both_ranks(resumed, [3, 4])
    assert _losses(resumed, 0) == _losses(first, 0)[2:]


def test_zero3_with_both_caches_trains_a_model_without_vision_blocks(tmp_path):
    """--use_vggt_cache --use_vision_cache under ZeRO-3 on two ranks: the model built without
    vision blocks partitions, trains the merger, saves visual.merger and no block."""
    from featstore.build.runner import BuildOptions, build
    from safetensors import safe_open

    from _training_helpers import spec_for

    root = sample_root(tmp_path)
    build_store(root)
    report = build(BuildOptions(data_root=root, annotations=[annotations(root)], encoder="qwen2.5-vl-vision-tiny",
                                spec_overrides={"target_size": spec_for().preprocess.target_size}, progress=False,
                                workers=0))
    assert not report.failed and report.computed > 0
    out = str(tmp_path / "zero3_both")
    probe = os.path.join(REPO, "tests", "_train_probe.py")
    cmd = torchrun("--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                   probe, "--model_name_or_path", "qwen2.5-vl-tiny", "--data_root", root,
                   "--annotations", annotations(root), "--use_vggt_cache", "--use_vision_cache",
                   "--output_dir", out, "--deepspeed", ZERO3, "--use_cpu", "--bf16", "--max_steps", "3",
                   "--save_strategy", "no", "--logging_steps", "1", "--per_device_train_batch_size", "1",
                   "--learning_rate", "1e-3", "--report_to", "none")
    res = run_group(cmd, env=child_env(), timeout=RUN_TIMEOUT)
    assert res.returncode == 0, res.stdout[-6000:]
    _assert_same_losses_on_both_ranks(out, [1, 2, 3])
    for rank in (0, 1):
        with open(os.path.join(out, f"probe.rank{rank}.json")) as f:
            probe_report = json.load(f)
        assert probe_report["vision_blocks"] == 0 and not probe_report["vggt_built"]
        assert probe_report["model_partitioned"] > 0
        assert probe_report["merger_in_optimizer"] == probe_report["merger_params"] > 0
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert [k for k in keys if k.startswith("model.visual.merger.") or k.startswith("visual.merger.")]
    assert not [k for k in keys if ".visual.blocks." in k or k.startswith("visual.blocks.")]
