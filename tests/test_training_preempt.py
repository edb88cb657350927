"""Preemption: SIGINT / SIGTERM during `python -m training.train` save a checkpoint at the next step
boundary, print one line naming it and the flag that resumes, and exit 130 / 143; the resumed run
logs the same losses as an uninterrupted one.

Real subprocesses on CPU with the tiny presets; the signal is sent once the run has logged step 2
(its metrics file), so it lands mid-run."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest
import torch

from _training_helpers import annotations, build_store, sample_root
from _training_launch import REPO, child_env, free_port, kill_groups, read_metrics, start_group, torchrun, wait_group

pytestmark = pytest.mark.timeout(900)

STEPS = 10
RUN_TIMEOUT = 300  # seconds per launch


@pytest.fixture(scope="module")
def cached_root(tmp_path_factory):
    root = sample_root(tmp_path_factory.mktemp("preempt"))
    build_store(root)
    return root


def _argv(root: str, out: str, *extra: str) -> list[str]:
    return ["--data_root", root, "--annotations", annotations(root), "--use_vggt_cache", "--output_dir", out,
            "--max_steps", str(STEPS), "--per_device_train_batch_size", "2", "--logging_steps", "1",
            "--save_strategy", "no", "--seed", "0", "--learning_rate", "2e-3", "--use_cpu", "--report_to", "none",
            "--disable_tqdm", "true", *extra]


def _train(*args: str) -> list[str]:
    return [sys.executable, "-m", "training.train", *args]


def _logged_steps(out: str, rank: int = 0) -> list[int]:
    path = os.path.join(out, f"metrics.rank{rank}.jsonl")
    if not os.path.exists(path):
        return []
    try:
        return [r["step"] for r in read_metrics(path) if "loss" in r]
    except json.JSONDecodeError:  # a line being written
        return []


def _wait_for_step(proc, out: str, step: int, timeout: float = RUN_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while max(_logged_steps(out), default=0) < step:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before logging step {step}:\n"
                                 + _output(proc)[-3000:])
        if time.monotonic() > deadline:
            kill_groups([proc])
            raise AssertionError(f"no step {step} logged within {timeout:.0f} s")
        time.sleep(0.05)


def _output(proc) -> str:
    return open(proc.log_path).read()


def _start(cmd: list[str], log_path: str):
    """`cmd` in its own process group, its output to `log_path` (a pipe nobody reads could fill)."""
    proc = start_group(cmd, env=child_env(), log_path=log_path)
    proc.log_path = log_path
    return proc


def _finish(proc) -> str:
    """Wait for `proc` (killing its group past RUN_TIMEOUT) and return its output."""
    wait_group([proc], timeout=RUN_TIMEOUT)
    return _output(proc)


def _losses(out: str, rank: int = 0) -> dict[int, float]:
    """step -> logged loss, over every run that wrote into `out` (a resumed run appends)."""
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(out, f"metrics.rank{rank}.jsonl")) if "loss" in r}


def _run(cmd: list[str], log_path: str) -> tuple[int, str]:
    proc = _start(cmd, log_path)
    try:
        return proc.wait(timeout=RUN_TIMEOUT), _output(proc)
    finally:
        kill_groups([proc])


@pytest.fixture(scope="module")
def uninterrupted(cached_root, tmp_path_factory):
    """step -> loss of the same run, never interrupted."""
    base = tmp_path_factory.mktemp("straight")
    out = str(base / "out")
    code, text = _run(_train(*_argv(cached_root, out)), str(base / "log"))
    assert code == 0, text[-3000:]
    losses = _losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def _checkpoint_of(stderr_line: str) -> tuple[int, str]:
    prefix = "training stopped by "
    assert stderr_line.startswith(prefix), stderr_line
    step = int(stderr_line.split(" after step ")[1].split(":")[0])
    checkpoint = stderr_line.split("checkpoint saved in ")[1].split(" (")[0]
    return step, checkpoint


def _hint_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("training stopped by ")]


def test_sigint_saves_a_checkpoint_exits_130_and_the_resumed_run_logs_the_same_losses(cached_root, uninterrupted,
                                                                                        tmp_path):
    from training.preempt import resume_hint

    out = str(tmp_path / "out")
    proc = _start(_train(*_argv(cached_root, out, "--dataloader_num_workers", "0")), str(tmp_path / "log"))
    try:
        _wait_for_step(proc, out, 2)
        os.kill(proc.pid, signal.SIGINT)  # Ctrl-C to the one process
        text = _finish(proc)
    finally:
        kill_groups([proc])
    assert proc.returncode == 130, text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    [line] = _hint_lines(text)
    step, checkpoint = _checkpoint_of(line)
    assert 2 <= step < STEPS, line
    assert checkpoint == os.path.join(out, f"checkpoint-{step}")
    seconds = float(line.split(f"{checkpoint} (")[1].split(" s)")[0])
    assert line == resume_hint(signal.SIGINT, step, checkpoint, seconds)
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        assert os.path.isfile(os.path.join(checkpoint, name)), name
    assert json.load(open(os.path.join(checkpoint, "trainer_state.json")))["global_step"] == step
    assert not os.path.exists(os.path.join(out, "model.safetensors"))  # no "final" model of a stopped run
    assert max(_logged_steps(out)) == step  # stopped at the step it saved

    code, text = _run(_train(*_argv(cached_root, out, "--dataloader_num_workers", "0",
                                    "--resume_from_checkpoint", checkpoint)), str(tmp_path / "log2"))
    assert code == 0, text[-3000:]
    assert _losses(out) == uninterrupted  # steps 1..k from the first run, k+1..10 from the resumed one


def test_sigterm_to_the_process_group_with_workers_and_a_second_signal_while_saving(cached_root, uninterrupted,
                                                                                    tmp_path):
    out = str(tmp_path / "out")
    proc = _start(_train(*_argv(cached_root, out, "--dataloader_num_workers", "2")), str(tmp_path / "log"))
    try:
        _wait_for_step(proc, out, 2)
        os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler does: every process, DataLoader workers included
        while proc.poll() is None:  # and again, while it finishes the step, saves and exits
            time.sleep(0.02)
            try:
                os.kill(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                break
        text = _finish(proc)
    finally:
        kill_groups([proc])
    assert proc.returncode == 143, text[-3000:]
    assert "Traceback" not in text and "exited unexpectedly" not in text
    [line] = _hint_lines(text)
    step, checkpoint = _checkpoint_of(line)
    assert line.startswith(f"training stopped by SIGTERM after step {step}: ")
    # In the text, not as a line of its own: a worker's log line may share its line (two processes, one pipe).
    assert "training: stopping: a checkpoint is being saved at the end of this step, please wait" in text
    code, text = _run(_train(*_argv(cached_root, out, "--dataloader_num_workers", "2",
                                    "--resume_from_checkpoint", checkpoint)), str(tmp_path / "log2"))
    assert code == 0, text[-3000:]
    assert _losses(out) == uninterrupted


def _rank_pid(launcher_pid: int, rank: int, timeout: float = 60) -> int:
    """The pid of torchrun's worker of `rank` (read from /proc: its RANK environment variable)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                if ppid != launcher_pid:
                    continue
                env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            except (OSError, ValueError, IndexError):
                continue
            if f"RANK={rank}".encode() in env:
                return int(pid)
        time.sleep(0.1)
    raise AssertionError(f"no rank {rank} under pid {launcher_pid}")


