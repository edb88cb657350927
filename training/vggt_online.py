"""Frozen VGGT for training: the encoder spec without a model, and the online encoder.

- `resolve_spec(...)` gives the `EncoderSpec` (and so the fingerprint) that the flags describe
  without building any VGGT module: cached mode checks the store against it and never builds VGGT.
- `OnlineVGGT` runs the frozen aggregator in the online modes (and on a cache miss under
  `--vggt_cache_miss compute`). It is deliberately NOT an `nn.Module` and the model keeps it
  outside its module tree: ZeRO-3 partitions every registered submodule and all-gathers it on
  every forward (TRAINING.md), so a registered VGGT would be partitioned, gathered each step,
  saved in checkpoints and offered to the optimizer. Here it is replicated, eval, no grad,
  moved to the device by us, and built lazily on first use.
- Frames go through the same encode-one-unit code as `featstore build` (`featstore.encode`
  when it exists: one call of S frames, or one frame per call with the key/value cache), and
  the result is cast to the store's storage dtype, so the merger sees what a cache would hold.

Shapes: S frames of one unit, [S, 3, H, W] in [0, 1]; features [F, N, C] with F = S ("all") or
1 ("last"), N = h*w patch tokens, C channels.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, Optional

import torch

__all__ = ["resolve_spec", "read_unit_frames", "encode_frames", "OnlineVGGT", "STORAGE_DTYPES"]

STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_spec(name: str, *, weights: Optional[str] = None, **overrides: Any):
    """The `EncoderSpec` that `get_encoder(name, weights=weights, **overrides)` would carry,
    computed without building the encoder (featstore's `resolve_spec` where it exists)."""
    from featstore import encoders as E

    if hasattr(E, "resolve_spec"):
        return E.resolve_spec(name, weights=weights, **overrides)
    return _resolve_spec_here(name, weights=weights, **overrides)


def _resolve_spec_here(name: str, *, weights: Optional[str], **overrides: Any):
    # The same steps as featstore.encoders._make_vggt up to (not including) building the model.
    from featstore.encoders import TINY_CONFIG, TINY_SEED, TINY_TARGET_SIZE, _apply_overrides
    from featstore.encoders.spec import EncoderSpec, PreprocessSpec
    from featstore.encoders.vggt import CODE_VERSION, VGGT_1B_CONFIG
    from featstore.encoders.weights import resolve_weights, sha256_file
    from featstore.errors import EncoderError, WeightsError

    presets = {"vggt-1b": (VGGT_1B_CONFIG, 518), "vggt-tiny": (TINY_CONFIG, TINY_TARGET_SIZE)}
    if name not in presets:
        raise EncoderError(f"--vggt_encoder {name!r}: training knows the presets {sorted(presets)}")
    config, target = presets[name]
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}
    if weights is not None:
        digest = sha256_file(resolve_weights(weights))
    elif name == "vggt-tiny":
        digest = f"random-seed-{TINY_SEED}"
    else:
        raise WeightsError(f"--vggt_encoder {name} needs --vggt_weights (a model.safetensors path or hub id)")
    spec = EncoderSpec(encoder=name, implementation="featstore", code_version=CODE_VERSION, config=config,
                       weights_sha256=digest, preprocess=PreprocessSpec(target_size=target))
    return _apply_overrides(spec, overrides)


def read_unit_frames(data_root: str, unit, spec, patch_size: int):
    """Read and preprocess the frames of one unit as the build does -> ([S, 3, H, W] float32, sources)."""
    try:
        from featstore.encode import read_unit_frames as featstore_read
    except ImportError:
        featstore_read = None
    if featstore_read is not None:
        return featstore_read(data_root, unit, spec, patch_size)
    from featstore.build import _read_frame
    from featstore.encoders.preprocess import stack_frames

    frames, sources = zip(*(_read_frame(data_root, f, spec, patch_size) for f in unit.frames))
    return stack_frames(list(frames)), list(sources)


