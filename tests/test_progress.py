"""Progress of the long commands (featstore.progress): a bar with the ETA on a terminal; elsewhere
whole lines with the ETA, each ending in a newline, never a carriage return."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys

from featstore.progress import Progress, format_eta

from _featstore_helpers import REPO


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_off_a_terminal_are_whole_and_carry_the_eta():
    out = io.StringIO()
    with Progress(10, desc="featstore build", unit="unit", stream=out, interval=0) as p:
        for _ in range(4):
            p.set_postfix_str("2.0 frames/s")
            p.update(1)
    text = out.getvalue()
    lines = text.splitlines()
    assert len(lines) == 4 and text.endswith("\n") and "\r" not in text
    assert lines[-1].startswith("featstore build: 4/10 units (40%), ")
    assert ", 2.0 frames/s, elapsed 0:00:00, ETA " in lines[-1]


def test_lines_wait_for_the_interval_and_bytes_are_scaled():
    quiet = io.StringIO()
    with Progress(100, desc="x", stream=quiet, interval=3600) as p:
        p.update(50)
    assert quiet.getvalue() == ""  # short work prints no line
    p = Progress(4e9, desc="featstore verify: entries", unit="B", stream=io.StringIO(), interval=0)
    p.update(1e9)
    assert p.line().startswith("featstore verify: entries: 1.0 GB/4.0 GB (25%), ")
    unknown = Progress(None, desc="y", stream=io.StringIO())
    unknown.update(3)
    assert unknown.line().startswith("y: 3 units, ") and unknown.line().endswith("ETA ?")
    assert format_eta(59.6) == "0:01:00" and format_eta(float("inf")) == "?"


def test_disabled_prints_nothing_and_a_terminal_gets_a_bar():
    off = io.StringIO()
    with Progress(5, desc="z", stream=off, interval=0, enabled=False) as p:
        p.update(5)
    assert off.getvalue() == ""
    tty = _Terminal()
    with Progress(5, desc="featstore merge: write vggt", unit="entry", stream=tty) as p:
        p.update(2)
    assert "featstore merge: write vggt" in tty.getvalue() and "2/5" in tty.getvalue()
    assert "<" in tty.getvalue()  # tqdm's [elapsed<remaining]


def test_cli_progress_off_a_terminal_is_whole_lines(tmp_path):
    shutil.copytree(os.path.join(REPO, "sample_data"), tmp_path / "data", ignore=shutil.ignore_patterns("*.lmdb"))
    env = dict(os.environ, FEATSTORE_PROGRESS_INTERVAL="0", PYTHONPATH=REPO)
    code = ("import sys\nfrom featstore.cli import main\n"
            "rc = main(['build', '--data-root', sys.argv[1], '--encoder', 'vggt-tiny', '--workers', '0',"
            " '--batch-frames', '1'])\n"
            "rc = rc or main(['verify', sys.argv[1], '--deep'])\n"
            "sys.exit(rc)\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "data")], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and r.stderr.endswith("\n") and r.stdout.endswith("\n")
    build = [ln for ln in r.stderr.splitlines() if ln.startswith("featstore build: ") and "units (" in ln]
    assert build and build[-1].startswith("featstore build: 10/10 units (100%)") and " ETA " in build[-1]
    assert any(ln.startswith("featstore verify: entries: ") for ln in r.stderr.splitlines())
    assert any(ln.startswith("featstore verify: sources: 10/10 files") for ln in r.stderr.splitlines())
