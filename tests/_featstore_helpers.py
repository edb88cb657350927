"""Helpers shared by the verify/gc/copy and reliability tests: small synthetic stores whose
every value is derivable from its index, tiny image data roots, and byte-level damage."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import signal
import subprocess
import sys

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEATSTORE = [sys.executable, "-m", "featstore"]
GRID = (6, 8)  # vggt-tiny on a 4:3 image: 112x84 -> 8x6 patches
SHAPE = (1, GRID[0] * GRID[1], 128)  # [frames, tokens, channels]: 2 x embed_dim 64


@functools.lru_cache(maxsize=None)
def tiny_spec() -> dict:
    """The vggt-tiny encoder spec dict, as `featstore build --encoder vggt-tiny` records it."""
    from featstore.encoders import get_encoder

    return get_encoder("vggt-tiny").spec.to_dict()


def core_spec(**changes):
    """A small complete EncoderSpec for store-core tests (depth 24, layer 23): no model behind it."""
    from featstore.encoders import EncoderSpec

    base = dict(encoder="test", implementation="featstore", code_version="1",
                config={"depth": 24, "embed_dim": 32, "patch_size": 14}, weights_sha256="random-seed-0", layer=23)
    return EncoderSpec(**{**base, **changes})


def tiny_fingerprint() -> str:
    from featstore.encoders import EncoderSpec

    return EncoderSpec.from_dict(tiny_spec()).fingerprint()


def features_for(i: int, shape=SHAPE, dtype=torch.bfloat16) -> torch.Tensor:
    """The features stored for entry `i`: random but reproducible from `i` alone."""
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(*shape, generator=g).to(dtype)


def write_source(data_root: str, key: str, i: int, size: int = 300) -> dict:
    """Write a small fake image file (random bytes; verify never decodes it) and return its
    source fingerprint as build records it."""
    path = os.path.join(data_root, key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(data)
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": hashlib.sha256(data).hexdigest()}


def entry_metadata(frames, sources, grid=GRID, fingerprint=None) -> dict[str, str]:
    return {"frames": json.dumps(list(frames), ensure_ascii=False), "sources": json.dumps(sources, sort_keys=True),
            "grid": json.dumps(list(grid)), "fingerprint": fingerprint or tiny_fingerprint(), "encoder": "vggt-tiny"}


def key_of(i: int) -> str:
    return f"scene{i // 10:02d}/{i % 10:03d}.jpg"


def make_data_root(tmp_path, n: int) -> str:
    """tmp_path/data holding `n` sources and their store (see `make_store`). Returns the data root."""
    data = tmp_path / "data"
    data.mkdir()
    make_store(str(data), n=n)
    return str(data)


def make_store(data_root: str, n: int = 20, *, finish: bool = True, batch_entries: int = 8,
               store: str | None = None) -> str:
    """A store of `n` single-frame entries at DATA_ROOT/vggt_features.lmdb (or `store`), with a
    source file per entry under `data_root`, consistent with the vggt-tiny spec. Returns its path."""
    from featstore.store.writer import StoreWriter

    store = store or os.path.join(data_root, "vggt_features.lmdb")
    with StoreWriter(store, spec=tiny_spec(), batch_entries=batch_entries, handle_signals=False) as w:
        for i in range(n):
            key = key_of(i)
            src = write_source(data_root, key, i)
            w.put(key, {"features": features_for(i)}, entry_metadata([key], [src]))
        if finish:
            w.finish(report={"failed": [], "computed": n})
    return store


def value_bytes(store: str, key: str) -> bytes:
    """The raw stored value of `key` (read with plain py-lmdb in a throwaway environment)."""
    import lmdb

    env = lmdb.open(store, readonly=True, lock=False, max_dbs=8, subdir=True)
    try:
        db = env.open_db(b"features", create=False)
        with env.begin(db=db) as txn:
            v = txn.get(key.encode("utf-8"))
            return bytes(v) if v is not None else None
    finally:
        env.close()


def flip_byte_in_value(store: str, key: str, where: str = "data", offset_in_part: int = 100) -> int:
    """Flip one bit of `key`'s value directly in data.mdb (as a disk error would) and return
    the file offset. `where`: "data" (tensor bytes) or "header" (the JSON header)."""
    value = value_bytes(store, key)
    n = int.from_bytes(value[:8], "little")
    rel = 8 + n + offset_in_part if where == "data" else 8 + offset_in_part
    path = os.path.join(store, "data.mdb")
    with open(path, "r+b") as f:
        content = f.read()
        pos = content.find(value)
        assert pos >= 0 and content.find(value, pos + 1) < 0, "value must occur once in data.mdb"
        f.seek(pos + rel)
        byte = content[pos + rel]
        f.write(bytes([byte ^ 0x10]))
        f.flush()
        os.fsync(f.fileno())
    return pos + rel


def run_cli(*args, timeout: float = 120, env=None, cwd=None) -> subprocess.CompletedProcess:
    """Run `python -m featstore ARGS` in a subprocess (so a crash cannot take the test run down)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([*FEATSTORE, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=full_env, cwd=cwd or REPO)


_FORKED = r"""
import json, os, sys, tempfile
import featstore.cli, featstore.ops.verify, featstore.store.reader  # the slow imports (torch), done once
codes = []
for i, (kind, arg) in enumerate(json.loads(sys.argv[1])):
    out = [os.path.join(sys.argv[2], f"{i}.{name}") for name in ("out", "err")]
    pid = os.fork()
    if pid == 0:  # one fresh process per run, as `python -m featstore` would be, less the imports
        for fd, path in zip((1, 2), out):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        code = 1
        try:
            if kind == "cli":
                code = featstore.cli.main(arg)
            else:
                sys.argv = ["-c", *arg[1:]]
                exec(compile(arg[0], "<script>", "exec"), {"__name__": "__main__"})
                code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))  # -N: killed by signal N
print(json.dumps(codes))
"""


def run_forked(runs: list, folder: str, timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """Several runs from one interpreter that imports featstore (and torch) once and forks a fresh
    process for each: ("cli", [ARGS]) runs `featstore ARGS`, ("script", [CODE, ARGS...]) runs
    `python -c CODE ARGS`. Each result has that process's exit code (negative: the signal that
    killed it, as subprocess reports it), stdout and stderr; a crash in one run cannot take the
    others or the test run down. Saves an interpreter start (~3 s of imports) per run after the first.
    """
    os.makedirs(folder, exist_ok=True)
    res = subprocess.run([sys.executable, "-c", _FORKED, json.dumps(runs), folder], capture_output=True,
                         text=True, timeout=timeout, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert res.returncode == 0, f"the forking driver failed: {res.stdout[-2000:]}{res.stderr[-2000:]}"
    codes = json.loads(res.stdout.strip().splitlines()[-1])
    out = []
    for i, (run, code) in enumerate(zip(runs, codes)):
        text = [open(os.path.join(folder, f"{i}.{name}")).read() for name in ("out", "err")]
        out.append(subprocess.CompletedProcess(run, code, *text))
    return out


def died_of_signal(returncode: int) -> bool:
    """True when a subprocess was killed by a signal (SIGSEGV, SIGBUS, ...), not exited."""
    return returncode < 0


def signal_name(returncode: int) -> str:
    return signal.Signals(-returncode).name if returncode < 0 else f"exit {returncode}"


def make_images(data_root: str, keys, size=(64, 48), seed: int = 0) -> None:
    """Small real images (PNG) for real builds with the tiny encoder."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for key in keys:
        path = os.path.join(data_root, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def read_store(store: str) -> dict[str, tuple[torch.Tensor, dict]]:
    """key -> (features copy, metadata) of every entry, with checksums verified."""
    from featstore.store.reader import FeatureStore

    out = {}
    with FeatureStore(store, verify_checksums=True) as fs:
        for key in fs.keys():
            e = fs.get(key, copy=True)
            out[key] = (e.features, {k: v for k, v in e.metadata.items()})
    return out


def weights_far_from_zero_(model, seed: int):
    """Seeded weights large enough that a tiny Qwen vision tower's output is far from zero
    (norm scales near 1, every other parameter N(0, 0.2)), in name order. Returns `model`."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen) if "norm" in name or "ln_q" in name
                    else 0.2 * torch.randn(p.shape, generator=gen))
    return model
