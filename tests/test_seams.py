"""The names training imports: resolve_spec, featstore.build.encode, featstore.ops.compare, the Encoder
protocol and VGGTEncoder, the dtype map; and the layering that keeps cache mode model-free."""

import hashlib
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import featstore.encoders as encoders
from featstore.ops.compare import COMPUTE_TOLERANCES, RECOMPUTE_TOLERANCES, compare_features
from featstore.contract.dtypes import DTYPE_NAMES, STORAGE_DTYPE_NAMES, TORCH_DTYPES, torch_dtype
from featstore.build.encode import encode_frames, encode_unit, read_frame, read_unit_frames, unit_metadata
from featstore.encoders import TINY_CONFIG, get_encoder, resolve_spec
from featstore.encoders.base import Encoder
from featstore.encoders.vggt.model import VGGTAggregator, init_random_
from featstore.encoders.vggt.config import VGGT_1B_CONFIG
from featstore.encoders.vggt.encoder import VGGTEncoder
from featstore.errors import EncoderError, ImageDecodeError, WeightsError
from featstore.build.plan import Unit, plan_units

from _featstore_helpers import REPO, make_images

SAMPLE = os.path.join(REPO, "sample_data")
OVERRIDES = [
    {},
    {"layer": -1, "attention": "causal", "frames_kept": "last"},
    {"target_size": 56, "preprocess_mode": "pad", "storage_dtype": "float16", "compute_dtype": "float16"},
    {"extra_resize": (28, 42), "compile": False, "backend": "featstore"},
]


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATSTORE_CACHE_DIR", str(tmp_path / "cache"))


def _checkpoint(path, seed=5):
    """A full-VGGT-style checkpoint of the tiny config: aggregator.* keys plus a head's key."""
    model = init_random_(VGGTAggregator(**TINY_CONFIG), seed)
    sd = {"aggregator." + k: v.clone() for k, v in model.state_dict().items()}
    sd["camera_head.trunk.0.weight"] = torch.zeros(3, 3)
    save_file(sd, str(path))
    return str(path)


@pytest.mark.parametrize("overrides", OVERRIDES)
def test_resolve_spec_equals_the_built_encoders_spec_tiny(overrides, monkeypatch):
    spec = resolve_spec("vggt-tiny", **overrides)
    built = get_encoder("vggt-tiny", **overrides).spec
    assert spec == built and spec.fingerprint() == built.fingerprint()
    # No model is built to resolve it: building one now fails, resolving still works.
    monkeypatch.setattr(VGGTAggregator, "__init__", lambda *a, **k: (_ for _ in ()).throw(AssertionError("built")))
    assert resolve_spec("vggt-tiny", **overrides).fingerprint() == built.fingerprint()


def test_resolve_spec_equals_the_built_encoders_spec_vggt_1b(tmp_path, monkeypatch):
    path = _checkpoint(tmp_path / "model.safetensors")
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    # The real VGGT-1B config: resolving reads and hashes the file, loads nothing.
    import featstore.encoders.vggt.weights as W

    monkeypatch.setattr(W, "load_aggregator_state", lambda *a: (_ for _ in ()).throw(AssertionError("loaded")))
    spec = resolve_spec("vggt-1b", weights=path, layer=-1)
    assert spec.weights_sha256 == digest and spec.config["depth"] == 24 and spec.layer_resolved == 23
    assert spec.encoder == "vggt-1b" and spec.preprocess.target_size == 518
    monkeypatch.undo()
    monkeypatch.setenv("FEATSTORE_CACHE_DIR", str(tmp_path / "cache"))
    # Built for real: the vggt-1b preset, with its config shrunk in place to the tiny one so the
    # small checkpoint loads strictly.
    for k, v in TINY_CONFIG.items():
        monkeypatch.setitem(VGGT_1B_CONFIG, k, v)
    for overrides in OVERRIDES[:3]:
        built = get_encoder("vggt-1b", weights=path, **overrides).spec
        resolved = resolve_spec("vggt-1b", weights=path, **overrides)
        assert resolved.fingerprint() == built.fingerprint() and built.weights_sha256 == digest


def test_resolve_spec_uses_the_hash_cache(tmp_path, monkeypatch):
    path = _checkpoint(tmp_path / "model.safetensors")
    first = resolve_spec("vggt-tiny", weights=path)
    import featstore.encoders.vggt.weights as W

    monkeypatch.setattr(W.hashlib, "sha256", lambda *a: (_ for _ in ()).throw(AssertionError("re-hashed")))
    assert resolve_spec("vggt-tiny", weights=path) == first


