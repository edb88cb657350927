"""The encoder registry: named presets that resolve an `EncoderSpec` and build an `Encoder`.

`resolve_spec(name, **options)` gives the spec (and so the fingerprint) WITHOUT building the
model or loading weights: training in cache mode and `featstore build --dry-run` use it.
`get_encoder(name, **options)` builds the encoder; its `.spec` equals `resolve_spec` of the
same arguments. A family registers its presets here (featstore/encoders/<family>/preset.py) with
its frame reader and its stored-shape rule; nothing else in featstore knows a family.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Dict, List, Optional, Tuple

from featstore.contract.spec import EncoderSpec, PreprocessSpec, spec_mismatch_details
from featstore.contract.naming import (PRIMARY_FEATURE_SET, build_command_for_set, check_feature_set,
                                       default_feature_set, register_set_writer)
from featstore.errors import EncoderError

# Spec fields a caller may override, and the short names for the preprocessing ones.
SPEC_OPTIONS = ("layer", "attention", "frames_kept", "compute_dtype", "storage_dtype", "preprocess",
                "reference_frame")
_PREPROCESS_SHORT = {"preprocess_mode": "mode", "mode": "mode", "target_size": "target_size",
                     "extra_resize": "extra_resize", "resample": "resample"}
# Options that choose how the spec is computed, not what it is (compile, the Qwen tower's
# vision_attention) or which code runs it.
BUILD_OPTIONS = ("backend", "compile", "vision_attention")


# What one encoder call covers: "sequence" (a sample's ordered frames in one call, VGGT) or
# "image" (each image alone: an encoder that attends within one image, Qwen's vision tower).
UNIT_KINDS = ("sequence", "image")


@dataclasses.dataclass(frozen=True)
class _Registered:
    factory: Callable[..., Any]
    spec: Optional[Callable[..., EncoderSpec]]
    unit: str = "sequence"
    feature_set: str = PRIMARY_FEATURE_SET
    preprocess: Optional[Callable[..., Any]] = None
    shape: Optional[Callable[..., Any]] = None
    channels: Optional[Callable[..., int]] = None


_REGISTRY: Dict[str, _Registered] = {}


def register_encoder(name: str, factory: Callable[..., Any], *, spec: Optional[Callable[..., EncoderSpec]] = None,
                     unit: str = "sequence", feature_set: str = PRIMARY_FEATURE_SET,
                     preprocess: Optional[Callable[..., Any]] = None, shape: Optional[Callable[..., Any]] = None,
                     channels: Optional[Callable[..., int]] = None, overwrite: bool = False) -> None:
    """Register an encoder preset.

    Args:
        name: the registry name (`--encoder NAME`).
        factory: ``factory(*, weights, device, **options) -> Encoder``.
        spec: ``spec(*, weights, **options) -> EncoderSpec`` that builds no model (for
            `resolve_spec`); without it `resolve_spec(name)` raises EncoderError.
        unit: what one encoder call covers, "sequence" (a sample's frames, in order) or "image"
            (each image alone); the build plans its units by it.
        feature_set: the store's feature set the build writes by default (`--feature-set`).
        preprocess: ``preprocess(source, spec, *, patch_size, name[, uint8]) -> [3, H, W]``, the
            frame reader of this family (`preprocess_frame`; `uint8` as for `preprocess_image`,
            optional); None: the view itself (`preprocess_image`).
        shape: ``shape(spec, width, height, num_frames) -> (F, N, C)``, the stored shape of a unit
            of source images that size (`stored_shape`); None: ``(frames_stored, tokens of the
            view's whole patch grid, channels(spec))``.
        channels: ``channels(spec) -> C``, the channels of a stored token (`stored_channels`):
            the family's rule (VGGT: 2 x embed_dim). Without it `stored_channels` and the
            default `stored_shape` raise EncoderError.

    A hook left None is taken from the preset the factory belongs to, when it offers them: a
    bound method of an object with a `family_hooks` dict (`VGGTPreset`, `QwenVisionPreset`),
    so ``register_encoder(name, preset.build, spec=preset.spec)`` registers the family's rules.
        overwrite: replace an existing registration instead of refusing.

    Example (a family's channels rule, as encoders/vggt/preset.py registers it):
        >>> from featstore.encoders import resolve_spec
        >>> from featstore.encoders.vggt.preset import vggt_channels
        >>> vggt_channels(resolve_spec("vggt-tiny"))   # frame-attention || global-attention output
        128
    """
    if not name or not isinstance(name, str):
        raise EncoderError(f"encoder name must be a non-empty string. Found {name!r}")
    if name in _REGISTRY and not overwrite:
        raise EncoderError(f"encoder {name!r} is already registered (pass overwrite=True to replace it)")
    if unit not in UNIT_KINDS:
        raise EncoderError(f"encoder {name!r}: unit must be one of {UNIT_KINDS}. Found {unit!r}")
    check_feature_set(feature_set)
    family = getattr(getattr(factory, "__self__", None), "family_hooks", None) or {}
    preprocess = preprocess if preprocess is not None else family.get("preprocess")
    shape = shape if shape is not None else family.get("shape")
    channels = channels if channels is not None else family.get("channels")
    _REGISTRY[name] = _Registered(factory, spec, unit, feature_set, preprocess, shape, channels)
    register_set_writer(name, feature_set)


def available_encoders() -> List[str]:
    """Registered encoder names, sorted."""
    return sorted(_REGISTRY)


def unit_of(name: str) -> str:
    """What one call of the registered encoder `name` covers: "sequence" or "image".

    Example:
        >>> from featstore.encoders import unit_of
        >>> unit_of("vggt-tiny")
        'sequence'
    """
    return _registered(name).unit


def feature_set_of(name: str) -> str:
    """The feature set a build with encoder `name` writes unless told otherwise.

    Example:
        >>> from featstore.encoders import feature_set_of
        >>> feature_set_of("vggt-1b")
        'vggt'
    """
    return _registered(name).feature_set


@functools.cache
def _takes_uint8(reader: Callable[..., Any]) -> bool:
    """Whether a registered frame reader takes `uint8=` (one written before it did does not)."""
    return "uint8" in inspect.signature(reader).parameters


def preprocess_frame(source, spec: EncoderSpec, patch_size: int, *, name: Optional[str] = None,
                     uint8: bool = False):
    """One image (path or bytes) -> the encoder input [3, H, W] float32 in [0, 1] of `spec`'s family
    (with `uint8`, its uint8 values k of k/255 where exact: `preprocess_image`).

    VGGT presets (and a spec whose encoder is not registered here): the VGGT view,
    `preprocess_image(source, spec.preprocess)`. Qwen vision presets: the Qwen image derived
    from that view (`featstore.encoders.preprocess.qwen_frame`), as training makes it.

    Args:
        source: a path, or the image bytes.
        spec: the EncoderSpec (its `encoder` picks the family, its `preprocess` the view).
        patch_size: the encoder's patch size.
        name: how errors name the image when `source` is bytes.
        uint8: as for `preprocess_image` (the build's decode workers).

    Raises:
        ImageDecodeError: the image cannot be decoded or is too small (the message names it).

    Example:
        >>> from featstore.encoders import preprocess_frame, resolve_spec
        >>> preprocess_frame("data/scene_a/000.jpg", resolve_spec("vggt-tiny"), 14).shape
        torch.Size([3, 84, 112])
        >>> preprocess_frame("data/scene_a/000.jpg", resolve_spec("qwen2.5-vl-vision-tiny"), 14).shape
        torch.Size([3, 84, 112])
    """
    entry = _REGISTRY.get(spec.encoder)
    if entry is not None and entry.preprocess is not None:
        if uint8 and _takes_uint8(entry.preprocess):
            return entry.preprocess(source, spec, patch_size=patch_size, name=name, uint8=True)
        return entry.preprocess(source, spec, patch_size=patch_size, name=name)  # float32: still correct
    from featstore.encoders.preprocess import preprocess_image

    return preprocess_image(source, spec.preprocess, patch_size=patch_size, name=name, uint8=uint8)


def frames_stored(spec: EncoderSpec, num_frames: int) -> int:
    """F, the frames a unit of `num_frames` frames keeps: all of them, or 1 (frames_kept "last").

    Example:
        >>> from featstore.encoders import frames_stored, resolve_spec
        >>> frames_stored(resolve_spec("vggt-tiny"), 8), frames_stored(resolve_spec("vggt-tiny", frames_kept="last"), 8)
        (8, 1)
    """
    return 1 if spec.frames_kept == "last" else int(num_frames)


def stored_channels(spec: EncoderSpec) -> int:
    """C, the channels of one stored token of `spec`'s family (VGGT: 2 x embed_dim, the frame-
    and global-attention outputs side by side; Qwen vision: hidden_size).

    A family that registered only a `shape` hook gets the C of its shape rule.

    Raises:
        EncoderError: `spec.encoder` is not registered in this process (its family is unknown),
            or registered neither a channels nor a shape rule.

    Example:
        >>> from featstore.encoders import resolve_spec, stored_channels
        >>> stored_channels(resolve_spec("vggt-tiny")), stored_channels(resolve_spec("qwen2.5-vl-vision-tiny"))
        (128, 32)
    """
    entry = _registered(spec.encoder)
    if entry.channels is None and entry.shape is not None:
        # A family with only a stored-shape rule: its channels do not depend on the image size.
        size = spec.preprocess.target_size
        return int(entry.shape(spec, size, size, 1)[2])
    if entry.channels is None:
        raise EncoderError(f"encoder {spec.encoder!r} registers no channels rule; register it with "
                           "register_encoder(..., channels=lambda spec: C), the channels of one stored token")
    return int(entry.channels(spec))


def stored_shape(spec: EncoderSpec, width: int, height: int, num_frames: int = 1) -> Tuple[int, int, int]:
    """The [F, N, C] a unit of `num_frames` width x height source images is stored as, without
    decoding or encoding anything (the build's size estimate, verify's shape check). The
    family's `shape` hook when it registered one, else F = `frames_stored`, N = the tokens of
    the view's patch grid (`featstore.encoders.preprocess.grid_tokens`), C = `stored_channels`.

    Example:
        >>> from featstore.encoders import resolve_spec, stored_shape
        >>> stored_shape(resolve_spec("vggt-tiny"), 640, 480, 3)                # 112x84 view: 8x6 patches
        (3, 48, 128)
        >>> stored_shape(resolve_spec("qwen2.5-vl-vision-tiny"), 480, 640)     # 112x112 -> 8x8
        (1, 64, 32)
    """
    entry = _registered(spec.encoder)
    if entry.shape is not None:
        return tuple(int(v) for v in entry.shape(spec, width, height, num_frames))
    from featstore.encoders.preprocess import grid_tokens

    tokens = grid_tokens(width, height, spec.preprocess, int(spec.config["patch_size"]))
    return frames_stored(spec, num_frames), tokens, stored_channels(spec)


def _registered(name: str) -> _Registered:
    if name not in _REGISTRY:
        raise EncoderError(f"unknown encoder {name!r}; available: {available_encoders()}; pass one of them "
                           "(CLI: --encoder)")
    return _REGISTRY[name]


def resolve_spec(name: str = "vggt-1b", *, weights: Optional[str] = None, **overrides) -> EncoderSpec:
    """The `EncoderSpec` that `get_encoder(name, weights=weights, **overrides)` would have,
    without building the model or loading the weights.

    The weights' sha256 comes from the hash cache (`featstore.encoders.vggt.weights.sha256_file`),
    or from hashing the file once (the file is read, not loaded).

    Args:
        name, weights, **overrides: as for `get_encoder` (device is not needed; compile is
            accepted and ignored: it does not change the features).

    Returns:
        The spec; ``resolve_spec(...).fingerprint() == get_encoder(...).spec.fingerprint()``.

    Raises:
        EncoderError: unknown name or option; WeightsError: a preset that needs weights got
            none (the error names the preset), or the weights file is missing / not a checkpoint.

    Example:
        >>> from featstore.encoders import resolve_spec
        >>> resolve_spec("vggt-tiny", layer=-1).layer_resolved
        3
    """
    entry = _registered(name)
    if entry.spec is None:
        raise EncoderError(f"encoder {name!r} registers no spec resolver; build it with get_encoder({name!r})")
    return entry.spec(weights=weights, **overrides)


def get_encoder(name: str = "vggt-1b", *, weights: Optional[str] = None, device: str = "cpu",
                **spec_overrides):
    """Build a registered encoder.

    Args:
        name: registry name (default "vggt-1b"); see `available_encoders()`.
        weights: weights file (model.safetensors / model.pt), a directory holding one, or a hub id.
        device: torch device string (default "cpu"): "cpu", "cuda", "cuda:N".
        **spec_overrides: layer (default -2), attention ("full"/"causal"), frames_kept
            ("all"/"last"), compute_dtype, storage_dtype, preprocess (PreprocessSpec or dict) or its
            fields preprocess_mode / target_size / extra_resize; plus backend ("featstore" or
            "official") and compile (bool: torch.compile the blocks, featstore backend).

    Raises:
        EncoderError: unknown name, option or device; WeightsError: weights missing or not matching.

    Example:
        >>> from featstore.encoders import get_encoder
        >>> get_encoder("vggt-tiny", layer=-1).spec.layer_resolved
        3
    """
    entry = _registered(name)
    check_device(device)
    return entry.factory(weights=weights, device=device, **spec_overrides)


def encoder_for_spec(spec: EncoderSpec, *, weights: Optional[str] = None, device: str = "cpu",
                     **build_options: Any):
    """Rebuild the encoder that computed `spec` (a store's manifest spec), for a recompute.
    `build_options`: BUILD_OPTIONS that change how it runs, not the spec (e.g. vision_attention).

    Raises:
        FingerprintMismatchError: the rebuilt encoder's spec differs (other weights, other
            code version); the message names every differing field with both values.
    """
    from featstore.errors import FingerprintMismatchError

    unknown = sorted(set(build_options) - set(BUILD_OPTIONS))
    if unknown:
        raise EncoderError(f"encoder_for_spec takes build options {', '.join(BUILD_OPTIONS)} besides the spec; "
                           f"got {', '.join(unknown)}")
    encoder = get_encoder(spec.encoder, weights=weights, device=device, **spec.overrides(), **build_options)
    differ = spec.diff(encoder.spec)
    if differ:
        raise FingerprintMismatchError(
            "the rebuilt encoder differs from the spec: " + spec_mismatch_details(spec, encoder.spec)
            + ". Pass the --weights the store was built with (and the featstore version it was built with)")
    return encoder


def check_device(device) -> None:
    """Refuse a device string torch cannot use here, naming it and what to pass instead."""
    if str(device) == "cpu":
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise EncoderError(f"device {str(device)!r} is not a torch device; pass cpu, cuda or cuda:N "
                           "(CLI: --device)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EncoderError(
                f"device {str(device)!r}: this torch {torch.__version__} sees no CUDA GPU (a CPU-only build, "
                "or no driver); pass --device cpu, or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise EncoderError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) "
                               f"are visible; pass cuda:0..cuda:{torch.cuda.device_count() - 1}")



def apply_overrides(spec: EncoderSpec, overrides: Dict[str, Any]) -> EncoderSpec:
    changes: Dict[str, Any] = {}
    pre: Dict[str, Any] = {}
    for k, v in overrides.items():
        if k in _PREPROCESS_SHORT:
            pre[_PREPROCESS_SHORT[k]] = v
        elif k in SPEC_OPTIONS:
            changes[k] = v
        else:
            raise EncoderError(
                f"unknown encoder option {k!r}; known: {sorted(SPEC_OPTIONS + tuple(_PREPROCESS_SHORT))} "
                f"and {', '.join(BUILD_OPTIONS)}"
            )
    if "preprocess" in changes and not isinstance(changes["preprocess"], PreprocessSpec):
        changes["preprocess"] = PreprocessSpec(**dict(changes["preprocess"]))
    if pre:
        base = changes.get("preprocess", spec.preprocess)
        changes["preprocess"] = dataclasses.replace(base, **pre)
    return spec.replace(**changes) if changes else spec