CONFIGS = os.path.join(REPO, "training", "configs")


@pytest.mark.slow
# No ZeRO-2 case: training.preempt has no branch per engine, and a DeepSpeed stop saves and resumes
# through the engine's save_checkpoint / load_checkpoint under ZeRO-2 as under ZeRO-3 (the [zero3]
# case, which also partitions the parameters); ZeRO-2 on two ranks is
# test_training_distributed.py::test_zero2_two_ranks_through_the_single_node_script. Each case is
# three two-rank launches (~30 s each on 2 cores).
@pytest.mark.parametrize("engine", ["ddp", "zero3"])
def test_under_torchrun_a_signal_to_one_rank_stops_every_rank_at_the_same_step(cached_root, tmp_path, engine):
    extra = []
    if engine != "ddp":
        pytest.importorskip("deepspeed")
        extra = ["--deepspeed", os.path.join(CONFIGS, f"{engine}.json")]  # the engine's own checkpoint
    flags = ["--per_device_train_batch_size", "1", "--dataloader_num_workers", "0", *extra]

    def launch(out: str, *more: str) -> list[str]:
        return torchrun("--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "training.train",
                        *_argv(cached_root, out, *flags, *more))

    straight = str(tmp_path / "straight")
    code, text = _run(launch(straight), str(tmp_path / "straight.log"))
    assert code == 0, text[-3000:]
    out = str(tmp_path / "out")
    proc = _start(launch(out), str(tmp_path / "log"))
    try:
        rank1 = _rank_pid(proc.pid, 1)
        _wait_for_step(proc, out, 2)
        os.kill(rank1, signal.SIGTERM)  # one rank only: the other learns of it at the next step end
        text = _finish(proc)
    finally:
        kill_groups([proc])
    assert proc.returncode != 0, text[-3000:]  # torchrun reports its ranks' exit status
    assert text.count("exitcode  : 143") == 2 or "exitcode: 143" in text, text[-3000:]
    [line] = _hint_lines(text)  # printed by rank 0, which got no signal itself
    step, checkpoint = _checkpoint_of(line)
    assert line.startswith(f"training stopped by SIGTERM after step {step}: ")
    assert max(_logged_steps(out, 0)) == max(_logged_steps(out, 1)) == step  # both stopped at the same step
    assert json.load(open(os.path.join(checkpoint, "trainer_state.json")))["global_step"] == step
    code, text = _run(launch(out, "--resume_from_checkpoint", checkpoint), str(tmp_path / "log2"))
    assert code == 0, text[-3000:]
    assert _losses(out, 0) == _losses(straight, 0) and sorted(_losses(out, 0)) == list(range(1, STEPS + 1))


