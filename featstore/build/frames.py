"""The build's decode stage: DataLoader worker processes that read and preprocess each unit's
frames (`featstore.build.encode.read_unit_frames`) ahead of the GPU loop.

Frames cross from the workers to the GPU loop as uint8 where that is exact (every value k/255:
the VGGT and Qwen views without extra_resize), a quarter of the float32 bytes to pass, stack,
pin and copy; the readers return those bytes straight from the decoded image (no float32 round
trip and check: about 1.4x less worker time a frame, benchmarks/decode_bench.py), and `to_float`
makes them float32 on the device, bit-identical to decoding to float32.

Shapes: a unit's frames [S, 3, H, W], uint8 or float32 in [0, 1].
"""

from __future__ import annotations

import os
import signal

from featstore.build.plan import Unit
from featstore.errors import ImageDecodeError
from featstore.interrupt import ignore_stop_signals, signals_blocked

# torch is imported inside the functions, so that `featstore build --help` needs no torch.

__all__ = ["UnitDataset", "start_decoding", "to_float", "exact_uint8"]


class UnitDataset:
    """Decodes the frames of one unit per item, in a DataLoader worker (a map-style dataset:
    `__len__` and `__getitem__` are all DataLoader needs).

    An item is (index, frames [S, 3, H, W] or None, sources or None, error message or None):
    a unit that cannot be read is returned with its error, never raised, so that one bad image
    does not stop a long build.

    Example:
        >>> from featstore.build.frames import UnitDataset
        >>> from featstore.build.plan import plan_units
        >>> from featstore.encoders import resolve_spec
        >>> i, frames, sources, error = UnitDataset(plan_units("data"), "data", resolve_spec("vggt-tiny"), 14)[0]
        >>> frames.dtype, frames.shape[0], error
        (torch.uint8, 1, None)
    """

    def __init__(self, units: list[Unit], data_root: str, spec, patch: int, uint8: bool = True):
        self.units, self.data_root, self.spec, self.patch, self.uint8 = units, data_root, spec, patch, uint8

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, i: int):
        # Looked up at call time, in the worker: tests and benchmarks replace it on the module.
        from featstore.build.encode import read_unit_frames

        try:
            # uint8 straight from the decoded image where exact; a reader that made float32
            # (extra_resize, a registered reader without uint8) is checked value by value.
            frames, sources = read_unit_frames(self.data_root, self.units[i], self.spec, self.patch, uint8=self.uint8)
            return i, exact_uint8(frames) if self.uint8 else frames, sources, None
        except ImageDecodeError as e:
            return i, None, None, str(e)
        except Exception as e:  # a decoder bug must not kill a long build: record the unit as failed
            return i, None, None, f"{type(e).__name__}: {e}"


def exact_uint8(frames):
    """`frames` (float32 in [0, 1]) as uint8 when every value is exactly k/255 (then
    `to_float` on the device gives back the very same float32), else unchanged; uint8 frames
    (the readers' own, exact by construction) pass as they are."""
    import torch

    if frames.dtype == torch.uint8:
        return frames
    u8 = frames.mul(255).round_().to(torch.uint8)
    return u8 if torch.equal(to_float(u8), frames) else frames


def to_float(x):
    """A batch of frames as the encoder takes them: float32 in [0, 1] (uint8 k -> k/255, the
    division the decoders make, so the result is bit-identical). The divisor is a tensor on x's
    device: CUDA divides by a Python number as a multiplication by its reciprocal, which can
    differ from k/255 in the last bit."""
    import torch

    if x.dtype != torch.uint8:
        return x
    return x.to(torch.float32).div_(torch.full((), 255.0, dtype=torch.float32, device=x.device))


def start_decoding(todo: list[Unit], data_root: str, spec, patch: int, *, workers: int, uint8: bool = True,
                   pin_device=None):
    """Fork the decode workers and return (loader iterator, its shutdown). Called before the
    model loads, so that the first units are decoded while it does.

    Args:
        todo: the units to decode, in order; the iterator yields `UnitDataset` items.
        data_root: the folder their frames are relative to.
        spec: the EncoderSpec (its preprocessing).
        patch: the encoder's patch size.
        workers: worker processes (0: decode in this process, as the iterator is consumed).
        uint8: hand frames over as uint8 where exact (BuildOptions.uint8_frames).
        pin_device: a CUDA device: the loader's pin-memory thread receives every unit from its
            worker and copies its frames into pinned memory, off the GPU loop's thread
            (BuildOptions.pin_frames). None: the iterator's caller receives them as they are.
    """
    import contextlib

    import torch

    dataset = UnitDataset(todo, data_root, spec, patch, uint8)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=workers,
        prefetch_factor=8 if workers else None, persistent_workers=False, pin_memory=pin_device is not None,
        collate_fn=lambda item: item, worker_init_fn=_die_with_parent)
    # The pin-memory thread works on the device current when the iterator is made: the build's
    # (a context on another GPU would cost that GPU memory).
    on_device = torch.cuda.device(pin_device) if pin_device is not None else contextlib.nullcontext()
    with signals_blocked(), on_device:
        batches = iter(loader)  # forks the decode workers (see featstore.interrupt)
    # Join the workers when the build ends (absent with workers=0), not whenever it is collected.
    return batches, getattr(batches, "_shutdown_workers", lambda: None)


def _die_with_parent(_worker_id: int) -> None:
    """Decode workers die with the build: a build killed just after forking a worker can
    otherwise leave it running, holding the store and the terminal (torch's own parent check
    starts too late to see that). Linux only; elsewhere a no-op. They ignore SIGINT/SIGTERM:
    the main process stops them (featstore.interrupt)."""
    ignore_stop_signals()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl: nothing will signal us
            os._exit(0)
    except (OSError, AttributeError):
        pass
