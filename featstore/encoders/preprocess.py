"""Image -> [3, H, W] float32 in [0, 1], identical to the official `load_and_preprocess_images`.

Re-implemented from the official behaviour (vggt/utils/load_fn.py @ 44b3afb), with the target
size a parameter (518 official; 644 in the JanusVLN family) and an optional extra resize. The
result is a pure function of the image bytes and the `PreprocessSpec`:

- RGBA images are alpha-composited on white, then everything is converted to RGB. As in the
  official code, only mode "RGBA" is composited: "LA" or palette images with transparency are
  converted by PIL directly (their transparent pixels do not become white), and EXIF orientation
  is NOT applied.
- crop: width -> T, height -> round(h * T / w / P) * P, PIL bicubic (P: the encoder's patch size,
  VGGT's by default); centre-crop the height to T if larger. 640x480 -> 518x392 (W x H) at T=518.
- pad: longest side -> T, other side rounded to a multiple of P, bicubic, then padded with white
  (1.0) to T x T, centred (odd remainder at the bottom/right).
- uint8 -> float32 / 255 (torchvision ToTensor semantics).
- extra_resize (H', W'): torch bicubic with antialias on the [0, 1] tensor, clamped to [0, 1].

The Qwen image (`qwen_view`) derives from that VGGT view, as VG-LLM and JanusVLN feed Qwen2.5-VL
(TRAINING.md grid rule): the view CROPPED to its patch grid trimmed to even, e.g. 518x392 -> 37x28
patches -> 36x28 -> the top-left 504x392 pixels (a crop, not a resize: Qwen token j covers the
pixels of geometry token j). `qwen_frame` is the Qwen vision encoders' frame reader:
preprocess_image, then qwen_view. `trimmed_grid` is that trim, the one place it is computed
(`grid_tokens` counts a view's stored tokens with it, for the encoder registry's `stored_shape`).

Shapes: tensors are [3, H, W] (channels first); `stack_frames` returns [S, 3, H, W].
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from featstore.contract.spec import PreprocessSpec
from featstore.encoders.vggt.config import VGGT_1B_CONFIG
from featstore.errors import ImageDecodeError

__all__ = ["preprocess_image", "qwen_view", "qwen_frame", "read_image_bytes", "stack_frames", "output_size",
           "view_size", "trimmed_grid", "grid_tokens", "OFFICIAL_PATCH_SIZE"]

# The official loader's patch size (VGGT's): the default of every `patch_size` here. An encoder
# passes its own (`Encoder.patch_size`, its spec's config["patch_size"]).
OFFICIAL_PATCH_SIZE = int(VGGT_1B_CONFIG["patch_size"])

Source = Union[str, os.PathLike, bytes, bytearray, memoryview]


def read_image_bytes(path: Union[str, os.PathLike]) -> bytes:
    """The file's bytes; ImageDecodeError naming the file if it cannot be read or is empty."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ImageDecodeError(f"cannot read image file {os.fspath(path)!r}: {e}; check that it exists and is "
                               "readable") from e
    if not data:
        raise ImageDecodeError(f"image file {os.fspath(path)!r} is empty (0 bytes); replace it, or remove it from "
                               "the data (or the annotations)")
    return data


def output_size(width: int, height: int, mode: str, target_size: int, patch: int = OFFICIAL_PATCH_SIZE):
    """(resized_w, resized_h) of the bicubic resize, before crop/pad, as the official code rounds it."""
    if mode == "pad" and height > width:
        new_h = target_size
        new_w = round(width * (new_h / height) / patch) * patch
    else:  # crop, or pad with a landscape/square image: width drives
        new_w = target_size
        new_h = round(height * (new_w / width) / patch) * patch
    return new_w, new_h


def view_size(width: int, height: int, spec: Optional[PreprocessSpec] = None,
              patch_size: int = OFFICIAL_PATCH_SIZE):
    """(W, H) of `preprocess_image`'s output for a width x height source, without decoding it.

    Example:
        >>> from featstore.encoders.preprocess import view_size
        >>> from featstore.contract.spec import PreprocessSpec
        >>> view_size(640, 480), view_size(480, 640), view_size(480, 640, PreprocessSpec(mode="pad"))
        ((518, 392), (518, 518), (518, 518))
    """
    spec = spec or PreprocessSpec()
    if spec.extra_resize is not None:
        return spec.extra_resize[1], spec.extra_resize[0]
    t = spec.target_size
    if spec.mode == "pad":
        return t, t
    new_w, new_h = output_size(width, height, spec.mode, t, patch_size)
    return new_w, min(new_h, t)


def trimmed_grid(h: int, w: int, merge_size: int = 1):
    """(h', w'): a patch grid h x w trimmed to whole merge x merge blocks (the last patch row and
    column go where h or w is odd, for Qwen's merge 2); merge 1 keeps the grid.

    Example:
        >>> from featstore.encoders.preprocess import trimmed_grid
        >>> trimmed_grid(28, 37, 2), trimmed_grid(28, 37)
        ((28, 36), (28, 37))
    """
    return h // merge_size * merge_size, w // merge_size * merge_size


