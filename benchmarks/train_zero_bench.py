"""DeepSpeed ZeRO-2 and ZeRO-3 on one GPU through `python -m training.train`: online vs cached.

Each run is the real entry in a subprocess (through benchmarks/_zero_probe.py, which runs
`training.train` as `__main__` and adds one callback that writes peak memory and where the
online VGGT's parameters ended up) with `--deepspeed training/configs/zero{2,3}.json`, bf16,
batch 1, a few dozen steps, logging every step. The model is a random-weight checkpoint folder
of Qwen2.5-VL-3B dimensions (written once with `save_pretrained`, with the offline tokenizer
and image processor: the entry loads it as `--model_name_or_path`); VGGT-1B is the random
checkpoint in the official layout; the data and store are train_bench's (shared work folder).

Per run: median `step_time` and `data_time` from the trainer's metrics file
(<output_dir>/metrics.rank0.jsonl) after the warm-up steps, peak GPU memory, and for ZeRO-3
online the proof that VGGT is neither partitioned (no parameter carries `ds_id`) nor gathered
(none of its parameters went through ZeRO-3's fetch) while ZeRO-3 did partition and gather
the model.

    python benchmarks/train_zero_bench.py --out $OUT --work /tmp/train_bench_work [--budget-s 240]
    python benchmarks/train_zero_bench.py --smoke --out /tmp/x   # tiny presets on CPU over gloo
Writes train_zero_bench.json (rewritten after every run) and train_zero_bench.md to --out.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _train_inputs as inputs_mod  # noqa: E402  (puts the repository on sys.path)
from _train_report import write_outputs  # noqa: E402

# Priority order: the ZeRO-3 online run carries the partitioning proof, so it goes first.
RUNS = ("zero3:online_full", "zero3:cached", "zero2:cached", "zero2:online_full")
CONFIGS = {"zero2": os.path.join(inputs_mod.REPO, "training", "configs", "zero2.json"),
           "zero3": os.path.join(inputs_mod.REPO, "training", "configs", "zero3.json")}


def parse(argv=None):
    p = inputs_mod.bench_parser(__doc__, budget_s=240.0, work_help="work folder shared with train_bench.py",
                                smoke_help="tiny presets on CPU (DeepSpeed over gloo)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 24, smoke 3)")
    p.add_argument("--warmup", type=int, default=None, help="logged steps left out of the medians "
                   "(default 4, smoke 1)")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma list of stage:mode out of {','.join(RUNS)}")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 4, smoke 1)")
    a = p.parse_args(argv)
    for r in a.runs.split(","):
        if r not in RUNS:
            p.error(f"--runs: unknown run {r!r}; choose from {', '.join(RUNS)}")
    a.steps = a.steps or (3 if a.smoke else 24)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.smoke else 4)
    a.workers = a.workers if a.workers is not None else (1 if a.smoke else 4)
    return a


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_command(a, inputs, model_folder: str, stage: str, mode: str, output_dir: str) -> list:
    cmd = [sys.executable, os.path.join(inputs_mod.HERE, "_zero_probe.py"),
           "--model_name_or_path", model_folder, "--data_root", inputs.root, "--annotations", inputs.annotations,
           "--vggt_encoder", inputs.encoder, "--vggt_weights", inputs.weights, "--output_dir", output_dir,
           "--deepspeed", CONFIGS[stage], "--bf16", "--max_steps", str(a.steps), "--logging_steps", "1",
           "--save_strategy", "no", "--per_device_train_batch_size", "1", "--learning_rate", "1e-5",
           "--dataloader_num_workers", str(a.workers), "--report_to", "none", "--seed", "0"]
    cmd += ["--use_vggt_cache", "--vggt_cache_path", inputs.store] if mode == "cached" else ["--vggt_mode", mode]
    if a.smoke:
        cmd.append("--use_cpu")
    return cmd


def parse_run(output_dir: str, warmup: int) -> dict:
    """Medians of the per-step `step_time` / `data_time` the trainer logged, and the probe."""
    path = os.path.join(output_dir, "metrics.rank0.jsonl")
    records = []
    with open(path) as f:
        for line in f:
            if line.strip():
                records.append(json.loads(line))
    steps = [r for r in records if "step_time" in r and "loss" in r]
    timed = steps[warmup:] or steps
    out = {"logged_steps": len(steps), "timed_steps": len(timed),
           "step_ms": 1e3 * statistics.median(r["step_time"] for r in timed) if timed else None,
           "data_ms": 1e3 * statistics.median(r["data_time"] for r in timed) if timed else None,
           "loss_last": steps[-1]["loss"] if steps else None}
    for key in ("cache_hits", "cache_misses", "cache_hit_rate"):
        if steps and key in steps[-1]:
            out[key] = steps[-1][key]
    probe_path = os.path.join(output_dir, "zero_probe.json")
    if os.path.isfile(probe_path):
        with open(probe_path) as f:
            out["probe"] = json.load(f)
    return out


def check_run(name: str, stage: str, mode: str, res: dict, steps: int) -> list:
    """What must hold for the run to count; returns the failures (empty: it holds)."""
    bad = []
    probe = res.get("probe")
    if probe is None:
        return [f"{name}: no zero_probe.json (the run did not reach the end of training)"]
    if res.get("logged_steps") != steps:
        bad.append(f"{name}: {res.get('logged_steps')} logged steps, expected {steps}")
    if mode == "cached":
        if res.get("cache_misses") or res.get("cache_hits") != steps:
            bad.append(f"{name}: cache hits {res.get('cache_hits')} misses {res.get('cache_misses')} in {steps} steps")
        if probe.get("vggt_built"):
            bad.append(f"{name}: VGGT was built in cached mode")
    else:
        if not probe.get("vggt_built"):
            bad.append(f"{name}: the online VGGT was never built")
        elif probe.get("vggt_partitioned") or probe.get("vggt_in_module_tree") or probe.get("vggt_empty_local") \
                or probe.get("vggt_gathered"):
            bad.append(f"{name}: VGGT partitioned {probe.get('vggt_partitioned')}, in the module tree "
                       f"{probe.get('vggt_in_module_tree')}, gathered {probe.get('vggt_gathered')}")
    if stage == "zero3" and not (probe.get("model_partitioned") and probe.get("zero3_fetched_params")):
        bad.append(f"{name}: ZeRO-3 partitioned {probe.get('model_partitioned')} and fetched "
                   f"{probe.get('zero3_fetched_params')} model parameters (both must be > 0)")
    return bad


def main(argv=None) -> int:
    a = parse(argv)
    t_start = time.monotonic()
    deadline = t_start + a.budget_s
    work = a.work or tempfile.mkdtemp(prefix="train_zero_bench_")
    import torch

    device = "cpu" if a.smoke or not torch.cuda.is_available() else "cuda"
    results = {"benchmark": "train_zero_bench", "smoke": a.smoke, "command": " ".join(sys.argv),
               "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "device": device,
               "steps": a.steps, "warmup": a.warmup, "runs": {}, "notes": [], "complete": False}
    if device == "cuda":
        results["card"] = torch.cuda.get_device_name(0)

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t_start:7.1f}s] {msg}", flush=True)

    def save() -> None:
        write_outputs(a.out, "train_zero_bench", results, log=log)

    try:
        import deepspeed

        results["deepspeed"] = deepspeed.__version__
    except Exception as e:
        results["notes"].append(f"deepspeed is not importable ({type(e).__name__}: {e}): nothing ran")
        save()
        return 1
    min_run_s = 20 if a.smoke else 60
    if a.budget_s < min_run_s:  # not even one run fits: do not write a 7 GB checkpoint for nothing
        results["runs"] = {name: {"skipped": f"budget ({a.budget_s:.0f} s)"} for name in a.runs.split(",")}
        save()
        return 0
    inputs = inputs_mod.prepare(work, smoke=a.smoke, units=3 if a.smoke else 16, frames=9,
                                samples=12 if a.smoke else 64, log=log)  # smoke: as train_bench.py's (one work folder)
    encoder, vggt_config = inputs_mod.vggt_choice(a.smoke)
    folder = inputs_mod.write_model_folder(os.path.join(work, "qwen_random"), 2 * int(vggt_config["embed_dim"]),
                                           smoke=a.smoke, device=device)
    torch.cuda.empty_cache() if device == "cuda" else None
    log(f"model folder ready: {folder}")
    failures = []
    for name in a.runs.split(","):
        stage, mode = name.split(":")
        left = deadline - time.monotonic()
        if left < min_run_s:
            results["runs"][name] = {"skipped": f"budget ({left:.0f} s left)"}
            save()
            continue
        out_dir = os.path.join(work, "zero_" + name.replace(":", "_"))
        shutil.rmtree(out_dir, ignore_errors=True)
        cmd = run_command(a, inputs, folder, stage, mode, out_dir)
        env = inputs_mod.child_env()
        # one process: the environment torchrun would give rank 0 of 1
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(_free_port()))
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # ninja for DS JIT
        log(f"{name}: $ {' '.join(cmd)}")
        t0 = time.monotonic()
        log_path = os.path.join(work, f"zero_{stage}_{mode}.log")
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=max(10.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
                code = None
        with open(log_path) as f:
            tail = f.read()[-4000:]
        res = {"wall_s": time.monotonic() - t0, "exit": code}
        if code != 0:
            res["error"] = "stopped at the budget" if code is None else f"exit {code}"
            res["log_tail"] = tail
        if os.path.isfile(os.path.join(out_dir, "metrics.rank0.jsonl")):
            res.update(parse_run(out_dir, a.warmup))
        if code == 0:
            bad = check_run(name, stage, mode, res, a.steps)
            if bad:
                res["error"] = "; ".join(bad)
                failures += bad
        results["runs"][name] = res
        log(f"{name}: exit {code}, step {res.get('step_ms')} ms, peak {res.get('probe', {}).get('peak_gib')} GiB"
            + (f" -- {res['error']}" if "error" in res else ""))
        for f in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
            if f.endswith(".safetensors") or f.startswith("checkpoint-"):  # 7 GB per run: free the disk
                target = os.path.join(out_dir, f)
                shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
        save()
    results["complete"] = all("error" not in r and "skipped" not in r for r in results["runs"].values())
    results["elapsed_s"] = time.monotonic() - t_start
    save()
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
