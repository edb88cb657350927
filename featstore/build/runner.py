"""One build, stage by stage: resolve the spec, plan, split fresh/missing/stale, check the
disk, start the decode workers, build the model, run the pipeline, finish the manifest.
`build(BuildOptions(...)) -> BuildReport` is the library's entry point (all three importable
from here); `featstore build` (featstore.build.cli) calls it.

Each stage has its own module: featstore.build.plan (units), .freshness (the split),
.estimate (bytes and free space), .frames (decode workers), .pipeline (encode and commit
threads), .distributed (torchrun ranks); docs/BUILD.md tells the stages in order.

Example:
    >>> from featstore.build.runner import BuildOptions, build
    >>> report = build(BuildOptions(data_root="data", encoder="vggt-tiny", store="doc.lmdb",
    ...                             workers=0, progress=False))
    >>> report.computed, report.failed
    (10, [])
"""

from __future__ import annotations

import contextlib
import time

from featstore.build import distributed
from featstore.build.estimate import estimate_size
from featstore.build.freshness import MISMATCH_ADVICE, split_units
from featstore.build.frames import start_decoding
from featstore.build.options import BuildContext, BuildOptions
from featstore.build.pipeline import run_pipeline
from featstore.build.plan import IMAGE_EXTENSIONS, Unit, frame_order, plan_units, shard_part
from featstore.build.report import BuildReport
from featstore.contract.naming import check_feature_set
from featstore.errors import PlanError
from featstore.interrupt import stop_on_signals
from featstore.store.layout import default_feature_set, utc_now
from featstore.store.lock import BuildLock, prepare_store_dir

# torch is imported inside the functions that run the model, so that `featstore --help` and
# the parser need no torch (the layering test runs the CLI with torch unimportable).

__all__ = ["build", "BuildOptions", "BuildReport"]


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
    rank, world = distributed.setup()
    # Every argument is checked before anything is created or locked: a wrong --device or
    # --weights leaves no store behind.
    if encoder is None:
        device = distributed.local_device(opts.device)
        check_device(device)
        # The build options are checked here too (a VGGT encoder refuses vision_attention) before
        # anything is created; they do not change the spec.
        spec = resolve_spec(opts.encoder, weights=opts.weights, **opts.build_options(), **opts.spec_overrides)
        name = opts.encoder
    else:
        spec, device, name = encoder.spec, str(encoder.device), encoder.spec.encoder
    feature_set = (check_feature_set(opts.feature_set) if opts.feature_set is not None
                   else default_feature_set(name))
    ctx = BuildContext(opts, spec, feature_set, rank=rank, world=world, t0=t0)
    skipped: list[dict] = []
    units = plan_units(opts.data_root, opts.annotations, skipped=skipped, unit=_unit_kind(name),
                       video_policy=opts.video_policy)
    if not units:
        raise PlanError(_nothing_planned(opts, skipped))
    prepare_store_dir(ctx.store_path, create=not opts.dry_run)
    # One build writes a feature set at a time; rank 0 holds the lock for all ranks of this one.
    # Taken before the model loads, so that a second build is refused at once. Builds of other
    # sets of the store take their own lock (LMDB serialises the commits).
    lock = (BuildLock(ctx.store_path, feature_set) if rank == 0 and not opts.dry_run
            else contextlib.nullcontext())
    with lock:
        return _build_units(ctx, units, skipped, device, encoder)


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