def grid_tokens(width: int, height: int, spec: Optional[PreprocessSpec] = None,
                patch_size: int = OFFICIAL_PATCH_SIZE, merge_size: int = 1) -> int:
    """The patch tokens stored for one width x height source image: its view's patch grid
    (`view_size` / `patch_size`), trimmed to whole merge blocks (`trimmed_grid`).

    Example:
        >>> from featstore.encoders.preprocess import grid_tokens
        >>> grid_tokens(640, 480), grid_tokens(640, 480, merge_size=2)   # 518x392: 37x28 patches
        (1036, 1008)
    """
    w, h = view_size(width, height, spec, patch_size)
    gh, gw = trimmed_grid(h // patch_size, w // patch_size, merge_size)
    return gh * gw


def preprocess_image(
    source: Source,
    spec: Optional[PreprocessSpec] = None,
    *,
    patch_size: int = OFFICIAL_PATCH_SIZE,
    name: Optional[str] = None,
    uint8: bool = False,
) -> torch.Tensor:
    """Decode and preprocess one image.

    Args:
        source: a path, the image bytes, or a decoded PIL image (a video frame: converted to
            RGB as VG-LLM does, `Image.fromarray(frame).convert("RGB")`).
        spec: the preprocessing (default: official crop at 518).
        patch_size: side of a patch in pixels (the encoder's; default VGGT's); every output side
            is a multiple of it.
        name: how errors name the image when `source` is bytes (default: the path).
        uint8: return the uint8 values k of the result k/255 instead, where they are exact
            (without `extra_resize`, whose interpolation leaves the k/255 grid; float32 then):
            the build's decode workers hand those over, a quarter of the bytes, and skip the
            float conversion (`featstore.build.frames.to_float` makes the same float32).

    Returns:
        float32 tensor [3, H, W] in [0, 1] (uint8 [3, H, W] with `uint8` where exact).

    Raises:
        ImageDecodeError: empty, truncated or unreadable file, or shorter side < one patch.

    Example:
        >>> from featstore.encoders.preprocess import preprocess_image
        >>> from featstore.contract.spec import PreprocessSpec
        >>> x = preprocess_image("data/scene_a/000.jpg", PreprocessSpec(mode="crop", target_size=518))
        >>> x.shape  # a 96x72 image (4:3, like a 640x480 photo): width 518, height 392
        torch.Size([3, 392, 518])
    """
    spec = spec or PreprocessSpec()
    if _is_pil(source):  # a decoded frame (a container video's, featstore.encoders.video)
        img, label = source.convert("RGB"), name or "<frame>"
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data, label = bytes(source), name or "<bytes>"
        if not data:
            raise ImageDecodeError(f"image {label!r} is empty (0 bytes); replace it, or remove it from the data "
                                   "(or the annotations)")
        img = _decode(data, label)
    else:
        data, label = read_image_bytes(source), name or os.fspath(source)
        img = _decode(data, label)
    w, h = img.size
    # Images whose shorter side is below one patch are rejected: the upscale would invent all the
    # content, and in datasets such files are almost always placeholders or broken thumbnails.
    if min(w, h) < patch_size:
        raise ImageDecodeError(
            f"image {label!r} is {w}x{h} pixels; featstore rejects images whose shorter side is below "
            f"{patch_size} px (less than one {patch_size}-px patch: almost always a placeholder "
            f"or broken file). Remove it from the data or the annotations."
        )
    t = spec.target_size
    new_w, new_h = output_size(w, h, spec.mode, t, patch_size)
    if new_w < patch_size or new_h < patch_size:
        raise ImageDecodeError(
            f"image {label!r} ({w}x{h}) is too elongated for {spec.mode} mode at {t}: it would be resized "
            f"to {new_w}x{new_h}, less than one {patch_size}-px patch; crop the image, or remove it from the data "
            "(or the annotations)"
        )
    from PIL import Image

    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    if not (uint8 and spec.extra_resize is None):
        x = x.float().div(255)
    if spec.mode == "crop" and new_h > t:
        top = (new_h - t) // 2
        x = x[:, top:top + t, :]
    elif spec.mode == "pad":
        x = _pad_white(x, t, t)
    if spec.extra_resize is not None:
        x = F.interpolate(x[None], size=spec.extra_resize, mode="bicubic", antialias=True,
                          align_corners=False)[0].clamp_(0.0, 1.0)
    return x.contiguous()


def qwen_view(view: torch.Tensor, *, patch_size: int = OFFICIAL_PATCH_SIZE, merge_size: int = 2,
              name: Optional[str] = None) -> torch.Tensor:
    """The Qwen image for one VGGT view: the view CROPPED to its first whole merge blocks.

    VG-LLM and JanusVLN (`data_qwen.py`, `process_image_unified_vggt`) take the VGGT view, drop the
    last patch column (and row) where the grid is odd, `images[:, :, :height, :width]`, and hand
    that float crop to the image processor with `do_rescale=False`. A crop keeps Qwen token j on
    exactly the pixels of geometry token j; a resize would shift it by up to one patch at the far
    edge (and change every pixel value), i.e. train another model than the one they evaluate.

    Args:
        view: the VGGT-preprocessed view [3, H, W] in [0, 1] (`preprocess_image`), H and W
            multiples of `patch_size`.
        patch_size: the VGGT and Qwen patch side (VGGT's, 14).
        merge_size: Qwen's spatial merge (2): the grid is trimmed to a multiple of it.
        name: how the error names the image.

    Returns:
        A view (no copy) of `view`: [3, (h // merge) * patch * merge, (w // merge) * patch * merge],
        (h, w) = (H // patch, W // patch); the same float values, top-left aligned.

    Raises:
        ImageDecodeError: the view's grid is smaller than merge x merge patches (no Qwen token fits).

    Example:
        >>> import torch
        >>> from featstore.encoders.preprocess import qwen_view
        >>> view = torch.rand(3, 392, 518)
        >>> crop = qwen_view(view)             # 37x28 patches -> 36x28: the last patch column goes
        >>> tuple(crop.shape), torch.equal(crop, view[:, :392, :504])
        ((3, 392, 504), True)
    """
    h, w = view.shape[-2] // patch_size, view.shape[-1] // patch_size
    th, tw = trimmed_grid(h, w, merge_size)
    if th == 0 or tw == 0:
        raise ImageDecodeError(
            f"image {name or '<view>'!r}: its VGGT grid {h}x{w} is smaller than {merge_size}x{merge_size} patches, "
            "so no Qwen token fits; use a larger preprocessing target size or drop the image")
    return view[..., : th * patch_size, : tw * patch_size]


def qwen_frame(source: Source, spec: Optional[PreprocessSpec] = None, *, patch_size: int = OFFICIAL_PATCH_SIZE,
               merge_size: int = 2,
               name: Optional[str] = None, uint8: bool = False) -> torch.Tensor:
    """Decode one image into the Qwen image as a tensor: `preprocess_image`, then `qwen_view`.

    Args:
        source, spec, patch_size, name, uint8: as for `preprocess_image` (the VGGT view's
            preprocessing).
        merge_size: Qwen's spatial merge (2).

    Returns:
        float32 tensor [3, H', W'] in [0, 1] (exactly k/255 without extra_resize; with `uint8`
        then the uint8 k), H' and W' multiples of patch * merge: the VGGT view's top-left
        H' x W' pixels.

    Raises:
        ImageDecodeError: as `preprocess_image`, or the view is too small for one Qwen token.

    Example:
        >>> from featstore.encoders.preprocess import qwen_frame
        >>> from featstore.contract.spec import PreprocessSpec
        >>> qwen_frame("data/scene_a/000.jpg", PreprocessSpec(target_size=518)).shape
        torch.Size([3, 392, 504])
    """
    view = preprocess_image(source, spec, patch_size=patch_size, name=name, uint8=uint8)
    label = name or (None if isinstance(source, (bytes, bytearray, memoryview)) or _is_pil(source)
                     else os.fspath(source))
    return qwen_view(view, patch_size=patch_size, merge_size=merge_size, name=label).contiguous()


def stack_frames(frames: Sequence[torch.Tensor]) -> torch.Tensor:
    """[3, H_i, W_i] x S -> [S, 3, H, W]; frames of other sizes padded with white to the largest,
    centred, as the official loader does for one call of mixed sizes."""
    if not frames:
        raise ValueError("stack_frames needs at least one frame")
    hh = max(f.shape[1] for f in frames)
    ww = max(f.shape[2] for f in frames)
    return torch.stack([_pad_white(f, hh, ww) for f in frames])


def _is_pil(source) -> bool:
    from PIL import Image

    return isinstance(source, Image.Image)


def _pad_white(x: torch.Tensor, hh: int, ww: int) -> torch.Tensor:
    dh, dw = hh - x.shape[1], ww - x.shape[2]
    if dh <= 0 and dw <= 0:
        return x
    dh, dw = max(dh, 0), max(dw, 0)
    white = 255 if x.dtype == torch.uint8 else 1.0
    return F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2), mode="constant", value=white)


def _decode(data: bytes, label: str):
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decode now: truncation surfaces here, not inside resize
        if img.mode == "RGBA":
            white = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(white, img)
        return img.convert("RGB")
    except UnidentifiedImageError as e:
        raise ImageDecodeError(f"cannot identify image file {label!r} (not an image, or an unsupported format); "
                               "convert it to JPEG or PNG, or remove it from the data (or the annotations)") from e
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"image {label!r} exceeds PIL's decompression-bomb pixel limit: {e}; downscale it, "
                               "or remove it from the data (or the annotations)") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageDecodeError(f"cannot decode image {label!r} (truncated or corrupt?): {e}; re-export or replace "
                               "the file, or remove it from the data (or the annotations)") from e
