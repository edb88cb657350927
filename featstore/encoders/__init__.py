"""Encoder registry: named presets that resolve an `EncoderSpec` and build an `Encoder`.

`resolve_spec(name, **options)` gives the spec (and so the fingerprint) WITHOUT building the
model or loading weights: training in cache mode and `featstore build --dry-run` use it.
`get_encoder(name, **options)` builds the encoder; its `.spec` equals `resolve_spec` of the
same arguments. An Encoder (protocol in `featstore.encoders.base`) offers `.spec`, `.device`,
`.patch_size`, `.model`, `load_image(path) -> [3, H, W]`, `encode(frames [B, S, 3, H, W]) ->
[B, F, N, C] float32`, `encode_stream(...)` (causal, one frame per call) and `patch_grid(H, W)`.

Presets:
    vggt-1b        VGGT-1B aggregator, in-tree implementation; needs `weights` (path or hub id).
    vggt-tiny      tiny random aggregator (seed 0; conv patch embed, 64 dims, depth 4, 112 px
                   preprocessing) for tests and demos; its spec says weights_sha256="random-seed-0".
    vggt-official  VGGT-1B through the installed official `vggt` package (full attention only);
                   its spec is vggt-1b's with implementation "official".
    qwen2.5-vl-vision       the frozen Qwen2.5-VL vision tower without its merger (transformers'
                   code); needs `weights` (a checkpoint folder, its model.safetensors, or a hub id
                   such as Qwen/Qwen2.5-VL-3B-Instruct). One unit per image; feature set "qwen_vision".
    qwen2.5-vl-vision-tiny  the tiny vision tower of training.presets (random, seed 0, 112 px
                   preprocessing; weights_sha256="random-seed-0"), or a tiny checkpoint's weights.
The VGGT presets also take `backend="official"`; the Qwen ones only "transformers".

`preprocess_frame(data, spec, patch_size)` is the frame reader of a spec's family (the VGGT view,
or the Qwen image derived from it): the build, verify's recompute and training all read frames
through it (`featstore.build.encode.read_frame`).

Example:
    >>> from featstore.encoders import get_encoder, resolve_spec
    >>> spec = resolve_spec("vggt-tiny", attention="causal", frames_kept="last")  # no model built
    >>> enc = get_encoder("vggt-tiny", attention="causal", frames_kept="last")
    >>> enc.spec.fingerprint() == spec.fingerprint()
    True
"""

from __future__ import annotations

from featstore.contract.spec import EncoderSpec, PreprocessSpec
from featstore.contract.naming import PRIMARY_FEATURE_SET
from featstore.encoders.registry import (BUILD_OPTIONS, SPEC_OPTIONS, UNIT_KINDS, available_encoders, check_device,
                                         encoder_for_spec, feature_set_of, frames_stored, get_encoder,
                                         preprocess_frame, register_encoder, resolve_spec, stored_channels,
                                         stored_shape, unit_of)
# The built-in families register their presets on import.
from featstore.encoders.vggt.config import TINY_CONFIG
from featstore.encoders.vggt.preset import OFFICIAL_INSTALL_HINT, VGGTPreset
from featstore.encoders.qwen_vision.preset import QwenVisionPreset

__all__ = ["register_encoder", "available_encoders", "get_encoder", "resolve_spec", "encoder_for_spec",
           "unit_of", "feature_set_of", "UNIT_KINDS", "PRIMARY_FEATURE_SET",
           "preprocess_frame", "stored_shape", "stored_channels", "frames_stored", "check_device", "EncoderSpec", "PreprocessSpec", "VGGTPreset",
           "QwenVisionPreset", "TINY_CONFIG", "OFFICIAL_INSTALL_HINT", "SPEC_OPTIONS", "BUILD_OPTIONS"]
