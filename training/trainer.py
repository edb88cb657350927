"""`FeatstoreTrainer`: a `transformers.Trainer` that logs data time and feature-cache counters.

The collator puts three 0-d int64 counters into every batch (`STAT_KEYS`: this batch's samples
whose features came from the store, were missing, were computed online on a miss). They travel
inside the batch because DataLoader workers are separate processes: a counter kept in a worker
would never reach the trainer. This Trainer

1. times each step's wait for data (around `get_batch_samples`, which fetches the step's
   `gradient_accumulation_steps` batches),
2. pops `STAT_KEYS` from every batch there, before the model or the loss-scaling count sees
   the batch, and adds them to running totals,
3. at every training log merges into the logged dict (so it reaches `state.log_history`, the
   printed line and every reporting integration; mutating `logs` in a callback's `on_log`
   would not reach `log_history`):

   - `data_time`: mean seconds per optimizer step spent waiting for data since the last log
     (averaged over ranks),
   - `step_time`: mean wall seconds per optimizer step since the last log (s/it),
   - `cache_hits`, `cache_misses`, `cache_computed`: totals since this process started,
     summed over ranks (one all-reduce per log, on every rank: `log()` runs on all of them),
   - `cache_hit_rate`: hits / (hits + misses); absent while no sample was looked up, and
     the three totals are absent when no batch carried the counters (online VGGT).

Each rank also appends every logged dict, with its rank and wall time, to
`<output_dir>/metrics.rank<R>.jsonl`: the printed line exists only on each node's first rank,
and `scripts/monitor_training.sh` reads these files.

Not guaranteed: totals restart from zero when training resumes from a checkpoint.

`--resume_from_checkpoint` (without DeepSpeed, whose engine reloads its own checkpoint) loads
the checkpoint's `model.safetensors` by the model's own parameter names: `save_pretrained`
writes it in the hub's layout (`model.layers.*`, `visual.*`: the class's key renames reversed),
and the stock Trainer loads it with a non-strict `load_state_dict` that applies no rename, which
left the LLM and the vision tower at their initial weights with only a warning. A checkpoint that
still does not fit (a key missing or left over) is refused, naming the keys.

Its DataLoader workers ignore SIGINT, and SIGTERM from anyone but their parent: the main
process decides when to stop (training.preempt saves a checkpoint at the next step boundary),
and a worker killed by a Ctrl-C or a scheduler's SIGTERM sent to the whole process group would
fail the step before that save. The parent's own SIGTERM (how it ends leftover workers) still
ends them.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import signal
import threading
import time
from typing import Any

import torch
import transformers

from featstore.interrupt import signals_blocked
from training.args import ArgumentError
from training.batch import TOWER_MAXIMA_KEY
from training.batch_slots import SlotBatch, SlotCollator

__all__ = ["STAT_KEYS", "FeatstoreTrainer", "metrics_path"]

# Fixed by the contract with training/data.py's collator.
STAT_KEYS = ("cache_hits", "cache_misses", "cache_computed")


def metrics_path(output_dir: str, rank: int) -> str:
    """Path of rank `rank`'s JSON-lines metrics file under `output_dir`.

    Example:
        >>> metrics_path("runs/a", 1)
        'runs/a/metrics.rank1.jsonl'
    """
    return os.path.join(output_dir, f"metrics.rank{rank}.jsonl")


class FeatstoreTrainer(transformers.Trainer):
    """`transformers.Trainer` that strips `STAT_KEYS` from batches and logs data time and cache totals.

    Args: exactly those of `transformers.Trainer`.

    Example:
        >>> trainer = FeatstoreTrainer(model=model, args=args, train_dataset=ds, data_collator=collate)
        >>> trainer.train()
        >>> trainer.state.log_history[0]["cache_hit_rate"]
        1.0
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if getattr(self.args, "dataloader_batch_slots", False) and self.args.dataloader_num_workers > 0 \
                and self.data_collator is not None and not isinstance(self.data_collator, SlotCollator):
            # Workers hand batches over in shared-memory slots (training.batch_slots); the
            # counters and the vision tower's longest segments stay CPU tensors, so reading them
            # (below, and in the model's forward) costs no GPU sync.
            prefetch = self.args.dataloader_prefetch_factor or 2
            self.data_collator = SlotCollator(self.data_collator, slots_per_worker=prefetch + 3,
                                              host_keys=STAT_KEYS + (TOWER_MAXIMA_KEY,))
        # Per-rank running totals since start (summed over ranks only when logged).
        self._cache_totals = [0, 0, 0]
        self._saw_cache_stats = False
        # Since the last training log: data wait, steps, and when that log happened.
        self._data_seconds = 0.0
        self._data_steps = 0
        self._last_log_wall = None  # set at the first data fetch

    def get_train_dataloader(self):
        """The Trainer's loader, its workers ignoring SIGINT/SIGTERM (module docstring)."""
        loader = super().get_train_dataloader()
        if self.args.dataloader_num_workers > 0:
            # An attribute read when the workers start (each epoch, or once if persistent), of
            # the torch DataLoader that accelerate's wrapper holds (`base_dataloader`, accelerate
            # >= 1.x; setting it on the wrapper would not reach it); a loader rebuilt to skip
            # batches on resume (accelerate's skip_first_batches) copies it.
            base = getattr(loader, "base_dataloader", loader)
            base.worker_init_fn = functools.partial(_worker_init, base.worker_init_fn)
        return loader

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Load a checkpoint folder's model.safetensors into the model by its own names (module
        docstring); other layouts (sharded, .bin, FSDP, PEFT) go to the Trainer's loader."""
        target = self.model if model is None else model
        weights = os.path.join(resume_from_checkpoint, transformers.utils.SAFE_WEIGHTS_NAME)
        if not os.path.isfile(weights) or not isinstance(target, transformers.PreTrainedModel) \
                or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from safetensors.torch import load_file

        names = _module_names_of_saved_keys(target)
        state = {names.get(k, k): v for k, v in load_file(weights, device="cpu").items()}
        result = target.load_state_dict(state, strict=False)
        # A tied parameter (lm_head and the embeddings, where tied) is saved once, under one name.
        own = target.state_dict()
        shared = collections.defaultdict(set)
        for name, tensor in own.items():
            shared[tensor.data_ptr()].add(name)
        missing = [k for k in result.missing_keys if not shared[own[k].data_ptr()] & set(state)]
        if missing or result.unexpected_keys:
            raise ArgumentError(
                f"--resume_from_checkpoint {resume_from_checkpoint}: its {transformers.utils.SAFE_WEIGHTS_NAME} does "
                f"not fit this model: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected "
                f"{result.unexpected_keys[:5]}{' ...' if len(result.unexpected_keys) > 5 else ''}; resume with the "
                "flags (model, --use_vision_cache, --vggt_*) of the run that wrote it")

    # -- 1 + 2: time the data wait, take the counters out of the batches -------------------
    def create_optimizer(self, model=None):
        """transformers' optimizer, with VG-LLM's and JanusVLN's per-group learning rates when
        --mm_projector_lr is set (training.optim: the mergers at that rate, with --vision_tower_lr
        the other visual.* parameters at that one)."""
        from training.optim import parameter_groups

        opt_model = self.model if model is None else model
        groups = None if self.optimizer is not None else parameter_groups(
            opt_model, weight_decay=self.args.weight_decay, projector_lr=getattr(self.args, "mm_projector_lr", None),
            vision_lr=getattr(self.args, "vision_tower_lr", None))
        if groups is None:
            return super().create_optimizer(model) if model is not None else super().create_optimizer()
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Fetch one optimizer step's batches (timed) and remove `STAT_KEYS` from each."""
        start = time.perf_counter()
        if self._last_log_wall is None:
            self._last_log_wall = start
        # A loader without accelerate's device placement gives SlotBatch messages: as dicts here.
        as_dicts = (b.to(self.args.device) if isinstance(b, SlotBatch) else b for b in epoch_iterator)
        # Workers are forked inside a fetch (an epoch's first): with SIGINT/SIGTERM blocked, so
        # that one sent to the process group stays pending in a new worker until it ignores it
        # (`_worker_init`), instead of killing it in torch's SIGTERM handler first. Here, the
        # signal is handled when the fetch returns (training.preempt: at the step's end anyway).
        blocked = signals_blocked() if self.args.dataloader_num_workers > 0 else contextlib.nullcontext()
        with blocked:
            batch_samples, num_items_in_batch = super().get_batch_samples(as_dicts, num_batches, device)
        self._data_seconds += time.perf_counter() - start
        self._data_steps += 1
        for batch in batch_samples:
            self._take_stats(batch)
        return batch_samples, num_items_in_batch

    def _take_stats(self, batch: Any) -> None:
        if not isinstance(batch, dict) or not any(k in batch for k in STAT_KEYS):
            return
        missing = [k for k in STAT_KEYS if k not in batch]
        if missing:
            raise KeyError(
                f"batch carries {sorted(k for k in STAT_KEYS if k in batch)} but not {missing}: "
                "the collator must emit all of training.trainer.STAT_KEYS or none"
            )
        self._saw_cache_stats = True
        for i, key in enumerate(STAT_KEYS):
            value = batch.pop(key)
            # .item() on a 0-d tensor; a device tensor costs one sync per batch, which is small
            # next to the step and only happens when the collator's output was moved to GPU.
            self._cache_totals[i] += int(value.item() if isinstance(value, torch.Tensor) else value)

    # -- 3: merge into the training log lines ------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add data time, step time and cache totals to training logs, then log as `Trainer` does."""
        if not any(k.startswith("eval_") or k.startswith("test_") for k in logs):
            self._merge_stats(logs)
        super().log(logs, start_time)
        self._append_metrics_file(self.state.log_history[-1])

    def _merge_stats(self, logs: dict[str, float]) -> None:
        now = time.perf_counter()
        steps = self._data_steps
        # One collective for all five numbers: every rank reaches log() at the same steps, and
        # each rank fetched data for the same number of them.
        local = [float(x) for x in self._cache_totals] + [self._data_seconds, float(self._saw_cache_stats)]
        hits, misses, computed, data_seconds, saw = self._sum_over_ranks(local)
        world = max(1, self.args.world_size)
        if steps > 0:
            logs["data_time"] = data_seconds / world / steps
            logs["step_time"] = (now - self._last_log_wall) / steps
        if saw > 0:
            logs["cache_hits"] = int(hits)
            logs["cache_misses"] = int(misses)
            logs["cache_computed"] = int(computed)
            if hits + misses > 0:
                logs["cache_hit_rate"] = hits / (hits + misses)
        self._data_seconds, self._data_steps, self._last_log_wall = 0.0, 0, now

    def _sum_over_ranks(self, values: list[float]) -> list[float]:
        dist = torch.distributed
        if self.args.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return values
        # float64 holds integer counts exactly up to 2**53. gloo reduces CPU tensors, nccl CUDA
        # ones: args.device is the one the backend of this run uses.
        tensor = torch.tensor(values, dtype=torch.float64, device=self.args.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def _append_metrics_file(self, record: dict[str, Any]) -> None:
        if not self.args.output_dir:
            return
        os.makedirs(self.args.output_dir, exist_ok=True)
        line = {"rank": self.args.process_index, "time": time.time(), **record}
        with open(metrics_path(self.args.output_dir, self.args.process_index), "a") as f:
            f.write(json.dumps(line, default=float) + "\n")


def _worker_init(then, worker_id: int) -> None:
    """A DataLoader worker's first act: ignore SIGINT, and SIGTERM from anyone but its parent;
    then the Trainer's own init (`then`, seeding). Module level, so that it pickles for 'spawn'
    workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked while it was forked
    _sigterm_from_parent_only()
    if then is not None:
        then(worker_id)


def _sigterm_from_parent_only() -> None:
    """SIGTERM from the parent ends this worker at once (as torch's own worker handler does);
    from anyone else (a scheduler signalling the process group) it is ignored.

    Not a plain SIG_IGN: the parent itself stops leftover daemonic workers with SIGTERM
    (multiprocessing's exit handler, `Process.terminate`, then an unbounded `join`), and a worker
    deaf to it hangs the parent's exit. A Python handler does not see the sender, so SIGTERM
    stays blocked and one thread takes it with `sigwaitinfo`, which does (`si_pid`). Threads the
    worker starts later inherit the blocked mask."""
    if not hasattr(signal, "sigwaitinfo"):  # not Linux: leave torch's handler (exit if from parent, else die)
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait() -> None:
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid == parent or os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=wait, name="featstore-worker-sigterm", daemon=True).start()


def _module_names_of_saved_keys(model) -> dict:
    """{name in a saved checkpoint: the model's own parameter name}, from the very renames
    `save_pretrained` applies (transformers' `revert_weight_conversion`, run on placeholders
    whose identity tells which own name each saved one came from); {} where that function
    does not exist or a conversion is more than a rename (the names are then used as saved)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return {}
    probe = {name: torch.empty(0) for name in model.state_dict()}
    own = {id(t): name for name, t in probe.items()}
    try:
        saved = revert_weight_conversion(model, probe)
    except Exception:  # a converter that computes (not this model's): no renames known
        return {}
    return {key: own[id(t)] for key, t in saved.items() if id(t) in own}
