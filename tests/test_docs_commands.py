"""Every command shown in the docs has been run: the CPU-runnable shell blocks of README.md and
docs/*.md run here, on a copy of the sample data, and must exit 0.

The convention (docs/QUICKSTART.md, "The commands in these docs", says the same for writers):

- A block fenced as ```bash runs as shown, on a CPU, from the repository root, on the bundled
  sample_data. This test runs it with `bash -e`. The runnable blocks of one file run in order in
  one fresh folder, so a later block may use what an earlier one built (build, then train).
- A block fenced as ```sh or ```console is shown and not run: it needs a GPU, several GPUs or
  hosts, real weights, the network, a data set of your own (placeholders such as DATA, /ckpt,
  /nvme) or a long time. So is a ```bash block whose first line is a comment `# gpu ...` or
  `# not run: ...`. Each such block is listed here as a skipped case with its reason.
- Output goes in ```text blocks; ```python blocks are tests/test_docs.py's business.

What this test changes before running a block, and nothing else:
- `.venv/bin/` becomes the folder of the interpreter running the tests; that folder comes first
  on PATH (so `python`, `featstore`, `torchrun` are this environment's), and the repository
  first on PYTHONPATH (so its code is the code under test).
- The parts of a line (split at `&&`) that create a venv (`python3 -m venv`), install
  (`pip install`) or run the test suite (`pytest`) are dropped: the environment running this
  test is installed already, and the suite is not run from inside itself.
- Paths under /tmp/ are moved into the block's folder (two runs must not share /tmp/run).

The folder holds a copy of sample_data (without any *.lmdb store) and links to the repository's
other top-level entries (scripts/, training/, ...), as a checkout would.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from _featstore_helpers import REPO

RUN_LANGUAGES = {"bash"}
SHOWN_LANGUAGES = {"sh", "console"}  # shown, not run
# Shell-like fence languages outside the convention: a block fenced so would be neither run nor listed.
AMBIGUOUS_LANGUAGES = {"shell", "zsh", "shell-session", "bash-session", "sh-session", "shellscript"}
NOT_RUN_MARK = re.compile(r"#\s*(gpu\b.*|not run\b.*)", re.I)
DROPPED = [
    (re.compile(r"^\s*(\S*/)?python3?\s+-m\s+venv\b"), "creates a venv: the test runs in an installed one"),
    (re.compile(r"^\s*(\S*/)?pip3?\s+install\b"), "installs: the environment running the test is installed"),
    (re.compile(r"^\s*(\S*/)?python3?\s+-m\s+pytest\b|^\s*(\S*/)?pytest\b"), "runs the test suite: not from inside it"),
]
TMP_PATH = re.compile(r"(?<![\w./-])/tmp/")
BLOCK_TIMEOUT_S = 300


@dataclass
class Block:
    path: str  # relative to the repository
    line: int  # of the opening fence, 1-based
    language: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def not_run_reason(self) -> str | None:
        """None for a block the test runs; else why it is not run."""
        first = self.text.splitlines()[0].strip() if self.text.strip() else ""
        if self.language in SHOWN_LANGUAGES:
            return (f"fenced as {self.language}: needs a GPU, several GPUs or hosts, weights, the network, data "
                    "of your own or a long time")
        mark = NOT_RUN_MARK.fullmatch(first)
        if mark:
            return f"marked `{first}`"
        return None


def doc_files() -> list[str]:
    return ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))


def fenced_blocks(relpath: str) -> list[Block]:
    """The fenced code blocks of a markdown file (backtick fences, up to 3 spaces of indent)."""
    blocks: list[Block] = []
    lines = open(os.path.join(REPO, relpath), encoding="utf-8").read().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^( {0,3})(`{3,})\s*([^`\s]*)[^`]*$", lines[i])
        if not m:
            i += 1
            continue
        indent, fence, language = len(m.group(1)), m.group(2), m.group(3).lower()
        body, j = [], i + 1
        while j < len(lines) and not re.match(rf"^ {{0,3}}{fence}`*\s*$", lines[j]):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        blocks.append(Block(relpath, i + 1, language, "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def shell_blocks() -> list[Block]:
    return [b for f in doc_files() for b in fenced_blocks(f) if b.language in RUN_LANGUAGES | SHOWN_LANGUAGES]


def runnable_by_file() -> dict[str, list[Block]]:
    out: dict[str, list[Block]] = {}
    for b in shell_blocks():
        if b.not_run_reason is None:
            out.setdefault(b.path, []).append(b)
    return out


def _logical_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined (what bash executes as one line)."""
    out, cur = [], ""
    for line in text.splitlines():
        if cur:
            line = line.lstrip()
        if line.endswith("\\"):
            cur += line[:-1].rstrip() + " "
        else:
            out.append(cur + line)
            cur = ""
    if cur:
        out.append(cur)
    return out


def prepared_script(block: Block, bindir: str, workdir: str) -> str:
    """The block as the test runs it (module docstring: what changes)."""
    out = [f"# {block.where}"]
    def localised(text: str) -> str:
        # /tmp/ paths of the doc first, then the interpreter's folder: that folder (or the test's
        # own) may itself lie under /tmp/, and must not be moved.
        return TMP_PATH.sub(os.path.join(workdir, "tmp") + "/", text).replace(".venv/bin/", bindir + "/")

    for line in _logical_lines(block.text):
        # What to drop is decided on the doc's own words, before any path is substituted (a
        # substituted path such as /tmp/pytest-of-root/... must not read as a pytest run).
        parts = line.split(" && ")
        kept, dropped = [], []
        for part in parts:
            reason = next((why for pattern, why in DROPPED if pattern.search(part)), None)
            (dropped if reason else kept).append(reason or part)
        for reason in dropped:
            out.append(f"# dropped by the test: a part that {reason}")
        if kept:
            out.append(localised(" && ".join(p.strip() for p in kept) if dropped else line))
    return "\n".join(out) + "\n"