@pytest.mark.parametrize("name", ["vggt-1b", "vggt-official"])
def test_missing_weights_name_the_preset(name):
    for call in (resolve_spec, get_encoder):
        with pytest.raises(WeightsError, match=f"^encoder '{name}' needs weights: pass weights="):
            call(name)


def test_resolve_spec_refuses_what_get_encoder_refuses():
    with pytest.raises(EncoderError, match="unknown encoder option 'layers'"):
        resolve_spec("vggt-tiny", layers=[1])
    with pytest.raises(EncoderError, match="the official vggt package has no causal mode"):
        resolve_spec("vggt-tiny", backend="official", attention="causal")
    encoders.register_encoder("test-specless", lambda **kw: kw, overwrite=True)
    with pytest.raises(EncoderError, match="encoder 'test-specless' registers no spec resolver"):
        resolve_spec("test-specless")


def test_vggt_encoder_follows_the_protocol():
    enc = get_encoder("vggt-tiny")
    assert isinstance(enc, VGGTEncoder) and isinstance(enc, Encoder)
    assert isinstance(enc.model, torch.nn.Module) and not enc.model.training
    assert enc.device == torch.device("cpu") and enc.patch_size == 14 and enc.patch_grid(84, 112) == (6, 8)
    assert tuple(enc.load_image(os.path.join(SAMPLE, "scene_a", "000.jpg")).shape[0:1]) == (3,)


@pytest.mark.parametrize("s", [1, 2, 5])
@pytest.mark.parametrize("kept", ["all", "last"])
def test_streamed_encoding_equals_one_causal_call(s, kept):
    enc = get_encoder("vggt-tiny", attention="causal", frames_kept=kept, storage_dtype="float32")
    x = torch.rand(2, s, 3, 28, 42, generator=torch.Generator().manual_seed(s))
    one_call = encode_frames(enc, x)
    streamed = encode_frames(enc, x, stream=True)
    assert streamed.shape == one_call.shape == (2, s if kept == "all" else 1, 6, 128)
    rel = ((streamed - one_call).norm() / one_call.norm()).item()
    assert rel < 1e-5, rel
    # An independent reference: the aggregator fed frame by frame by hand.
    state = enc.model.new_stream()
    with torch.no_grad():
        for k in range(s):
            out = enc.model.stream_step(x[:, k], state, last_layer=2, keep_layers=[2])[0][2][:, :, 5:]
    assert ((streamed[:, -1:] - out).norm() / out.norm()).item() < 1e-6
    if s > 1:  # full attention differs: the comparison above can fail
        full = encode_frames(get_encoder("vggt-tiny", frames_kept=kept, storage_dtype="float32"), x)
        assert ((full - one_call).norm() / one_call.norm()).item() > 1e-3


def test_stream_needs_a_causal_spec():
    with pytest.raises(EncoderError, match="encode_stream needs attention='causal' and backend='featstore'; "
                                           "this encoder has attention='full'"):
        encode_frames(get_encoder("vggt-tiny"), torch.rand(1, 2, 3, 28, 42), stream=True)


def test_encode_frames_returns_the_storage_dtype_on_the_encoders_device():
    for dtype in DTYPE_NAMES:
        enc = get_encoder("vggt-tiny", storage_dtype=dtype)
        x = torch.rand(1, 2, 3, 28, 42)
        y = encode_frames(enc, x)
        assert y.dtype == torch_dtype(dtype) == TORCH_DTYPES[dtype] and y.device == enc.device
        assert torch.equal(y, enc.encode(x).to(TORCH_DTYPES[dtype]))


