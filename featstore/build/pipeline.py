"""Compute a data root's encoder features into the store (missing and stale only).

Pipeline (one process per GPU; see docs/BUILD.md):
  0. spec     the EncoderSpec from --encoder/--weights/flags (resolve_spec: no model yet); a
              store of another spec is refused here, every differing field named
  1. plan     units from a scan of the data root, or from training's annotation files
              (featstore.build.plan: the same code training uses to ask for features); one per
              sample for a sequence encoder (VGGT), one per distinct image for an image encoder
  2. split    fresh / missing / stale against the store's feature set (--feature-set, default
              the encoder's: "vggt" for VGGT); only missing and stale are computed
              (--dry-run stops here, having built no model)
  3. decode   DataLoader workers read each frame once (featstore.build.encode.read_unit_frames)
  4. batch    units are grouped by (S, H, W) and stacked into [B, S, 3, H, W]
  5. encode   featstore.build.encode.encode_frames: one forward per batch (autocast per the spec),
              cast to the storage dtype on the GPU, copied to pinned host memory without
              blocking the GPU
  6. commit   a writer thread waits for the copy, serialises blobs and commits in batches

Rerunning the same command resumes an interrupted build and recomputes only what changed.
Progress (units done, frames/s, ETA) goes to stderr; the summary follows on stderr, or the
report as JSON on stdout with --json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import queue
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

from featstore.store.lock import BuildLock, prepare_store_dir
from featstore.cli import add_annotations_argument
from featstore.contract.dtypes import DTYPE_NAMES, STORAGE_DTYPE_NAMES, is_quantised, torch_dtype
from featstore.contract.spec import EncoderSpec, PreprocessSpec, field_choices, field_default
from featstore.errors import FeatstoreError, ImageDecodeError, PlanError, StoreFullError
from featstore.interrupt import StopFlag, ignore_stop_signals, signals_blocked, stop_on_signals
from featstore.build.plan import IMAGE_EXTENSIONS, Unit, annotation_sources, describe_skipped, plan_units, source_path
from featstore.progress import NO_PROGRESS_HELP
from featstore.build.recipes import RECIPE_NAMES, get_recipe
from featstore.store.layout import (DEFAULT_STORE_NAME, PRIMARY_FEATURE_SET, check_feature_set, check_fingerprint,
                             default_feature_set, existing_manifest, feature_set_label, features_db,
                             open_env, require_directory, utc_now)

# torch is imported inside the functions that run the model, so that `featstore --help` and
# the parser need no torch (the layering test runs the CLI with torch unimportable).

__all__ = ["BuildOptions", "BuildReport", "build", "split_plan", "configure_parser", "run", "EXAMPLES"]

logger = logging.getLogger("featstore")

# The CPU encoder's torch intra-op threads, chosen by benchmarks/cpu_threads_bench.py
# (docs/BENCHMARKS.md, "CPU builds"). None: the cores the decode workers leave, at least one
# (2 cores, 2 workers: 1 thread, 4-7x the frames/s of torch's default of 2 there, which
# oversubscribes the cores the workers decode on; more cores: not measured). The decode workers
# already run one thread each: torch's DataLoader sets that in every worker.
CPU_ENCODER_THREADS: int | None = None
_HEADER_ESTIMATE = 1024  # bytes of safetensors header + metadata per entry, for size estimates


@dataclass
class BuildOptions:
    """Everything one build needs; the CLI fills it from its flags."""

    data_root: str
    annotations: list[str] = field(default_factory=list)
    store: str | None = None
    encoder: str = "vggt-1b"
    feature_set: str | None = None  # None: the encoder's (featstore.encoders.feature_set_of)
    weights: str | None = None
    device: str = "auto"
    spec_overrides: dict = field(default_factory=dict)
    force: bool = False
    dry_run: bool = False
    workers: int = min(4, os.cpu_count() or 1)
    batch_frames: int = 16  # frames per forward; batching amortises kernel launches
    shard: tuple[int, int] = (0, 1)  # (index, count) for multi-host builds
    commit_entries: int = 64
    commit_bytes: int = 512 << 20
    progress: bool = True
    compile: bool = False  # torch.compile the encoder's blocks (GPU; same features within bf16 noise)
    # Frames cross from the decode workers to the GPU loop as uint8 where that is exact (every
    # value k/255: the VGGT and Qwen views without extra_resize), a quarter of the float32 bytes
    # to pass, stack, pin and copy; they become float32 on the device. False: float32 all the way
    # (same features; kept for benchmarks/build_bench.py's before/after).
    uint8_frames: bool = True

    def store_path(self) -> str:
        if self.store:
            return self.store
        name = DEFAULT_STORE_NAME
        if self.shard[1] > 1:
            name = f"vggt_features.shard-{self.shard[0]}-of-{self.shard[1]}.lmdb"
        return os.path.join(self.data_root, name)


@dataclass
class BuildReport:
    feature_set: str = PRIMARY_FEATURE_SET
    planned: int = 0
    fresh: int = 0
    missing: int = 0
    stale: int = 0
    computed: int = 0
    frames: int = 0
    bytes: int = 0
    failed: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # annotation samples without images (e.g. video)
    elapsed_s: float = 0.0
    pipeline_s: float = 0.0  # decode + encode + commit, without model loading and planning
    # Frames/s from the first commit to the last: the pipeline's steady rate, without the start
    # (first decode, first forward); 0.0 for a single commit.
    steady_frames_per_s: float = 0.0
    # Host time per pipeline stage, in seconds (docs/BUILD.md, "Stage times"). Each thread's
    # stages add up to at most pipeline_s; threads overlap, so the busiest one binds:
    decode_wait_s: float = 0.0  # GPU loop waiting for the decode workers' next unit
    encode_s: float = 0.0  # GPU loop: stack, host->device, forward, cast, queue the device->host copy
    d2h_wait_s: float = 0.0  # serialiser waiting for a batch's device->host copy (and its kernels)
    serialise_s: float = 0.0  # serialiser: quantise (fp8), blob layout, one copy and CRC-32
    commit_s: float = 0.0  # writer: LMDB puts, commits and their fsync
    interrupted: bool = False

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def stage_summary(self) -> str:
        """One line of the stage times, e.g. for the build's summary on stderr."""
        return (f"stages: decode wait {self.decode_wait_s:.2f} s, encode {self.encode_s:.2f} s, device->host wait "
                f"{self.d2h_wait_s:.2f} s, serialise+CRC {self.serialise_s:.2f} s, commit+fsync {self.commit_s:.2f} s "
                f"(pipeline {self.pipeline_s:.2f} s; {self.steady_frames_per_s:.1f} frames/s from the first commit "
                "to the last)")


