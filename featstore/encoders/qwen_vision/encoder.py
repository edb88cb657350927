"""`QwenVisionEncoder`: the frozen Qwen2.5-VL vision tower without its patch merger (`visual.merger`).

The tower is transformers' `Qwen2_5_VisionTransformerPretrainedModel`, run by its own forward
(patch_embed, the 2-D rotary embedding, the window index, every block with window or full
attention over cu_seqlens, then the window permutation undone). Only its merger is replaced, by
a parameterless module that groups the merge**2 tokens of a block as the merger's input view does:
the forward then hands back the pre-merge hidden states in the image processor's token order,
which is exactly what `visual.merger` consumes (`merger(out[i])` == the stock merged tokens).

The Qwen ViT attends within one image only, so every image is its own unit: `encode` runs the
B*S images of [B, S, 3, H, W] as B*S independent images (several per forward, separated by
cu_seqlens), and `encode_images` takes images of different sizes in one forward.

Pixels: the Qwen image (`featstore.encoders.preprocess.qwen_view`, [3, H, W] in [0, 1], H and W
multiples of patch * merge = 28) is normalised with the image processor's mean/std and patchified
exactly as `Qwen2VLImageProcessorPil` does (temporal_patch_size copies of the image, merge x merge
blocks): `pixel_values` equals the processor's output for the same float image with
`do_rescale=False` (the call VG-LLM and JanusVLN make on the crop).

Shapes: frames [B, S, 3, H, W]; features [B, S, N, C] float32, N = (H/14)*(W/14) patches in the
processor's order (row-major over merge blocks, each block's 2x2 patches row-major), C = hidden_size.
"""

from __future__ import annotations

import itertools
from typing import List, Sequence, Tuple

import torch
from torch import Tensor, nn

from featstore.encoders.base import autocast_dtype, compile_each
from featstore.errors import EncoderError

__all__ = ["QwenVisionEncoder", "build_vision_tower", "compile_tower_blocks", "init_random_"]


class _MergeGroups(nn.Module):
    """Stands where `visual.merger` was: the merger's input view ([seq, C] -> [seq / m^2, m^2 * C],
    one row per merge block) with no weights, so the forward's un-permutation of the windows
    (which moves whole rows) returns the pre-merge tokens in the processor's order."""

    def __init__(self, hidden_size: int, spatial_merge_size: int):
        super().__init__()
        self.width = hidden_size * spatial_merge_size ** 2

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(-1, self.width)


def build_vision_tower(vision_config: dict) -> nn.Module:
    """transformers' Qwen2.5-VL vision tower for a config dict, float32, its merger replaced
    (no merger parameter; module docstring). Weights are transformers' init: load or seed them.

    Raises:
        EncoderError: transformers is not installed.
    """
    try:
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    except ImportError as e:
        raise EncoderError(f"the Qwen2.5-VL vision encoders need transformers>=5.17 ({e}); "
                           "`pip install 'transformers>=5.17'` (or featstore[qwen])") from e
    config = Qwen2_5_VLVisionConfig(**dict(vision_config))
    model = Qwen2_5_VisionTransformerPretrainedModel(config).float()
    del model.merger
    model.merger = _MergeGroups(config.hidden_size, config.spatial_merge_size)
    return model


