"""Frozen VGGT for training: the encoder spec without a model, and the online encoder.

- `resolve_spec(...)` gives the `EncoderSpec` (and so the fingerprint) that the flags describe
  without building any VGGT module: cached mode checks the store against it and never builds VGGT.
- `OnlineVGGT` runs the frozen aggregator in the online modes (and on a cache miss under
  `--vggt_cache_miss compute`). It is deliberately NOT an `nn.Module` and the model keeps it
  outside its module tree: ZeRO-3 partitions every registered submodule and all-gathers it on
  every forward (TRAINING.md), so a registered VGGT would be partitioned, gathered each step,
  saved in checkpoints and offered to the optimizer. Here it is replicated, eval, no grad,
  moved to the device by us, and built lazily on first use.
- Frames go through the same encode-one-unit code as `featstore build` (`featstore.build.encode`:
  one call of S frames, or one frame per call with the key/value cache), and the result is
  cast to the store's storage dtype, so the merger sees what a cache would hold.

Shapes: S frames of one unit, [S, 3, H, W] in [0, 1]; features [F, N, C] with F = S ("all") or
1 ("last"), N = h*w patch tokens, C channels.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, List, Optional

import torch

# The build's own code, re-exported: training computes units exactly as `featstore build` does.
from featstore.build.encode import encode_frames, read_unit_frames
from featstore.errors import FingerprintMismatchError
from featstore.encoders import resolve_spec  # no model built; the same fingerprint as get_encoder's

__all__ = ["resolve_spec", "read_unit_frames", "encode_frames", "OnlineVGGT"]


class OnlineVGGT:
    """The frozen encoder for online modes, built on first use on the device that asks.

    Args:
        name, weights, overrides: as for `featstore.encoders.get_encoder`.
        patch_size: the encoder's patch size (frames are h*patch x w*patch pixels).
        max_frames_per_call: frames per encoder call when units are batched (as `featstore build
            --batch-frames`, default 16).
        stream: feed frames one per call with the key/value cache (`online_causal_stream`).
        expected_fingerprint: the spec's fingerprint training resolved; the built encoder must match.

    Example:
        >>> vggt = OnlineVGGT("vggt-tiny", stream=False)
        >>> vggt.features(torch.rand(2, 3, 84, 112), "cpu").shape   # [F, N, C] bf16
        torch.Size([2, 48, 128])
    """

    def __init__(self, name: str, *, weights: Optional[str] = None, stream: bool = False,
                 overrides: Optional[Dict[str, Any]] = None, expected_fingerprint: Optional[str] = None,
                 patch_size: int = 14, max_frames_per_call: int = 16):
        self.name, self.weights, self.stream, self.patch_size = name, weights, stream, int(patch_size)
        self.max_frames_per_call = int(max_frames_per_call)
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
                    raise FingerprintMismatchError(
                        f"online VGGT {self.name}: built spec fingerprint {fp} differs from the "
                        f"resolved {self.expected_fingerprint}; did the --vggt_weights file change "
                        "after training started? Restart training")
                self._encoder = enc
            return self._encoder

    def features(self, frames: torch.Tensor, device) -> torch.Tensor:
        """One unit's frames [S, 3, H, W] in [0, 1] -> features [F, N, C] (storage dtype) on `device`."""
        return self.features_many([frames], device)[0]

    def features_many(self, units: List[torch.Tensor], device) -> List[torch.Tensor]:
        """Several units' frames -> their features, in order. Units of one shape share encoder
        calls of at most `max_frames_per_call` frames (one unit always fits), as the build
        batches them: fewer, larger calls on the GPU."""
        enc = self.encoder(device)
        out: List[Optional[torch.Tensor]] = [None] * len(units)
        groups: Dict[tuple, List[int]] = {}
        for j, frames in enumerate(units):
            groups.setdefault(tuple(frames.shape), []).append(j)
        for shape, members in groups.items():
            per_call = max(1, self.max_frames_per_call // shape[0])
            for start in range(0, len(members), per_call):
                chunk = members[start: start + per_call]
                feats = encode_frames(enc, torch.stack([units[j] for j in chunk]), stream=self.stream)
                for j, f in zip(chunk, feats):
                    out[j] = f.to(device)
        return out

    def __getstate__(self):  # never pickle a built model (spawn workers, checkpoints)
        state = dict(self.__dict__)
        state["_encoder"], state["_lock"] = None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
