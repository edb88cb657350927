"""Encode one unit: read its frames, preprocess, run the encoder, cast to the storage dtype
(bfloat16 for an fp8 store: its codec quantises when the entry is serialised), and make
the entry's metadata. The build, `verify --recompute` and training's online path all
call this module, so the three compute a unit the same way.

Shapes: a frame [3, H, W] float32 in [0, 1]; a unit's frames [S, 3, H, W]; a batch of units
[B, S, 3, H, W]; features [B, F, N, C] (F = S for frames_kept "all", 1 for "last"; N = h*w
patch tokens; C channels), stored per unit as [F, N, C].

Example:
    >>> from featstore.build.encode import encode_unit
    >>> from featstore.encoders import get_encoder
    >>> from featstore.build.plan import plan_units
    >>> encoder = get_encoder("vggt-tiny")
    >>> unit = plan_units("data")[0]                      # misc/portrait.png, a unit of one frame
    >>> features, metadata = encode_unit(encoder, "data", unit)
    >>> features.dtype, features.shape[0], sorted(metadata)
    (torch.bfloat16, 1, ['encoder', 'fingerprint', 'frames', 'grid', 'sources'])
"""

from __future__ import annotations

import hashlib
import json
import os

import torch

from featstore.format.codecs import codec_for
from featstore.encoders import preprocess_frame
from featstore.errors import ImageDecodeError
from featstore.build.plan import Unit
from featstore.encoders.video import decode_video_frames, probe_video
from featstore.format.frame_ref import is_video_path, parse_frame_ref
from featstore.format.keys import source_path

__all__ = ["read_frame", "read_unit_frames", "encode_frames", "encode_unit", "unit_metadata",
           "encoder_for_manifest"]


def read_frame(data_root: str, frame_key: str, spec, patch_size: int, *, uint8: bool = False) -> tuple[torch.Tensor, dict]:
    """Read one frame file once: its preprocessed tensor and its identity.

    Args:
        data_root: the folder keys are relative to.
        frame_key: the frame's key (relative path).
        spec: the EncoderSpec: its family's frame reader (`featstore.encoders.preprocess_frame`:
            the VGGT view, or the Qwen image derived from it) with its `preprocess`.
        patch_size: the encoder's patch size.
        uint8: the uint8 values k of k/255 where exact (`featstore.encoders.preprocess_image`).

    Returns:
        (tensor [3, H, W] float32 in [0, 1] (uint8 with `uint8`, where exact), source dict
        {"size", "mtime_ns", "sha256"} as the entry's metadata records it).

    Raises:
        ImageDecodeError: the file cannot be read or decoded (the message names its path).
    """
    path = source_path(data_root, frame_key)
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except OSError as e:
        raise ImageDecodeError(f"image {path!r}: {e.strerror}; check that the file exists and is readable") from None
    source = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": hashlib.sha256(data).hexdigest()}
    return preprocess_frame(data, spec, patch_size, name=path, uint8=uint8), source


def read_unit_frames(data_root: str, unit: Unit, spec, patch_size: int, *,
                     uint8: bool = False) -> tuple[torch.Tensor, list[dict]]:
    """All frames of one unit, in call order: (frames [S, 3, H, W] float32, source dicts);
    with `uint8`, uint8 frames where exact (`read_frame`).

    A frame of a container video ("clips/a.mp4#12", `featstore.format.frame_ref`) is decoded
    at its exact index (`featstore.encoders.video`), each video once per unit; its source dict
    is the video file's.

    Raises:
        ImageDecodeError: a frame cannot be read (a video: cannot be decoded, or is truncated), or the frames preprocess to different sizes
            (one encoder call needs one size); the message names the unit.
    """
    videos = _decode_videos(data_root, unit)
    frames, sources = zip(*(read_frame(data_root, f, spec, patch_size, uint8=uint8) if f not in videos
                            else (preprocess_frame(videos[f][0], spec, patch_size, name=f, uint8=uint8), videos[f][1])
                            for f in unit.frames))
    shapes = {tuple(t.shape) for t in frames}
    if len(shapes) != 1:
        raise ImageDecodeError(f"unit {unit.key!r}: frames preprocess to different sizes {sorted(shapes)}; "
                               "one encoder call needs frames of one size (use pad mode or extra_resize)")
    return torch.stack(frames), list(sources)


