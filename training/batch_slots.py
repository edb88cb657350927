"""Batch slots: DataLoader workers write each batch into shared memory they keep, and the main
process copies it to the GPU straight from there.

Why: by default a batch leaves a worker as fresh shared memory, tens of MB for a cached VGGT
batch (60 MB at the benchmark's size). The main process maps it, the pin-memory thread copies
it into pinned memory, and then it is freed: unmapping it and the kernel releasing its pages
take 10-15 ms for 60 MB, under the GIL, so the training thread stalls for that long once per
batch. The cached step is host-bound (it launches thousands of kernels), so the stall is step
time: docs/PERFORMANCE.md measured it. With slots nothing is allocated or freed per batch: each
worker fills a few slots it created once, the main process maps each slot once and registers it
with CUDA as pinned memory (cudaHostRegister), and the copy to the GPU is one asynchronous copy
out of the slot.

`SlotCollator(collate)` wraps the collator (worker side). A collator with
`collate_into(items, alloc)` (training.collate.Collator) writes the batch straight into a free
slot: it states the batch's layout, `alloc` returns views into the slot, and no byte of the
batch is copied into it afterwards (a cached batch's features come out of the store map into
the slot, one host copy). Another collator's dict is copied into a slot. In a worker it returns a `SlotBatch`,
which is a small message (slot id and layout); `SlotBatch.to(device, non_blocking)` (what
accelerate's device placement and `send_to_device` call) gives the batch dict on `device`.
`host_keys` (the cache counters) come back as CPU tensors, so reading them costs no GPU sync.
Outside a worker (num_workers 0) the collator's dict is returned as it is.

A slot's first 64 bytes are its header, two int64 words:
  state   0 free: the worker may fill it. 1 filled: a batch in it is on its way or being copied.
  mapped  1 once the main process holds the slot's memory; until then each batch carries it.
The worker fills only free slots, then sets state 1. The main process sets state 0 when the copy
out of the slot has finished (a CUDA event it checks at the next copy; at once on a CPU device,
where the batch is copied out before), or when a batch is dropped unread (`__del__`). Each
transition has one writer, so no lock is needed, and the batch's bytes are written before the
message that announces them. When all of a worker's slots are filled it returns the ordinary
dict: slower, never wrong.
"""

from __future__ import annotations

import math
import os
import secrets
import threading
import warnings
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

from featstore.store.lock import pid_alive

__all__ = ["SlotCollator", "SlotBatch", "slots_in_use"]

HEADER = 64       # bytes before a slot's data: two int64 words, then padding to a cache line
ALIGN = 64        # every tensor starts on a 64-byte boundary (any dtype's view is aligned)
FREE, FILLED = 0, 1
STATE, MAPPED = 0, 1  # header word indices


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _header(buffer: torch.Tensor) -> torch.Tensor:
    return buffer[:HEADER].view(torch.int64)


# ---- worker side ----------------------------------------------------------------------------


