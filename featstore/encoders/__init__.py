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
through it (`featstore.encode.read_frame`).

Example:
    >>> from featstore.encoders import get_encoder, resolve_spec
    >>> spec = resolve_spec("vggt-tiny", attention="causal", frames_kept="last")  # no model built
    >>> enc = get_encoder("vggt-tiny", attention="causal", frames_kept="last")
    >>> enc.spec.fingerprint() == spec.fingerprint()
    True
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional

from featstore.errors import EncoderError, WeightsError

from .spec import EncoderSpec, PreprocessSpec, spec_mismatch_details
from .qwen_config import DEFAULT_TARGET_SIZE as QWEN_DEFAULT_TARGET
from .qwen_config import TINY_SEED as QWEN_TINY_SEED
from .qwen_config import TINY_TARGET_SIZE as QWEN_TINY_TARGET
from .qwen_config import TINY_VISION_CONFIG
from .vggt_config import CODE_VERSION, TINY_CONFIG, TINY_SEED, TINY_TARGET_SIZE, VGGT_1B_CONFIG

__all__ = ["register_encoder", "available_encoders", "get_encoder", "resolve_spec", "encoder_for_spec",
           "unit_of", "feature_set_of", "UNIT_KINDS", "PRIMARY_FEATURE_SET",
           "preprocess_frame", "stored_shape", "check_device", "EncoderSpec", "PreprocessSpec", "VGGTPreset", "QwenVisionPreset",
           "TINY_CONFIG", "OFFICIAL_INSTALL_HINT", "SPEC_OPTIONS", "BUILD_OPTIONS"]

OFFICIAL_INSTALL_HINT = (
    "pip install git+https://github.com/facebookresearch/vggt (it does not list torch as a "
    "dependency), or put a checkout's parent folder of `vggt/` on PYTHONPATH"
)

# Spec fields a caller may override, and the short names for the preprocessing ones.
SPEC_OPTIONS = ("layer", "attention", "frames_kept", "compute_dtype", "storage_dtype", "preprocess",
                "reference_frame")
_PREPROCESS_SHORT = {"preprocess_mode": "mode", "mode": "mode", "target_size": "target_size",
                     "extra_resize": "extra_resize", "resample": "resample"}
# Options that choose how the spec is computed, not what it is (compile) or which code runs it.
BUILD_OPTIONS = ("backend", "compile")
BACKENDS = ("featstore", "official")


# What one encoder call covers: "sequence" (a sample's ordered frames in one call, VGGT) or
# "image" (each image alone: an encoder that attends within one image, Qwen's vision tower).
UNIT_KINDS = ("sequence", "image")
# The feature set VGGT encoders write: the store's original `features` sub-database.
PRIMARY_FEATURE_SET = "vggt"


@dataclasses.dataclass(frozen=True)
class _Registered:
    factory: Callable[..., Any]
    spec: Optional[Callable[..., EncoderSpec]]
    unit: str = "sequence"
    feature_set: str = PRIMARY_FEATURE_SET
    preprocess: Optional[Callable[..., Any]] = None
    shape: Optional[Callable[..., Any]] = None


_REGISTRY: Dict[str, _Registered] = {}


def register_encoder(name: str, factory: Callable[..., Any], *, spec: Optional[Callable[..., EncoderSpec]] = None,
                     unit: str = "sequence", feature_set: str = PRIMARY_FEATURE_SET,
                     preprocess: Optional[Callable[..., Any]] = None, shape: Optional[Callable[..., Any]] = None,
                     overwrite: bool = False) -> None:
    """Register an encoder preset.

    Args:
        name: the registry name (`--encoder NAME`).
        factory: ``factory(*, weights, device, **options) -> Encoder``.
        spec: ``spec(*, weights, **options) -> EncoderSpec`` that builds no model (for
            `resolve_spec`); without it `resolve_spec(name)` raises EncoderError.
        unit: what one encoder call covers, "sequence" (a sample's frames, in order) or "image"
            (each image alone); the build plans its units by it.
        feature_set: the store's feature set the build writes by default (`--feature-set`).
        preprocess: ``preprocess(source, spec, *, patch_size, name) -> [3, H, W]``, the frame
            reader of this family (`preprocess_frame`); None: the VGGT view (`preprocess_image`).
        shape: ``shape(spec, width, height, num_frames) -> (F, N, C)``, the stored shape of a unit
            of source images that size (`stored_shape`); None: VGGT's.
        overwrite: replace an existing registration instead of refusing.
    """
    if not name or not isinstance(name, str):
        raise EncoderError(f"encoder name must be a non-empty string. Found {name!r}")
    if name in _REGISTRY and not overwrite:
        raise EncoderError(f"encoder {name!r} is already registered (pass overwrite=True to replace it)")
    if unit not in UNIT_KINDS:
        raise EncoderError(f"encoder {name!r}: unit must be one of {UNIT_KINDS}. Found {unit!r}")
    _REGISTRY[name] = _Registered(factory, spec, unit, feature_set, preprocess, shape)


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


