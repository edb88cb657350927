"""The `featstore` command line: parse, then hand off to one module per subcommand (`COMMANDS`).
The options the subcommands share are defined once, in `featstore.arguments`."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from featstore import __version__
from featstore.arguments import store_after_annotations
from featstore.errors import FeatstoreError
from featstore.interrupt import ignore_stop_signals, interrupts_deferred, sigterm_as_keyboard_interrupt

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