def init_random_(model: nn.Module, seed: int) -> nn.Module:
    """Seeded weights independent of transformers' init code: RMSNorm scales 1, every other
    parameter N(0, 0.02) from one generator, in name order. Returns `model`."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith(("norm1.weight", "norm2.weight")):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def compile_tower_blocks(visual: nn.Module, **compile_kwargs) -> nn.Module:
    """torch.compile each block of a FROZEN Qwen2.5-VL vision tower (`visual.blocks`, transformers'
    `Qwen2_5_VisionTransformerPretrainedModel` or the tower above); returns `visual`.

    A compiled block fuses the RMSNorms, the rotary embedding, the gated MLP and the residual adds
    into a few kernels; with the one-call attention it leaves a handful of launches per layer.
    The forward's start (patch embedding, the rotary table and window index, loops over grid_thw
    on the host) stays eager: it runs once per call, not per layer. The blocks share one class,
    so one compiled graph serves them all; a new token count recompiles once with that dimension
    dynamic, then serves every count (the first forward pays the compile, about 10 s per shape on
    a CPU for the tiny tower). Outputs agree with the eager blocks within rounding.

    Only for a tower whose weights do not train (the build, verify --recompute, and training
    without --tune_vision; tests/test_training_train.py trains with gradient checkpointing on).
    Not under DeepSpeed ZeRO-3, whose partitioned weights a compiled block does not gather
    (training refuses the combination).
    """
    compile_each(visual.blocks, **compile_kwargs)
    return visual


class QwenVisionEncoder:
    """Qwen images -> pre-merge vision features for one `EncoderSpec` (build with
    `featstore.encoders.get_encoder("qwen2.5-vl-vision", weights=...)`).

    `encode` output: [B, S, N, C] float32 on `device`. On CUDA it runs under
    autocast(compute_dtype) with float32 weights (as VGGTEncoder); on CPU in float32.

    Attributes:
        spec, device, patch_size, model: see `featstore.encoders.base.Encoder`.
        merge_size, temporal_patch_size: Qwen's spatial merge (2) and temporal patch (2).

    Example:
        >>> import torch
        >>> from featstore.encoders import get_encoder
        >>> enc = get_encoder("qwen2.5-vl-vision-tiny")
        >>> x = torch.rand(1, 2, 3, 84, 112)                 # [B, S, 3, H, W]: two 84x112 Qwen images
        >>> enc.encode(x).shape                              # [B, S, N, C]: 6x8 patches each
        torch.Size([1, 2, 48, 32])
    """

    def __init__(self, spec, model: nn.Module, device):
        self.spec = spec
        self.model = model
        self.device = torch.device(device)
        cfg = spec.config
        self.patch_size = int(cfg["patch_size"])
        self.merge_size = int(cfg["spatial_merge_size"])
        self.temporal_patch_size = int(cfg["temporal_patch_size"])
        self._mean = torch.tensor(cfg["image_mean"], dtype=torch.float32, device=self.device).view(3, 1, 1)
        self._std = torch.tensor(cfg["image_std"], dtype=torch.float32, device=self.device).view(3, 1, 1)
        self._autocast_dtype = autocast_dtype(spec.compute_dtype, self.device)
        self._layouts: dict = {}  # grids -> the forward's index tensors on the device (_tower_inputs)

    def patch_grid(self, height: int, width: int) -> Tuple[int, int]:
        """(h, w) patch grid of an H x W Qwen image (before the merge)."""
        return height // self.patch_size, width // self.patch_size

    def load_image(self, path) -> Tensor:
        """One image file -> the Qwen image [3, H, W] float32 in [0, 1] (`preprocess.qwen_frame`)."""
        from featstore.encoders.preprocess import qwen_frame

        return qwen_frame(path, self.spec.preprocess, patch_size=self.patch_size, merge_size=self.merge_size)

    def _check_image(self, image: Tensor, what: str) -> None:
        side = self.patch_size * self.merge_size
        if image.dim() != 3 or image.shape[0] != 3:
            raise EncoderError(f"{what} takes images [3, H, W]; got shape {tuple(image.shape)}")
        hh, ww = image.shape[-2:]
        if hh % side or ww % side or not hh or not ww:
            raise EncoderError(f"image size {hh}x{ww} is not a positive multiple of patch * merge = {side} px; "
                               "make the image with featstore.encoders.preprocess.qwen_view")

    def pixel_values(self, images: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
        """Normalise and patchify images as `Qwen2VLImageProcessorPil` does.

        Args:
            images: Qwen images [3, H_i, W_i] float32 in [0, 1] (sides multiples of 28).

        Returns:
            (pixel_values [sum N_i, 3 * temporal_patch * patch * patch] float32, grid_thw [n, 3]
            int64 rows (1, H_i / patch, W_i / patch)), on `device`.
        """
        pixels, grids = self._pixels_and_grids(images)
        return pixels, torch.tensor(grids, dtype=torch.int64, device=self.device)

    def _pixels_and_grids(self, images: Sequence[Tensor]) -> Tuple[Tensor, Tuple[Tuple[int, int, int], ...]]:
        """`pixel_values` with the grids as host tuples: consecutive images of one size are
        patchified together (a handful of kernels per size, not per image)."""
        for k, image in enumerate(images):
            self._check_image(image, f"pixel_values (image {k})")
        runs = [list(run) for _, run in itertools.groupby(images, key=lambda image: image.shape)]
        p = self.patch_size
        grids = tuple((1, run[0].shape[1] // p, run[0].shape[2] // p) for run in runs for _ in run)
        return torch.cat([self._patchify(torch.stack(run)) for run in runs]), grids

    def _patchify(self, x: Tensor) -> Tensor:
        """[n, 3, H, W] images of one size -> their pixel_values rows [n * H/p * W/p, 3 * t * p * p]."""
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        # (x - mean) / std in float32, the processor's own order of operations (not a fused
        # multiply by 1/std), so the values agree bit for bit.
        x = (x.to(self.device, torch.float32) - self._mean) / self._std
        n, gh, gw = x.shape[0], x.shape[2] // p, x.shape[3] // p
        x = x.reshape(n, 3, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)  # (n, gh/m, gw/m, m, m, C, p, p)
        x = x.unsqueeze(6).expand(*x.shape[:6], t, p, p)  # the image repeated over the temporal patch
        return x.reshape(n * gh * gw, 3 * t * p * p)

    def _tower_inputs(self, grids: Tuple[Tuple[int, int, int], ...]) -> dict:
        """The forward's index tensors for images of these grids (`tower_index`: position ids,
        cu_seqlens, the window index and the longest segments), made on the host once per
        distinct list of grids and kept on the device: the forward then computes none of them,
        so a call never makes the host wait for the GPU, and the integers are the forward's own.
        The dict is passed as `**` (grid_thw included): the forward pops from its own copy, so
        the cached dict stays whole."""
        inputs = self._layouts.get(grids)
        if inputs is None:
            from featstore.encoders.qwen_vision.tower_index import TowerWindows, tower_index

            inputs = tower_index(grids, TowerWindows.of(self.model.config))
            inputs = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in inputs.items()}
            inputs["grid_thw"] = torch.tensor(grids, dtype=torch.int64, device=self.device)
            if len(self._layouts) >= 8:  # a build has one or a few; verify --recompute of mixed sizes more
                self._layouts.pop(next(iter(self._layouts)))
            self._layouts[grids] = inputs
        return inputs

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self._autocast_dtype or torch.float32,
                              enabled=self._autocast_dtype is not None)

    @torch.inference_mode()
    def _forward(self, pixels: Tensor, grids: Tuple[Tuple[int, int, int], ...]) -> Tensor:
        """pixel_values of images with these grids -> [sum N_i, C] float32, processor order."""
        with self._autocast():
            out = self.model(pixels, **self._tower_inputs(grids))
        # 5.x returns BaseModelOutputWithPooling (pooler_output = the merger's output, un-permuted);
        # 4.x returned that tensor itself.
        grouped = out if isinstance(out, Tensor) else getattr(out, "pooler_output", None)
        if not isinstance(grouped, Tensor):
            raise EncoderError(f"the installed transformers' vision forward returned {type(out).__name__} without a "
                               "pooler_output tensor; featstore supports transformers>=5.17")
        return grouped.reshape(pixels.shape[0], -1).float()

    def encode_images(self, images: Sequence[Tensor]) -> List[Tensor]:
        """Images of any sizes (multiples of 28) in one forward -> one [N_i, C] float32 per image.

        Each image attends only within itself (cu_seqlens), so an image's features do not
        depend on the others in the call (up to floating-point rounding).
        """
        if not len(images):
            return []
        pixels, grids = self._pixels_and_grids(images)
        return list(self._forward(pixels, grids).split([h * w for _, h, w in grids]))

    def encode(self, frames: Tensor) -> Tensor:
        """[B, S, 3, H, W] Qwen images in [0, 1] -> [B, S, N, C] float32, every image on its own.

        Nothing in it waits for the GPU: a caller can prepare the next batch meanwhile."""
        if frames.dim() != 5 or frames.shape[2] != 3:
            raise EncoderError(f"encode takes frames [B, S, 3, H, W]; got shape {tuple(frames.shape)}")
        b, s = frames.shape[:2]
        if not b * s:
            raise EncoderError(f"encode got no image (frames of shape {tuple(frames.shape)})")
        images = frames.reshape(b * s, *frames.shape[2:])
        self._check_image(images[0], "encode")  # one size for all
        gh, gw = self.patch_grid(*images.shape[-2:])
        feats = self._forward(self._patchify(images), ((1, gh, gw),) * (b * s))
        return feats.reshape(b, s, gh * gw, -1).contiguous()

    def encode_stream(self, frames: Tensor) -> Tensor:
        """Not offered: the Qwen vision tower has no causal mode or key/value cache."""
        raise EncoderError(f"encode_stream needs a causal encoder; {self.spec.encoder!r} attends within one image "
                           "only: use encode()")

    def __repr__(self) -> str:
        return (f"QwenVisionEncoder({self.spec.encoder!r}, device={str(self.device)!r}, "
                f"fingerprint={self.spec.fingerprint()[:12]})")
