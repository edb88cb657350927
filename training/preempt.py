"""Preemption: SIGINT / SIGTERM during training save a checkpoint at the next step boundary and stop.

A signal handler that raises (Python's default for SIGINT) lands at an arbitrary bytecode: in
the middle of an optimizer step, a DataLoader's bookkeeping, or a checkpoint being written.
So while training runs, SIGINT and SIGTERM only record the signal (`Preemption.handling_signals`);
at the end of the optimizer step the `Preemption` callback asks the Trainer for a checkpoint
(``control.should_save``), which the Trainer writes through its own save path (`_save_checkpoint`:
model, optimizer, scheduler, RNG states, trainer state; DeepSpeed's engine checkpoint under
DeepSpeed), and then to stop (``control.should_training_stop``, set once the save is done, so
the checkpoint's trainer state does not record a stop). `python -m training.train` then prints
one line, the checkpoint and the flag that resumes from it, and exits 128 + the signal: 130
(SIGINT), 143 (SIGTERM).

Under torchrun every rank may get the signal, at different instants (or only some ranks do). A
rank that stops alone would leave the others waiting in a collective, and a checkpoint is a
collective save; so at every step end the ranks all-reduce (MAX) the signal each has seen, over
a gloo group of their own (a CPU tensor: no GPU sync in the step), and all stop at the same
step. Every rank exits with the same status.

A second signal while the checkpoint is written is not acted on (the first rank prints that it
is saving); the save completes. DataLoader workers ignore SIGINT, and SIGTERM from anyone but
their parent (training.trainer): a Ctrl-C or a scheduler's SIGTERM reaches the whole process
group, and a worker that died of it would fail the step before the save.

Not guaranteed: a signal that arrives before training starts (model loading, planning) ends
the run at once ("interrupted", nothing saved), and a launcher or scheduler that kills the
processes before the save completes (torchrun waits `--shutdown-timeout`, 30 s by default, then
sends SIGKILL) leaves the previous checkpoint as the last complete one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Iterator, Optional

import torch
import transformers

__all__ = ["Preemption", "exit_status", "resume_hint"]

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_status(signum: int) -> int:
    """The shell's status for a process ended by `signum`: 128 + its number (SIGINT 130, SIGTERM 143).

    Example:
        >>> import signal
        >>> exit_status(signal.SIGINT), exit_status(signal.SIGTERM)
        (130, 143)
    """
    return 128 + int(signum)


def resume_hint(signum: int, step: int, checkpoint: str, seconds: float) -> str:
    """The one line `python -m training.train` prints after a preemption save (`seconds`: the save's).

    Example:
        >>> import signal
        >>> resume_hint(signal.SIGTERM, 3, "runs/a/checkpoint-3", 0.4)
        'training stopped by SIGTERM after step 3: checkpoint saved in runs/a/checkpoint-3 (0.40 s); resume with --resume_from_checkpoint runs/a/checkpoint-3'
    """
    return (f"training stopped by {signal.Signals(signum).name} after step {step}: checkpoint saved in {checkpoint} "
            f"({seconds:.2f} s); resume with --resume_from_checkpoint {checkpoint}")


class Preemption(transformers.TrainerCallback):
    """Save and stop at the next step boundary after SIGINT / SIGTERM (module docstring).

    Add it to the Trainer's callbacks and run `train()` inside `handling_signals()`. After
    training, `signum` is the signal that stopped it (None: not stopped), `checkpoint` the
    folder saved, `step` the step it holds, `save_seconds` how long the save took.

    Example:
        >>> preemption = Preemption()
        >>> trainer = FeatstoreTrainer(model=model, args=args, train_dataset=ds, callbacks=[preemption])
        >>> with preemption.handling_signals():
        ...     trainer.train()
        >>> preemption.signum is None  # not interrupted
        True
    """

    def __init__(self) -> None:
        self.received: Optional[int] = None  # the first signal this process got
        self.signum: Optional[int] = None  # the signal all ranks agreed to stop on
        self.checkpoint: Optional[str] = None
        self.step: Optional[int] = None
        self.save_seconds: Optional[float] = None  # how long the checkpoint took to write
        self._save_start: Optional[float] = None
        self._announce = True  # this process prints the "please wait" line (the first rank)
        self._group = None  # the ranks' gloo group for the agreement, when distributed

    # -- signals -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def handling_signals(self) -> Iterator["Preemption"]:
        """While the block runs, SIGINT and SIGTERM are recorded instead of raising or killing.
        When it ends the previous handlers come back, unless a signal came: the process is
        then stopping, and both stay ignored (one more Ctrl-C while it shuts down, or tears
        down its process group, must not end it with a traceback or another status).
        Outside the main thread: unchanged."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._on_signal) for s in _STOP_SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, signal.SIG_IGN if self.received is not None else handler)

    def _on_signal(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            return
        if self._announce:
            self._announce = False  # once
            # os.write, not print: a handler runs between two bytecodes of the main thread, which
            # may be inside a print to stderr (buffered IO is not reentrant).
            os.write(2, b"training: stopping: a checkpoint is being saved at the end of this step, please wait\n")

    # -- the Trainer's events --------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self._announce = state.is_world_process_zero
        dist = torch.distributed
        if args.world_size > 1 and dist.is_available() and dist.is_initialized() and self._group is None:
            # Every rank calls this once, here (a collective); gloo reduces CPU tensors, so the
            # per-step agreement never waits for the GPU.
            self._group = dist.new_group(backend="gloo")

    def on_step_end(self, args, state, control, **kwargs):
        agreed = self._agree(self.received or 0)
        if agreed and self.signum is None:
            self.signum = agreed
            self._save_start = time.perf_counter()
            control.should_save = True  # the Trainer saves right after this event, then on_save

    def on_save(self, args, state, control, **kwargs):
        if self.signum is not None and self.checkpoint is None:
            self.step = state.global_step
            self.save_seconds = time.perf_counter() - self._save_start
            self.checkpoint = os.path.join(args.output_dir, f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-"
                                                            f"{state.global_step}")
            control.should_training_stop = True

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.signum is not None:
            control.should_save = False  # saved at the step already (save_strategy "epoch" would save again)

    def _agree(self, local: int) -> int:
        """The largest signal number any rank has seen (0: none); one small all-reduce per step."""
        if self._group is None:
            return local
        flag = torch.tensor([local], dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._group)
        return int(flag.item())
