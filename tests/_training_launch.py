"""Launch helpers for the training tests: free ports, and subprocesses in their own process
group with a bounded run time (the whole group is killed on timeout, so no torchrun worker
outlives its test)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment with the repository and the tests' helpers importable and one
    thread per process (two ranks on two cores must not oversubscribe), plus `extra`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, os.path.join(REPO, "tests"), env.get("PYTHONPATH", "")])
    # torch's JIT extension build (DeepSpeed's CPU ops, first run) runs `ninja` from PATH: the
    # training extra installs it beside this interpreter, which need not be on PATH.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    # DeepSpeed's JIT-built extension is cached per venv: a cache shared with another venv (same
    # HOME) is rebuilt whenever that one builds into it, ~2 minutes on 2 busy cores.
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra)
    return env


def start_group(cmd: list[str], *, env=None, cwd=REPO, log_path=None) -> subprocess.Popen:
    """Start `cmd` as the leader of a new process group, output to `log_path` (or piped)."""
    out = open(log_path, "w") if log_path else subprocess.PIPE
    return subprocess.Popen(cmd, env=env or child_env(), cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait_group(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """Wait for every process of `procs` within `timeout` seconds in all; on timeout kill each
    one's process group and raise with the command."""
    import time

    deadline = time.monotonic() + timeout
    codes = []
    try:
        for p in procs:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired as e:
        kill_groups(procs)
        raise AssertionError(f"{e.cmd} ran past {timeout:.0f} s; its process group was killed") from None
    return codes


def kill_groups(procs: list[subprocess.Popen]) -> None:
    """SIGKILL each process's group (each was started with its own session)."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def run_group(cmd: list[str], *, timeout: float, env=None, cwd=REPO) -> subprocess.CompletedProcess:
    """Run `cmd` in its own process group; kill the group after `timeout` s. Returns its output."""
    p = start_group(cmd, env=env, cwd=cwd)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_groups([p])
        raise AssertionError(f"{cmd} ran past {timeout:.0f} s; its process group was killed") from None
    return subprocess.CompletedProcess(cmd, p.returncode, out, "")


def torchrun(*args: str) -> list[str]:
    """The torchrun command of this interpreter."""
    return [sys.executable, "-m", "torch.distributed.run", *args]


def read_metrics(path: str) -> list[dict]:
    """Records of one rank's metrics.rank<R>.jsonl."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