def preprocess_frame(source, spec: EncoderSpec, patch_size: int, *, name: Optional[str] = None):
    """One image (path or bytes) -> the encoder input [3, H, W] float32 in [0, 1] of `spec`'s family.

    VGGT presets (and a spec whose encoder is not registered here): the VGGT view,
    `preprocess_image(source, spec.preprocess)`. Qwen vision presets: the Qwen image derived
    from that view (`featstore.encoders.preprocess.qwen_frame`), as training makes it.

    Args:
        source: a path, or the image bytes.
        spec: the EncoderSpec (its `encoder` picks the family, its `preprocess` the view).
        patch_size: the encoder's patch size.
        name: how errors name the image when `source` is bytes.

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
        return entry.preprocess(source, spec, patch_size=patch_size, name=name)
    from .preprocess import preprocess_image

    return preprocess_image(source, spec.preprocess, patch_size=patch_size, name=name)


def stored_shape(spec: EncoderSpec, width: int, height: int, num_frames: int = 1):
    """The [F, N, C] a unit of `num_frames` width x height source images is stored as, without
    decoding or encoding anything (the build's size estimate). The family is chosen as in
    `preprocess_frame`.

    Example:
        >>> from featstore.encoders import resolve_spec, stored_shape
        >>> stored_shape(resolve_spec("vggt-tiny"), 640, 480, 3)                # 112x84 view: 8x6 patches
        (3, 48, 128)
        >>> stored_shape(resolve_spec("qwen2.5-vl-vision-tiny"), 480, 640)     # 112x112 -> 8x8
        (1, 64, 32)
    """
    entry = _REGISTRY.get(spec.encoder)
    if entry is not None and entry.shape is not None:
        return entry.shape(spec, width, height, num_frames)
    from .preprocess import view_size

    p = int(spec.config["patch_size"])
    w, h = view_size(width, height, spec.preprocess, p)
    return (1 if spec.frames_kept == "last" else num_frames), (h // p) * (w // p), 2 * int(spec.config["embed_dim"])


def _registered(name: str) -> _Registered:
    if name not in _REGISTRY:
        raise EncoderError(f"unknown encoder {name!r}; available: {available_encoders()}; pass one of them "
                           "(CLI: --encoder)")
    return _REGISTRY[name]


def resolve_spec(name: str = "vggt-1b", *, weights: Optional[str] = None, **overrides) -> EncoderSpec:
    """The `EncoderSpec` that `get_encoder(name, weights=weights, **overrides)` would have,
    without building the model or loading the weights.

    The weights' sha256 comes from the hash cache (`featstore.encoders.weights.sha256_file`),
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


def encoder_for_spec(spec: EncoderSpec, *, weights: Optional[str] = None, device: str = "cpu"):
    """Rebuild the encoder that computed `spec` (a store's manifest spec), for a recompute.

    Raises:
        FingerprintMismatchError: the rebuilt encoder's spec differs (other weights, other
            code version); the message names every differing field with both values.
    """
    from featstore.errors import FingerprintMismatchError

    encoder = get_encoder(spec.encoder, weights=weights, device=device, **spec.overrides())
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


# ---- VGGT presets -------------------------------------------------------------------------


def _apply_overrides(spec: EncoderSpec, overrides: Dict[str, Any]) -> EncoderSpec:
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


def _official_version() -> str:
    try:
        from importlib.metadata import version

        return "vggt-" + version("vggt")
    except Exception:  # vendored checkout without metadata
        return "vggt-unversioned"


@dataclasses.dataclass(frozen=True)
class VGGTPreset:
    """A VGGT aggregator preset: its spec (`spec`, no model) and its encoder (`build`).

    Args:
        name: the preset's name as the error messages give it.
        config: the aggregator config (official Aggregator argument names).
        default_target: the preprocessing target size unless overridden.
        random_seed: without weights, use this seed's random weights (weights, when given, are
            loaded instead); None: weights required.
        backend: force this backend (vggt-official); None: the caller chooses (default featstore).
        spec_name: the `encoder` field of the spec (default `name`).

    Example:
        >>> from featstore.encoders import TINY_CONFIG, VGGTPreset, register_encoder
        >>> p = VGGTPreset("tiny-seed-3", TINY_CONFIG, default_target=112, random_seed=3)
        >>> register_encoder(p.name, p.build, spec=p.spec, overwrite=True)
        >>> p.spec().weights_sha256
        'random-seed-3'
    """

    name: str
    config: Dict[str, Any]
    default_target: int
    random_seed: Optional[int] = None
    backend: Optional[str] = None
    spec_name: Optional[str] = None

    def _prepare(self, weights, options: Dict[str, Any]):
        """Every argument checked before any work (building VGGT-1B takes seconds and 3.6 GB)."""
        from .weights import resolve_weights

        options = dict(options)
        backend = options.pop("backend", self.backend or "featstore")
        compile = options.pop("compile", False)
        if self.backend is not None and backend != self.backend:
            raise EncoderError(f"encoder {self.name!r} always uses backend={self.backend!r}; leave the backend "
                               "option out")
        if backend not in BACKENDS:
            raise EncoderError(f"backend must be 'featstore' or 'official'. Found {backend!r}")
        if weights is None and self.random_seed is None:
            raise WeightsError(
                f"encoder {self.name!r} needs weights: pass weights='/path/to/model.safetensors' (or model.pt), "
                f"or the hub id 'facebook/VGGT-1B' on a machine with internet (CLI: --weights). For a "
                f"weightless smoke test use the 'vggt-tiny' encoder."
            )
        path = resolve_weights(weights) if weights is not None else None
        config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.config.items()}
        code_version = _official_version() if backend == "official" else CODE_VERSION
        spec = EncoderSpec(encoder=self.spec_name or self.name, implementation=backend, code_version=code_version,
                           config=config, weights_sha256="?", preprocess=PreprocessSpec(target_size=self.default_target))
        spec = _apply_overrides(spec, options)
        if backend == "official":
            if spec.attention != "full":
                raise EncoderError("the official vggt package has no causal mode; use backend='featstore' "
                                   "for attention='causal'")
            if compile:
                raise EncoderError("compile=True is only supported with backend='featstore'")
        return spec, path, backend, bool(compile)

    def spec(self, *, weights=None, **options) -> EncoderSpec:
        """The spec `build` would give, without a model (the weights file is hashed, not loaded)."""
        from .weights import weights_sha256

        spec, path, _, _ = self._prepare(weights, options)
        digest = weights_sha256(path) if path is not None else f"random-seed-{self.random_seed}"
        return spec.replace(weights_sha256=digest)

    def build(self, *, weights=None, device="cpu", **options):
        """Build the encoder: the model on CPU, weights loaded strictly, then moved to `device`."""
        spec, path, backend, compile = self._prepare(weights, options)
        if backend == "official":
            try:
                from vggt.models.aggregator import Aggregator
            except ImportError as e:
                raise EncoderError(f"backend='official' needs the official `vggt` package ({e}). "
                                   f"{OFFICIAL_INSTALL_HINT}") from e
        from . import vggt as V
        from .vggt_encoder import VGGTEncoder
        from .weights import load_aggregator_state, load_into, weights_sha256

        config = dict(spec.config)
        # Build on CPU, load, then move: a 5 GB checkpoint never sits twice on the GPU.
        if path is None:
            # Random weights come from our aggregator's seeded init, whichever backend runs them.
            ours = V.init_random_(V.VGGTAggregator(**config), self.random_seed)
            state, source = ours.state_dict(), f"random-seed-{self.random_seed}"
            digest = source
        else:
            ours, state, source = None, load_aggregator_state(path), str(path)
        if backend == "official":
            model = Aggregator(**config)
        else:
            model = ours if ours is not None else V.VGGTAggregator(**config)
        del ours
        load_into(model, state, source)
        del state
        if path is not None:
            digest = weights_sha256(path)  # after the strict load: a wrong file fails fast, unhashed
        spec = spec.replace(weights_sha256=digest)
        model = model.to(device).eval().requires_grad_(False)
        if compile:
            model.compile_blocks()
        return VGGTEncoder(spec, model, device, backend=backend)


