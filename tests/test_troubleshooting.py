"""docs/TROUBLESHOOTING.md lists every message a user can see, as the code prints it, and says
what to do about it.

The source of featstore/ and training/ is walked (ast) for the messages a user can meet: the
text given to a raised exception (every class: featstore's errors, training's ArgumentError /
DataError, and the ValueError / TypeError / KeyError / RuntimeError raised to callers), errors
made by helper functions (``return SomeError(...)``), parser.error, what the CLI and training
print to stderr, warnings, verify's findings and the advice texts appended to messages. Each
constant piece of 12 characters or more must appear in TROUBLESHOOTING.md, so that the page
quotes every message as it is printed. A few real failures then run through the real command
line (and training's main), and their one error line must be on stderr, end with a newline,
match an entry of the page and say what to do.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import subprocess
from dataclasses import dataclass

import pytest

from _featstore_helpers import FEATSTORE, REPO, make_images

DOC = os.path.join(REPO, "docs", "TROUBLESHOOTING.md")
SOURCE_TREES = ("featstore", "training")
MIN_PIECE = 12  # constant pieces shorter than this ("image ", ": ") say nothing on their own

# Messages no user meets: internal signals caught before anyone sees them, normal reports, and
# checks of arguments that featstore's own code always passes right. (file, a fragment of the
# message) -> why it is not listed. Every entry must still match a message (a stale one fails).
ALLOWLIST = {
    # Python's own wording for a missing module attribute (the lazy re-exports' __getattr__).
    ("featstore/__init__.py", "has no attribute"): "AttributeError of a module __getattr__",
    ("featstore/contract/dtypes.py", "has no attribute"): "AttributeError of a module __getattr__",
    # SIGTERM inside a StoreWriter: a KeyboardInterrupt, printed as "<command>: interrupted".
    ("featstore/store/writer.py", "committing what is done"): "BuildInterrupted, shown as 'interrupted'",
    # The build's normal summary on stderr (not a failure); its failure lines are listed.
    ("featstore/build/cli.py", "already fresh"): "the build's summary line",
    ("featstore/build/cli.py", "dry run, nothing computed"): "the summary line of build --dry-run",
    ("featstore/ops/merge.py", "identical skipped"): "merge's summary line",
    # The VGGT aggregator module's own argument checks (featstore.encoders.vggt.model, met only by
    # building a VGGTAggregator by hand): the presets pass fixed configs, and the encoder
    # (VGGTEncoder) checks frame shapes first, with the EncoderError messages listed.
    ("featstore/encoders/vggt/model.py", "must be divisible by num_heads"): "aggregator constructor",
    ("featstore/encoders/vggt/model.py", "2-D RoPE needs head_dim"): "aggregator constructor",
    ("featstore/encoders/vggt/model.py", "must be divisible by aa_block_size"): "aggregator constructor",
    ("featstore/encoders/vggt/model.py", "aa_order must contain"): "aggregator constructor",
    ("featstore/encoders/vggt/model.py", "outputs "): "aggregator constructor (patch_embed width)",
    ("featstore/encoders/vggt/model.py", "patch_embed must be 'conv'"): "aggregator constructor",
    ("featstore/encoders/vggt/model.py", "go past last_layer"): "aggregator forward (keep_layers)",
    ("featstore/encoders/vggt/model.py", "images must have 3 channels"): "aggregator forward",
    ("featstore/encoders/vggt/model.py", "is not a multiple of patch_size"): "aggregator forward",
    ("featstore/encoders/vggt/model.py", "attention must be 'full' or 'causal'"): "aggregator forward",
    ("featstore/encoders/vggt/model.py", "is out of range for depth"): "aggregator layer index",
    ("featstore/encoders/vggt/model.py", "stream_step takes one frame"): "aggregator streaming step",
    ("featstore/encoders/vggt/model.py", "all frames of a stream must share"): "aggregator streaming step",
    # Caught in the same function and re-raised as the listed WeightsError ("cannot read the
    # shard index ...").
}


@dataclass(frozen=True)
class Message:
    where: str  # "featstore/build/pipeline.py:517"
    what: str  # how it reaches the user: "raise PlanError", "print", "warning", ...
    pieces: tuple[str, ...]  # its constant text, split where a value is inserted

    @property
    def path(self) -> str:
        return self.where.rsplit(":", 1)[0]

    @property
    def text(self) -> str:
        return " <...> ".join(self.pieces)


def _norm(text: str) -> str:
    return " ".join(text.split())


def _name(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Call):  # raise type(e)(...)
        return _name(func.func) + "()"
    return ""


def _is_error_class(name: str) -> bool:
    return name.endswith(("Error", "Exception", "Interrupt", "Interrupted")) or name == "type()"


class _Collector:
    def __init__(self, path: str, tree: ast.Module):
        self.path = path
        self.tree = tree
        self.functions = {n.name: n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        self.messages: list[Message] = []

    def pieces(self, node, depth: int = 0) -> list[str]:
        """The constant text of a message expression, one string per run between inserted values."""
        if isinstance(node, ast.Constant):
            return [node.value] if isinstance(node.value, str) else [""]
        if isinstance(node, ast.JoinedStr):
            out = [""]
            for v in node.values:
                if isinstance(v, ast.Constant):
                    out[-1] += v.value
                else:
                    out.append("")
            return out
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return self.pieces(node.left, depth) + self.pieces(node.right, depth)
        if isinstance(node, ast.IfExp):
            return self.pieces(node.body, depth) + self.pieces(node.orelse, depth)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and depth < 2:
            helper = self.functions.get(node.func.id)  # a function of this module that makes the text
            if helper is not None:
                out: list[str] = []
                for ret in ast.walk(helper):
                    if isinstance(ret, ast.Return) and ret.value is not None:
                        out += self.pieces(ret.value, depth + 1)
                return out
        return [""]

    def add(self, node: ast.AST, what: str, expr) -> None:
        pieces = tuple(p for p in self.pieces(expr) if p.strip())
        if pieces:
            self.messages.append(Message(f"{self.path}:{node.lineno}", what, pieces))

    def collect(self) -> list[Message]:
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                call = node.exc
                name = _name(call.func)
                if _is_error_class(name):
                    if call.args:
                        self.add(node, f"raise {name}", call.args[0])
                else:  # a helper that builds the error (`_fail(key, "...")`): its text arguments
                    for arg in call.args:
                        if isinstance(arg, (ast.Constant, ast.JoinedStr, ast.BinOp)):
                            self.add(node, f"raise {name}()", arg)
            elif isinstance(node, ast.Return) and isinstance(node.value, ast.Call):
                name = _name(node.value.func)
                if _is_error_class(name) and node.value.args:
                    self.add(node, f"return {name}", node.value.args[0])
            elif isinstance(node, ast.Call):
                self._call(node)
            elif isinstance(node, ast.Assign) and node in self.tree.body:
                for target in node.targets:
                    if isinstance(target, ast.Name) and re.fullmatch(r"_?[A-Z_]*(ADVICE|HINT)", target.id):
                        self.add(node, "advice", node.value)
        return self.messages

    def _call(self, node: ast.Call) -> None:
        func = node.func
        name = _name(func)
        owner = func.value if isinstance(func, ast.Attribute) else None
        owner_name = _name(owner) if owner is not None else ""
        if name == "error" and "parser" in owner_name and node.args:
            self.add(node, "parser.error", node.args[0])
        elif name == "warning" and "log" in owner_name and node.args:
            self.add(node, "warning", node.args[0])
        elif name == "warn" and owner_name == "warnings" and node.args:
            self.add(node, "warning", node.args[0])
        elif name == "print" and node.args and any(
                k.arg == "file" and ast.unparse(k.value) == "sys.stderr" for k in node.keywords):
            self.add(node, "print to stderr", node.args[0])
        elif (name == "add" and owner_name == "report" or name == "Finding") and len(node.args) >= 2:
            self.add(node, "verify finding", node.args[1])
        for k in node.keywords:
            if k.arg == "advice":
                self.add(node, "advice", k.value)


@functools.lru_cache(maxsize=None)
def collect_messages() -> tuple[Message, ...]:
    out: list[Message] = []
    for tree in SOURCE_TREES:
        for dirpath, _, files in os.walk(os.path.join(REPO, tree)):
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    rel = os.path.relpath(path, REPO).replace(os.sep, "/")
                    with open(path, encoding="utf-8") as f:
                        out += _Collector(rel, ast.parse(f.read(), rel)).collect()
    return tuple(out)


def _allowed(message: Message) -> str | None:
    for (path, fragment), why in ALLOWLIST.items():
        if message.path == path and fragment in message.text:
            return why
    return None


def _doc() -> str:
    with open(DOC, encoding="utf-8") as f:
        return f.read()


def _unlisted(messages, doc: str) -> list[str]:
    text = _norm(doc)
    missing = []
    for m in messages:
        if _allowed(m):
            continue
        for piece in m.pieces:
            piece = _norm(piece)
            if len(piece) >= MIN_PIECE and piece not in text:
                missing.append(f"{m.where} ({m.what}): {piece!r}")
    return missing


# -- the page lists every message -------------------------------------------------------------

def test_the_walk_finds_the_messages():
    messages = collect_messages()
    texts = [m.text for m in messages]
    # One of each way a message reaches the user, so that the walk itself cannot silently stop.
    for fragment in ("no images found under",  # a string helper's return (build._nothing_planned)
                     "checksum mismatch",  # a helper's text argument (format._fail)
                     "is not in the store",  # a helper's returned error (reader._missing)
                     "is being written by another build",  # raise StoreBusyError
                     "--data_root is required",  # training's ArgumentError
                     "error: LMDB: ",  # the CLI's stderr line
                     "taking over the build lock",  # a warning
                     "has no entry",  # a verify finding
                     "Pass --force to rebuild this store in place"):  # advice
        assert any(fragment in t for t in texts), fragment
    assert len(messages) > 250


def test_every_message_is_listed_in_troubleshooting():
    missing = _unlisted(collect_messages(), _doc())
    assert not missing, ("messages not quoted in docs/TROUBLESHOOTING.md (add them, with what they mean and what "
                         "to do; or allowlist an internal one here):\n" + "\n".join(missing))


def test_an_unlisted_message_is_found():
    doc = _doc()
    messages = collect_messages()
    store_busy = [m for m in messages if "is being written by another build" in m.text]
    assert store_busy and not _unlisted(store_busy, doc)
    assert _unlisted(store_busy, doc.replace("is being written by another build", "is busy"))


def test_every_allowlist_entry_matches_a_message():
    messages = collect_messages()
    stale = [key for key in ALLOWLIST if not any(m.path == key[0] and key[1] in m.text for m in messages)]
    assert not stale, f"allowlist entries that match no message any more: {stale}"


def test_every_verify_finding_kind_is_explained():
    from featstore.ops.verify import PROBLEM_KINDS

    text = _norm(_doc())
    for kind, advice in PROBLEM_KINDS.items():
        assert f"`{kind}`" in text and _norm(advice) in text, kind


# -- real failures through the real command lines ------------------------------------------------

# Each error line names a next step with one of these words.
HINT = re.compile(r"\b(pass|run|rerun|rebuild|build|check|use|remove|restore|choose|wait|give|drop|install|"
                  r"free|fix|rename|shorten|create|download|re-download|upgrade|open|select|train|delete|"
                  r"replace|move|add|leave|copy|crop|convert|downscale)\b", re.I)


def doc_templates(doc: str) -> list[str]:
    """The messages the page lists: the code spans of the first line of each list item."""
    lines = [line for line in doc.splitlines() if re.match(r"\s*- `", line)]
    return [m.group(2) for line in lines for m in re.finditer(r"(?<!`)(`+)(?!`) ?(.+?) ?(?<!`)\1(?!`)", line)]


def template_regex(template: str) -> re.Pattern:
    """A listed message as a regex: each <placeholder> stands for any text."""
    parts = re.split(r"<[A-Za-z][^<>]*>", template)
    body = ".+?".join(r"\s+".join(re.escape(w) for w in part.split(" ")) for part in parts)
    return re.compile(body, re.S)


def listed_as(message: str, doc: str) -> list[str]:
    return [t for t in doc_templates(doc) if template_regex(t).fullmatch(message)]


def test_templates_match_what_they_list():
    doc = _doc()
    assert len(doc_templates(doc)) > 200
    assert listed_as("no featstore database at /x (nor at /x/vggt_features.lmdb); build one with "
                     "`featstore build --data-root DATA_ROOT`", doc)
    assert not listed_as("no such thing at all", doc)


@dataclass
class Failure:
    prefix: str  # what precedes the message on its line: "featstore verify: error: ", "error: "
    proc: subprocess.Popen | None = None
    returncode: int | None = None
    stderr: str = ""

    def wait(self) -> "Failure":
        if self.proc is not None:
            _, self.stderr = self.proc.communicate(timeout=120)
            self.returncode, self.proc = self.proc.returncode, None
        return self


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A data root with a vggt-tiny store (target size 112), an empty folder, vggt-tiny's weights
    as a file (the same features, another weights_sha256) and an annotation file."""
    from safetensors.torch import save_file

    from featstore.build.runner import BuildOptions, build
    from featstore.encoders import get_encoder

    base = tmp_path_factory.mktemp("trouble")
    data = str(base / "data")
    make_images(data, ["s0/000.png", "s0/001.png"])
    build(BuildOptions(data_root=data, encoder="vggt-tiny", workers=0, progress=False))
    (base / "empty").mkdir()
    save_file(get_encoder("vggt-tiny").model.state_dict(), str(base / "tiny.safetensors"))
    (base / "train.json").write_text('[{"image": "s0/000.png", "conversations": [{"from": "human", "value": '
                                     '"<image>hi"}, {"from": "gpt", "value": "ok"}]}]')
    return base


