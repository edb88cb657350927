"""Timing of one training step for train_bench.py: named marks (CUDA events on a GPU, wall time
on a CPU), forward hooks that mark the model's stages, an online VGGT whose calls are marked,
the loop that runs one mode (warm-up, timed steps, peak memory) and the budget alarm.

The split of a step (PHASES) is read off the marks of that step:
  vggt, vision, merger   sums of their start/end spans
  llm_forward            the language model's pre-forward hook to the end of the forward (loss)
  forward_other          the forward minus the four above
  backward, optimizer    between the ends of forward, backward and the optimizer step
"""

from __future__ import annotations

import contextlib
import math
import signal
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

from training.trainer import STAT_KEYS

__all__ = ["PHASES", "BudgetExceeded", "StepClock", "install_hooks", "timed_online_vggt", "run_mode", "run_paired",
           "batch_bytes", "alarm_at"]

PHASES = ("vggt", "vision", "merger", "llm_forward", "forward_other", "backward", "optimizer")
GIB = float(1 << 30)


class BudgetExceeded(Exception):
    """The run reached --budget-s (raised by the alarm, even inside a long step)."""


# ---- timing ---------------------------------------------------------------------------------


class StepClock:
    """Named marks in one step: CUDA events on a GPU (no sync until `phases`), wall time on a CPU
    (where execution is synchronous, so wall time is the compute time)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: List[tuple] = []

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((name, event))
        else:
            self.marks.append((name, time.perf_counter()))

    def reset(self) -> None:
        self.marks = []

    def _times_ms(self) -> List[tuple]:
        if not self.marks:
            return []
        if self.cuda:
            torch.cuda.synchronize()
            first = self.marks[0][1]
            return [(n, first.elapsed_time(e)) for n, e in self.marks]
        first = self.marks[0][1]
        return [(n, (t - first) * 1e3) for n, t in self.marks]

    def phases(self) -> Dict[str, float]:
        """Milliseconds per phase (PHASES) and `device_step` (forward start to optimizer end)."""
        times = self._times_ms()
        at = {}
        spans = {"vggt": 0.0, "vision": 0.0, "merger": 0.0}
        opened = {}
        for name, t in times:
            part, _, edge = name.partition(":")
            if part in spans and edge == "start":
                opened[part] = t
            elif part in spans and edge == "end" and part in opened:
                spans[part] += t - opened.pop(part)
            else:
                at.setdefault(name, t)
        forward = at["forward:end"] - at["forward:start"]
        llm = at["forward:end"] - at.get("llm:start", at["forward:end"])
        out = dict(spans, llm_forward=llm)
        out["forward_other"] = forward - sum(out.values())
        out["backward"] = at["backward:end"] - at["forward:end"]
        out["optimizer"] = at["optimizer:end"] - at["backward:end"]
        out["device_step"] = at["optimizer:end"] - at["forward:start"]
        return out


def install_hooks(model, clock: StepClock) -> None:
    """Marks around the vision tower (its merger alone when the blocks are not built), the
    geometry merger's MLP and the start of the language model."""
    def pair(module, part):
        module.register_forward_pre_hook(lambda *_: clock.mark(f"{part}:start"))
        module.register_forward_hook(lambda *_: clock.mark(f"{part}:end"))

    visual = model.model.visual
    # Built without vision blocks (--use_vision_cache), the tower's only work is visual.merger.
    pair(visual if len(getattr(visual, "blocks", ())) else visual.merger, "vision")
    pair(model.merger.mlp, "merger")
    model.model.language_model.register_forward_pre_hook(lambda *_: clock.mark("llm:start"))


def timed_online_vggt(clock: StepClock):
    """OnlineVGGT whose encoder calls are marked, and whose call peak can be measured once."""
    from training.vggt_online import OnlineVGGT

    class TimedOnlineVGGT(OnlineVGGT):
        measure_peak = False
        call_peak_bytes: Optional[int] = None

        def features_many(self, units, device):
            dev = torch.device(device)
            if self.measure_peak and dev.type == "cuda":
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            clock.mark("vggt:start")
            out = super().features_many(units, device)
            clock.mark("vggt:end")
            if self.measure_peak and dev.type == "cuda":
                torch.cuda.synchronize()
                self.call_peak_bytes = torch.cuda.max_memory_allocated() - base
                self.measure_peak = False
            return out

    return TimedOnlineVGGT


# ---- one mode ---------------------------------------------------------------------------------