class SlotCollator:
    """Wraps a collator so that DataLoader workers hand batches over in shared-memory slots.

    Args:
        collate: the collator (items -> dict of tensors).
        slots_per_worker: the most slots one worker fills at once. A worker has up to
            prefetch_factor batches queued, accelerate holds one more ahead, and a slot frees
            only once its copy to the GPU is done: prefetch_factor + 3 never runs short.
        host_keys: keys that `SlotBatch.to` returns as CPU tensors whatever the device.
        headroom: a new slot is this much larger than the batch that needs it, so batches
            a little larger later fit without a new slot.

    Example:
        >>> loader = DataLoader(ds, batch_size=1, num_workers=2, collate_fn=SlotCollator(Collator(0)))
        >>> batch = next(iter(loader)).to("cuda", non_blocking=True)   # a dict of CUDA tensors
    """

    def __init__(self, collate, *, slots_per_worker: int = 5, host_keys: Iterable[str] = (),
                 headroom: float = 1.25):
        if slots_per_worker < 1:
            raise ValueError(f"slots_per_worker must be at least 1, got {slots_per_worker}")
        self.collate = collate
        self.slots_per_worker = int(slots_per_worker)
        self.host_keys = tuple(host_keys)
        self.headroom = float(headroom)

    def __call__(self, items: List[Any]) -> Any:
        in_worker = torch.utils.data.get_worker_info() is not None
        collate_into = getattr(self.collate, "collate_into", None)
        if in_worker and collate_into is not None:
            # The collator writes the batch straight into a slot: no copy of the batch into it.
            worker = _worker_slots(self)
            alloc = _SlotAllocator(worker)
            batch = collate_into(items, alloc)
            return batch if alloc.index is None else worker.seal(alloc.index, alloc.layout, alloc.nbytes,
                                                                  self.host_keys)
        batch = self.collate(items)
        if not in_worker:
            return batch  # the main process: nothing to hand over
        if not isinstance(batch, dict) or not all(isinstance(v, torch.Tensor) for v in batch.values()):
            return batch  # only dicts of tensors travel in slots
        return _worker_slots(self).pack(batch, self.host_keys)


_WORKER: Optional["_WorkerSlots"] = None


def _worker_slots(owner: SlotCollator) -> "_WorkerSlots":
    global _WORKER
    if _WORKER is None or _WORKER.pid != os.getpid():  # first batch of this worker process
        _WORKER = _WorkerSlots(owner.slots_per_worker, owner.headroom)
    return _WORKER


class _WorkerSlots:
    """One worker process's slots. `token` names this process's slots in the main process (a
    restarted worker gets new ones)."""

    def __init__(self, most: int, headroom: float):
        self.pid = os.getpid()
        self.token = f"{self.pid}-{secrets.token_hex(6)}"
        self.most = most
        self.headroom = headroom
        self.buffers: List[torch.Tensor] = []
        self.fallbacks = 0  # batches sent the ordinary way because every slot was filled

    def _slot_for(self, nbytes: int) -> Optional[int]:
        for index, buffer in enumerate(self.buffers):
            if int(_header(buffer)[STATE]) == FREE:
                if buffer.numel() - HEADER < nbytes:
                    self.buffers[index] = self._new_buffer(nbytes)  # a larger one, sent anew
                return index
        if len(self.buffers) < self.most:
            self.buffers.append(self._new_buffer(nbytes))
            return len(self.buffers) - 1
        return None

    def _new_buffer(self, nbytes: int) -> torch.Tensor:
        size = HEADER + _align(int(nbytes * self.headroom) + (1 << 20))
        buffer = torch.empty(size, dtype=torch.uint8).share_memory_()
        _header(buffer).zero_()
        return buffer

    def pack(self, batch: Dict[str, torch.Tensor], host_keys: Tuple[str, ...] = ()) -> Any:
        """Copy a finished batch into a free slot -> its SlotBatch (the batch itself when every
        slot is filled). For collators without `collate_into`."""
        layout, offset = _slot_layout((key, t.dtype, tuple(t.shape)) for key, t in batch.items())
        index = self._slot_for(offset)
        if index is None:
            self.fallbacks += 1
            return batch
        for (key, dtype, shape, start, nbytes), tensor in zip(layout, batch.values()):
            if nbytes:
                _view(self.buffers[index], HEADER + start, nbytes, dtype, shape).copy_(tensor)
        return self.seal(index, layout, offset, host_keys)

    def seal(self, index: int, layout: list, nbytes: int, host_keys: Tuple[str, ...] = ()) -> "SlotBatch":
        """Mark slot `index`, written in `layout`, filled -> the message that announces it."""
        header = _header(self.buffers[index])
        header[STATE] = FILLED
        unmapped = int(header[MAPPED]) == 0
        return SlotBatch((self.token, index), layout, nbytes, self.buffers[index] if unmapped else None, host_keys)