def test_read_and_encode_one_unit(tmp_path):
    root = str(tmp_path)
    make_images(root, ["s/0.png", "s/1.png"], size=(64, 48))
    make_images(root, ["s/wide.png"], size=(96, 32), seed=1)
    enc = get_encoder("vggt-tiny")
    frame, source = read_frame(root, "s/0.png", enc.spec, enc.patch_size)
    assert frame.shape == (3, 84, 112) and frame.dtype == torch.float32
    assert source == {"size": os.path.getsize(tmp_path / "s/0.png"), "mtime_ns": os.stat(tmp_path / "s/0.png").st_mtime_ns,
                      "sha256": hashlib.sha256((tmp_path / "s/0.png").read_bytes()).hexdigest()}
    unit = Unit("s/1.png", ("s/0.png", "s/1.png"))
    frames, sources = read_unit_frames(root, unit, enc.spec, enc.patch_size)
    assert frames.shape == (2, 3, 84, 112) and len(sources) == 2 and torch.equal(frames[0], frame)
    with pytest.raises(ImageDecodeError, match=r"unit 'mixed': frames preprocess to different sizes"):
        read_unit_frames(root, Unit("mixed", ("s/0.png", "s/wide.png")), enc.spec, enc.patch_size)
    feats, meta = encode_unit(enc, root, unit)
    assert feats.dtype == torch.bfloat16 and feats.device.type == "cpu" and feats.shape == (2, 48, 128)
    # Independent reference: the aggregator's layer -2 patch tokens on the same frames.
    with torch.no_grad():
        ref = enc.model(frames[None], keep_layers=[2])[0][2][0, :, 5:]
    assert torch.equal(feats, ref.to(torch.bfloat16))
    assert meta == unit_metadata(unit, sources, (6, 8), enc.spec)
    assert meta["frames"] == '["s/0.png", "s/1.png"]' and meta["grid"] == "[6, 8]"
    assert meta["fingerprint"] == enc.spec.fingerprint() == resolve_spec("vggt-tiny").fingerprint()


def test_compare_features_is_public_with_its_tolerances():
    ref = torch.randn(1, 48, 128, generator=torch.Generator().manual_seed(0))
    assert compare_features(ref.to(torch.bfloat16), ref, "bfloat16")["ok"]
    assert not compare_features(ref.to(torch.bfloat16), ref.flip(1), "bfloat16")["ok"]
    got = compare_features(ref, ref, "float32", "bfloat16")
    assert (got["rel_tolerance"], got["cosine_tolerance"]) == (COMPUTE_TOLERANCES["bfloat16"][0],
                                                                COMPUTE_TOLERANCES["bfloat16"][1])
    assert compare_features(ref, ref, "float16")["rel_tolerance"] == RECOMPUTE_TOLERANCES["float16"][0]
    assert not compare_features(ref, ref.reshape(48, 1, 128), "float32")["ok"]  # same numel, other shape


def test_one_dtype_map():
    from featstore.build.cli import configure_parser
    import argparse

    p = argparse.ArgumentParser()
    configure_parser(p)
    choices = {a.dest: a.choices for a in p._actions if a.dest in ("storage_dtype", "compute_dtype")}
    # fp8 is a storage dtype only (stored with its per-token scale, featstore.format.fp8).
    assert choices == {"storage_dtype": STORAGE_DTYPE_NAMES, "compute_dtype": DTYPE_NAMES}
    assert STORAGE_DTYPE_NAMES == DTYPE_NAMES + ("float8_e4m3fn",)
    assert set(TORCH_DTYPES) == set(STORAGE_DTYPE_NAMES)
    with pytest.raises(EncoderError, match=r"storage_dtype must be one of \['bfloat16', 'float16', 'float32', "
                                           r"'float8_e4m3fn'\]"):
        resolve_spec("vggt-tiny", storage_dtype="int8")
    with pytest.raises(EncoderError, match=r"compute_dtype must be one of \['bfloat16', 'float16', 'float32'\]"):
        resolve_spec("vggt-tiny", compute_dtype="float8_e4m3fn")
    with pytest.raises(ValueError, match="dtype must be one of .* Found 'half'"):
        torch_dtype("half")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_layering_cache_mode_imports_neither_the_build_nor_the_model():
    r = _python(
        "import sys\n"
        "import featstore.build.plan, featstore.store.reader, featstore.encoders\n"
        "featstore.encoders.resolve_spec('vggt-tiny', attention='causal').fingerprint()\n"
        "bad = [m for m in ('featstore.build.pipeline', 'featstore.build.runner', 'featstore.build.cli', 'featstore.encoders.vggt.model', 'featstore.encoders.vggt.encoder',\n"
        "                   'featstore.build.encode') if m in sys.modules]\n"
        "print('LOADED', bad)\n")
    assert r.returncode == 0, r.stderr
    assert "LOADED []" in r.stdout


@pytest.mark.parametrize("argv", [["--help"], ["build", "--help"], ["verify", "--help"], ["info", "--help"],
                                  ["gc", "--help"], ["copy", "--help"],
                                  ["merge", "--help"]])
def test_cli_help_runs_without_torch(argv):
    r = _python("import sys\n"
                "sys.modules['torch'] = None  # `import torch` raises ImportError\n"
                "from featstore.cli import main\n"
                f"sys.exit(main({argv!r}))\n")
    assert r.returncode == 0, r.stderr
    assert "usage: featstore" in r.stdout
    if argv[0] == "--help":
        assert all(c in r.stdout for c in ("build", "verify", "info", "gc", "copy", "merge"))


