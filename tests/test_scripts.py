"""The launch and monitor scripts: the command each prints is the one it runs, environment
variables switch its flags, bad settings fail naming the variable, and the monitor reads s/it,
data time and cache hit rate from a real short training run's logs."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from _training_launch import REPO

SCRIPTS = os.path.join(REPO, "scripts")
ZERO2 = os.path.join(REPO, "training", "configs", "zero2.json")
ZERO3 = os.path.join(REPO, "training", "configs", "zero3.json")


def _run(script: str, env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("VGGT_", "USE_VGGT", "MASTER_", "NODE_RANK"))}
    full.update(env)
    return subprocess.run(["bash", os.path.join(SCRIPTS, script), *args], env=full, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def _printed(res: subprocess.CompletedProcess) -> list[str]:
    assert res.returncode == 0, res.stderr
    (line,) = [ln for ln in res.stdout.splitlines() if ln.startswith("+ ")]
    return shlex.split(line[2:])


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_single_node_defaults(tmp_path):
    argv = _printed(_run("train_h800.sh", {"DRY_RUN": "1"}))
    assert argv[:6] == ["python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "8"]
    assert argv[6:8] == ["-m", "training.train"]
    assert _flag(argv, "--deepspeed") == ZERO2 and os.path.isfile(ZERO2)
    assert "--use_vggt_cache" not in argv and "--vggt_mode" not in argv  # training derives it from the fusion
    assert _flag(argv, "--bf16") == "true" and _flag(argv, "--gradient_checkpointing") == "true"
    assert "--use_cpu" not in argv and "--vggt_layer" not in argv
    assert _flag(argv, "--tune_vision_merger") == "true" and "--use_vision_cache" not in argv


def test_use_vggt_cache_switches_the_flag():
    argv = _printed(_run("train_h800.sh", {"DRY_RUN": "1", "USE_VGGT_CACHE": "true", "DATA_ROOT": "/d",
                                           "VGGT_CACHE_PATH": "/fast/f.lmdb", "VGGT_LAYER": "23",
                                           "VGGT_FUSION": "last_to_all", "VGGT_SCALE": "0.2"}))
    assert "--use_vggt_cache" in argv and "--vggt_mode" not in argv
    assert _flag(argv, "--vggt_cache_path") == "/fast/f.lmdb" and _flag(argv, "--vggt_cache_miss") == "error"
    assert _flag(argv, "--data_root") == "/d" and _flag(argv, "--annotations") == "/d/annotations.json"
    assert (_flag(argv, "--vggt_layer"), _flag(argv, "--vggt_fusion"), _flag(argv, "--vggt_scale")) == \
        ("23", "last_to_all", "0.2")
    assert "--vggt_weights" not in argv
    # vggt-1b needs its weights with the cache too: the store is checked against their sha256.
    argv = _printed(_run("train_h800.sh", {"DRY_RUN": "1", "USE_VGGT_CACHE": "true", "VGGT_WEIGHTS": "/ckpt/m.pt"}))
    assert "--use_vggt_cache" in argv and _flag(argv, "--vggt_weights") == "/ckpt/m.pt"


_PARSE = """
import json, sys
from training.args import parse_args, resolve_vggt
for argv in json.loads(sys.argv[1]):
    model_args, data_args, train_args = parse_args(argv)
    s = resolve_vggt(model_args, data_args)
    print(json.dumps([s.mode, s.fusion, s.scale, s.cached, bool(train_args.bf16), train_args.deepspeed,
                      train_args.per_device_train_batch_size, model_args.tune_llm, model_args.tune_vision]))