_VGGT_1B = VGGTPreset("vggt-1b", VGGT_1B_CONFIG, default_target=518)
_VGGT_TINY = VGGTPreset("vggt-tiny", TINY_CONFIG, default_target=TINY_TARGET_SIZE, random_seed=TINY_SEED)
# The official package runs the same VGGT-1B model: its spec is vggt-1b's, implementation "official".
_VGGT_OFFICIAL = VGGTPreset("vggt-official", VGGT_1B_CONFIG, default_target=518, backend="official",
                            spec_name="vggt-1b")


register_encoder("vggt-1b", _VGGT_1B.build, spec=_VGGT_1B.spec)
register_encoder("vggt-tiny", _VGGT_TINY.build, spec=_VGGT_TINY.spec)
register_encoder("vggt-official", _VGGT_OFFICIAL.build, spec=_VGGT_OFFICIAL.spec)


# ---- Qwen2.5-VL vision presets ----------------------------------------------------------

QWEN_BACKEND = "transformers"


def _qwen_frame(source, spec: EncoderSpec, *, patch_size: int, name: Optional[str] = None):
    from .preprocess import qwen_frame

    return qwen_frame(source, spec.preprocess, patch_size=patch_size,
                      merge_size=int(spec.config["spatial_merge_size"]), name=name)


