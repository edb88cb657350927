"""The documented read calls cannot crash the process: `get` returns owned memory, and the
zero-copy opt-in (`store.view()`) keeps its map alive until its block ends.

Each case runs in a subprocess: on a regression the failure is a SIGSEGV, not an assertion."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from _featstore_helpers import REPO, died_of_signal, signal_name


def _run(tmp_path, body: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent("""
        import json, torch
        from featstore import FeatureStore, FeatstoreError
        from featstore.store.writer import StoreWriter
        p = {path!r}
        with StoreWriter(p, handle_signals=False) as w:   # 5.6 MB-like value on overflow pages
            w.put("a.jpg", {{"features": torch.full((1, 64, 256), 3.0, dtype=torch.bfloat16)}})
            w.finish()
        store = FeatureStore(p)
    """).format(path=str(tmp_path / "s")) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)


def _ok(out: subprocess.CompletedProcess) -> dict:
    assert not died_of_signal(out.returncode), f"killed by {signal_name(out.returncode)}: {out.stderr}"
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_writing_into_a_got_entry_is_safe_and_leaves_the_store_alone(tmp_path):
    got = _ok(_run(tmp_path, """
        feats = store.get("a.jpg").features
        feats.add_(1)                                     # the README's call
        again = store.get("a.jpg").features
        print(json.dumps([feats[0, 0, 0].item(), again[0, 0, 0].item()]))
    """))
    assert got == [4.0, 3.0]


def test_a_got_entry_outlives_close(tmp_path):
    got = _ok(_run(tmp_path, """
        feats = store.get("a.jpg").features
        store.close()
        print(json.dumps([feats.float().sum().item()]))
    """))
    assert got == [3.0 * 64 * 256]


def test_view_is_zero_copy_inside_its_block_and_closed_after(tmp_path):
    got = _ok(_run(tmp_path, """
        import numpy as np
        from featstore.store.environments import map_range as _map_range
        with store.view() as v:
            feats = v.get("a.jpg").features
            start, end = _map_range(store._rec.fd)
            in_map = start <= feats.data_ptr() < end      # a view of the map, not a copy
            total = feats.float().sum().item()
        try:
            v.get("a.jpg")
            after = "no error"
        except FeatstoreError as e:
            after = str(e)
        print(json.dumps([in_map, total, after]))
    """))
    assert got[0] is True and got[1] == 3.0 * 64 * 256
    assert "this store view is closed" in got[2]


def test_close_inside_a_view_keeps_the_map_until_the_block_ends(tmp_path):
    got = _ok(_run(tmp_path, """
        with store.view() as v:
            feats = v.get("a.jpg").features
            store.close()                                 # the view still holds the environment
            total = feats.float().sum().item()
        print(json.dumps([total]))
    """))
    assert got == [3.0 * 64 * 256]


def test_get_copy_false_points_to_view(tmp_path):
    from featstore.store.writer import StoreWriter
    from featstore import FeatureStore
    import torch

    with StoreWriter(str(tmp_path / "s"), handle_signals=False) as w:
        w.put("a.jpg", {"features": torch.zeros(1, 4, 4)})
        w.finish()
    with FeatureStore(str(tmp_path / "s")) as store, pytest.raises(ValueError, match=r"store\.view\(\)"):
        store.get("a.jpg", copy=False)