"""


def test_training_accepts_every_flag_the_scripts_pass(tmp_path):
    pytest.importorskip("transformers")
    from _training_helpers import sample_root

    root = sample_root(tmp_path)
    argvs = []
    for env in ({"USE_VGGT_CACHE": "true", "VGGT_LAYER": "23", "VGGT_CACHE_MISS": "compute"},
                {"VGGT_FUSION": "last_to_all", "VGGT_ENCODER": "vggt-tiny", "TUNE_VISION": "true"}):
        argv = _printed(_run("train_h800.sh", {"DRY_RUN": "1", "DATA_ROOT": root, "MODEL": "qwen2.5-vl-tiny",
                                               "USE_CPU": "true", "BATCH_SIZE": "3", **env}))
        argvs.append(argv[argv.index("training.train") + 1:])
    # A fresh interpreter: parsing --deepspeed leaves process-wide DeepSpeed state behind.
    res = subprocess.run([sys.executable, "-c", _PARSE, json.dumps(argvs)], cwd=REPO, capture_output=True,
                         text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    cached, online = (json.loads(line) for line in res.stdout.strip().splitlines()[-2:])
    assert cached == ["cached", "per_image", 1.0, True, True, ZERO2, 3, True, False]
    assert online == ["online_causal_stream", "last_to_all", 0.2, False, True, ZERO2, 3, True, True]


def test_use_vision_cache_passes_the_flag_and_the_store_path():
    argv = _printed(_run("train_h800.sh", {"DRY_RUN": "1", "USE_VISION_CACHE": "true",
                                           "VGGT_CACHE_PATH": "/fast/f.lmdb"}))
    assert "--use_vision_cache" in argv and "--use_vggt_cache" not in argv
    assert _flag(argv, "--vggt_cache_path") == "/fast/f.lmdb"
    res = _run("train_h800.sh", {"DRY_RUN": "1", "USE_VISION_CACHE": "1"})
    assert res.returncode == 2 and res.stderr.strip() == "USE_VISION_CACHE=1: set it to true or false"


def test_bad_use_vggt_cache_names_the_variable():
    res = _run("train_h800.sh", {"DRY_RUN": "1", "USE_VGGT_CACHE": "yes"})
    assert res.returncode == 2 and res.stderr.strip() == "USE_VGGT_CACHE=yes: set it to true or false"


def test_two_node_reads_the_rendezvous_from_the_environment():
    res = _run("train_2node_h800.sh", {"DRY_RUN": "1"})
    assert res.returncode != 0 and "MASTER_ADDR: set MASTER_ADDR to the address of node 0" in res.stderr
    res = _run("train_2node_h800.sh", {"DRY_RUN": "1", "MASTER_ADDR": "10.1.2.3"})
    assert res.returncode != 0 and "NODE_RANK: set NODE_RANK" in res.stderr
    argv = _printed(_run("train_2node_h800.sh", {"DRY_RUN": "1", "MASTER_ADDR": "10.1.2.3", "NODE_RANK": "1",
                                                 "MASTER_PORT": "29123", "DEEPSPEED": ZERO3}))
    assert argv[3:13] == ["--nnodes", "2", "--node_rank", "1", "--nproc_per_node", "8",
                          "--master_addr", "10.1.2.3", "--master_port", "29123"]
    assert _flag(argv, "--deepspeed") == ZERO3
    argv = _printed(_run("train_2node_h800.sh", {"DRY_RUN": "1", "MASTER_ADDR": "h", "NODE_RANK": "0"}))
    assert _flag(argv, "--deepspeed") == ZERO2  # ZeRO-2 by default


@pytest.mark.parametrize("script,env", [("train_h800.sh", {}),
                                        ("train_2node_h800.sh", {"MASTER_ADDR": "h", "NODE_RANK": "0"})])
def test_printed_command_is_the_one_run_and_logged(tmp_path, script, env):
    # PYTHON is a stand-in that records its argv and prints a line, so the real launch is observed.
    record = tmp_path / "argv.json"
    fake = tmp_path / "fakepython"
    fake.write_text(f"#!/usr/bin/env python3\nimport json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n"
                    "print('training output line')\n")
    fake.chmod(0o755)
    out = tmp_path / "run"
    res = _run(script, {"PYTHON": str(fake), "OUTPUT_DIR": str(out), "DEEPSPEED": "none", **env})
    printed = _printed(res)
    assert printed[0] == str(fake) and printed[1:] == json.loads(record.read_text())
    assert "--deepspeed" not in printed and _flag(printed, "--output_dir") == str(out)
    log = out / ("train.log" if script == "train_h800.sh" else "train.node0.log")
    assert log.read_text() == "training output line\n" and "training output line" in res.stdout


def _fake_nvidia_smi(tmp_path) -> str:
    """A stand-in nvidia-smi (there is no GPU here) printing what the real one prints for the query."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '0, 31245 MiB, 81559 MiB'\necho '1, 30990 MiB, 81559 MiB'\n")
    smi.chmod(0o755)
    return str(bin_dir)


def test_monitor_reads_a_real_run(tmp_path, capsys):
    pytest.importorskip("transformers")
    from _tiny_trainer import build

    out = tmp_path / "run"
    trainer = build(str(out), max_steps=4, logging_steps=2)
    trainer.train()
    (out / "train.log").write_text(capsys.readouterr().out)  # what the launch scripts tee there
    last = [r for r in trainer.state.log_history if "loss" in r][-1]
    env = {"PYTHON": sys.executable}

    res = _run("monitor_training.sh", {**env, "PATH": "/usr/bin:/bin"}, str(out))
    assert res.returncode == 0, res.stderr
    line, gpu = res.stdout.splitlines()
    assert line.startswith(f"step {last['step']}  s/it {last['step_time']:.4g}  data_time {last['data_time']:.4g} s")
    rate = f"cache hit rate {last['cache_hit_rate']:.1%} ({last['cache_hits']} hits, {last['cache_misses']} misses"
    assert rate in line
    assert "[metrics files, ranks 1]" in line and gpu == "GPU memory: nvidia-smi not found"

    # Without metrics files it falls back to the printed log lines; nvidia-smi where present.
    for path in out.glob("metrics.rank*.jsonl"):
        path.unlink()
    res = _run("monitor_training.sh", {**env, "PATH": _fake_nvidia_smi(tmp_path) + ":/usr/bin:/bin"}, str(out))
    assert res.returncode == 0, res.stderr
    line, *gpus = res.stdout.splitlines()
    assert f"cache hit rate {last['cache_hit_rate']:.1%}" in line and "[log lines, ranks 1]" in line
    # printed lines round to 4 significant digits
    assert float(re.search(r"data_time (\S+) s", line).group(1)) == pytest.approx(last["data_time"], rel=2e-3)
    assert gpus == ["GPU memory (index, used, total): 0, 31245 MiB, 81559 MiB",
                    "GPU memory (index, used, total): 1, 30990 MiB, 81559 MiB"]


def test_monitor_refuses_a_missing_directory(tmp_path):
    res = _run("monitor_training.sh", {}, str(tmp_path / "nope"))
    assert res.returncode == 2 and f"OUTPUT_DIR={tmp_path / 'nope'} is not a directory" in res.stderr