def _qwen_shape(spec: EncoderSpec, width: int, height: int, num_frames: int):
    from .preprocess import view_size

    p, m = int(spec.config["patch_size"]), int(spec.config["spatial_merge_size"])
    w, h = view_size(width, height, spec.preprocess, p)
    grid_h, grid_w = (h // p) // m * m, (w // p) // m * m  # qwen_view's trim to whole merge blocks
    return num_frames, grid_h * grid_w, int(spec.config["hidden_size"])


@dataclasses.dataclass(frozen=True)
class QwenVisionPreset:
    """A Qwen2.5-VL vision tower preset (merger removed): its spec (`spec`, no model) and its
    encoder (`build`, a `featstore.encoders.qwen_vision.QwenVisionEncoder`).

    The spec's config is the checkpoint's config.json `vision_config` (featstore.encoders.
    qwen_config.spec_config), or `vision_config` for a preset that fixes one; its preprocess is
    the VGGT view the Qwen image derives from. Only layer -1 (the last block's output), full
    attention and frames_kept "all" exist for this tower.

    Args:
        name: the registry name (the spec's `encoder`).
        default_target: the VGGT view's target size unless overridden.
        vision_config: a fixed vision config (the tiny preset); None: the checkpoint's.
        random_seed: without weights, seeded random weights (`qwen_vision.init_random_`); None:
            weights required.

    Example:
        >>> from featstore.encoders import resolve_spec
        >>> spec = resolve_spec("qwen2.5-vl-vision-tiny")
        >>> spec.implementation, spec.layer_resolved, spec.weights_sha256, spec.preprocess.target_size
        ('transformers', 1, 'random-seed-0', 112)
    """

    name: str
    default_target: int
    vision_config: Optional[Dict[str, Any]] = None
    random_seed: Optional[int] = None

    def _prepare(self, weights, options: Dict[str, Any]):
        """Every argument checked before any work; returns (spec without digest, checkpoint or None)."""
        from .qwen_config import CODE_VERSION as QWEN_CODE_VERSION
        from .qwen_config import spec_config
        from .qwen_weights import resolve_checkpoint

        options = dict(options)
        backend = options.pop("backend", QWEN_BACKEND)
        if backend != QWEN_BACKEND:
            raise EncoderError(f"encoder {self.name!r} runs transformers' Qwen2.5-VL code only: backend must be "
                               f"{QWEN_BACKEND!r}. Found {backend!r}")
        if options.pop("compile", False):
            raise EncoderError(f"compile=True is not supported by encoder {self.name!r} (it runs transformers' "
                               "vision forward as is); leave --compile off")
        if weights is None and self.random_seed is None:
            raise WeightsError(
                f"encoder {self.name!r} needs weights: pass a Qwen2.5-VL checkpoint, e.g. "
                f"weights='/path/to/Qwen2.5-VL-3B-Instruct' (its folder: config.json and model.safetensors or the "
                f"shards), or the hub id 'Qwen/Qwen2.5-VL-3B-Instruct' on a machine with internet (CLI: --weights). "
                f"For a weightless smoke test use the 'qwen2.5-vl-vision-tiny' encoder.")
        ckpt = resolve_checkpoint(weights) if weights is not None else None
        if self.vision_config is not None:
            config = spec_config(self.vision_config, source=f"encoder {self.name!r}")
            if ckpt is not None and ckpt.vision_config is not None:
                theirs = spec_config(ckpt.vision_config, source=str(ckpt.config_path))
                differ = sorted(k for k in config if config[k] != theirs.get(k))
                if differ:
                    raise WeightsError(
                        f"checkpoint config {str(ckpt.config_path)!r} is not encoder {self.name!r}'s vision config: "
                        + "; ".join(f"{k}: checkpoint {theirs.get(k)!r}, preset {config[k]!r}" for k in differ)
                        + ". Use the 'qwen2.5-vl-vision' encoder for this checkpoint")
        else:
            if ckpt.vision_config is None:
                raise WeightsError(
                    f"weights {ckpt.where()!r} have no config.json beside them: encoder {self.name!r} takes the "
                    "vision config from config.json's vision_config; pass the checkpoint folder "
                    "(--weights /path/to/Qwen2.5-VL-3B-Instruct)")
            config = spec_config(ckpt.vision_config, source=str(ckpt.config_path))
        spec = EncoderSpec(encoder=self.name, implementation=QWEN_BACKEND, code_version=QWEN_CODE_VERSION,
                           config=config, weights_sha256="?", layer=-1, qwen_view="crop",
                           preprocess=PreprocessSpec(target_size=self.default_target))
        spec = _apply_overrides(spec, options)
        for field, want in (("layer", -1), ("attention", "full"), ("frames_kept", "all"),
                            ("reference_frame", "first")):
            if getattr(spec, field) != want:
                raise EncoderError(
                    f"encoder {self.name!r} offers {field}={want!r} only (the vision tower's output before the "
                    f"merger, each image on its own). Found {getattr(spec, field)!r}")
        return spec, ckpt

    def spec(self, *, weights=None, **options) -> EncoderSpec:
        """The spec `build` would give, without a model (the checkpoint is hashed, not loaded)."""
        spec, ckpt = self._prepare(weights, options)
        return spec.replace(weights_sha256=ckpt.sha256() if ckpt is not None else f"random-seed-{self.random_seed}")

    def build(self, *, weights=None, device="cpu", **options):
        """Build the tower on CPU, load the checkpoint strictly (or seed it), then move it to `device`."""
        spec, ckpt = self._prepare(weights, options)
        from .qwen_vision import QwenVisionEncoder, build_vision_tower, init_random_
        from .qwen_weights import load_vision_into, load_vision_state

        vision_config = self.vision_config if self.vision_config is not None else ckpt.vision_config
        model = build_vision_tower(vision_config)
        if ckpt is None:
            init_random_(model, self.random_seed)
            digest = f"random-seed-{self.random_seed}"
        else:
            state = load_vision_state(ckpt)
            load_vision_into(model, state, ckpt)
            del state
            digest = ckpt.sha256()  # after the strict load: a wrong checkpoint fails fast, unhashed
        model = model.to(device).eval().requires_grad_(False)
        return QwenVisionEncoder(spec.replace(weights_sha256=digest), model, device)


_QWEN = QwenVisionPreset("qwen2.5-vl-vision", QWEN_DEFAULT_TARGET)
_QWEN_TINY = QwenVisionPreset("qwen2.5-vl-vision-tiny", QWEN_TINY_TARGET, vision_config=TINY_VISION_CONFIG,
                              random_seed=QWEN_TINY_SEED)

for _preset in (_QWEN, _QWEN_TINY):
    # One unit per image: the tower attends within one image only.
    register_encoder(_preset.name, _preset.build, spec=_preset.spec, unit="image", feature_set="qwen_vision",
                     preprocess=_qwen_frame, shape=_qwen_shape)
del _preset