def _slot_layout(specs) -> Tuple[list, int]:
    """(key, dtype, shape) per tensor -> ((key, dtype, shape, byte offset, bytes) per tensor, total
    bytes): tensors one after another, each on a 64-byte boundary."""
    layout, offset = [], 0
    for key, dtype, shape in specs:
        nbytes = math.prod(shape) * dtype.itemsize
        layout.append((key, dtype, tuple(shape), offset, nbytes))
        offset = _align(offset + nbytes)
    return layout, offset


class _SlotAllocator:
    """The allocator a collator's `collate_into(items, alloc)` writes the batch into: views into a
    free slot of this worker (`index` set), or plain tensors when every slot is filled."""

    def __init__(self, worker: _WorkerSlots):
        self.worker, self.index, self.layout, self.nbytes = worker, None, None, 0

    def __call__(self, specs) -> Dict[str, torch.Tensor]:
        layout, nbytes = _slot_layout(specs)
        index = self.worker._slot_for(nbytes)
        if index is None:
            self.worker.fallbacks += 1
            return {key: torch.empty(shape, dtype=dtype) for key, dtype, shape, _, _ in layout}
        self.index, self.layout, self.nbytes = index, layout, nbytes
        buffer = self.worker.buffers[index]
        return {key: _view(buffer, HEADER + start, size, dtype, shape) for key, dtype, shape, start, size in layout}


def _view(buffer: torch.Tensor, start: int, nbytes: int, dtype: torch.dtype, shape: Tuple[int, ...]):
    return buffer[start:start + nbytes].view(dtype).view(shape)


# ---- main-process side ----------------------------------------------------------------------


class SlotBatch:
    """A batch in a worker's slot, as the main process receives it. `to(device)` gives the
    batch dict; see the module docstring."""

    def __init__(self, slot_id: Tuple[str, int], layout: list, nbytes: int, buffer: Optional[torch.Tensor],
                 host_keys: Tuple[str, ...] = ()):
        self.slot_id = slot_id
        self.layout = layout  # (key, dtype, shape, byte offset in the slot's data, bytes) per tensor
        self.nbytes = nbytes
        self.buffer = buffer  # the slot's memory, sent until the main process has mapped it
        self.host_keys = tuple(host_keys)
        self._received = False
        self._done = False

    def __getstate__(self):
        return {"slot_id": self.slot_id, "layout": self.layout, "nbytes": self.nbytes, "buffer": self.buffer,
                "host_keys": self.host_keys}

    def __setstate__(self, state):  # runs in the main process (or its pin-memory thread)
        self.__dict__.update(state)
        self.buffer = _MAIN.adopt(self.slot_id, self.buffer)
        _MAIN.received += 1
        self._received = True
        self._done = False

    def keys(self) -> List[str]:
        return [entry[0] for entry in self.layout]

    def pin_memory(self, *args, **kwargs) -> "SlotBatch":
        return self  # the slot is pinned memory already (registered when first copied)

    def to(self, device, non_blocking: bool = False) -> Dict[str, torch.Tensor]:
        """The batch dict on `device` (the collator's `host_keys` as CPU tensors). Called once."""
        if self._done:
            raise RuntimeError(f"batch slot {self.slot_id}: this batch was already moved; move it once")
        if self.buffer is None:
            raise RuntimeError(f"batch slot {self.slot_id}: its memory never reached this process; "
                               "train with --dataloader_batch_slots False and report this")
        self._done = True
        device = torch.device(device)
        data = self.buffer[HEADER:HEADER + self.nbytes]
        host = {key: _view(self.buffer, HEADER + start, nbytes, dtype, shape).clone()
                for key, dtype, shape, start, nbytes in self.layout if key in self.host_keys}
        if device.type == "cuda":
            moved = _MAIN.copy_to_cuda(self.buffer, data, device, non_blocking)
        else:
            moved = data.clone() if device.type == "cpu" else data.to(device)
            _MAIN.release(self.buffer)
        out = {}
        for key, dtype, shape, start, nbytes in self.layout:
            out[key] = host[key] if key in host else _view(moved, start, nbytes, dtype, shape)
        return out

    def __del__(self):
        # A batch dropped unread (the end of an epoch, a DataLoader shut down): free its slot.
        try:
            if self._received and not self._done and self.buffer is not None:
                _MAIN.release(self.buffer)
        except Exception:  # interpreter shutdown
            pass