_STAGE_FIELDS = ("decode_wait_s", "encode_s", "d2h_wait_s", "serialise_s", "commit_s")

# What a build on a store of another spec can do (the error lists every differing field first).
_MISMATCH_ADVICE = ("Pass --force to rebuild this store in place (drops its entries), or --store PATH to build "
                    "a new store beside it.")


# -- encoder helpers ------------------------------------------------------------------------

def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


# -- planning: what to compute ----------------------------------------------------------------

def _entry_state(value, unit: Unit, data_root: str, fingerprint: str) -> str:
    """'fresh' or 'stale' for a stored value of `unit`."""
    from featstore.format.blob import decode_entry

    try:
        meta = decode_entry(value, key=unit.key).metadata
        frames = json.loads(meta.get("frames", "null"))
        sources = json.loads(meta.get("sources", "null"))
    except (FeatstoreError, ValueError):
        return "stale"  # undecodable: recompute it
    if meta.get("fingerprint") != fingerprint or frames != list(unit.frames):
        return "stale"
    if not isinstance(sources, list) or len(sources) != len(unit.frames):
        return "stale"
    for frame, src in zip(unit.frames, sources):
        try:
            st = os.stat(source_path(data_root, frame))
        except OSError:
            return "stale"
        if not isinstance(src, dict) or src.get("size") != st.st_size or src.get("mtime_ns") != st.st_mtime_ns:
            return "stale"
    return "fresh"


def split_plan(units: list[Unit], store_path: str, data_root: str, fingerprint: str, *,
               feature_set: str = PRIMARY_FEATURE_SET) -> dict[str, list[Unit]]:
    """Split `units` into fresh / missing / stale against `feature_set` of the store at
    `store_path` (all missing when the store or the set does not exist yet)."""
    split: dict[str, list[Unit]] = {"fresh": [], "missing": [], "stale": []}
    if existing_manifest(store_path, feature_set) is None:
        split["missing"] = list(units)
        return split
    env = open_env(store_path, readonly=True, lock=False)
    try:
        db = env.open_db(features_db(feature_set), create=False)
        with env.begin(db=db, buffers=True) as txn:
            for unit in units:
                value = txn.get(unit.key.encode("utf-8"))
                state = "missing" if value is None else _entry_state(value, unit, data_root, fingerprint)
                split[state].append(unit)
    finally:
        env.close()
    return split


