"""The `featstore` command line: parse, then hand off to one module per subcommand."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from featstore import __version__
from featstore.errors import FeatstoreError

# subcommand -> module that defines `configure_parser(parser)` and `run(args) -> int`
COMMANDS = {
    "build": "featstore.build",
    "verify": "featstore.verify",
    "info": "featstore.info",
    "gc": "featstore.gc",
    "copy": "featstore.copy",
    "merge": "featstore.merge",
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="featstore",
        description="Precompute frozen-encoder (VGGT) features once into one LMDB store beside the "
        "data, and serve them to training zero-copy.",
        epilog="Run `featstore COMMAND --help` for the options of each command. "
        "Docs: docs/FORMAT.md (store format), docs/OPERATIONS.md (running a store).",
    )
    parser.add_argument("--version", action="version", version=f"featstore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in _available_commands().items():
        doc = (module.__doc__ or "").strip().splitlines()[0]
        p = sub.add_parser(name, help=doc, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.configure_parser(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except FeatstoreError as e:
        print(f"featstore {args.command}: error: {e}", file=sys.stderr)
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
        print(f"featstore {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `featstore info | head`: the reader went away; not an error of ours. Point stdout at
        # /dev/null so that the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
