"""The build's encode and commit stages: three threads, so that the GPU never waits on the disk.

  GPU loop (the calling thread)   takes decoded units from the decode workers
                                  (featstore.build.frames; on CUDA already received and pinned
                                  by the loader's pin-memory thread), groups them by
                                  (S, 3, H, W, dtype), stacks a group into pinned memory as
                                  [B, S, 3, H, W] at --batch-frames frames,
                                  copies it to the GPU on a stream of its own, runs one forward
                                  (featstore.build.encode.encode_frames), and queues a
                                  non-blocking device->host copy of [B, F, N, C] + a CUDA event.
                                  With frame reuse, a frame shared by units of the batch is
                                  copied and patch-embedded once (`distinct_frames`)
  serialiser thread               waits for a batch's copy, records a unit with a NaN or an
                                  infinity as failed, makes each other unit's blob (one copy +
                                  CRC-32, both release the GIL)
  writer thread                   hands the blobs to the single StoreWriter, which commits in
                                  batches; counts progress

Bounded queues between them (4 batches to the serialiser: the pinned memory in flight; 2 to the
writer) keep memory flat. The first exception of a thread stops its work and is raised in the
calling thread; SIGINT/SIGTERM only set a stop flag, checked between units, after which the
batches in flight are finished and committed (featstore.interrupt says why).
"""

from __future__ import annotations

import os
import queue
import threading
import time

from featstore.build.frames import to_float
from featstore.build.options import BuildContext
from featstore.build.plan import Unit
from featstore.build.report import BuildReport
from featstore.interrupt import StopFlag

# torch is imported inside the functions, so that `featstore build --help` needs no torch.

__all__ = ["run_pipeline", "distinct_frames", "CPU_ENCODER_THREADS", "NONFINITE_ERROR"]

# The CPU encoder's torch intra-op threads, chosen by benchmarks/cpu_threads_bench.py
# (docs/BENCHMARKS.md, "CPU builds"). None: the cores the decode workers leave, at least one
# (2 cores, 2 workers: 1 thread, 4-7x the frames/s of torch's default of 2 there, which
# oversubscribes the cores the workers decode on; more cores: not measured). The decode workers
# already run one thread each: torch's DataLoader sets that in every worker.
CPU_ENCODER_THREADS: int | None = None


class _Stage(threading.Thread):
    """A worker thread fed through a bounded queue, passing its results to the next stage.

    The first exception stops the stage's work (it keeps draining its queue so that nobody
    blocks on it) and is surfaced by the main thread. `None` ends the stage and the next one."""

    def __init__(self, name: str, handle, *, maxsize: int, downstream: "_Stage | None" = None):
        super().__init__(name=name, daemon=True)
        self.handle, self.downstream = handle, downstream
        self.jobs: queue.Queue = queue.Queue(maxsize=maxsize)
        self.error: BaseException | None = None

    def run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                if self.downstream is not None:
                    self.downstream.jobs.put(None)
                return
            if self.error is not None:
                continue
            try:
                result = self.handle(*job)
                if self.downstream is not None:
                    self.downstream.jobs.put(result)
            except BaseException as e:  # surfaced in the main thread
                self.error = e


NONFINITE_ERROR = ("the encoder gave NaN or infinite features: not stored. Check the image and the weights "
                   "(--weights); float16 overflows past 65504: use --compute-dtype and --storage-dtype bfloat16")


def _serialise(spec, report: BuildReport, units, sources, host, finite, done, grid):
    """Wait for a batch's device->host copy, then make each unit's blob (one copy + CRC-32;
    both release the GIL, so this overlaps the writer's commits). A unit whose features are not
    all finite is recorded as failed instead (a rerun retries it). Times both in `report`.
    Returns (units to commit, their blobs, how many failed)."""
    from featstore.build.encode import unit_metadata
    from featstore.format.blob import encode_entry
    from featstore.format.codecs import codec_for

    t0 = time.perf_counter()
    if done is not None:
        done.synchronize()
    t1 = time.perf_counter()
    kept, blobs = [], []
    codec = codec_for(spec.storage_dtype)
    for unit, src, feats, ok in zip(units, sources, host, finite.tolist()):
        if not ok:
            report.failed.append({"key": unit.key, "frames": list(unit.frames), "error": NONFINITE_ERROR})
            continue
        kept.append(unit)
        blobs.append(encode_entry(codec.encode(feats), unit_metadata(unit, src, grid, spec)))
    report.d2h_wait_s += t1 - t0
    report.serialise_s += time.perf_counter() - t1
    return kept, blobs, len(units) - len(kept)


