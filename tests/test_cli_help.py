"""The help is the documentation: docs/CLI.md is the current `--help` of every command, every
option says what it does, every command's help ends with examples, and those examples run on a
copy of the bundled sample data, printing only whole lines."""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import os
import shlex
import shutil
import time

import pytest

from featstore.cli import COMMANDS, EXAMPLES as TOP_EXAMPLES, build_parser, main

from _featstore_helpers import REPO

COLUMNS = "100"  # as scripts/gen_cli_docs.py: the wrapping must not depend on the terminal
DOC = os.path.join(REPO, "docs", "CLI.md")


@pytest.fixture(autouse=True)
def _columns(monkeypatch):
    monkeypatch.setenv("COLUMNS", COLUMNS)


def _generator():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", os.path.join(REPO, "scripts", "gen_cli_docs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _example_lines(text: str) -> list[str]:
    """The lines of the "Examples:" section of a help text, continuation lines joined."""
    section = ("\n" + text).split("\nExamples:\n", 1)[1]
    lines, pending = [], ""
    for line in section.splitlines():
        if not line.startswith("  "):  # the section ends at the first unindented line
            break
        line = pending + line.strip()
        if line.endswith("\\"):
            pending = line[:-1]
            continue
        pending = ""
        lines.append(line)
    return lines


def _runnable(text: str) -> list[str]:
    """The featstore commands among the examples that run on the bundled sample data (the others
    name data, checkpoints or GPUs of their own), without their trailing comments."""
    out = []
    for line in _example_lines(text):
        command = line.split("  #", 1)[0].strip()
        if command.startswith("featstore ") and "sample_data" in command:
            out.append(command)
    return out


def test_docs_cli_md_is_the_current_help():
    pytest.importorskip("transformers")  # the training section needs the training extra
    want = _generator().render()
    have = open(DOC, encoding="utf-8").read() if os.path.exists(DOC) else ""
    if have != want:
        diff = "".join(list(difflib.unified_diff(have.splitlines(True), want.splitlines(True), "docs/CLI.md",
                                                 "the current --help"))[:60])
        pytest.fail("docs/CLI.md is not the commands' current --help: run `python scripts/gen_cli_docs.py` "
                    f"and commit docs/CLI.md.\n{diff}")


def test_every_option_explains_itself_and_every_command_ends_with_examples():
    parser = build_parser()
    subs = _subparsers(parser)
    assert list(subs) == list(COMMANDS)
    for name, sub in subs.items():
        for action in sub._actions:
            label = f"featstore {name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help not in (None, argparse.SUPPRESS) and action.help.strip(), f"{label}: no help text"
        text = sub.format_help()
        assert "\nExamples:\n" in text, f"featstore {name} --help has no Examples: section"
        assert text.index("\nExamples:\n") > text.index("\noptions:\n"), f"featstore {name}: Examples: is not last"
        assert _runnable(text), f"featstore {name} --help: no example on sample_data"
    top = parser.format_help()
    assert "\nExamples:\n" in top
    for name in subs:
        assert f"\n    {name} " in top, f"featstore --help does not list {name} with its purpose"
    # Each example of `featstore --help` is also one of a command's, so the test below runs it.
    commands_examples = {c for sub in subs.values() for c in _runnable(sub.format_help())}
    for command in _runnable(TOP_EXAMPLES):
        assert command in commands_examples, f"featstore --help example {command!r} is in no command's examples"


def test_training_help_explains_the_project_options_with_an_example():
    pytest.importorskip("transformers")
    from training.args import build_parser as training_parser

    own = _generator().training_own_fields()
    parser = training_parser()
    actions = [a for a in parser._actions if a.dest in own]
    assert {a.dest for a in actions} == own
    for action in actions:
        assert action.help and action.help.strip(), f"python -m training.train {action.option_strings}: no help"
    text = parser.format_help()
    assert text.startswith("usage: python -m training.train ")
    head = text[: text.index("\noptions:\n")]  # the example comes before the long options list
    assert "Examples:" in head
    assert ("python -m training.train --data_root sample_data --annotations sample_data/annotations.json "
            "--use_vggt_cache --output_dir /tmp/run --max_steps 20 --use_cpu --report_to none") in " ".join(
                line.strip().rstrip("\\").strip() for line in head.splitlines()).replace("  ", " ")


def test_the_examples_run_on_the_sample_data(tmp_path, monkeypatch, capsys):
    """Every featstore example on sample_data, in the order of `featstore --help`'s commands (build
    first, so that the others find a store), on a copy of the data; /tmp/ paths go to a scratch
    folder. Builds decode in-process (--workers 0: a fork per build would cost more than the work)."""
    shutil.copytree(os.path.join(REPO, "sample_data"), tmp_path / "sample_data",
                    ignore=shutil.ignore_patterns("*.lmdb"))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.chdir(tmp_path)
    subs = _subparsers(build_parser())
    ran, timings = set(), []
    for name in COMMANDS:
        for command in _runnable(subs[name].format_help()):
            argv = [a.replace("/tmp/", f"{scratch}/") for a in shlex.split(command)[1:]]
            if argv[0] == "build" and "--workers" not in argv:
                argv += ["--workers", "0"]
            if tuple(argv) in ran:  # an example repeated by another command (merge's builds)
                continue
            ran.add(tuple(argv))
            t0 = time.perf_counter()
            rc = main(argv)
            timings.append((time.perf_counter() - t0, command))
            out, err = capsys.readouterr()
            assert rc == 0, f"`{command}` exited {rc}:\n{err}"
            for stream, text in (("stdout", out), ("stderr", err)):
                assert "\r" not in text, f"`{command}` wrote a carriage return on {stream} (not a terminal)"
                assert not text or text.endswith("\n"), f"`{command}`: its last {stream} line has no newline"
    assert len(ran) >= 12
    with capsys.disabled():
        slowest = ", ".join(f"{c.split(' ', 2)[1]} {t:.1f} s" for t, c in sorted(timings, reverse=True)[:3])
        print(f"\n{len(ran)} examples in {sum(t for t, _ in timings):.1f} s (slowest: {slowest})")
