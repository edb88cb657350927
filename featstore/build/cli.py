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
import json
import sys

from featstore.build import distributed
from featstore.build.options import BuildOptions
from featstore.build.annotations import annotation_sources
from featstore.build.video import parse_video_policy
from featstore.build.plan import describe_skipped
from featstore.build.recipes import RECIPE_NAMES, get_recipe
from featstore.build.runner import build
from featstore.arguments import add_annotations_argument, add_video_policy_argument
from featstore.contract.dtypes import DTYPE_NAMES, STORAGE_DTYPE_NAMES
from featstore.contract.naming import DEFAULT_STORE_NAME, PRIMARY_FEATURE_SET, check_feature_set, set_note
from featstore.contract.spec import EncoderSpec, PreprocessSpec, field_choices, field_default
from featstore.encoders.qwen_vision.config import VISION_ATTENTION_CHOICES
from featstore.errors import FeatstoreError
from featstore.progress import NO_PROGRESS_HELP
from featstore.store.layout import require_directory

# torch is imported only when a build runs: `featstore build --help` and the parser need none
# (the layering test runs the CLI with torch unimportable).

__all__ = ["configure_parser", "options_from_args", "run", "EXAMPLES"]

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
    add_video_policy_argument(p)
    p.add_argument("--store", help=f"the store to write (default: DATA_ROOT/{DEFAULT_STORE_NAME}, where training "
                   "and the other commands look; DATA_ROOT/vggt_features.shard-I-of-N.lmdb with --shard). Use it "
                   "for a store on another disk, or a second store of another spec")
    g = p.add_argument_group("encoder (every choice enters the fingerprint)")
    g.add_argument("--encoder", default=_default("encoder"), help="registered encoder (default "
                   f"{_default('encoder')}): vggt-1b (needs --weights), vggt-tiny (random weights, for tests/demos), "
                   "vggt-official (the installed vggt package), qwen2.5-vl-vision (the frozen Qwen2.5-VL vision "
                   "tower without visual.merger, one entry per image in the 'qwen_vision' feature set; --weights a "
                   "Qwen2.5-VL checkpoint folder or hub id), "
                   "qwen2.5-vl-vision-tiny (random, for tests/demos). Example: --encoder qwen2.5-vl-vision "
                   "--weights Qwen/Qwen2.5-VL-3B-Instruct")
    g.add_argument("--feature-set", metavar="NAME", help="the store's feature set to write ([a-z0-9_], up to 32 "
                   f"characters; default: the encoder's, {PRIMARY_FEATURE_SET!r} for VGGT encoders). Each set has its "
                   "own entries, manifest and freshness; building one never touches another (docs/FORMAT.md). Use it "
                   "to keep two specs of one encoder in one store")
    g.add_argument("--recipe", choices=RECIPE_NAMES, help="start from a published recipe's encoder settings: "
                   f"{_recipe_settings()}. An encoder flag given too wins (docs/TRAINING.md, 'Coming from JanusVLN / "
                   "VG-LLM')")
    g.add_argument("--weights", help="the encoder's weights: a model.safetensors / model.pt path, a folder holding "
                   "one, or a hub id (facebook/VGGT-1B, needs internet). Needed by vggt-1b and qwen2.5-vl-vision; "
                   "the tiny encoders take none (default: none)")
    g.add_argument("--layer", type=int, help=f"aggregator layer to keep (default {field_default(EncoderSpec, 'layer')}, "
                   "i.e. 22 of VGGT-1B, as VG-LLM and JanusVLN); training's --vggt_layer must match")
    g.add_argument("--attention", choices=field_choices(EncoderSpec, "attention"), help="global attention across the "
                   "frames of a unit: full (official) or causal (streaming navigation models such as JanusVLN) "
                   f"(default {field_default(EncoderSpec, 'attention')}); training's --vggt_attention must match")
    g.add_argument("--frames-kept", choices=field_choices(EncoderSpec, "frames_kept"),
                   help="store every frame's tokens (all: per-image fusion) or only the last frame's (last: "
                   "JanusVLN's last_to_all fusion, 1/S of the bytes for S frames) (default "
                   f"{field_default(EncoderSpec, 'frames_kept')})")
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
    g.add_argument("--compile", action="store_true", help="torch.compile the encoder's blocks (VGGT's, or the Qwen "
                   "vision tower's): about 1.7x faster VGGT-1B builds on an H200 (docs/BENCHMARKS.md) after a "
                   "one-time compile; features agree with eager within bf16 rounding. Worth it for large GPU "
                   "builds (default off)")
    g.add_argument("--vision-attention", choices=VISION_ATTENTION_CHOICES,
                   help="the Qwen vision tower's attention (qwen2.5-vl-vision encoders only): auto (default: "
                   "one attention call a layer through torch's varlen kernel on a CUDA bf16/fp16 build, "
                   "transformers' per-window sdpa calls elsewhere), stock (transformers' path, one sdpa call per "
                   "window) or one_call (every window of a layer in one call everywhere). All give the same "
                   "features within the recompute tolerance and the same fingerprint; verify --recompute uses "
                   "auto"),
    g.add_argument("--device", default=_default("device"), help=f"cuda, cuda:N, cpu (default {_default('device')}: the "
                   "local rank's GPU, else CPU)")
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
    r.add_argument("--shard", default=_SHARD_DEFAULT, metavar="I/N", help="build only part I of N (0-based; "
                   f"default {_SHARD_DEFAULT}: all), one part per host, each into its own store (default: "
                   "vggt_features.shard-I-of-N.lmdb in DATA_ROOT); merge the parts with `featstore merge`. The "
                   "parts are the planned units in episode order cut into N contiguous runs, so an episode's "
                   "shared frames are embedded on one host; build all parts with one featstore version")
    r.add_argument("--commit-every", type=int, default=_default("commit_entries"), metavar="N",
                   help=f"entries per LMDB commit (default {_default('commit_entries')}); a crash or kill loses "
                   "at most the entries of one open batch, which a rerun recomputes")
    r.add_argument("--no-frame-reuse", action="store_true", help="embed every frame of every unit: by default a "
                   "frame shared by several units of a batch (an episode's first frame, overlapping histories) "
                   "goes through the patch embedding once, with VGGT encoders on the featstore backend (same "
                   "features within rounding; docs/BUILD.md, \"Frame reuse\")")
    r.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    r.add_argument("--json", action="store_true", help="print the build report (counts, failures, stage times) "
                   "as one JSON object on stdout instead of the summary on stderr")


