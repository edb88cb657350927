"""Packaging and launcher checks: what a user installs and runs before any featstore code."""

from __future__ import annotations

import configparser
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def test_license_file_matches_the_declared_license():
    declared = _setup_cfg()["metadata"]["license"]
    assert declared == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text


def test_lmdb_lower_bound_has_what_verify_uses():
    """verify walks data.mdb with `lmdb.verify` (py-lmdb >= 3.0) before mapping it."""
    reqs = _setup_cfg()["options"]["install_requires"]
    m = re.search(r"^\s*lmdb>=(\d+)\.(\d+)", reqs, re.M)
    assert m, f"no lmdb lower bound in install_requires: {reqs!r}"
    assert (int(m.group(1)), int(m.group(2))) >= (3, 0)
    from lmdb import verify  # noqa: F401  (the installed lmdb has it)


def _fake_bin(tmp_path: Path, devices: int) -> dict:
    """A PATH where `torchrun` prints its arguments as JSON and `python` reports `devices` GPUs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text(
        "#!/usr/bin/env python3\nimport json, sys\nprint('ARGS ' + json.dumps(sys.argv[1:]))\n")
    (bin_dir / "python").write_text(f"#!/usr/bin/env bash\necho {devices}\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("WEIGHTS", "NGPUS", "PYTHON")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


def _launch(env: dict, **extra) -> tuple[str, list[str]]:
    env = dict(env, DATA_ROOT="/data/r2r", **extra)
    out = subprocess.run(["bash", str(ROOT / "scripts" / "build_features.sh")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    args = next(json.loads(line[5:]) for line in out.stdout.splitlines() if line.startswith("ARGS "))
    return out.stdout, args


def test_build_launcher_passes_weights_only_when_set(tmp_path):
    env = _fake_bin(tmp_path, devices=2)
    _, args = _launch(env)
    assert "--weights" not in args
    _, args = _launch(env, WEIGHTS="/ckpt/model.safetensors")
    assert args[args.index("--weights") + 1] == "/ckpt/model.safetensors"


@pytest.mark.parametrize("devices, nproc, says", [(0, "1", "no GPU visible: one CPU process"),
                                                   (3, "3", "3 GPU(s)")])
def test_build_launcher_counts_gpus_truthfully(tmp_path, devices, nproc, says):
    out, args = _launch(_fake_bin(tmp_path, devices=devices))
    assert args[args.index("--nproc-per-node") + 1] == nproc
    assert f"featstore build on {says}:" in out


def test_build_launcher_dry_run_prints_and_runs_nothing(tmp_path):
    env = dict(_fake_bin(tmp_path, devices=1), DATA_ROOT="/data/r2r", DRY_RUN="1")
    res = subprocess.run(["bash", str(ROOT / "scripts" / "build_features.sh")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "featstore build on 1 GPU(s): torchrun" in res.stdout
    assert "ARGS " not in res.stdout


def _encoder_bench(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "encoder_bench.py"), "--smoke", "--quick",
                           "--budget-s", "1", "--out", str(tmp_path / "out"), *extra],
                          cwd=tmp_path, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_encoder_bench_smoke_writes_under_out_and_fails_on_error(tmp_path):
    ok = _encoder_bench(tmp_path)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    res = json.loads((tmp_path / "out" / "encoder_bench.json").read_text())
    assert res["errors"] == []
    assert (tmp_path / "out" / "encoder_bench.md").is_file()
    assert not (tmp_path / "bench_out").exists()
    # A measurement that fails (an invalid torch.compile mode) is an error: exit 1, and it is recorded.
    bad = _encoder_bench(tmp_path, "--smoke-compile", "--compile-mode", "no-such-mode")
    assert bad.returncode == 1
    res = json.loads((tmp_path / "out" / "encoder_bench.json").read_text())
    assert [e["what"] for e in res["errors"]] == ["ours_compiled"]