def _commit(writer, report: BuildReport, bar, first: dict, units, blobs, failed: int = 0) -> None:
    """Hand blobs to the single writer (which commits every N entries) and count progress
    (`failed`: units of the batch recorded as failed, counted as done on the bar). `first` holds
    the time and frame count of the first batch handed over (the steady rate's start)."""
    t0 = time.perf_counter()
    for unit, blob in zip(units, blobs):
        writer.put(unit.key, blob)
        report.computed += 1
        report.frames += unit.num_frames
        report.bytes += len(blob)
    t1 = time.perf_counter()
    report.commit_s += t1 - t0
    if not first:
        first.update(t=t1, frames=report.frames)  # the steady rate counts from here
    else:
        report.steady_frames_per_s = (report.frames - first["frames"]) / max(t1 - first["t"], 1e-9)
    if bar is not None:
        elapsed = max(time.perf_counter() - bar.t0, 1e-9)
        bar.set_postfix_str(f"{report.frames / elapsed:.1f} frames/s, {report.bytes / elapsed / 1e6:.1f} MB/s",
                            refresh=False)
        bar.update(len(units) + failed)


def run_pipeline(ctx: BuildContext, encoder, todo: list[Unit], batches, writer, report: BuildReport,
                 stop: StopFlag) -> bool:
    """Encode the decoded units `batches` yields (`start_decoding(todo, ...)`) and hand every
    unit of `todo` to the writer, counting into `report`.

    Args:
        ctx: the build (its options: batch_frames, workers, compile; the progress bar).
        encoder: the built encoder (its spec is ctx.spec).
        todo: this rank's units, as the decode workers were given them.
        batches: the decode workers' iterator.
        writer: the StoreWriter; entries go to it from the writer thread only.
        report: counts, failures and stage times are added to it.
        stop: the stop flag of SIGINT/SIGTERM, checked between units.

    Returns:
        True when `stop` ended it early (the units handed over so far are committed by the
        writer stage).
    """
    import torch

    from featstore.build.encode import encode_frames
    from featstore.progress import Progress

    opts = ctx.opts
    spec = encoder.spec
    # Each distinct frame of a batch is embedded once where the encoder can (VGGT, featstore
    # backend). Under --compile the number of distinct frames varies by batch: torch.compile
    # recompiles the patch-embedding blocks once with that dimension dynamic, then reuses them.
    reuse = opts.frame_reuse and getattr(encoder, "encodes_indexed", False)
    device = encoder.device
    on_cuda = device.type == "cuda"
    threads = torch.get_num_threads()
    if not on_cuda:  # restored below: it is the calling process's setting
        torch.set_num_threads(CPU_ENCODER_THREADS or max(1, (os.cpu_count() or 1) - opts.workers))
    # A bar on a terminal, else a whole line every 30 s (featstore.progress); both with the ETA.
    bar = Progress(len(todo), desc="featstore build", unit="unit", enabled=ctx.show_progress)
    # GPU loop (this thread) -> serialiser thread -> writer thread. The serialiser's queue bounds
    # the pinned batches in flight; the writer's bounds the encoded blobs waiting for the disk.
    committer = _Stage("featstore-writer", lambda u, b, n: _commit(writer, report, bar, first, u, b, n), maxsize=2)
    serialiser = _Stage("featstore-serialiser", lambda *job: _serialise(spec, report, *job), maxsize=4,
                        downstream=committer)
    committer.start()
    serialiser.start()
    buckets: dict[tuple, list] = {}  # (S, 3, H, W, dtype) -> decoded units waiting for their batch
    first: dict = {}
    stopped = False
    if on_cuda:
        compute = torch.cuda.current_stream(device)
        h2d, d2h = torch.cuda.Stream(device), torch.cuda.Stream(device)

    def flush(bucket) -> None:
        t0 = time.perf_counter()
        try:
            _flush(bucket)
        finally:
            report.encode_s += time.perf_counter() - t0

    def _flush(bucket) -> None:
        items = buckets.pop(bucket)
        shape = bucket[:-1]
        units = [todo[i] for i, _, _ in items]
        index = None
        if reuse:
            first, rows = distinct_frames(units, [src for _, _, src in items])
            parts = [items[b][1][k] for b, k in first]  # the distinct frames [3, H, W]
            index = torch.tensor(rows, dtype=torch.long)  # [B, S]
        else:
            parts = [frames for _, frames, _ in items]  # [S, 3, H, W] each
        report.count_frames(len(items) * shape[0], len(parts) if reuse else len(items) * shape[0])
        full = -(-opts.batch_frames // shape[0])
        if opts.compile and len(items) < full:
            # A short last batch would make torch.compile recompile for a new B; pad it with
            # copies (batch rows are independent in VGGT) and drop their outputs below.
            if reuse:
                index = torch.cat([index, index[-1:].expand(full - len(items), -1)])
            else:
                parts += [parts[-1]] * (full - len(items))
        # [U, 3, H, W] with reuse, else [B, S, 3, H, W]. On CUDA stacked straight into pinned
        # memory, the host->device copy's source: one copy of the batch on the host, not two.
        x = torch.empty((len(parts), *parts[0].shape), dtype=parts[0].dtype, pin_memory=on_cuda)
        torch.stack(parts, out=x)
        grid = encoder.patch_grid(*x.shape[-2:])
        if on_cuda:
            # Copies run on their own streams, so that this batch's host->device copy overlaps the
            # previous batch's forward and its device->host copy the next one's (on the compute
            # stream each copy would wait for the kernels before it, and they for it).
            with torch.cuda.stream(h2d):
                x = x.to(device, non_blocking=True)
            compute.wait_stream(h2d)
            x.record_stream(compute)  # its memory is not reused before the forward has read it
        feats = encode_frames(encoder, to_float(x), index=index)[: len(items)]  # [B, F, N, C], storage dtype, on the device
        finite = torch.isfinite(feats.flatten(1)).all(1)  # [B]: a NaN or infinity is never stored
        done = None
        if on_cuda:
            host = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=True)
            host_finite = torch.empty(finite.shape, dtype=torch.bool, pin_memory=True)
            d2h.wait_stream(compute)
            with torch.cuda.stream(d2h):
                host.copy_(feats, non_blocking=True)  # the GPU goes on with the next batch
                host_finite.copy_(finite, non_blocking=True)
                done = torch.cuda.Event()
                done.record(d2h)
            feats.record_stream(d2h)  # nor is this before the copy has read it
            finite.record_stream(d2h)
        else:
            host, host_finite = feats.cpu(), finite
        serialiser.jobs.put((units, [src for _, _, src in items], host, host_finite, done, grid))

    try:
        waited = time.perf_counter()
        for i, frames, sources, error in batches:
            report.decode_wait_s += time.perf_counter() - waited
            for stage in (serialiser, committer):
                if stage.error is not None:
                    raise stage.error
            if stop:  # checked between units: nothing is cut in half
                stopped = True
                break
            if error is not None:
                report.failed.append({"key": todo[i].key, "frames": list(todo[i].frames), "error": error})
                bar.update(1)
                waited = time.perf_counter()
                continue
            bucket = (*frames.shape, frames.dtype)
            buckets.setdefault(bucket, []).append((i, frames, sources))
            if len(buckets[bucket]) * frames.shape[0] >= opts.batch_frames:
                flush(bucket)
            waited = time.perf_counter()
        if not stopped:
            for bucket in list(buckets):
                flush(bucket)
    finally:
        # Signals only set `stop` here, so this cannot be cut short: the sentinel always reaches
        # the serialiser, which finishes the batches in flight and then ends the writer stage.
        serialiser.jobs.put(None)
        serialiser.join()
        committer.join()
        bar.close()
        torch.set_num_threads(threads)
    for stage in (serialiser, committer):
        if stage.error is not None:
            raise stage.error
    return stopped