def test_a_resumed_run_holds_the_checkpoints_weights_and_a_checkpoint_that_does_not_fit_is_refused(cached_root,
                                                                                                   tmp_path, capsys):
    """In-process: the checkpoint's model.safetensors (hub layout) loads into every parameter."""
    from safetensors.torch import load_file, save_file

    from training.train import main, run

    out = str(tmp_path / "out")
    first = run(_argv(cached_root, out, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2"))
    checkpoint = os.path.join(out, "checkpoint-2")
    trained = {k: v.clone() for k, v in first.model.state_dict().items()}
    resumed = run(_argv(cached_root, str(tmp_path / "again"), "--max_steps", "2",
                        "--resume_from_checkpoint", checkpoint))  # nothing left to train: the weights as loaded
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, trained[name]), name  # the LLM and the vision tower too, not only the merger

    weights = os.path.join(checkpoint, "model.safetensors")
    state = load_file(weights)
    del state["model.norm.weight"]  # the hub layout's name of model.language_model.norm.weight
    save_file(state, weights, metadata={"format": "pt"})
    assert main(_argv(cached_root, str(tmp_path / "third"), "--resume_from_checkpoint", checkpoint)) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: --resume_from_checkpoint {checkpoint}: its model.safetensors does not fit this model: missing "
        "['model.language_model.norm.weight'], unexpected []; resume with the flags (model, --use_vision_cache, "
        "--vggt_*) of the run that wrote it")


_LEFTOVER_WORKER = r"""
import functools, os, sys, time
import torch
from training.trainer import _worker_init

loader = torch.utils.data.DataLoader(list(range(100)), batch_size=1, num_workers=1,
                                     worker_init_fn=functools.partial(_worker_init, None))
it = iter(loader)
next(it)
print(it._workers[0].pid, flush=True)
sys.stdin.readline()  # the test signals the worker meanwhile
print("alive" if it._workers[0].is_alive() else "dead", flush=True)
# exit with the iterator alive: multiprocessing's exit handler terminates the daemonic worker
"""


def test_a_worker_ignores_sigterm_from_others_but_not_from_its_parent_so_the_parent_exits(tmp_path):
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", _LEFTOVER_WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=child_env(), cwd=REPO)
    try:
        worker = int(proc.stdout.readline())
        os.kill(worker, signal.SIGTERM)  # a scheduler's SIGTERM, not the parent's
        os.kill(worker, signal.SIGINT)  # a Ctrl-C to the process group
        time.sleep(0.5)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "alive"
        assert proc.wait(timeout=60) == 0  # the parent's own SIGTERM at exit ends the worker: no hang
    finally:
        proc.kill()
