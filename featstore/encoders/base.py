"""The `Encoder` protocol: what the build, verify's recompute and training need of an encoder.

An encoder turns preprocessed frames into the features a store holds. VGGT
(`featstore.encoders.vggt.encoder.VGGTEncoder`, unit "sequence") and the Qwen2.5-VL vision tower
(`featstore.encoders.qwen_vision.encoder.QwenVisionEncoder`, unit "image": each of the B*S images on its
own, F = S) follow this protocol; another frozen encoder registers a preset with
`featstore.encoders.register_encoder`.

Shapes: frames [B, S, 3, H, W] float32 in [0, 1] (B independent sequences of S frames, one
encoder call each); features [B, F, N, C] with F = S (frames_kept "all") or 1 ("last"),
N = h*w patch tokens, C channels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Tuple, runtime_checkable

if TYPE_CHECKING:  # no torch import for the protocol itself
    import torch

    from featstore.contract.spec import EncoderSpec

__all__ = ["Encoder", "autocast_dtype", "compile_each"]


@runtime_checkable
class Encoder(Protocol):
    """A frozen encoder for one `EncoderSpec`.

    Attributes:
        spec: the EncoderSpec whose fingerprint every entry it computes carries.
        device: the torch.device it runs on.
        patch_size: side of a patch in pixels (frame sides must be multiples of it).
        model: the frozen `torch.nn.Module` (eval mode, no grad).
    """

    spec: "EncoderSpec"
    device: "torch.device"
    patch_size: int
    model: "torch.nn.Module"

    def load_image(self, path) -> "torch.Tensor":
        """One image file -> [3, H, W] float32 in [0, 1], preprocessed per `spec.preprocess`."""

    def encode(self, frames: "torch.Tensor") -> "torch.Tensor":
        """[B, S, 3, H, W] -> [B, F, N, C] float32 on `device`, all S frames in one call."""

    def encode_stream(self, frames: "torch.Tensor") -> "torch.Tensor":
        """As `encode`, but fed one frame per call through a key/value cache (causal specs)."""

    def patch_grid(self, height: int, width: int) -> Tuple[int, int]:
        """(h, w) patch grid of an H x W frame."""


def autocast_dtype(compute_dtype: str, device, *, advice: str = "pass compute_dtype='float16'"):
    """The autocast dtype an encoder runs under on `device`: None on a CPU (float32) or for
    float32, else the torch dtype of `compute_dtype`.

    Raises:
        EncoderError: bfloat16 asked for on a GPU without bf16 support (the message names the
            GPU and `advice`).

    Example:
        >>> from featstore.encoders.base import autocast_dtype
        >>> autocast_dtype("bfloat16", "cpu") is None
        True
    """
    import torch

    from featstore.contract.dtypes import torch_dtype
    from featstore.errors import EncoderError

    device = torch.device(device)
    if device.type != "cuda":
        return None
    dt = torch_dtype(compute_dtype)
    if dt == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise EncoderError(f"compute_dtype=bfloat16 is not supported on {torch.cuda.get_device_name(device)}; {advice}")
    return None if dt == torch.float32 else dt


def compile_each(blocks, **compile_kwargs) -> None:
    """torch.compile each module of `blocks` in place (`nn.Module.compile`), for a frozen
    encoder's repeated blocks (VGGT's, the Qwen vision tower's).

    Blocks of one class share the compiled graph; each new input shape compiles once more (from
    the second, the changed dimension is dynamic). Dynamo's cache limit is raised to 64 entries,
    process-wide: several shapes and block kinds in one process must not exhaust the default of
    8, past which torch falls back to eager without an error.
    """
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for block in blocks:
        block.compile(**compile_kwargs)