def _estimate_entry_bytes(spec, units: list[Unit], data_root: str) -> int:
    """Bytes of one entry, from the first readable image's size (headers only, no decode)."""
    from PIL import Image

    from featstore.encoders import stored_shape

    itemsize = torch_dtype(spec.storage_dtype).itemsize
    scale_bytes = 4 if is_quantised(spec.storage_dtype) else 0  # fp8: one float32 scale per token
    for unit in units[:32]:
        try:
            with Image.open(source_path(data_root, unit.frames[0])) as im:
                w, h = im.size
        except OSError:
            continue
        kept, tokens, channels = stored_shape(spec, w, h, unit.num_frames)
        return kept * tokens * (channels * itemsize + scale_bytes) + _HEADER_ESTIMATE
    return _HEADER_ESTIMATE


# -- the pipeline ---------------------------------------------------------------------------

class _UnitDataset:
    """Decodes the frames of one unit per item, in a DataLoader worker (a map-style dataset:
    `__len__` and `__getitem__` are all DataLoader needs)."""

    def __init__(self, units: list[Unit], data_root: str, spec, patch: int, uint8: bool):
        self.units, self.data_root, self.spec, self.patch, self.uint8 = units, data_root, spec, patch, uint8

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, i: int):
        from featstore.build.encode import read_unit_frames

        try:
            frames, sources = read_unit_frames(self.data_root, self.units[i], self.spec, self.patch)
            return i, _exact_uint8(frames) if self.uint8 else frames, sources, None
        except ImageDecodeError as e:
            return i, None, None, str(e)
        except Exception as e:  # a decoder bug must not kill a long build: record the unit as failed
            return i, None, None, f"{type(e).__name__}: {e}"


def _exact_uint8(frames):
    """`frames` (float32 in [0, 1]) as uint8 when every value is exactly k/255 (then
    `_to_float` on the device gives back the very same float32), else unchanged."""
    import torch

    u8 = frames.mul(255).round_().to(torch.uint8)
    return u8 if torch.equal(_to_float(u8), frames) else frames


def _to_float(x):
    """A batch of frames as the encoder takes them: float32 in [0, 1] (uint8 k -> k/255, the
    division the decoders make, so the result is bit-identical)."""
    import torch

    return x.to(torch.float32).div_(255) if x.dtype == torch.uint8 else x


def _start_decoding(todo: list[Unit], opts: BuildOptions, spec, patch: int):
    """Fork the decode workers and return (loader iterator, its shutdown). Called before the
    model loads, so that the first units are decoded while it does."""
    import torch

    dataset = _UnitDataset(todo, opts.data_root, spec, patch, opts.uint8_frames)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=opts.workers,
        prefetch_factor=8 if opts.workers else None, persistent_workers=False,
        collate_fn=lambda item: item, worker_init_fn=_die_with_parent)
    with signals_blocked():
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
    from featstore.format.fp8 import entry_tensors

    t0 = time.perf_counter()
    if done is not None:
        done.synchronize()
    t1 = time.perf_counter()
    kept, blobs = [], []
    for unit, src, feats, ok in zip(units, sources, host, finite.tolist()):
        if not ok:
            report.failed.append({"key": unit.key, "frames": list(unit.frames), "error": NONFINITE_ERROR})
            continue
        kept.append(unit)
        blobs.append(encode_entry(entry_tensors(feats, spec.storage_dtype), unit_metadata(unit, src, grid, spec)))
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


