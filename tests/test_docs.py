"""The text is true: every public docstring `Example:` runs as a doctest, and the README's Python
block runs, on a copy of the sample data with a vggt-tiny store built beside it."""

import doctest
import importlib
import os
import pkgutil
import re
import shlex
import shutil

import pytest

import featstore
from featstore.build.runner import BuildOptions, build

from _featstore_helpers import REPO


def _modules() -> list[str]:
    names = ["featstore"]
    for info in pkgutil.walk_packages(featstore.__path__, "featstore."):
        if info.name not in ("featstore.__main__",):
            names.append(info.name)
    return sorted(names)


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory):
    """A folder holding data/ (the sample data) and its built store, as the examples assume."""
    base = tmp_path_factory.mktemp("docs")
    shutil.copytree(os.path.join(REPO, "sample_data"), base / "data", ignore=shutil.ignore_patterns("*.lmdb"))
    build(BuildOptions(data_root=str(base / "data"), encoder="vggt-tiny", workers=0, progress=False))
    return base


@pytest.fixture
def in_docs_dir(docs_dir, tmp_path, monkeypatch):
    # A fresh working folder per module (examples write copies and new stores), with data/ linked in.
    os.symlink(docs_dir / "data", tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEATSTORE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def test_every_module_with_examples_is_collected():
    with_examples = [m for m in _modules() if ">>>" in (importlib.util.find_spec(m).loader.get_source(m) or "")]
    assert {"featstore.build.plan", "featstore.store.reader", "featstore.build.encode", "featstore.encoders"} <= set(with_examples)


@pytest.mark.parametrize("module", _modules())
def test_docstring_examples_run(module, in_docs_dir):
    mod = importlib.import_module(module)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(mod, module) if t.examples]
    if not tests:
        pytest.skip(f"{module} has no examples")
    for t in tests:
        runner.run(t)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {module} failed (see stdout)"


def _readme_build_command(text: str) -> list[str]:
    """The `featstore build` of the README's command 1 (its first bash block), as arguments."""
    first = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    joined = re.sub(r"\\\n\s*", " ", first)
    parts = [p.strip() for p in joined.split("&&")]
    build = next(p for p in parts if re.match(r"(\S*/)?featstore build ", p))
    return shlex.split(build)[1:]


def test_readme_python_block_runs_on_the_store_command_1_builds(tmp_path, monkeypatch):
    from featstore.cli import main

    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python block"
    shutil.copytree(os.path.join(REPO, "sample_data"), tmp_path / "sample_data",
                    ignore=shutil.ignore_patterns("*.lmdb"))
    monkeypatch.chdir(tmp_path)
    argv = _readme_build_command(text)  # exactly as a new user runs it, right before the example
    assert argv[:2] == ["build", "--data-root"] and "--annotations" in argv, argv
    assert main([*argv, "--no-progress"]) == 0
    for block in blocks:
        scope: dict = {}
        exec(compile(block, "README.md", "exec"), scope)
    assert scope["feats"].shape == (2, 48, 128) and scope["batch"].shape == (2, 2, 48, 128)
    assert scope["keys"] == ["misc/portrait.png", "scene_a_step1", "scene_a_step3", "scene_b_step1", "scene_b_step3"]
