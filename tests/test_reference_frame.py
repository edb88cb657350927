"""`reference_frame`: which frame anchors the VGGT call (VG-LLM's and JanusVLN's setting).

"first" encodes a unit's frames in their order; "last" encodes them reversed and flips the
outputs back (VG-LLM modeling_qwen2_5_vl.py: one aggregator call; JanusVLN: a stream of one frame
per call that starts from the unit's last frame, keeping the last streamed frame, i.e. the unit's
first). fp32 on CPU with vggt-tiny; the parity tests run the vendored references' own aggregators
and skip when `.vendor/` is absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from _training_helpers import (annotations, build_store, collate, dataset, loss_and_merger_grads, max_rel, online,
                               sample_root, spec_for, tiny_model)
from featstore.encoders import get_encoder, resolve_spec

REPO = Path(__file__).resolve().parents[1]
LAYER = 2  # -2 at vggt-tiny's depth 4, as VG-LLM and JanusVLN read it


def _frames(s: int, seed: int = 0, b: int = 2) -> torch.Tensor:
    return torch.rand(b, s, 3, 28, 42, generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---- the encoder -------------------------------------------------------------------------


@pytest.mark.parametrize("frames_kept", ["all", "last"])
@pytest.mark.parametrize("s", [1, 2, 5])
def test_full_attention_last_is_first_on_the_reversed_frames_flipped_back(s, frames_kept):
    first = get_encoder("vggt-tiny", frames_kept=frames_kept)
    last = get_encoder("vggt-tiny", frames_kept=frames_kept, reference_frame="last")
    x = _frames(s)
    got = last.encode(x)
    want = first.encode(x.flip(1)).flip(1)  # the reversed frames, outputs back in the unit's order
    assert got.shape == want.shape == (2, s if frames_kept == "all" else 1, 6, 128)
    assert (got - want).abs().max().item() <= 1e-6
    if frames_kept == "last":  # the call's last frame is the unit's first, seen after all the others
        assert (got[:, 0] - first.encode(x.flip(1))[:, -1]).abs().max().item() <= 1e-6
    if s > 1:  # the frame that gets frame 0's tokens changed: every frame's output changes
        plain = first.encode(x)
        kept = range(s) if frames_kept == "all" else [0]
        for k in kept:
            assert _rel(got[:, k], plain[:, k]) > 1e-3, k
    else:
        assert torch.equal(got, first.encode(x))


def _manual_stream(model, frames: torch.Tensor):
    """The aggregator's stream over `frames` in the given order: [B, S, N, C], patch tokens of LAYER."""
    state, outs = model.new_stream(), []
    with torch.no_grad():
        for k in range(frames.shape[1]):
            o, psi = model.stream_step(frames[:, k], state, last_layer=LAYER, keep_layers=[LAYER])
            outs.append(o[LAYER][:, :, psi:])
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("frames_kept", ["all", "last"])
@pytest.mark.parametrize("s", [1, 2, 5])
def test_causal_last_equals_the_stream_over_the_reversed_frames_mapped_back(s, frames_kept):
    enc = get_encoder("vggt-tiny", attention="causal", frames_kept=frames_kept, reference_frame="last")
    x = _frames(s, seed=1)
    reversed_stream = _manual_stream(enc.model, x.flip(1))  # starts from the unit's last frame
    # Stream position j holds the unit's frame s-1-j; kept "last": the last streamed = the unit's frame 0.
    want = reversed_stream.flip(1) if frames_kept == "all" else reversed_stream[:, -1:]
    streamed, one_call = enc.encode_stream(x), enc.encode(x)
    assert streamed.shape == one_call.shape == want.shape
    assert (streamed - want).abs().max().item() <= 1e-6
    for k in range(want.shape[1]):  # one block-causal call == the stream, up to summation order
        assert _rel(one_call[:, k], want[:, k]) < 1e-5, k
    if s > 1:
        first = get_encoder("vggt-tiny", attention="causal", frames_kept=frames_kept)
        assert _rel(one_call, first.encode(x)) > 1e-3


def test_the_qwen_vision_presets_refuse_last():
    from featstore.errors import EncoderError

    with pytest.raises(EncoderError, match="offers reference_frame='first' only"):
        resolve_spec("qwen2.5-vl-vision-tiny", reference_frame="last")


# ---- parity with the references' own code (vendored; skipped when absent) ---------------


def _vendored_aggregator(repo: str):
    """The `Aggregator` class of .vendor/<repo> (both repos name their package `qwen_vl`: import
    one, then drop it from sys.modules so the other can be imported)."""
    src = REPO / ".vendor" / repo / "src"
    if not (src / "qwen_vl" / "model" / "vggt" / "models" / "aggregator.py").is_file():
        pytest.skip(f"{repo} not vendored at {src}")
    sys.path.insert(0, str(src))
    try:
        from qwen_vl.model.vggt.models.aggregator import Aggregator
    finally:
        sys.path.remove(str(src))
        for name in [m for m in sys.modules if m == "qwen_vl" or m.startswith("qwen_vl.")]:
            del sys.modules[name]
    return Aggregator


