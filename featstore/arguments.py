"""The argparse pieces the subcommands share: the STORE argument and --data-root, --annotations,
--feature-set, --json and --no-progress, worded and resolved one way for every subcommand.

A utility below the build and ops layers (they build the subcommands' parsers); `featstore.cli`
puts the subcommands together.
"""

from __future__ import annotations

import argparse
import os

from featstore.contract.naming import DEFAULT_STORE_NAME
from featstore.progress import NO_PROGRESS_HELP

__all__ = ['STORE_HELP', 'store_path_arg', 'add_annotations_argument', 'store_after_annotations', 'add_store_arguments', 'leading_store', 'add_feature_set_filter', 'add_output_arguments', 'shows_progress']

STORE_HELP = (f"the store directory, or a data root holding {DEFAULT_STORE_NAME} (default: "
              f"DATA_ROOT/{DEFAULT_STORE_NAME} with --data-root, as build names it; else the current directory)")


def store_path_arg(store: str | None, data_root: str | None) -> str:
    """The store a subcommand works on, named the way `featstore build` names it: STORE when
    given, else ``DATA_ROOT/vggt_features.lmdb`` for ``--data-root DATA_ROOT``, else the current
    directory (a store, or a data root holding one)."""
    if store is not None:
        return store
    if data_root is not None:
        return os.path.join(data_root, DEFAULT_STORE_NAME)
    return "."


def add_annotations_argument(p: argparse.ArgumentParser, help: str, *, store_may_follow: bool = False) -> None:
    """`--annotations FILE [FILE ...]` as every subcommand takes it: repeatable, and every file of
    every occurrence is kept (``--annotations a.json --annotations b.json`` is both files).
    `store_may_follow`: the subcommand has a positional STORE, which may come after the files
    (`store_after_annotations`)."""
    p.add_argument("--annotations", action="extend", nargs="+", default=[], metavar="FILE[@IMAGE_DIR][%N]",
                   help=help + ". FILE@IMAGE_DIR: the file's relative image paths start from IMAGE_DIR (a folder "
                   "inside the data root; VG-LLM's data_path); FILE%%N: keep N percent of its samples (1-100), the "
                   "same ones in build, verify, gc and training (docs/BUILD.md). Repeat the flag, or list several "
                   "values after it")
    if store_may_follow:
        p.set_defaults(_store_may_follow_annotations=True)


def add_video_policy_argument(p: argparse.ArgumentParser) -> None:
    """`--video-policy` as the planning subcommands take it (featstore.build.video)."""
    p.add_argument("--video-policy", metavar="POLICY", default=None,
                   help="which frames of an annotation sample's 'video' (a folder of frames or a .mp4/.avi/.mov) "
                   "form its unit: vgllm[:BASE_INTERVAL:MIN:MAX] (VG-LLM's rule, default vgllm:2:4:8) or linspace:N "
                   "(N evenly spaced frames: Spatial-MLLM 16, VLM-3R 32). Part of the plan: training's "
                   "--video_policy must match, or its samples miss the store (docs/BUILD.md)")


def store_after_annotations(args: argparse.Namespace) -> None:
    """Give STORE back when ``--annotations`` took it: in ``featstore verify --annotations a.json
    STORE`` argparse hands STORE to the option's list. An annotation file is never a directory and
    a store (or a data root) always is, so a directory at the end of the list, with no STORE
    given, is the STORE. Anything else stays an annotation file (and is checked as one)."""
    files = getattr(args, "annotations", None)
    if not getattr(args, "_store_may_follow_annotations", False):
        return  # build names its store with --store only: a directory there stays an error
    if files and args.store is None and os.path.isdir(files[-1]):
        args.store = files.pop()


# -- the options the store's tools share (verify, gc, info, copy, merge), in this order: the
# store first (add_store_arguments), the command's own options, the output last (add_output_arguments).

def add_store_arguments(p: argparse.ArgumentParser, data_root_help: str, *,
                        paths: tuple[str, str, str] | None = None) -> None:
    """The store a command works on: a positional STORE (optional), or with `paths` = (dest,
    metavar, help) the command's one or more paths whose first is the store ("[SRC] DST",
    "[OUT] SHARD"); then ``--data-root DATA_ROOT``, which names the store build makes there
    instead. `store_path_arg` (STORE) and `leading_store` (`paths`) give the store's path."""
    if paths is None:
        p.add_argument("store", nargs="?", default=None, metavar="STORE", help=STORE_HELP)
    else:
        dest, metavar, help = paths
        p.add_argument(dest, nargs="+", metavar=metavar, help=help)
    p.add_argument("--data-root", help=data_root_help)


def leading_store(paths: list[str], data_root: str | None) -> tuple[str | None, list[str]]:
    """Split the paths of `add_store_arguments(..., paths=...)` into the store and the rest:
    with --data-root the store is ``DATA_ROOT/vggt_features.lmdb`` and every path is of the
    rest; else the first path is the store (None when there is none).

    Example:
        >>> from featstore.arguments import leading_store
        >>> leading_store(["out.lmdb", "a.lmdb", "b.lmdb"], None)
        ('out.lmdb', ['a.lmdb', 'b.lmdb'])
        >>> leading_store(["a.lmdb"], "data")
        ('data/vggt_features.lmdb', ['a.lmdb'])
    """
    if data_root is not None:
        return store_path_arg(None, data_root), list(paths)
    return (paths[0] if paths else None), list(paths[1:])


def add_feature_set_filter(p: argparse.ArgumentParser, verb: str) -> None:
    """``--feature-set NAME``, repeatable, of a command that works set by set: `verb` (e.g.
    "check") only the sets named; by default every set of the store."""
    p.add_argument("--feature-set", action="append", metavar="NAME", help=f"{verb} only this feature set "
                   "(repeat for several; default: every set of the store)")


def add_output_arguments(p: argparse.ArgumentParser, json_help: str, *, progress: bool = True) -> None:
    """``--no-progress`` (unless `progress` is False: a command too quick to show any) and
    ``--json`` (`json_help` says what the object holds instead of which text). `shows_progress`
    reads them."""
    if progress:
        p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    p.add_argument("--json", action="store_true", help=json_help)


def shows_progress(args: argparse.Namespace) -> bool:
    """Whether a command shows its progress on stderr: not with --no-progress, nor with --json
    (a script reads the output then)."""
    return not args.no_progress and not args.json


# `featstore --help`'s examples: one per command, a first session on the bundled sample data
# (each is also an example of its command's --help, where tests/test_cli_help.py runs it).
