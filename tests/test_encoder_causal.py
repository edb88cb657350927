"""Causal (streaming) attention: one masked call == one frame per call with a k/v cache (fp32, CPU)."""

import pytest
import torch

from featstore.encoders import TINY_CONFIG, get_encoder
from featstore.encoders.vggt.model import VGGTAggregator, init_random_

LAYER = 2  # = -2 at depth 4


@pytest.fixture(scope="module")
def model():
    return init_random_(VGGTAggregator(**TINY_CONFIG), 11).eval()


def _frames(s, seed=0, b=2):
    return torch.rand(b, s, 3, 28, 42, generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("s", [1, 2, 5, 9])
def test_one_call_causal_equals_streamed(model, s):
    x = _frames(s)
    with torch.no_grad():
        one_call = model(x, attention="causal", keep_layers=[LAYER, 0])[0]
        state = model.new_stream()
        for k in range(s):
            step = model.stream_step(x[:, k], state, last_layer=LAYER, keep_layers=[LAYER, 0])[0]
            for layer in (0, LAYER):
                assert _rel(step[layer][:, 0], one_call[layer][:, k]) < 1e-5, (s, k, layer)
    assert state.frames == s and state.kv[LAYER][0].shape[2] == s * one_call[LAYER].shape[2]


def test_frame0_causal_equals_plain_single_frame_call(model):
    x = _frames(5)
    with torch.no_grad():
        causal = model(x, attention="causal")[0][LAYER]
        single = model(x[:, :1])[0][LAYER]
    assert _rel(causal[:, 0], single[:, 0]) < 1e-5


def test_causal_frame_k_ignores_later_frames_full_does_not(model):
    s, k = 5, 2
    x = _frames(s)
    y = x.clone()
    y[:, k + 1:] = torch.rand_like(y[:, k + 1:])
    with torch.no_grad():
        c_x, c_y = model(x, attention="causal")[0][LAYER], model(y, attention="causal")[0][LAYER]
        f_x, f_y = model(x)[0][LAYER], model(y)[0][LAYER]
    for j in range(k + 1):
        assert _rel(c_y[:, j], c_x[:, j]) < 1e-6
        assert _rel(f_y[:, j], f_x[:, j]) > 1e-3
    assert _rel(c_y[:, k + 1], c_x[:, k + 1]) > 1e-3
    # Causal and full differ for k < S-1 (frame 0 sees only itself in causal mode).
    for j in range(s - 1):
        assert _rel(c_x[:, j], f_x[:, j]) > 1e-3


def test_frame0_token_variant_matters(model):
    # Giving frame 0 the "other frames" camera/register tokens (index 1) changes its output.
    x = _frames(3)
    swapped = init_random_(VGGTAggregator(**TINY_CONFIG), 11).eval()
    with torch.no_grad():
        swapped.camera_token[:, 0] = swapped.camera_token[:, 1]
        swapped.register_token[:, 0] = swapped.register_token[:, 1]
        a = model(x, attention="causal")[0][LAYER]
        b = swapped(x, attention="causal")[0][LAYER]
    assert _rel(b[:, 0], a[:, 0]) > 1e-3


def test_stream_rejects_a_frame_of_another_size(model):
    state = model.new_stream()
    with torch.no_grad():
        model.stream_step(_frames(1)[:, 0], state)
        with pytest.raises(ValueError, match="share batch and size"):
            model.stream_step(torch.rand(2, 3, 42, 42), state)


def test_encoder_causal_last_equals_last_streamed_frame():
    enc = get_encoder("vggt-tiny", attention="causal", frames_kept="last")
    x = _frames(4, seed=5, b=1)
    got = enc.encode(x)  # [1, 1, N, C]
    m = enc.model
    state = m.new_stream()
    with torch.no_grad():
        for k in range(4):
            outs, psi = m.stream_step(x[:, k], state, last_layer=LAYER, keep_layers=[LAYER])
    assert got.shape == (1, 1, 6, 128)
    assert _rel(got, outs[LAYER][:, :, psi:]) < 1e-5