def _default(name: str):
    return field_default(BuildOptions, name)


_SHARD_DEFAULT = "/".join(str(v) for v in _default("shard"))  # "0/1": the whole plan


def _recipe_settings() -> str:
    """The recipes' encoder settings in words, from featstore.build.recipes (--recipe's help)."""
    def words(name: str) -> str:
        o = get_recipe(name).encoder_options()
        return (f"{name} (layer {o['layer']}, {o['attention']} attention, frames kept {o['frames_kept']}, target "
                f"{o['target_size']}, {o['preprocess_mode']} mode, reference frame {o['reference_frame']})")

    return " or ".join(words(name) for name in RECIPE_NAMES)


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
    parse_video_policy(args.video_policy)
    for flag, value, least in (("--workers", args.workers, 0), ("--batch-frames", args.batch_frames, 1),
                               ("--commit-every", args.commit_every, 1)):
        if value < least:
            raise FeatstoreError(f"{flag} must be >= {least}. Found {value}")
    return BuildOptions(
        data_root=args.data_root, annotations=args.annotations, video_policy=args.video_policy, store=args.store,
        encoder=args.encoder,
        feature_set=args.feature_set, weights=args.weights, device=args.device, spec_overrides=overrides,
        force=args.force, dry_run=args.dry_run, workers=args.workers, batch_frames=args.batch_frames,
        shard=_parse_shard(args.shard), commit_entries=args.commit_every, progress=not args.no_progress,
        compile=args.compile, vision_attention=args.vision_attention, frame_reuse=not args.no_frame_reuse)


def run(args: argparse.Namespace) -> int:
    try:
        report = build(options_from_args(args))
    finally:
        distributed.shutdown()
    if distributed.rank_of_process() == 0:
        if args.json:
            print(json.dumps(report.to_dict(), indent=2))
        elif args.dry_run:  # the plan summary above said it all; nothing ran
            print(f"featstore build: dry run, nothing computed: {report.missing + report.stale} units would be "
                  f"computed, {report.fresh} are fresh; run without --dry-run to build", file=sys.stderr)
        elif not report.interrupted:  # then the one "interrupted: N units committed" line says it
            rate = report.frames / report.elapsed_s if report.elapsed_s else 0.0
            into = set_note(report.feature_set)
            print(f"featstore build{into}: {report.computed} computed ({report.frames} frames, "
                  f"{report.bytes / 1e6:.1f} MB, {rate:.1f} frames/s), {report.fresh} already fresh, "
                  f"{len(report.failed)} failed, {report.elapsed_s:.1f} s; frame reuse {report.frame_reuse:.2f}x "
                  f"({report.frame_instances} frames embedded as {report.distinct_frames})", file=sys.stderr)
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