def encode_frames(encoder, frames: torch.Tensor, *, stream: bool = False) -> torch.Tensor:
    """[B, S, 3, H, W] -> [B, F, N, C] in the spec's storage dtype, on the encoder's device.

    stream=False: one call of S frames (the build's call). stream=True: one frame per call with
    the aggregator's key/value cache, as streaming navigation models train; only valid with
    causal attention, where it equals the one-call causal output up to float rounding.
    """
    try:
        from featstore.encode import encode_frames as featstore_encode
    except ImportError:
        featstore_encode = None
    if featstore_encode is not None:
        return featstore_encode(encoder, frames, stream=stream)
    dtype = STORAGE_DTYPES[encoder.spec.storage_dtype]
    if not stream:
        return encoder.encode(frames).to(dtype)
    return _encode_stream(encoder, frames).to(dtype)


@torch.inference_mode()
def _encode_stream(encoder, frames: torch.Tensor) -> torch.Tensor:
    spec, model = encoder.spec, encoder.model
    if spec.attention != "causal":
        raise ValueError("streaming (one frame per call) needs attention='causal'")
    layer = spec.layer_resolved
    x = frames.to(encoder.device, dtype=torch.float32)
    dt = encoder._autocast_dtype
    state, kept = model.new_stream(), []
    with torch.autocast(encoder.device.type, dtype=dt or torch.float32, enabled=dt is not None):
        for k in range(x.shape[1]):
            outs, psi = model.stream_step(x[:, k], state, last_layer=layer, keep_layers=[layer])
            kept.append(outs[layer][:, :, psi:])
    y = torch.cat(kept if spec.frames_kept == "all" else kept[-1:], dim=1)
    return y.float().contiguous()


class OnlineVGGT:
    """The frozen encoder for online modes, built on first use on the device that asks.

    Args:
        name, weights, overrides: as for `featstore.encoders.get_encoder`.
        patch_size: the encoder's patch size (frames are h*patch x w*patch pixels).
        stream: feed frames one per call with the key/value cache (`online_causal_stream`).
        expected_fingerprint: the spec's fingerprint training resolved; the built encoder must match.

    Example:
        >>> vggt = OnlineVGGT("vggt-tiny", stream=False)
        >>> vggt.features(torch.rand(2, 3, 84, 112), "cpu").shape   # [F, N, C] bf16
        torch.Size([2, 48, 128])
    """

    def __init__(self, name: str, *, weights: Optional[str] = None, stream: bool = False,
                 overrides: Optional[Dict[str, Any]] = None, expected_fingerprint: Optional[str] = None,
                 patch_size: int = 14):
        self.name, self.weights, self.stream, self.patch_size = name, weights, stream, int(patch_size)
        self.overrides = dict(overrides or {})
        self.expected_fingerprint = expected_fingerprint
        self._encoder = None
        self._lock = threading.Lock()

    @property
    def built(self) -> bool:
        return self._encoder is not None

    def encoder(self, device) -> Any:
        """The `VGGTEncoder` on `device` (built once; later calls reuse it)."""
        with self._lock:
            if self._encoder is None:
                from featstore.encoders import get_encoder

                enc = get_encoder(self.name, weights=self.weights, device=str(device), **self.overrides)
                fp = enc.spec.fingerprint()
                if self.expected_fingerprint is not None and fp != self.expected_fingerprint:
                    raise RuntimeError(f"online VGGT {self.name}: built spec fingerprint {fp} differs from the "
                                       f"resolved {self.expected_fingerprint}")
                self._encoder = enc
            return self._encoder

    def features(self, frames: torch.Tensor, device) -> torch.Tensor:
        """One unit's frames [S, 3, H, W] in [0, 1] -> features [F, N, C] (storage dtype) on `device`."""
        enc = self.encoder(device)
        out = encode_frames(enc, frames[None], stream=self.stream)[0]
        return out.to(device)

    def __getstate__(self):  # never pickle a built model (spawn workers, checkpoints)
        state = dict(self.__dict__)
        state["_encoder"], state["_lock"] = None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