def _theirs(repo: str, ours):
    from featstore.encoders import TINY_CONFIG

    agg = _vendored_aggregator(repo)(**TINY_CONFIG).eval()
    agg.load_state_dict(ours.state_dict(), strict=True)
    return agg


@pytest.mark.parametrize("s", [1, 3])
def test_full_attention_last_matches_vgllm(s):
    """VG-LLM's forward with reference_frame != "first": flip the frames, one aggregator call,
    patch tokens of output -2, flip the features back (modeling_qwen2_5_vl.py ~1993-2015)."""
    enc = get_encoder("vggt-tiny", reference_frame="last")
    theirs = _theirs("vgllm", enc.model)
    x = _frames(s, seed=2, b=1)
    with torch.no_grad():
        outs, psi = theirs(torch.flip(x[0], dims=(0,))[None])
        want = torch.flip(outs[-2][0, :, psi:], dims=(0,))
    assert _rel(enc.encode(x)[0], want) < 1e-5


@pytest.mark.parametrize("s", [1, 2, 5])
def test_causal_stream_last_matches_janusvln(s):
    """JanusVLN's forward with reference_frame != "first": flip the frames, stream one per call
    through its key/value cache, keep the LAST streamed frame's patch tokens of output -2 (the
    unit's first frame), flip (a no-op on one frame) (modeling_qwen2_5_vl.py ~2003-2033)."""
    enc = get_encoder("vggt-tiny", attention="causal", frames_kept="last", reference_frame="last")
    theirs = _theirs("janusvln", enc.model)
    x = _frames(s, seed=3, b=1)
    images = torch.flip(x[0], dims=(0,))
    past = [None] * theirs.depth
    with torch.no_grad():
        for k, frame in enumerate(images):
            outs, psi, past = theirs(frame[None, None], past_key_values=past, use_cache=True, past_frame_idx=k)
            features = outs[-2][0, :, psi:]
    want = torch.flip(features, dims=(0,))
    assert _rel(enc.encode_stream(x)[0], want) < 1e-5
    assert _rel(enc.encode(x)[0], want) < 1e-5
    if s > 1:  # "first" keeps another frame, computed from another stream
        first = get_encoder("vggt-tiny", attention="causal", frames_kept="last")
        assert _rel(first.encode_stream(x)[0], want) > 1e-3


# ---- the spec, the store, the CLI ----------------------------------------------------------


def test_a_default_spec_dict_has_no_reference_frame_key_and_last_changes_the_fingerprint():
    first, last = resolve_spec("vggt-tiny"), resolve_spec("vggt-tiny", reference_frame="last")
    assert "reference_frame" not in first.to_dict() and last.to_dict()["reference_frame"] == "last"
    assert first.fingerprint() != last.fingerprint() and first.diff(last) == ["reference_frame"]
    assert resolve_spec(last.encoder, **last.overrides()) == last