def _build_units(ctx: BuildContext, units: list[Unit], skipped: list[dict], device: str, encoder) -> BuildReport:
    """Split, estimate and (unless a dry run) compute this host's shard of `units`."""
    from featstore.encoders import get_encoder

    opts, spec, store_path = ctx.opts, ctx.spec, ctx.store_path
    index, count = ctx.shard
    units = shard_part(units, index, count)  # contiguous in episode order: an episode on one host
    report = BuildReport(feature_set=ctx.feature_set, planned=len(units), skipped=skipped)

    split = split_units(ctx, units)
    # Units sharing frames next to each other (one batch embeds a shared frame once).
    todo = frame_order(split["missing"] + split["stale"])
    report.fresh, report.missing, report.stale = (len(split[k]) for k in ("fresh", "missing", "stale"))

    size = estimate_size(spec, todo, opts.data_root, store_path, sample=units)
    ctx.log(f"featstore build: {len(units)} units planned ({ctx.world} rank(s), shard {index}/{count}) -> "
            f"{store_path}, feature set {ctx.feature_set!r}\n"
            f"  fresh {report.fresh}, missing {report.missing}, stale {report.stale}; to compute {len(todo)}\n"
            f"  encoder {spec.encoder} fingerprint {ctx.fingerprint[:16]} on {device}; "
            f"~{size.entry_bytes / 1e6:.2f} MB per entry, ~{size.need / 1e9:.3f} GB to add, "
            f"{size.free / 1e9:.1f} GB free")
    size.require_space(store_path, ctx.world)
    if opts.dry_run:
        report.elapsed_s = time.perf_counter() - ctx.t0
        return report
    # Each rank takes a contiguous part of the to-do list, keeping an episode's units together.
    mine = todo[len(todo) * ctx.rank // ctx.world: len(todo) * (ctx.rank + 1) // ctx.world]
    patch = encoder.patch_size if encoder is not None else int(spec.config["patch_size"])
    pin_device = device if opts.pin_frames and str(device).startswith("cuda") else None
    batches, stop_decoding = start_decoding(mine, opts.data_root, spec, patch, workers=opts.workers,
                                            uint8=opts.uint8_frames, pin_device=pin_device)
    try:
        if encoder is None:  # the workers decode the first units meanwhile
            encoder = get_encoder(opts.encoder, weights=opts.weights, device=device, compile=opts.compile,
                                  **opts.build_options(), **opts.spec_overrides)
            assert encoder.spec == spec, spec.diff(encoder.spec)  # resolve_spec's contract
        return _encode_and_commit(ctx, encoder, mine, batches, report)
    finally:
        stop_decoding()


def _encode_and_commit(ctx: BuildContext, encoder, mine: list[Unit], batches, report: BuildReport) -> BuildReport:
    """Open the writer, run the pipeline over this rank's units `mine`, commit and finish the
    manifest (rank 0, with every rank's report gathered)."""
    from featstore.store.writer import StoreWriter

    opts, spec, world = ctx.opts, ctx.spec, ctx.world
    writer_kw = dict(spec=spec, feature_set=ctx.feature_set, batch_entries=opts.commit_entries,
                     batch_bytes=opts.commit_bytes, mismatch_advice=MISMATCH_ADVICE, handle_signals=False)
    # From here on SIGINT/SIGTERM only set `stop`: the pipeline checks it between units and the
    # writer commits what is done (featstore.interrupt says why no exception is raised).
    with stop_on_signals() as stop:
        # Rank 0 creates (or resets, with --force) the store before the other ranks open it.
        writer = StoreWriter(ctx.store_path, reset=opts.force, **writer_kw) if ctx.rank == 0 else None
        distributed.barrier(world)
        if writer is None:
            writer = StoreWriter(ctx.store_path, **writer_kw)
        try:
            t_pipe = time.perf_counter()
            report.interrupted = bool(stop) or run_pipeline(ctx, encoder, mine, batches, writer, report, stop)
            t_commit = time.perf_counter()
            writer.commit()
            report.commit_s += time.perf_counter() - t_commit
            report.pipeline_s = time.perf_counter() - t_pipe
            report.elapsed_s = time.perf_counter() - ctx.t0
            if report.interrupted:
                ctx.log(f"interrupted: {report.computed} units committed; rerun the same command to resume")
                return report
            distributed.barrier(world)
            total = distributed.gather_reports(report, world)
            if ctx.rank == 0:
                total.elapsed_s = time.perf_counter() - ctx.t0
                index, count = ctx.shard
                summary = dict(total.to_dict(), finished=utc_now(), encoder=spec.encoder, fingerprint=ctx.fingerprint,
                               shard=f"{index}/{count}", ranks=world, feature_set=ctx.feature_set)
                from featstore.build.plan_record import record_of

                # The set remembers what it was built from: verify, gc and info plan it by default.
                writer.finish(summary, complete=True,
                              plan=record_of(opts.data_root, opts.annotations, _unit_kind(spec.encoder),
                                             video_policy=opts.video_policy, shard=ctx.shard))
            distributed.barrier(world)
            return total
        finally:
            writer.close()
