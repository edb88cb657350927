"""`VGGTEncoder`: the `Encoder` (featstore.encoders.base) that runs a VGGT aggregator for one spec.

It owns the choices the spec makes around the aggregator: which layer, patch tokens only,
which frames are kept, full or causal attention (one call, or streamed one frame at a time),
the reference frame (the order of the frames in the call) and the autocast dtype. The
aggregator itself is `featstore.encoders.vggt.model.VGGTAggregator` (or the official package's
`Aggregator` with backend "official").

Shapes: frames [B, S, 3, H, W] float32 in [0, 1]; features [B, F, N, C], F = S ("all") or 1
("last"), N = h*w patch tokens, C = 2*embed_dim.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from featstore.encoders.base import autocast_dtype
from featstore.errors import EncoderError

__all__ = ["VGGTEncoder"]


class VGGTEncoder:
    """Frames -> stored features for one `EncoderSpec` (build with `featstore.encoders.get_encoder`).

    `encode` output: [B, F, N, C] float32 on `device`. On CUDA it runs under
    autocast(compute_dtype) with fp32 weights (the official recipe); on CPU in float32, which
    agrees with the GPU within bf16 tolerance, not bitwise.

    Attributes:
        spec, device, patch_size, model: see `featstore.encoders.base.Encoder`.
        backend: "featstore" (in-tree aggregator) or "official" (the vggt package).

    Example:
        >>> import torch
        >>> from featstore.encoders import get_encoder
        >>> enc = get_encoder("vggt-tiny", attention="causal", frames_kept="last")
        >>> x = torch.rand(1, 3, 3, 84, 112)                 # [B, S, 3, H, W]
        >>> enc.encode(x).shape                              # [B, F, N, C]: last frame, 6x8 patches
        torch.Size([1, 1, 48, 128])
        >>> torch.allclose(enc.encode_stream(x), enc.encode(x), rtol=1e-4, atol=1e-5)
        True
    """

    def __init__(self, spec, model: nn.Module, device, *, backend: str = "featstore"):
        self.spec = spec
        self.model = model
        self.device = torch.device(device)
        self.backend = backend
        self.patch_size = int(spec.config["patch_size"])
        self._autocast_dtype = autocast_dtype(
            spec.compute_dtype, self.device,
            advice="pass compute_dtype='float16' (VGGT's recipe below compute capability 8.0)")

    def patch_grid(self, height: int, width: int) -> Tuple[int, int]:
        """(h, w) patch grid of an H x W input."""
        return height // self.patch_size, width // self.patch_size

    def load_image(self, path) -> Tensor:
        """One image file -> [3, H, W] float32 in [0, 1], preprocessed per `spec.preprocess`."""
        from featstore.encoders.preprocess import preprocess_image

        return preprocess_image(path, self.spec.preprocess, patch_size=self.patch_size)

    def _check_frames(self, frames: Tensor, what: str) -> Tensor:
        if frames.dim() != 5 or frames.shape[2] != 3:
            raise EncoderError(f"{what} takes frames [B, S, 3, H, W]; got shape {tuple(frames.shape)}")
        hh, ww = frames.shape[-2:]
        if hh % self.patch_size or ww % self.patch_size:
            raise EncoderError(f"frame size {hh}x{ww} is not a multiple of the patch size {self.patch_size}")
        return frames.to(self.device, dtype=torch.float32, non_blocking=True)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self._autocast_dtype or torch.float32,
                              enabled=self._autocast_dtype is not None)

    def _call_order(self, x: Tensor) -> Tensor:
        """[B, S, ...] in the sample's order <-> the order of the encoder call (its own inverse).

        reference_frame "first": the same order. "last": reversed along S, as VG-LLM and JanusVLN
        do when their `reference_frame` is not "first" (torch.flip of the frames before VGGT and
        of the features after it): the sample's last frame is frame 0 of the call (frame 0's
        camera/register tokens; a causal stream starts from it). frames_kept "last" keeps the
        call's last frame, which is then the sample's FIRST frame, computed after all the others
        (JanusVLN keeps the last streamed frame; flipping one frame back changes nothing).
        """
        return x.flip(1) if self.spec.reference_frame == "last" else x

    @torch.inference_mode()
    def encode(self, frames: Tensor) -> Tensor:
        """[B, S, 3, H, W] in [0, 1] -> [B, F, N, C] float32 (see class docstring), one call. Frames
        come in the sample's order and the features go back in it (`spec.reference_frame`)."""
        return self._features(self._call_order(self._check_frames(frames, "encode")))

    def _features(self, x: Tensor, frame_index: Optional[Tensor] = None) -> Tensor:
        """One aggregator call on `x` (in the call's order) -> the spec's layer, patch tokens only,
        the kept frames, back in the sample's order: [B, F, N, C] float32."""
        layer = self.spec.layer_resolved
        with self._autocast():
            if self.backend == "official":
                outs, psi = self.model(x)
            else:
                extra = {} if frame_index is None else {"frame_index": frame_index}
                outs, psi = self.model(x, attention=self.spec.attention, last_layer=layer, keep_layers=[layer],
                                       **extra)
        y = outs[layer][:, :, psi:]
        if self.spec.frames_kept == "last":
            y = y[:, -1:]
        return self._call_order(y).float().contiguous()

    @property
    def encodes_indexed(self) -> bool:
        """Whether `encode_indexed` is offered: the in-tree aggregator, full or causal attention
        (the build then embeds each distinct frame of a batch once; the patch embedding sees one
        frame, whatever the global blocks' mask). The official backend keeps the plain `encode`."""
        return self.backend == "featstore"

    @torch.inference_mode()
    def encode_indexed(self, frames: Tensor, index: Tensor) -> Tensor:
        """`encode` of B sequences that share frames, given each distinct frame once.

        Args:
            frames: [U, 3, H, W] in [0, 1], the distinct frames of the batch.
            index: [B, S] long, sequence b's frame k (in the sample's order) is frames[index[b, k]].

        Returns:
            [B, F, N, C] float32, as `encode(frames[index])` returns it: the patch embedding (the
            per-frame DINOv2 ViT) runs U times instead of B*S, the alternating blocks as before.

        Raises:
            EncoderError: `encodes_indexed` is False for this encoder, or the shapes are wrong.
        """
        if not self.encodes_indexed:
            raise EncoderError(
                f"encode_indexed needs backend='featstore'; this encoder has backend={self.backend!r}. "
                "Use encode()")
        if index.dim() != 2 or index.dtype != torch.long:
            raise EncoderError(f"encode_indexed takes index [B, S] of dtype long; got {index.dtype} {tuple(index.shape)}")
        x = self._check_frames(frames[None], "encode_indexed")[0]  # the distinct frames, [U, 3, H, W]
        if index.numel() and not 0 <= int(index.min()) <= int(index.max()) < x.shape[0]:
            raise EncoderError(f"encode_indexed: index values must lie in [0, {x.shape[0]}) (the frames given); "
                               f"got [{int(index.min())}, {int(index.max())}]")
        # non_blocking: a blocking host->device copy synchronizes the stream, so the host would wait
        # for the previous batch's forward before launching this one. From pageable memory (the
        # build's index) the bytes are staged before the call returns; a pinned index is read
        # later, in stream order, so its caller must not change it in place meanwhile.
        index = self._call_order(index.to(self.device, non_blocking=True))  # reference_frame "last" reverses each sequence
        return self._features(x, frame_index=index)

    @torch.inference_mode()
    def encode_stream(self, frames: Tensor) -> Tensor:
        """Causal streaming: feed frame k of every sequence through the aggregator's key/value
        cache (`new_stream` / `stream_step`), one frame per call, as streaming navigation
        models (JanusVLN / StreamVGGT) run it. Equal to `encode` of a causal spec up to rounding.

        With reference_frame "last" the stream runs over the frames reversed (it starts from the
        sample's last frame) and the outputs come back in the sample's order (`_call_order`).

        Args:
            frames: [B, S, 3, H, W] in [0, 1]; the cache is reset per call (one stream per sample).

        Returns:
            [B, F, N, C] float32; with frames_kept "last" only the last streamed frame's output is
            kept (earlier frames still run, to fill the cache).

        Raises:
            EncoderError: the spec's attention is not "causal", or the backend is not "featstore"
                (the official package has no key/value cache).
        """
        if self.spec.attention != "causal" or self.backend != "featstore":
            raise EncoderError(
                f"encode_stream needs attention='causal' and backend='featstore'; this encoder has "
                f"attention={self.spec.attention!r}, backend={self.backend!r}. Use encode(), or build the "
                "encoder with attention='causal'"
            )
        x = self._call_order(self._check_frames(frames, "encode_stream"))
        layer, s = self.spec.layer_resolved, x.shape[1]
        keep_all = self.spec.frames_kept == "all"
        state = self.model.new_stream()
        kept = []
        with self._autocast():
            for k in range(s):
                wanted = keep_all or k == s - 1
                outs, psi = self.model.stream_step(x[:, k], state, last_layer=layer,
                                                   keep_layers=[layer] if wanted else [])
                if wanted:
                    kept.append(outs[layer][:, :, psi:])  # [B, 1, N, C]
        return self._call_order(torch.cat(kept, dim=1)).float().contiguous()

    def __repr__(self) -> str:
        return (f"VGGTEncoder({self.spec.encoder!r}, backend={self.backend!r}, device={str(self.device)!r}, "
                f"layer={self.spec.layer}, attention={self.spec.attention!r}, fingerprint={self.spec.fingerprint()[:12]})")