def _shims(workdir: str, bindir: str) -> str:
    """A folder of stand-ins for `python`, `python3` and `featstore` where the interpreter's own
    folder lacks them (a system interpreter, a checkout on PYTHONPATH without the entry point)."""
    shims = os.path.join(workdir, ".shims")
    os.makedirs(shims)
    for name, target in (("python", f'"{sys.executable}"'), ("python3", f'"{sys.executable}"'),
                         ("featstore", f'"{sys.executable}" -m featstore')):
        if not os.path.exists(os.path.join(bindir, name)):
            path = os.path.join(shims, name)
            with open(path, "w") as f:
                f.write(f'#!/bin/sh\nexec {target} "$@"\n')
            os.chmod(path, 0o755)
    return shims


def _workdir(tmp_path) -> str:
    work = str(tmp_path / "repo")
    os.makedirs(os.path.join(work, "tmp"))
    shutil.copytree(os.path.join(REPO, "sample_data"), os.path.join(work, "sample_data"),
                    ignore=shutil.ignore_patterns("*.lmdb"))
    for name in os.listdir(REPO):
        if name != "sample_data" and not name.startswith("."):
            os.symlink(os.path.join(REPO, name), os.path.join(work, name))
    return work


def _env(work: str, bindir: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PATH"] = os.pathsep.join([bindir, _shims(work, bindir), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in [REPO, env.get("PYTHONPATH", "")] if p)
    # As the training tests do: DeepSpeed's JIT-built extension cached per environment, if ever built.
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


# -- the convention holds --------------------------------------------------------------------------
def test_the_docs_have_runnable_blocks_and_no_ambiguous_shell_fences():
    runnable = runnable_by_file()
    assert "README.md" in runnable and "docs/QUICKSTART.md" in runnable, sorted(runnable)
    ambiguous = [f"{b.where} ({b.language})" for f in doc_files() for b in fenced_blocks(f)
                 if b.language in AMBIGUOUS_LANGUAGES]
    assert not ambiguous, ("fence shell commands as bash (run on the sample data by this test) or sh/console "
                           f"(shown, not run): {ambiguous}")


def test_prepared_script_drops_installs_and_moves_tmp(tmp_path):
    block = Block("X.md", 1, "bash", "python3 -m venv .venv && .venv/bin/pip install -e . && "
                  ".venv/bin/featstore info sample_data\n.venv/bin/python -m pytest -q\n"
                  "python -m training.train \\\n    --output_dir /tmp/run\n")
    script = prepared_script(block, "/env/bin", "/work")
    assert script.splitlines()[1:] == [
        "# dropped by the test: a part that creates a venv: the test runs in an installed one",
        "# dropped by the test: a part that installs: the environment running the test is installed",
        "/env/bin/featstore info sample_data",
        "# dropped by the test: a part that runs the test suite: not from inside it",
        "python -m training.train --output_dir /work/tmp/run"]
    # A checkout and a work folder under /tmp (as CI's clone may be): neither path is rewritten,
    # and a work path holding "pytest" drops nothing.
    block = Block("X.md", 1, "bash", ".venv/bin/python - <<'EOF'\nprint(1)\nEOF\n"
                  "PYTHON=.venv/bin/python scripts/build_features.sh --out /tmp/x\n")
    script = prepared_script(block, "/tmp/clone/.venv/bin", "/tmp/pytest-of-root/w")
    assert script.splitlines()[1:] == [
        "/tmp/clone/.venv/bin/python - <<'EOF'", "print(1)", "EOF",
        "PYTHON=/tmp/clone/.venv/bin/python scripts/build_features.sh --out /tmp/pytest-of-root/w/tmp/x"]


# -- the blocks not run are listed, with why -------------------------------------------------------
@pytest.mark.parametrize("block", [b for b in shell_blocks() if b.not_run_reason is not None],
                         ids=lambda b: b.where)
def test_block_not_run(block):
    first = next((ln.strip() for ln in block.text.splitlines() if ln.strip()), "")
    pytest.skip(f"{block.where} not run ({block.not_run_reason}): {first[:80]}")


# -- the runnable blocks run -----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("relpath", sorted(runnable_by_file()))
def test_doc_commands_run(relpath, tmp_path):
    work = _workdir(tmp_path)
    bindir = os.path.dirname(sys.executable)
    env = _env(work, bindir)
    timings = []
    for n, block in enumerate(runnable_by_file()[relpath]):
        script = prepared_script(block, bindir, work)
        script_path = os.path.join(work, ".shims", f"block{n}.sh")
        with open(script_path, "w") as f:
            f.write(script)
        start = time.monotonic()
        res = subprocess.run(["bash", "-e", script_path], cwd=work, env=env, capture_output=True, text=True,
                             timeout=BLOCK_TIMEOUT_S)
        timings.append(f"{block.where} {time.monotonic() - start:.1f} s")
        assert res.returncode == 0, (f"{block.where}: exit {res.returncode}\n--- script\n{script}"
                                     f"--- stdout (tail)\n{res.stdout[-3000:]}\n--- stderr (tail)\n{res.stderr[-3000:]}")
    print("ran: " + "; ".join(timings))