def test_an_old_store_without_the_key_still_opens_and_trains(tmp_path):
    """A store written before reference_frame existed: its spec dict has no such key, and its
    fingerprint is the sha256 of that dict's canonical JSON. It still opens as "first"."""
    from featstore.errors import FingerprintMismatchError
    from featstore.store.reader import FeatureStore

    root = sample_root(tmp_path)
    path = build_store(root)
    with FeatureStore(path) as store:
        manifest = store.manifest
    stored = manifest["encoder"]
    assert "reference_frame" not in stored and "qwen_view" not in stored
    old_form = json.dumps(stored, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert manifest["fingerprint"] == hashlib.sha256(old_form.encode()).hexdigest()
    spec = spec_for()
    assert spec.fingerprint() == manifest["fingerprint"]
    batch = collate(dataset(root, spec, store=FeatureStore(path, expected_encoder=spec)))
    assert int(batch["cache_hits"]) == 5
    with pytest.raises(FingerprintMismatchError, match="reference_frame: store has 'first', expected 'last'"):
        FeatureStore(path, expected_encoder=spec_for(reference_frame="last")).manifest


def _train_argv(root: str, out: str, *extra: str) -> list:
    return ["--data_root", root, "--annotations", annotations(root), "--output_dir", out, "--max_steps", "1",
            "--per_device_train_batch_size", "5", "--use_cpu", "--report_to", "none", "--save_strategy", "no",
            "--seed", "0", "--disable_tqdm", "true", *extra]


def test_a_last_store_is_refused_by_first_and_served_to_last(tmp_path, capsys):
    from featstore.cli import main as featstore_main
    from featstore.store.reader import FeatureStore
    from training.train import main as train_main
    from training.train import run as train_run

    root = sample_root(tmp_path)
    args = ["build", "--data-root", root, "--annotations", annotations(root), "--encoder", "vggt-tiny",
            "--workers", "0", "--no-progress"]
    assert featstore_main(args + ["--reference-frame", "last"]) == 0
    store = os.path.join(root, "vggt_features.lmdb")
    with FeatureStore(store) as s:
        assert s.manifest["encoder"]["reference_frame"] == "last" and len(s) == 5
        stored = {k: s.get(k, copy=True).features for k in s.keys()}
    capsys.readouterr()

    # Training that asks for "first" (the default) is refused, naming the field and both values.
    assert train_main(_train_argv(root, str(tmp_path / "o1"), "--use_vggt_cache")) == 2
    err = capsys.readouterr().err
    assert f"{store}: the store was built with a different encoder spec (" in err
    assert "reference_frame: store has 'last', expected 'first'" in err
    # So is a build of "first" into it (the default), without --force.
    assert featstore_main(args) == 2
    assert "reference_frame: store has 'last', expected 'first'" in capsys.readouterr().err

    # A run asking for "last" reads it: every sample a hit, the stored bytes in the batch.
    trainer = train_run(_train_argv(root, str(tmp_path / "o2"), "--use_vggt_cache", "--vggt_reference_frame", "last"))
    last = [r for r in trainer.state.log_history if "cache_hits" in r][-1]
    assert (last["cache_hits"], last["cache_misses"]) == (5, 0)
    assert trainer.model.online_vggt is None
    # verify --recompute agrees: the encoder honours the stored spec's reference_frame.
    assert featstore_main(["verify", store, "--data-root", root, "--annotations", annotations(root),
                           "--recompute", "5", "--seed", "0", "--no-progress"]) == 0
    # And the stored features are not the "first" ones.
    first_store = build_store(root, store=str(tmp_path / "first.lmdb"))
    with FeatureStore(first_store) as s:
        differ = [k for k in stored if not torch.equal(s.get(k, copy=True).features, stored[k])]
        multi = [k for k in stored if stored[k].shape[0] > 1]
    assert multi and set(multi) <= set(differ)


def test_the_flag_reaches_the_online_encoder(tmp_path):
    from training.train import run as train_run

    root = sample_root(tmp_path)
    trainer = train_run(_train_argv(root, str(tmp_path / "o"), "--vggt_fusion", "last_to_all",
                                    "--vggt_reference_frame", "last"))
    enc = trainer.model.online_vggt.encoder("cpu")
    assert enc.spec.reference_frame == "last" and enc.spec.attention == "causal" and trainer.model.online_vggt.stream


@pytest.mark.parametrize("fusion,mode", [("per_image", "online_full"), ("last_to_all", "online_causal_stream")])
def test_online_last_gives_the_cached_loss_and_merger_grads(tmp_path, fusion, mode):
    """As tests/test_training_model.py's cached == online, with reference_frame "last": the
    same batch through the store built with it and through the online encoder."""
    from featstore.store.reader import FeatureStore

    stream = mode == "online_causal_stream"
    overrides = dict(attention="causal" if stream else "full", frames_kept="all" if fusion == "per_image" else "last",
                     storage_dtype="float32" if stream else "bfloat16", reference_frame="last")
    root = sample_root(tmp_path)
    store_path = build_store(root, **overrides)
    spec = spec_for(**overrides)
    cached = collate(dataset(root, spec, store=FeatureStore(store_path, expected_encoder=spec)))
    live = collate(dataset(root, spec))
    assert int(cached["cache_hits"]) == 5 and live["vggt_source"].tolist() == [2] * 5

    model = tiny_model(spec, fusion=fusion, scale=0.2 if stream else 1.0)
    model.attach_vggt(online(spec, stream=stream))
    loss_c, grads_c = loss_and_merger_grads(model, cached)
    loss_o, grads_o = loss_and_merger_grads(model, live)
    assert all(g.abs().sum() > 0 for g in grads_c.values())
    if not stream:  # the same encode-one-unit code on the same frames: bit-identical
        assert torch.equal(loss_c, loss_o)
        for name in grads_c:
            assert torch.equal(grads_c[name], grads_o[name]), name
    else:  # the store holds one block-causal call, the online path streams (summation order only)
        assert max_rel(loss_o, loss_c) < 1e-6
        for name in grads_c:
            assert max_rel(grads_o[name], grads_c[name]) < 1e-5, name
    # The online encoder computed "last", not "first": a "first" store gives another loss.
    first = dict(overrides, reference_frame="first")
    first_spec = spec_for(**first)
    other = collate(dataset(root, first_spec, store=FeatureStore(build_store(root, store=str(tmp_path / "f.lmdb"),
                                                                             **first), expected_encoder=first_spec)))
    loss_f, _ = loss_and_merger_grads(model, other)
    assert max_rel(loss_f, loss_o) > 1e-6