# ---- the layering of featstore/, bottom to top ----------------------------------------------

# A module may import its own layer and the layers below it, never one above (module-level and
# function-level imports alike: a lazy import runs back up just the same). progress, interrupt
# and arguments (the subcommands' shared argparse pieces) are utilities anyone may import; the
# package root (`featstore/__init__.py`: the version and lazy re-exports of the public names)
# likewise.
LAYERS = ("errors", "contract", "format", "store", "encoders", "build", "ops", "cli")
UTILITIES = ("progress", "interrupt", "arguments")


def _layer(module: str) -> str | None:
    """The layer of a featstore module name ('featstore.store.writer' -> 'store'), 'utility' for
    the utilities and the package root, None outside featstore."""
    parts = module.split(".")
    if parts[0] != "featstore":
        return None
    head = parts[1] if len(parts) > 1 else ""
    if head in ("cli", "__main__"):
        return "cli"
    if head in UTILITIES or head == "":
        return "utility"
    assert head in LAYERS, f"featstore.{head} belongs to no layer: add it to LAYERS (or UTILITIES) in this test"
    return head


def _imports(path: str):
    """(line, imported module) of every import in the file, at any depth (functions included)."""
    import ast

    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: a relative import; featstore imports absolutely"
            yield node.lineno, node.module


def _upward_imports(package_dir: str) -> list[tuple[str, str, str]]:
    """(where, importing module, imported module) of every import that runs up the layers."""
    found = []
    base = os.path.dirname(package_dir)
    for root, _, files in os.walk(package_dir):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            module = os.path.relpath(path, base)[:-3].replace(os.sep, ".").removesuffix(".__init__")
            mine = _layer(module)
            for line, imported in _imports(path):
                theirs = _layer(imported)
                if mine == "utility" or theirs in (None, "utility"):
                    continue
                if LAYERS.index(theirs) > LAYERS.index(mine):
                    found.append((f"{os.path.relpath(path, base)}:{line}", module, imported))
    return found


def test_no_import_runs_back_up_the_layers():
    found = _upward_imports(os.path.join(REPO, "featstore"))
    new = [f"{where}: {mod} ({_layer(mod)}) imports {imp} ({_layer(imp)})"
           for where, mod, imp in found]
    assert not new, ("imports that run back up the layers (errors < contract < format < store < encoders < build "
                     "< ops < cli); move the name down, or the import up:\n" + "\n".join(new))


def test_the_layering_check_catches_an_upward_import(tmp_path):
    """The check itself: a store module importing the encoders, at module level or inside a
    function, is reported with its file and line; a downward import is not."""
    pkg = tmp_path / "featstore"
    (pkg / "store").mkdir(parents=True)
    (pkg / "encoders").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "store" / "__init__.py").write_text("")
    (pkg / "store" / "bad.py").write_text("import featstore.format.blob\n\ndef f():\n"
                                          "    from featstore.encoders.registry import stored_shape\n")
    (pkg / "encoders" / "__init__.py").write_text("import featstore.store.bad\nimport featstore.progress\n")
    (pkg / "store" / "top.py").write_text("from featstore.cli import main\n")
    found = sorted(_upward_imports(str(pkg)))
    assert found == [(os.path.join("featstore", "store", "bad.py") + ":4", "featstore.store.bad",
                      "featstore.encoders.registry"),
                     (os.path.join("featstore", "store", "top.py") + ":1", "featstore.store.top", "featstore.cli")]


def test_the_contract_and_the_codec_registry_need_no_torch():
    r = _python(
        "import sys\n"
        "sys.modules['torch'] = None  # `import torch` raises ImportError\n"
        "import featstore.contract, featstore.contract.spec, featstore.contract.naming, featstore.contract.dtypes\n"
        "from featstore.format.codecs import codec_for, codec_names, RECOMPUTE_TOLERANCES\n"
        "c = codec_for('float8_e4m3fn')\n"
        "print(codec_names(), c.format_version, c.tensors, c.bytes_per_token(2048), c.tolerance, c.read_dtype_name)\n"
        "from featstore.contract.spec import EncoderSpec, PreprocessSpec\n"
        "EncoderSpec(encoder='e', implementation='x', code_version='1', config={'depth': 2, 'patch_size': 16},\n"
        "            weights_sha256='random-seed-0', preprocess=PreprocessSpec(target_size=512)).fingerprint()\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[0] == ("['float32', 'float16', 'bfloat16', 'float8_e4m3fn'] 2 ('features', "
                                       "'features_scale') 2052 (0.08, 0.999) bfloat16")