def _median(values: List[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def run_mode(name: str, next_batch: Callable[[], dict], model, optimizer, clock: StepClock, device, *,
             warmup: int, steps: int, deadline: float, reserve_s: float, expect_hits: bool,
             online=None, log=print) -> dict:
    """Warm-up, then up to `steps` timed steps (fewer when the budget would not hold them)."""
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = device.type == "cuda"
    data_ms, step_ms, phases, losses = [], [], [], []
    hits = misses = 0
    planned = warmup + steps
    i = 0
    while i < planned:
        if i == warmup:
            warm = [s for s in step_ms] or [0.0]
            left = deadline - reserve_s - time.monotonic()
            fit = int(left // max(1e-3, max(warm) / 1e3))
            if fit < steps:
                log(f"  {name}: {max(1, fit)} timed steps fit in the budget (asked {steps})")
                planned = warmup + max(1, fit)
            step_ms.clear(), data_ms.clear(), phases.clear()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
        if online is not None and i == 0:  # the encoder is built already: this is one call
            online.measure_peak = True
        t0 = time.perf_counter()
        batch = next_batch()
        t1 = time.perf_counter()
        stats = {k: int(batch.pop(k)) for k in STAT_KEYS if k in batch}
        hits, misses = hits + stats.get("cache_hits", 0), misses + stats.get("cache_misses", 0)
        clock.reset()
        clock.mark("forward:start")
        out = model(**batch)
        clock.mark("forward:end")
        out.loss.backward()
        clock.mark("backward:end")
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.mark("optimizer:end")
        split = clock.phases()  # synchronizes
        t2 = time.perf_counter()
        loss = float(out.loss.detach())
        if not math.isfinite(loss):
            raise RuntimeError(f"mode {name}: step {i} loss is {loss}")
        data_ms.append((t1 - t0) * 1e3)
        step_ms.append((t2 - t0) * 1e3)
        phases.append(split)
        losses.append(loss)
        i += 1
    if expect_hits and (misses or hits < planned):
        raise RuntimeError(f"mode {name}: {hits} store hits and {misses} misses in {planned} steps; every "
                           "sample must come from the store")
    result = {
        "timed_steps": len(step_ms), "warmup_steps": warmup,
        "step_ms": _median(step_ms), "data_ms": _median(data_ms),
        "step_ms_all": [round(v, 3) for v in step_ms],
        "phases_ms": {k: _median([p[k] for p in phases]) for k in PHASES + ("device_step",)},
        "loss_last": losses[-1], "cache_hits": hits, "cache_misses": misses,
    }
    if cuda:
        result["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
    return result


def _one_step(next_batch, model, optimizer, params, clock=None, settle: bool = False) -> tuple:
    """One training step as run_mode times it: (step ms incl. the data wait, data ms, loss). With
    `settle`, the clock starts only once the batch's host-to-device copies have finished (the
    step without the read path's cost: what is left of a gap to the floor is not the read)."""
    t0 = time.perf_counter()
    batch = next_batch()
    if settle and torch.cuda.is_available():  # data ms then holds the wait for the copies too
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    data_ms = (t1 - t0) * 1e3
    if settle:
        t0 = t1  # the step starts once its batch is on the device
    for k in STAT_KEYS:
        batch.pop(k, None)
    if clock is not None:
        clock.reset()  # the model's hooks mark into it: keep it from growing over the pairs
    out = model(**batch)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if out.loss.is_cuda:
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    loss = float(out.loss.detach())
    if not math.isfinite(loss):
        raise RuntimeError(f"loss is {loss}")
    return (t2 - t0) * 1e3, data_ms, loss


def batch_bytes(batch: dict) -> dict:
    """{key: "dtype, MB"} of a batch's tensors, and their total in MB: what one step copies."""
    out, total = {}, 0
    for k, v in batch.items():
        if torch.is_tensor(v):
            out[k] = f"{str(v.dtype).replace('torch.', '')}, {v.numel() * v.element_size() / 1e6:.2f} MB"
            total += v.numel() * v.element_size()
    out["total_mb"] = round(total / 1e6, 2)
    return out


def run_paired(names: tuple, next_read: Callable[[], dict], pool: List[dict], model, optimizer, *, pairs: int,
               warmup: int, deadline: float, reserve_s: float, clock=None, log=print, seed: int = 0,
               other_reads: Optional[Dict[str, Callable[[], dict]]] = None) -> dict:
    """The read path's cost at 2%: `pairs` groups of one step per arm, interleaved in rotating order so
    that drift of the card or host falls on all alike:
      read     the real DataLoader's next batch (`next_read`), clocked from the call as training is;
      floor    the next batch of `pool`, resident on the device (the whole dataset read once
               through the same loader, in a shuffled cycle, so both see the same mix of samples);
      settled  a read batch clocked only once its copies to the device are done: read/settled
               is what the read and copy cost, settled/floor what fresh batches cost beyond that;
      loaded   a floor step after a read whose batch is dropped (clocked once its copies are
               done): the loader works in the background as on a read step, the step computes
               on a resident batch. settled/loaded: fresh tensors alone; loaded/floor: the
               loader's background work alone.
    With `other_reads` ({name: another loader's next batch}), two more arms for each:
      read_<name>, loaded_<name>  as read and loaded through that loader (e.g. "unpinned", no
               pinned memory and blocking copies: whether the pin-memory thread in this process is
               what the background work costs), side by side with the default loader.
    Each ratio two ways: median per-group ratio (the paired estimate: the card's slow spells, which
    last several groups, fall out) and median step / median step, both with 95% bootstrap
    intervals over the groups (each resampled group keeps all its steps)."""
    import random

    read_name, floor_name = names
    settled_name = f"{read_name}_settled"
    params = [p for p in model.parameters() if p.requires_grad]
    rng = random.Random(seed)
    cycle: List[dict] = []

    def floor_batch():
        if not cycle:
            cycle.extend(rng.sample(pool, len(pool)))
        return dict(cycle.pop())

    arms = {
        "read": lambda: _one_step(next_read, model, optimizer, params, clock),
        "floor": lambda: _one_step(floor_batch, model, optimizer, params, clock),
        "settled": lambda: _one_step(next_read, model, optimizer, params, clock, settle=True),
        "loaded": lambda: _one_step(lambda: (next_read(), floor_batch())[1], model, optimizer, params, clock,
                                    settle=True),
    }
    ratios = {"": ("read", "floor"), "settled_": ("settled", "floor"), "read_over_settled_": ("read", "settled"),
              "settled_over_loaded_": ("settled", "loaded"), "loaded_": ("loaded", "floor")}
    for name, other in (other_reads or {}).items():
        arms[f"read_{name}"] = lambda other=other: _one_step(other, model, optimizer, params, clock)
        arms[f"loaded_{name}"] = lambda other=other: _one_step(lambda: (other(), floor_batch())[1], model, optimizer,
                                                               params, clock, settle=True)
        ratios.update({f"read_{name}_": (f"read_{name}", "floor"), f"loaded_{name}_": (f"loaded_{name}", "floor"),
                       f"read_over_read_{name}_": ("read", f"read_{name}")})
    # each arm in each position equally often, forwards and backwards (so each follows each alike)
    names_ = list(arms)
    orders = [names_[i:] + names_[:i] for i in range(len(names_))]
    orders += [list(reversed(o)) for o in orders]
    for _ in range(warmup):
        for arm in arms.values():
            arm()
    rows = []  # {arm: (step ms, data ms)}
    for g in range(pairs):
        if time.monotonic() > deadline - reserve_s:
            log(f"  paired: budget reached after {len(rows)} groups (asked {pairs})")
            break
        row = {}
        for name in orders[g % len(orders)]:
            step, data, _ = arms[name]()
            row[name] = (step, data)
        rows.append(row)
    if not rows:
        return {"pairs": 0, "ratio": None}

    def med(sample, arm):
        return statistics.median(r[arm][0] for r in sample)

    def per_group(sample, a, b):
        return statistics.median(r[a][0] / r[b][0] for r in sample)

    def of_medians(sample, a, b):
        return med(sample, a) / med(sample, b)

    boots = [[rng.choice(rows) for _ in rows] for _ in range(2000)]

    def ci(fn, a, b):
        values = sorted(fn(s, a, b) for s in boots)
        return [values[49], values[1949]]

    out = {"pairs": len(rows), "other_reads": list(other_reads or {})}
    for label, (a, b) in ratios.items():
        out[f"{label}ratio"] = per_group(rows, a, b)
        out[f"{label}ratio_ci95"] = ci(per_group, a, b)
        out[f"{label}ratio_of_medians"] = of_medians(rows, a, b)
        out[f"{label}ratio_of_medians_ci95"] = ci(of_medians, a, b)
    out.update({
        f"{read_name}_step_ms": med(rows, "read"), f"{floor_name}_step_ms": med(rows, "floor"),
        f"{settled_name}_step_ms": med(rows, "settled"), f"{floor_name}_loaded_step_ms": med(rows, "loaded"),
        f"{read_name}_data_ms": statistics.median(r["read"][1] for r in rows),
        f"{settled_name}_copy_wait_ms": statistics.median(r["settled"][1] for r in rows),
        "pool_batches": len(pool),
        "groups_ms": [{k: round(v[0], 3) for k, v in r.items()} for r in rows],
    })
    return out


@contextlib.contextmanager
def alarm_at(deadline: float):
    """Raise BudgetExceeded in the main thread once time.monotonic() passes `deadline`."""
    def fire(*_):
        raise BudgetExceeded(f"budget reached at {time.strftime('%H:%M:%S')}")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(0.01, deadline - time.monotonic()))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
