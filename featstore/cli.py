"""The `featstore` command line: parse, then hand off to one module per subcommand (`COMMANDS`);
and the options the subcommands share, defined once (the store, --annotations, --feature-set,
--no-progress and --json)."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from featstore import __version__
from featstore.contract.naming import DEFAULT_STORE_NAME
from featstore.errors import FeatstoreError
from featstore.interrupt import ignore_stop_signals, interrupts_deferred, sigterm_as_keyboard_interrupt
from featstore.progress import NO_PROGRESS_HELP

# subcommand -> module that defines `configure_parser(parser)` and `run(args) -> int`
COMMANDS = {
    "build": "featstore.build.cli",
    "verify": "featstore.ops.verify.cli",
    "info": "featstore.ops.info",
    "gc": "featstore.ops.collect",
    "copy": "featstore.ops.copy_store",
    "merge": "featstore.ops.merge",
}


def _available_commands() -> dict[str, object]:
    modules = {}
    for name, module_name in COMMANDS.items():
        try:
            modules[name] = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:  # a missing dependency, not a missing subcommand
                raise
    return modules


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
        >>> from featstore.cli import leading_store
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
EXAMPLES = """\
Examples:
  # a first session on the bundled sample data, on CPU, from the repository root
  featstore build --data-root sample_data --encoder vggt-tiny     # compute the features (seconds)
  featstore verify sample_data                    # check every entry against the images
  featstore info sample_data                      # what the store holds
  featstore gc sample_data --dry-run              # what gc would remove
  featstore copy sample_data /tmp/vggt_features.lmdb          # a compacted copy, e.g. to local disk
  featstore build --data-root sample_data --encoder vggt-tiny --shard 0/2
  featstore build --data-root sample_data --encoder vggt-tiny --shard 1/2
  featstore merge /tmp/merged.lmdb \\
      sample_data/vggt_features.shard-0-of-2.lmdb sample_data/vggt_features.shard-1-of-2.lmdb
  # train on the cached features (`python -m training.train --help`)
  featstore build --data-root sample_data --annotations sample_data/annotations.json \\
      --encoder vggt-tiny
  python -m training.train --data_root sample_data --annotations sample_data/annotations.json \\
      --use_vggt_cache --output_dir /tmp/run --max_steps 20 --use_cpu --report_to none

Run `featstore COMMAND --help` for the options of each command and more examples.
Docs: docs/CLI.md (every command's help), docs/BUILD.md (building), docs/FORMAT.md (store
format), docs/OPERATIONS.md (running a store).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="featstore",
        description="Precompute frozen-encoder (VGGT) features once into one LMDB store beside the data,\n"
        "and serve them to training zero-copy.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"featstore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND",
                                title="commands (each with its own --help: options and examples)")
    for name, module in _available_commands().items():
        doc = (module.__doc__ or "").strip().splitlines()[0]
        p = sub.add_parser(name, help=doc, description=module.__doc__, epilog=getattr(module, "EXAMPLES", None),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.configure_parser(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Ctrl-C or SIGTERM at any instant, start-up included (importing torch takes seconds),
    # ends with one "interrupted" line, not a traceback. A build replaces this with a stop
    # flag while its pipeline runs (featstore.interrupt).
    sigterm_as_keyboard_interrupt()
    command = "featstore"
    restore_logging = lambda: None  # noqa: E731
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        store_after_annotations(args)
        command = f"featstore {args.command}" if getattr(args, "command", None) else command
        if getattr(args, "_run", None) is None:
            parser.print_help()
            return 2
        restore_logging = _log_to_stderr()
        with interrupts_deferred():  # an interrupt inside torch's import could abort the process
            _import_torch()
        return int(args._run(args) or 0)
    except FeatstoreError as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return 2
    except PermissionError as e:
        # A folder or file of the data root or the store this user may not read or write (a
        # shared data root, a store built by another user): one line naming it, not a traceback.
        where = e.filename if e.filename is not None else "a file"
        print(f"{command}: error: permission denied: {where} ({e.strerror or e}); run as a user who may access "
              "it, change its permissions (chmod / chown), or pass --store PATH for a store in a folder you "
              "can write", file=sys.stderr)
        return 2
    except Exception as e:
        # LMDB's own errors (a damaged lock file, a read-only folder, ...) for every subcommand,
        # translated here once; lmdb is imported only when one happened.
        lmdb = sys.modules.get("lmdb")
        if lmdb is None or not isinstance(e, lmdb.Error):
            raise
        print(f"featstore {args.command}: error: LMDB: {type(e).__name__}: {e} (run `featstore verify` on the "
              "store; restore or rebuild it if it is damaged)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        if argv is None:
            # A KeyboardInterrupt that passed through a C-level PyRun_* call (an import of an
            # extension, say) sets CPython's "unhandled" flag for good, and the interpreter
            # would then kill itself with SIGINT at exit although it was handled here.
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(130)
        return 130
    except BrokenPipeError:
        # `featstore info | head`: the reader went away; not an error of ours. Point stdout at
        # /dev/null so that the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        restore_logging()
        if argv is None:
            # The process's own command line, and its work is done: a signal from now on (in
            # atexit callbacks, interpreter shutdown) must not print a traceback.
            ignore_stop_signals()


def _import_torch() -> None:
    """Import torch (every subcommand reads or writes tensors) where an interrupt is deferred;
    `--help` never gets here, so it runs without torch. A missing torch is reported by the
    subcommand that needs it."""
    try:
        import torch  # noqa: F401
    except ImportError:
        pass


def _log_to_stderr():
    """The CLI's human output of library messages: featstore's INFO and up on this call's stderr,
    plain. Returns the function that undoes it (called when `main` returns: an in-process caller,
    a test, keeps its own logging setup). Library users get the messages through
    `logging.getLogger("featstore")` at the levels they set."""
    logger = logging.getLogger("featstore")
    if logger.handlers:  # the caller set featstore's logging up: leave it as it is
        return lambda: None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    def restore() -> None:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]

    return restore


if __name__ == "__main__":
    sys.exit(main())