def distinct_frames(units: list[Unit], sources: list[list[dict]]) -> tuple[list[tuple[int, int]], list[list[int]]]:
    """The distinct frames of a batch and where each unit's frames are among them.

    A frame is known by its reference (path, or video#index) and its file's sha256 as the decode
    step read it: two units naming one file read the same bytes and preprocess them alike (the
    preprocessing is per frame), unless the file changed between the two reads, which the hash
    tells apart.

    Returns:
        (first, index): first[j] = (unit, frame) position of distinct frame j's first instance;
        index[b][k] = the distinct frame of unit b's frame k.

    Example:
        >>> from featstore.build.plan import Unit
        >>> src = lambda *h: [{"sha256": x} for x in h]
        >>> distinct_frames([Unit("a", ("e/0", "e/1")), Unit("b", ("e/0", "e/2"))], [src("0", "1"), src("0", "2")])
        ([(0, 0), (0, 1), (1, 1)], [[0, 1], [0, 2]])
    """
    ids: dict[tuple[str, str], int] = {}
    first: list[tuple[int, int]] = []
    index = []
    for b, (unit, srcs) in enumerate(zip(units, sources)):
        row = []
        for k, (ref, src) in enumerate(zip(unit.frames, srcs)):
            j = ids.setdefault((ref, src["sha256"]), len(ids))
            if j == len(first):
                first.append((b, k))
            row.append(j)
        index.append(row)
    return first, index
