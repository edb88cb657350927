"""Check a store: structure, manifest, checksums, plan coverage, source freshness.

Optionally (--recompute N) also compares stored features with features recomputed on the encoder.

A store of several feature sets (docs/FORMAT.md, "Feature sets") is checked set by set, each
against its own manifest, spec and plan (an image encoder's plan is one unit per image);
`--feature-set NAME` restricts the check. Findings of a store with several sets name theirs.

Exit status: 0 clean, 1 problems found (each names its key and what to do), 2 cannot run (no
store, not an LMDB file, unreadable manifest, bad arguments).

Checks, in order (docs/OPERATIONS.md says what each finding means and what to do):
  1. structure   data.mdb is not truncated and passes LMDB's offline structural audit
                 (`lmdb.verify`, py-lmdb >= 3.0), *before* the file is mapped: a truncated
                 map is a SIGBUS, not an exception, once a page past the end is touched
  2. manifest    format version, fingerprint == spec, entry count and bytes == what is stored,
                 build state complete, no failed units in the last build
  3. entries     every value decodes and its CRC-32 (header and tensors) matches; dtype ==
                 storage dtype; shape [frames_kept, grid rows*cols, the encoder's channels];
                 entry fingerprint == manifest's
                 (read in parallel threads: zlib's CRC-32 releases the GIL, so this is bound
                 by disk and checksum speed)
  4. sources     with a data root: orphans (a frame file is gone), stale (size/mtime changed;
                 with --deep, content sha256 changed)
  5. plan        with a data root: every unit of the plan is present, with the planned frames
  6. recompute   --recompute N: N random fresh units re-encoded and compared with the stored
                 features (max abs error relative to the tensor's scale, cosine similarity)

The CRC-32 covers the canonical header (every metadata value: frames, sources, grid,
fingerprint) and the tensor bytes, so a flipped byte anywhere in a value is found. Not checked:
a byte of the header's space padding turned into another JSON whitespace character decodes to
the same entry, and is harmless.
"""

from __future__ import annotations

import argparse
import json
import sys

import lmdb

from featstore.arguments import (add_annotations_argument, add_feature_set_filter, add_output_arguments,
                           add_store_arguments, shows_progress, store_path_arg)
from featstore.errors import FeatstoreError
from featstore.ops.verify.orchestrate import DEFAULT_WORKERS, verify_store
from featstore.ops.verify.weights import parse_weights

__all__ = ["configure_parser", "run", "EXAMPLES"]

EXAMPLES = """\
Examples:
  # the bundled sample data, after `featstore build --data-root sample_data --encoder vggt-tiny`
  featstore verify sample_data                    # the store beside the data: every check
  featstore verify sample_data --deep --recompute 2 --json
  featstore verify sample_data/vggt_features.lmdb --data-root sample_data --feature-set vggt
  # your data
  featstore verify /nvme/vggt_features.lmdb --data-root data/ --annotations data/train.json
  featstore verify data/ --deep --recompute 16 --weights /ckpt/model.safetensors --json
  featstore verify data/ --feature-set qwen_vision --recompute 4 \\
      --weights qwen_vision=/ckpt/Qwen2.5-VL-3B
"""


def configure_parser(p: argparse.ArgumentParser) -> None:
    add_store_arguments(p, "the images' folder: enables the orphan/stale/coverage checks (default: STORE when it "
                        "is a data root, else none and those checks are skipped)")
    add_annotations_argument(p, "training's annotation files: the plan is one unit per sample (as for build). "
                             "Default: the plan the store records (the files it was built from; a store that "
                             "records none: a scan of the data root, one unit per image)", store_may_follow=True)
    p.add_argument("--deep", action="store_true", help="also hash every source file (sha256) to find content "
                   "changes that kept size and mtime (reads every image; default: size and mtime only)")
    p.add_argument("--recompute", type=int, default=0, metavar="N",
                   help="re-encode N random fresh units and compare with the stored features (default 0: none); "
                   "checks weights and code versions, needs the data root and, for real encoders, --weights")
    p.add_argument("--seed", type=int, help="seed for choosing the recomputed units (default: random, noted in "
                   "the report); pass it to recheck the same units")
    add_feature_set_filter(p, "check")
    p.add_argument("--weights", action="append", metavar="[NAME=]PATH",
                   help="weights for --recompute (as given to build): PATH for the selected set (the one "
                   "--feature-set names, else 'vggt'), NAME=PATH for set NAME; repeat for several sets "
                   "(default: none, fine for the random-weight tiny encoders)")
    p.add_argument("--device", default="cpu", help="device for --recompute: cpu (default), cuda or cuda:N")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                   help="reader threads checksumming entries in parallel (default: min(16, 2 x CPU count)); "
                   "more than the cores help on cold or network storage, where threads wait on reads")
    p.add_argument("--no-structure", action="store_true", help="skip LMDB's structural audit of data.mdb "
                   "(only its size is checked then); saves one read of the whole file on a huge store")
    add_output_arguments(p, "print one JSON object on stdout (also when it cannot run) instead of the readable "
                         "summary; for scripts and monitoring")


def run(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise FeatstoreError(f"--workers must be >= 1. Found {args.workers}")
    store = store_path_arg(args.store, args.data_root)
    try:
        report = verify_store(store, feature_set=args.feature_set, data_root=args.data_root,
                              annotations=args.annotations, deep=args.deep, recompute=args.recompute,
                              seed=args.seed, weights=parse_weights(args.weights),
                              device=args.device, workers=args.workers, structure=not args.no_structure,
                              progress=shows_progress(args), log=False)
    except (FeatstoreError, lmdb.Error) as e:
        if not args.json:
            raise  # the CLI prints it (and translates lmdb.Error), exit 2
        print(json.dumps({"path": store, "ok": False, "exit_code": 2, "error": str(e)}, indent=2))
        print(f"featstore verify: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(report.summary())
    return report.exit_code