@pytest.fixture(scope="module")
def failures(setup):
    """Real failures of the command line, started at once (each starts its own interpreter) and
    waited for when a test asks: name -> Failure."""
    base, data = setup, str(setup / "data")
    runs = {
        "verify a missing store": ("verify", str(base / "nowhere")),
        "build an empty data root": ("build", "--data-root", str(base / "empty"), "--encoder", "vggt-tiny",
                                     "--no-progress"),
        "build onto a store of another spec": ("build", "--data-root", data, "--encoder", "vggt-tiny",
                                               "--target-size", "126", "--no-progress"),
        "verify --recompute with other weights": ("verify", data, "--recompute", "1", "--weights",
                                                  str(base / "tiny.safetensors"), "--no-progress"),
    }
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    started = {name: Failure(f"featstore {args[0]}: error: ", subprocess.Popen(
                   [*FEATSTORE, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
                   env=env))
               for name, args in runs.items()}
    yield started
    for failure in started.values():  # a test that failed early leaves its command running
        if failure.proc is not None:
            failure.proc.kill()
            failure.proc.communicate()


def _check_error_line(failure: Failure, expected: str) -> None:
    assert failure.returncode == 2, failure.stderr
    assert "Traceback" not in failure.stderr, failure.stderr
    assert failure.stderr.endswith("\n")
    line = failure.stderr.rstrip("\n").splitlines()[-1]
    assert line.startswith(failure.prefix), line
    message = line[len(failure.prefix):]
    assert expected in message
    assert listed_as(message, _doc()), f"not listed in docs/TROUBLESHOOTING.md: {message}"
    hint = re.split(r"[;.:]\s", message, maxsplit=1)[-1]  # the part after the first clause
    assert HINT.search(hint), f"no next step in: {message}"


def test_training_on_a_store_of_another_spec_prints_a_listed_message(setup, failures, capsys):
    # In this process, while the command lines above run: training's own interpreter would spend
    # seconds importing transformers again. main() is what `python -m training.train` runs.
    from training.train import main

    data = str(setup / "data")
    code = main(["--data_root", data, "--annotations", str(setup / "train.json"), "--use_vggt_cache",
                 "--vggt_target_size", "126", "--output_dir", str(setup / "run"), "--use_cpu", "--report_to", "none"])
    failure = Failure("error: ", returncode=code, stderr=capsys.readouterr().err)
    _check_error_line(failure, "the store was built with a different encoder spec (preprocess.target_size: store "
                               "has 112, expected 126). Train with the --vggt_* flags")


@pytest.mark.parametrize("case, expected", [
    ("verify a missing store", "no featstore database at "),
    ("build an empty data root", "no images found under "),
    ("build onto a store of another spec", "the store was built with a different encoder spec "
                                           "(preprocess.target_size: store has 112, expected 126). Pass --force"),
    ("verify --recompute with other weights", "the rebuilt encoder differs from the spec: weights_sha256: "
                                              "store has 'random-seed-0'"),
])
def test_a_real_failure_prints_a_listed_message_with_what_to_do(failures, case, expected):
    _check_error_line(failures[case].wait(), expected)