def _decode_videos(data_root: str, unit: Unit) -> dict[str, tuple]:
    """{frame ref: (PIL image, source dict)} for the unit's container-video frames."""
    by_video: dict[str, list[tuple[str, int]]] = {}
    for ref in unit.frames:
        video, index = parse_frame_ref(ref)
        if index is not None:
            by_video.setdefault(video, []).append((ref, index))
        elif is_video_path(ref):  # planned without indices: the video could not be opened then
            probe_video(source_path(data_root, ref))  # raises, naming the file and why
            raise ImageDecodeError(f"video {source_path(data_root, ref)!r} could not be read when the plan was made; "
                                   "rerun the command (it plans the video's frames anew)")
    out: dict[str, tuple] = {}
    for video, refs in by_video.items():
        path = source_path(data_root, video)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                h = hashlib.sha256()
                while block := f.read(1 << 20):
                    h.update(block)
                digest = h.hexdigest()
        except OSError as e:
            raise ImageDecodeError(f"video {path!r}: {e.strerror}; check that the file exists and is readable") from None
        source = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        images = decode_video_frames(path, [i for _, i in refs])
        out.update({ref: (image, source) for (ref, _), image in zip(refs, images)})
    return out


def encode_frames(encoder, frames: torch.Tensor, *, stream: bool = False,
                  index: torch.Tensor | None = None) -> torch.Tensor:
    """Run the encoder on a batch of units: [B, S, 3, H, W] -> [B, F, N, C] in the spec's
    storage dtype (bfloat16 for fp8 storage, see the codec's `read_dtype`), on the encoder's device (no copy to the host: training's online path keeps
    it on the GPU; the cast happens there too).

    Args:
        encoder: an Encoder (featstore.encoders.base).
        frames: [B, S, 3, H, W] float32 in [0, 1], on any device.
        stream: feed one frame per call through the key/value cache (`encoder.encode_stream`),
            as streaming models train; needs a causal spec on the featstore backend.
        index: [B, S] long, or None. Given, `frames` are the batch's distinct frames [U, 3, H, W]
            and unit b's frame k is frames[index[b, k]] (`encoder.encode_indexed`: each distinct
            frame is embedded once; only for an encoder whose `encodes_indexed` is True).

    Returns:
        features [B, F, N, C], dtype = codec_for(spec.storage_dtype).read_dtype(), device = encoder.device.
    """
    if index is not None:
        feats = encoder.encode_indexed(frames, index)
    else:
        feats = encoder.encode_stream(frames) if stream else encoder.encode(frames)
    return feats.to(codec_for(encoder.spec.storage_dtype).read_dtype())


def unit_metadata(unit: Unit, sources: list[dict], grid: tuple[int, int], spec) -> dict[str, str]:
    """The `__metadata__` of a stored entry (docs/FORMAT.md): frame list, source identities,
    patch grid (rows, cols), the spec's fingerprint and the encoder name (all strings)."""
    return {
        "frames": json.dumps(list(unit.frames), ensure_ascii=False),
        "sources": json.dumps(sources, sort_keys=True),
        "grid": json.dumps(list(grid)),
        "fingerprint": spec.fingerprint(),
        "encoder": spec.encoder,
    }


def encode_unit(encoder, data_root: str, unit: Unit) -> tuple[torch.Tensor, dict[str, str]]:
    """Encode one unit directly: (features [F, N, C] as `encode_frames` returns them, on the CPU;
    metadata). `codec_for(spec.storage_dtype).encode(features)` makes the stored tensors.

    Raises:
        ImageDecodeError: a frame cannot be read, or the frames differ in size.
    """
    frames, sources = read_unit_frames(data_root, unit, encoder.spec, encoder.patch_size)
    feats = encode_frames(encoder, frames[None])[0].cpu()
    grid = encoder.patch_grid(*frames.shape[-2:])
    return feats, unit_metadata(unit, sources, grid, encoder.spec)


def encoder_for_manifest(manifest: dict, *, weights: str | None = None, device: str = "cpu"):
    """Rebuild the encoder a store was built with (verify --recompute), from its manifest spec.

    Raises:
        FingerprintMismatchError: the rebuilt encoder's spec differs (other weights were
            given); every differing field is named with both values.
    """
    from featstore.encoders import EncoderSpec, encoder_for_spec

    return encoder_for_spec(EncoderSpec.from_dict(manifest["encoder"]), weights=weights, device=device)