def _run_pipeline(encoder, todo: list[Unit], batches, opts: BuildOptions, writer, report: BuildReport, show: bool,
                  stop: StopFlag) -> bool:
    """Encode the decoded units `batches` yields (`_start_decoding(todo, ...)`) and hand every
    unit of `todo` to the writer. Returns True when `stop` ended it early (the units handed over
    so far are committed by the writer stage)."""
    import torch

    from featstore.build.encode import encode_frames
    from featstore.progress import Progress

    spec = encoder.spec
    device = encoder.device
    on_cuda = device.type == "cuda"
    threads = torch.get_num_threads()
    if not on_cuda:  # restored below: it is the calling process's setting
        torch.set_num_threads(CPU_ENCODER_THREADS or max(1, (os.cpu_count() or 1) - opts.workers))
    # A bar on a terminal, else a whole line every 30 s (featstore.progress); both with the ETA.
    bar = Progress(len(todo), desc="featstore build", unit="unit", enabled=show)
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
        x = torch.stack([frames for _, frames, _ in items])  # [B, S, 3, H, W]
        full = -(-opts.batch_frames // shape[0])
        if opts.compile and len(items) < full:
            # A short last batch would make torch.compile recompile for a new B; pad it with
            # copies (batch rows are independent in VGGT) and drop their outputs below.
            x = torch.cat([x, x[-1:].expand(full - len(items), *x.shape[1:])])
        grid = encoder.patch_grid(*x.shape[-2:])
        if on_cuda:
            # Copies run on their own streams, so that this batch's host->device copy overlaps the
            # previous batch's forward and its device->host copy the next one's (on the compute
            # stream each copy would wait for the kernels before it, and they for it).
            pinned = x.pin_memory()
            with torch.cuda.stream(h2d):
                x = pinned.to(device, non_blocking=True)
            compute.wait_stream(h2d)
            x.record_stream(compute)  # its memory is not reused before the forward has read it
        feats = encode_frames(encoder, _to_float(x))[: len(items)]  # [B, F, N, C], storage dtype, on the device
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


def _dist_setup():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _gather_reports(report: BuildReport, world: int) -> BuildReport:
    if world <= 1:
        return report
    import torch.distributed as dist

    parts: list = [None] * world
    dist.all_gather_object(parts, report.to_dict())
    # Every rank plans every unit and splits them fresh/missing/stale alike; only the work is
    # divided (todo[rank::world]). So the plan counts are one rank's, the work counts a sum.
    total = BuildReport(feature_set=report.feature_set, planned=report.planned, fresh=report.fresh,
                        missing=report.missing, stale=report.stale, skipped=report.skipped)
    for p in parts:
        for k in ("computed", "frames", "bytes"):
            setattr(total, k, getattr(total, k) + p[k])
        total.failed.extend(p["failed"])
        total.interrupted |= p["interrupted"]
        for k in ("pipeline_s", *_STAGE_FIELDS):
            setattr(total, k, max(getattr(total, k), p[k]))  # the slowest rank decides
        total.steady_frames_per_s += p["steady_frames_per_s"]  # ranks run side by side
    total.elapsed_s = report.elapsed_s
    return total


def _existing_ancestor(path: str) -> str:
    """The nearest existing folder at or above `path` (the store and its parents may not exist yet)."""
    path = os.path.abspath(path)
    while not os.path.isdir(path):
        path = os.path.dirname(path)
    return path


def build(opts: BuildOptions, *, encoder=None) -> BuildReport:
    """Run one build (one rank of it under torchrun). Returns the (gathered) report.

    Args:
        opts: what to build.
        encoder: an already built encoder to use instead of `opts.encoder`/`opts.weights`
            (saves loading the model twice in one process).

    The spec is resolved first (`resolve_spec`: no model), so that a spec mismatch, the split
    and the size estimate come before the model loads, and `dry_run` never builds it.
    """
    from featstore.encoders import check_device, resolve_spec

    t0 = time.perf_counter()
    rank, world = _dist_setup()
    # Every argument is checked before anything is created or locked: a wrong --device or
    # --weights leaves no store behind.
    if encoder is None:
        device = _resolve_device(opts.device)
        check_device(device)
        spec = resolve_spec(opts.encoder, weights=opts.weights, **opts.spec_overrides)
        name = opts.encoder
    else:
        spec, device, name = encoder.spec, str(encoder.device), encoder.spec.encoder
    feature_set = (check_feature_set(opts.feature_set) if opts.feature_set is not None
                   else default_feature_set(name))
    skipped: list[dict] = []
    units = plan_units(opts.data_root, opts.annotations, skipped=skipped, unit=_unit_kind(name))
    if not units:
        raise PlanError(_nothing_planned(opts, skipped))
    store_path = opts.store_path()
    prepare_store_dir(store_path, create=not opts.dry_run)
    # One build writes a feature set at a time; rank 0 holds the lock for all ranks of this one.
    # Taken before the model loads, so that a second build is refused at once. Builds of other
    # sets of the store take their own lock (LMDB serialises the commits).
    lock = BuildLock(store_path, feature_set) if rank == 0 and not opts.dry_run else contextlib.nullcontext()
    with lock:
        return _build_units(opts, units, skipped, spec, device, encoder, rank, world, t0, feature_set)


def _unit_kind(name: str) -> str:
    """The unit kind of the registered encoder `name`; "sequence" (VGGT's) for one the registry
    does not know (an encoder object built elsewhere)."""
    from featstore.encoders import available_encoders, unit_of

    return unit_of(name) if name in available_encoders() else "sequence"


def _nothing_planned(opts: BuildOptions, skipped: list[dict]) -> str:
    if not opts.annotations:
        return (f"no images found under {opts.data_root} (looked for {', '.join(IMAGE_EXTENSIONS)} files); "
                "check --data-root")
    named = "; ".join(f"{s['sample']}: {s['reason']}" for s in skipped[:3])
    more = f" (and {len(skipped) - 3} more)" if len(skipped) > 3 else ""
    return (f"no sample with images in --annotations {' '.join(opts.annotations)}: {len(skipped)} samples "
            f"skipped{': ' + named + more if skipped else ''}; check the files and --data-root")


def _build_units(opts: BuildOptions, units: list[Unit], skipped: list[dict], spec: EncoderSpec, device: str,
                 encoder, rank: int, world: int, t0: float, feature_set: str) -> BuildReport:
    from featstore.encoders import get_encoder

    show = opts.progress and rank == 0
    log = logger.info if rank == 0 else (lambda msg: None)  # the plan summary, once per build
    fingerprint = spec.fingerprint()
    store_path = opts.store_path()
    index, count = opts.shard
    units = units[index::count]
    report = BuildReport(feature_set=feature_set, planned=len(units), skipped=skipped)
    where = feature_set_label(store_path, feature_set)

    # Freshness is per set: another set of the store (other encoder, other spec) is not looked at.
    manifest = existing_manifest(store_path, feature_set)
    if manifest is not None and not opts.force:
        check_fingerprint(manifest, spec, path=where, advice=_MISMATCH_ADVICE)
    if manifest is None:
        split = {"fresh": [], "missing": list(units), "stale": []}
    elif opts.force:
        split = {"fresh": [], "missing": [], "stale": list(units)}
    else:
        split = split_plan(units, store_path, opts.data_root, fingerprint, feature_set=feature_set)
    todo = sorted(split["missing"] + split["stale"], key=lambda u: u.key)
    report.fresh, report.missing, report.stale = (len(split[k]) for k in ("fresh", "missing", "stale"))

    entry_bytes = _estimate_entry_bytes(spec, todo or units, opts.data_root)
    need = entry_bytes * len(todo)
    free = shutil.disk_usage(_existing_ancestor(store_path)).free
    log(f"featstore build: {len(units)} units planned ({world} rank(s), shard {index}/{count}) -> {store_path}, "
        f"feature set {feature_set!r}\n"
        f"  fresh {report.fresh}, missing {report.missing}, stale {report.stale}; to compute {len(todo)}\n"
        f"  encoder {spec.encoder} fingerprint {fingerprint[:16]} on {device}; "
        f"~{entry_bytes / 1e6:.2f} MB per entry, ~{need / 1e9:.3f} GB to add, {free / 1e9:.1f} GB free")
    if need * world > free:
        raise StoreFullError(f"{store_path}: the build needs about {need * world / 1e9:.2f} GB but only "
                             f"{free / 1e9:.2f} GB are free; free space or build into another --store")
    if opts.dry_run:
        report.elapsed_s = time.perf_counter() - t0
        return report
    mine = todo[rank::world]
    patch = encoder.patch_size if encoder is not None else int(spec.config["patch_size"])
    batches, stop_decoding = _start_decoding(mine, opts, spec, patch)
    try:
        if encoder is None:  # the workers decode the first units meanwhile
            encoder = get_encoder(opts.encoder, weights=opts.weights, device=device, compile=opts.compile,
                                  **opts.spec_overrides)
            assert encoder.spec == spec, spec.diff(encoder.spec)  # resolve_spec's contract
        return _encode_and_commit(opts, spec, encoder, mine, batches, report, rank, world, t0, feature_set,
                                  fingerprint, index, count, show, log)
    finally:
        stop_decoding()


def _encode_and_commit(opts: BuildOptions, spec: EncoderSpec, encoder, mine: list[Unit], batches,
                       report: BuildReport, rank: int, world: int, t0: float, feature_set: str, fingerprint: str,
                       index: int, count: int, show: bool, log) -> BuildReport:
    """Open the writer, run the pipeline over this rank's units `mine`, commit and finish the
    manifest (rank 0, with every rank's report gathered)."""
    from featstore.store.writer import StoreWriter

    store_path = opts.store_path()
    writer_kw = dict(spec=spec, feature_set=feature_set, batch_entries=opts.commit_entries,
                     batch_bytes=opts.commit_bytes, mismatch_advice=_MISMATCH_ADVICE, handle_signals=False)
    # From here on SIGINT/SIGTERM only set `stop`: the pipeline checks it between units and the
    # writer commits what is done (featstore.interrupt says why no exception is raised).
    with stop_on_signals() as stop:
        # Rank 0 creates (or resets, with --force) the store before the other ranks open it.
        writer = StoreWriter(store_path, reset=opts.force, **writer_kw) if rank == 0 else None
        _barrier(world)
        if writer is None:
            writer = StoreWriter(store_path, **writer_kw)
        try:
            t_pipe = time.perf_counter()
            report.interrupted = bool(stop) or _run_pipeline(encoder, mine, batches, opts, writer, report, show,
                                                             stop)
            t_commit = time.perf_counter()
            writer.commit()
            report.commit_s += time.perf_counter() - t_commit
            report.pipeline_s = time.perf_counter() - t_pipe
            report.elapsed_s = time.perf_counter() - t0
            if report.interrupted:
                log(f"interrupted: {report.computed} units committed; rerun the same command to resume")
                return report
            _barrier(world)
            total = _gather_reports(report, world)
            if rank == 0:
                total.elapsed_s = time.perf_counter() - t0
                summary = dict(total.to_dict(), finished=utc_now(), encoder=spec.encoder, fingerprint=fingerprint,
                               shard=f"{index}/{count}", ranks=world, feature_set=feature_set)
                from featstore.build.plan_record import record_of

                # The set remembers what it was built from: verify, gc and info plan it by default.
                writer.finish(summary, complete=True,
                              plan=record_of(opts.data_root, opts.annotations, _unit_kind(spec.encoder)))
            _barrier(world)
            return total
        finally:
            writer.close()


# -- command line ---------------------------------------------------------------------------

EXAMPLES = """\
Examples:
  # the bundled sample data, on CPU, from the repository root (vggt-tiny has random weights)
  featstore build --data-root sample_data --encoder vggt-tiny
  featstore build --data-root sample_data --annotations sample_data/annotations.json \\
      --encoder vggt-tiny
  featstore build --data-root sample_data --encoder vggt-tiny --dry-run      # plan only, no model
  featstore build --data-root sample_data --encoder qwen2.5-vl-vision-tiny   # set qwen_vision
  featstore build --data-root sample_data --encoder vggt-tiny --store /tmp/fp8.lmdb \\
      --storage-dtype float8_e4m3fn                                          # half the bytes
  # your data (VGGT-1B on GPU)
  featstore build --data-root data/ --weights /ckpt/VGGT-1B/model.safetensors
  featstore build --data-root data/ --annotations data/train.json --weights facebook/VGGT-1B \\
      --recipe janusvln               # JanusVLN's spec: causal, last frame kept, target 644
  torchrun --nproc-per-node 8 -m featstore build --data-root data/ --weights facebook/VGGT-1B
  featstore build --data-root data/ --shard 0/4 --weights /ckpt/VGGT-1B   # host 0 of 4, then merge
  featstore build --data-root data/ --annotations data/train.json --encoder qwen2.5-vl-vision \\
      --weights Qwen/Qwen2.5-VL-3B-Instruct
"""


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", required=True, help="folder of the images (required); the store's keys are "
                   f"image paths relative to it, and the store goes beside them, in DATA_ROOT/{DEFAULT_STORE_NAME}, "
                   "unless --store")
    add_annotations_argument(p, "training's LLaVA/Qwen JSON/JSONL files: one unit per sample (its ordered frame "
                             "list); for an encoder of single images, one unit per distinct image of the samples. "
                             "Default: none, every image under the data root is its own unit. Pass the files "
                             "training gets, so that `python -m training.train --use_vggt_cache` finds every sample")
    p.add_argument("--store", help=f"the store to write (default: DATA_ROOT/{DEFAULT_STORE_NAME}, where training "
                   "and the other commands look; DATA_ROOT/vggt_features.shard-I-of-N.lmdb with --shard). Use it "
                   "for a store on another disk, or a second store of another spec")
    g = p.add_argument_group("encoder (every choice enters the fingerprint)")
    g.add_argument("--encoder", default=_default("encoder"), help="registered encoder: vggt-1b (default, needs "
                   "--weights), vggt-tiny (random weights, for tests/demos), vggt-official (the installed vggt package), "
                   "qwen2.5-vl-vision (the frozen Qwen2.5-VL vision tower without visual.merger, one entry per image in "
                   "the 'qwen_vision' feature set; --weights a Qwen2.5-VL checkpoint folder or hub id), "
                   "qwen2.5-vl-vision-tiny (random, for tests/demos). Example: --encoder qwen2.5-vl-vision "
                   "--weights Qwen/Qwen2.5-VL-3B-Instruct")
    g.add_argument("--feature-set", metavar="NAME", help="the store's feature set to write ([a-z0-9_], up to 32 "
                   "characters; default: the encoder's, 'vggt' for VGGT encoders). Each set has its own entries, "
                   "manifest and freshness; building one never touches another (docs/FORMAT.md). Use it to keep "
                   "two specs of one encoder in one store")
    g.add_argument("--recipe", choices=RECIPE_NAMES, help="start from a published recipe's encoder settings: vgllm "
                   "(layer -2, full attention, all frames, target 518) or janusvln (layer -2, causal, last frame "
                   "kept, target 644: 640x480 -> 644x490); both crop mode, reference frame first. An encoder flag "
                   "given too wins (docs/TRAINING.md, 'Coming from JanusVLN / VG-LLM')")
    g.add_argument("--weights", help="the encoder's weights: a model.safetensors / model.pt path, a folder holding "
                   "one, or a hub id (facebook/VGGT-1B, needs internet). Needed by vggt-1b and qwen2.5-vl-vision; "
                   "the tiny encoders take none (default: none)")
    g.add_argument("--layer", type=int, help=f"aggregator layer to keep (default {field_default(EncoderSpec, 'layer')}, "
                   "i.e. 22 of VGGT-1B, as VG-LLM and JanusVLN); training's --vggt_layer must match")
    g.add_argument("--attention", choices=field_choices(EncoderSpec, "attention"), help="global attention across the "
                   "frames of a unit: full (official, default) or causal (streaming navigation models such as "
                   "JanusVLN); training's --vggt_attention must match")
    g.add_argument("--frames-kept", choices=field_choices(EncoderSpec, "frames_kept"),
                   help="store every frame's tokens (all, default: per-image fusion) or only the last frame's "
                   "(last: JanusVLN's last_to_all fusion, 1/S of the bytes for S frames)")
    g.add_argument("--reference-frame", choices=field_choices(EncoderSpec, "reference_frame"),
                   help=f"which frame of a unit anchors the encoder call (default "
                   f"{field_default(EncoderSpec, 'reference_frame')}): first = the frames in their order, as "
                   "VG-LLM's and JanusVLN's published training scripts pass (--reference_frame first); last = "
                   "reversed (the last frame gets frame 0's tokens, a causal stream starts from it; with "
                   "--frames-kept last the kept frame is then the unit's first), features stored in the unit's "
                   "order. training's --vggt_reference_frame must match")
    g.add_argument("--target-size", type=int, help="preprocessing size in pixels, a multiple of 14: the width "
                   "(crop mode) or the longest side (pad mode). Default: the encoder's, 518 (vggt-tiny 112); "
                   "JanusVLN uses 644")
    g.add_argument("--preprocess-mode", choices=field_choices(PreprocessSpec, "mode"),
                   help="VGGT's official preprocessing: crop (width to --target-size, centre-crop the height) or pad "
                   f"(longest side to --target-size, white padding) (default {field_default(PreprocessSpec, 'mode')})")
    g.add_argument("--storage-dtype", choices=STORAGE_DTYPE_NAMES,
                   help=f"dtype of stored features (default {field_default(EncoderSpec, 'storage_dtype')}); "
                   "float8_e4m3fn halves the bytes, with a per-token scale, read back dequantised (docs/FORMAT.md); "
                   "float32 only to compare with a float32 reference")
    g.add_argument("--compute-dtype", choices=DTYPE_NAMES,
                   help=f"autocast dtype of the forward on GPU (default {field_default(EncoderSpec, 'compute_dtype')}); "
                   "CPU builds compute in float32")
    g.add_argument("--compile", action="store_true", help="torch.compile the encoder's blocks: about 1.7x faster "
                   "VGGT-1B builds on an H200 (docs/BENCHMARKS.md) after a one-time compile; features agree "
                   "with eager within bf16 rounding. Worth it for large GPU builds (default off)")
    g.add_argument("--device", default=_default("device"), help="cuda, cuda:N, cpu (default auto: the local rank's "
                   "GPU, else CPU)")
    r = p.add_argument_group("run")
    r.add_argument("--force", action="store_true", help="recompute every unit: drops all entries of the feature "
                   "set first. Needed to rebuild a store in place with another spec (it is refused otherwise); "
                   "a plain rerun recomputes only missing and stale units (default off)")
    r.add_argument("--dry-run", action="store_true", help="print what would be computed (the fresh/missing/stale "
                   "split, the bytes to add, the free disk space) without building the model, then stop")
    r.add_argument("--workers", type=int, default=_default("workers"),
                   help="image-decoding DataLoader worker processes (default: min(4, CPU count)); 0 decodes in "
                   "the main process (small data, debugging)")
    r.add_argument("--batch-frames", type=int, default=_default("batch_frames"),
                   help=f"frames per forward (default {_default('batch_frames')}): units of one frame count and "
                   "size are batched up to this many frames. Lower it if the GPU runs out of memory")
    r.add_argument("--shard", default="0/1", metavar="I/N", help="build only part I of N (0-based; default 0/1: "
                   "all), one part per host, each into its own store (default: vggt_features.shard-I-of-N.lmdb "
                   "in DATA_ROOT); merge the parts with `featstore merge`")
    r.add_argument("--commit-every", type=int, default=_default("commit_entries"), metavar="N",
                   help=f"entries per LMDB commit (default {_default('commit_entries')}); a crash or kill loses "
                   "at most the entries of one open batch, which a rerun recomputes")
    r.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    r.add_argument("--json", action="store_true", help="print the build report (counts, failures, stage times) "
                   "as one JSON object on stdout instead of the summary on stderr")