class _MainSide:
    """The main process's view of every worker's slots: their memory (mapped once), which of
    them are registered with CUDA, and the copies out of them not yet known to be done."""

    def __init__(self):
        self.lock = threading.Lock()  # the pin-memory thread adopts, the training thread copies
        self.buffers: Dict[Tuple[str, int], torch.Tensor] = {}
        self.registered: Dict[int, int] = {}  # data_ptr -> bytes, pinned by cudaHostRegister
        self.pending: List[Tuple[Any, torch.Tensor]] = []  # (CUDA event, slot buffer)
        self.warned = False
        self.received = 0  # batches that arrived in slots, since the process started

    def adopt(self, slot_id, buffer: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        with self.lock:
            if buffer is None:
                return self.buffers.get(slot_id)
            old = self.buffers.get(slot_id)
            if old is not None and old.data_ptr() != buffer.data_ptr():
                self._forget(old)  # the worker replaced a free slot with a larger one
            if old is None:
                self._forget_dead_workers(slot_id[0])
            self.buffers[slot_id] = buffer
            _header(buffer)[MAPPED] = 1
            return buffer

    def _forget_dead_workers(self, token: str) -> None:
        # Workers restarted (non-persistent workers, each epoch): the old ones' slots are unused.
        for key in [k for k in self.buffers if k[0] != token and not pid_alive(int(k[0].split("-")[0]))]:
            self._forget(self.buffers.pop(key))

    def _forget(self, buffer: torch.Tensor) -> None:
        self._wait_for_copies(buffer)
        size = self.registered.pop(buffer.data_ptr(), None)
        if size is not None:
            torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())

    def _wait_for_copies(self, buffer: torch.Tensor) -> None:
        for event, pending in self.pending:
            if pending.data_ptr() == buffer.data_ptr():
                event.synchronize()

    def release(self, buffer: torch.Tensor) -> None:
        _header(buffer)[STATE] = FREE

    def _release_finished(self) -> None:
        still = []
        for event, buffer in self.pending:
            if event.query():
                self.release(buffer)
            else:
                still.append((event, buffer))
        self.pending = still

    def _register(self, buffer: torch.Tensor) -> bool:
        ptr = buffer.data_ptr()
        if ptr in self.registered:
            return True
        cudart = torch.cuda.cudart()
        result = cudart.cudaHostRegister(ptr, buffer.numel(), 0)
        if result != cudart.cudaError.success:
            if not self.warned:
                self.warned = True
                warnings.warn(f"batch slots: cudaHostRegister failed ({result}); batches are copied to the GPU "
                              "synchronously. --dataloader_batch_slots False gives the pin-memory thread instead",
                              RuntimeWarning, stacklevel=3)
            return False
        self.registered[ptr] = buffer.numel()
        return True

    def copy_to_cuda(self, buffer, data, device, non_blocking: bool) -> torch.Tensor:
        with self.lock:
            self._release_finished()
            pinned = self._register(buffer)
            moved = data.to(device, non_blocking=non_blocking and pinned)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            self.pending.append((event, buffer))
            return moved


_MAIN = _MainSide()


def slots_in_use() -> Dict[str, int]:
    """In the main process: slots mapped, registered with CUDA, copies not yet released, and
    batches that arrived in slots since the process started."""
    with _MAIN.lock:
        return {"mapped": len(_MAIN.buffers), "registered": len(_MAIN.registered), "pending": len(_MAIN.pending),
                "received": _MAIN.received}