def _default(name: str):
    return field_default(BuildOptions, name)


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise FeatstoreError(f"--shard must look like I/N (e.g. 0/4). Found {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise FeatstoreError(f"--shard must be I/N with 0 <= I < N. Found {text!r}")
    return i, n


def options_from_args(args: argparse.Namespace) -> BuildOptions:
    # A recipe's values first; every encoder flag given explicitly (not None) then wins.
    overrides = get_recipe(args.recipe).encoder_options() if getattr(args, "recipe", None) else {}
    for flag, key in (("layer", "layer"), ("attention", "attention"), ("frames_kept", "frames_kept"),
                      ("target_size", "target_size"), ("preprocess_mode", "preprocess_mode"),
                      ("storage_dtype", "storage_dtype"), ("compute_dtype", "compute_dtype"),
                      ("reference_frame", "reference_frame")):
        value = getattr(args, flag)
        if value is not None:
            overrides[key] = value
    require_directory(args.data_root, "--data-root", "pass the folder that holds the images")
    if args.feature_set is not None:
        check_feature_set(args.feature_set)
    annotation_sources(args.annotations, args.data_root)  # every FILE[@IMAGE_DIR][%N] checked before any work
    for flag, value, least in (("--workers", args.workers, 0), ("--batch-frames", args.batch_frames, 1),
                               ("--commit-every", args.commit_every, 1)):
        if value < least:
            raise FeatstoreError(f"{flag} must be >= {least}. Found {value}")
    return BuildOptions(
        data_root=args.data_root, annotations=args.annotations, store=args.store, encoder=args.encoder,
        feature_set=args.feature_set, weights=args.weights, device=args.device, spec_overrides=overrides, force=args.force,
        dry_run=args.dry_run, workers=args.workers, batch_frames=args.batch_frames,
        shard=_parse_shard(args.shard), commit_entries=args.commit_every, progress=not args.no_progress,
        compile=args.compile)


def run(args: argparse.Namespace) -> int:
    try:
        report = build(options_from_args(args))
    finally:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        if args.json:
            print(json.dumps(report.to_dict(), indent=2))
        elif args.dry_run:  # the plan summary above said it all; nothing ran
            print(f"featstore build: dry run, nothing computed: {report.missing + report.stale} units would be "
                  f"computed, {report.fresh} are fresh; run without --dry-run to build", file=sys.stderr)
        elif not report.interrupted:  # then the one "interrupted: N units committed" line says it
            rate = report.frames / report.elapsed_s if report.elapsed_s else 0.0
            into = "" if report.feature_set == PRIMARY_FEATURE_SET else f" (feature set {report.feature_set!r})"
            print(f"featstore build{into}: {report.computed} computed ({report.frames} frames, "
                  f"{report.bytes / 1e6:.1f} MB, {rate:.1f} frames/s), {report.fresh} already fresh, "
                  f"{len(report.failed)} failed, {report.elapsed_s:.1f} s", file=sys.stderr)
            print(f"  {report.stage_summary()}", file=sys.stderr)
            for f in report.failed[:20]:
                print(f"  failed {f['key']}: {f['error']}", file=sys.stderr)
            if len(report.failed) > 20:
                print(f"  ... and {len(report.failed) - 20} more (see `featstore info --json`)", file=sys.stderr)
            if report.skipped:
                print(f"  {describe_skipped(report.skipped)}", file=sys.stderr)
    if report.interrupted:
        return 130
    return 1 if report.failed else 0
