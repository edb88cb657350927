"""Encoder registry: named presets that build an `Encoder` (VGGT first; others can register).

An Encoder offers `.spec` (EncoderSpec), `.device`, `load_image(path) -> [3, H, W]`,
`encode(frames [B, S, 3, H, W]) -> [B, F, N, C] float32` and `patch_grid(H, W) -> (h, w)`.

Presets:
    vggt-1b        VGGT-1B aggregator, in-tree implementation; needs `weights` (path or hub id).
    vggt-tiny      tiny random aggregator (seed 0; conv patch embed, 64 dims, depth 4, 112 px
                   preprocessing) for tests and demos; its spec says weights_sha256="random-seed-0".
    vggt-official  VGGT-1B through the installed official `vggt` package (full attention only).
Any preset also takes `backend="official"`.

Example:
    >>> enc = get_encoder("vggt-1b", weights="facebook/VGGT-1B", device="cuda", attention="causal",
    ...                   frames_kept="last", target_size=644)
    >>> feats = enc.encode(torch.stack([enc.load_image(p) for p in paths])[None])  # [1, 1, N, 2048]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional

from featstore.errors import EncoderError, WeightsError

from .spec import EncoderSpec, PreprocessSpec

__all__ = ["register_encoder", "available_encoders", "get_encoder", "EncoderSpec", "PreprocessSpec",
           "TINY_CONFIG", "OFFICIAL_INSTALL_HINT"]

_REGISTRY: Dict[str, Callable[..., Any]] = {}

OFFICIAL_INSTALL_HINT = (
    "pip install git+https://github.com/facebookresearch/vggt (it does not list torch as a "
    "dependency), or put a checkout's parent folder of `vggt/` on PYTHONPATH"
)

# The tiny preset: small enough for CPU tests (head_dim 16, divisible by 4 for 2-D RoPE).
TINY_CONFIG: Dict[str, Any] = dict(
    img_size=112, patch_size=14, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0,
    num_register_tokens=4, qkv_bias=True, proj_bias=True, ffn_bias=True, patch_embed="conv",
    aa_order=["frame", "global"], aa_block_size=1, qk_norm=True, rope_freq=100, init_values=0.01,
)
TINY_SEED = 0
TINY_TARGET_SIZE = 112  # 112x84 crops of a 4:3 image: 8x6 patches, fast on CPU

# Spec fields a caller may override, and the short names for the preprocessing ones.
_SPEC_OVERRIDES = ("layer", "attention", "frames_kept", "compute_dtype", "storage_dtype", "preprocess")
_PREPROCESS_SHORT = {"preprocess_mode": "mode", "mode": "mode", "target_size": "target_size",
                     "extra_resize": "extra_resize", "resample": "resample"}


def register_encoder(name: str, factory: Callable[..., Any], *, overwrite: bool = False) -> None:
    """Register `factory(*, weights, device, backend, compile, **spec_overrides) -> Encoder` as `name`."""
    if not name or not isinstance(name, str):
        raise EncoderError(f"encoder name must be a non-empty string. Found {name!r}")
    if name in _REGISTRY and not overwrite:
        raise EncoderError(f"encoder {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = factory


def available_encoders() -> List[str]:
    """Registered encoder names, sorted."""
    return sorted(_REGISTRY)


def get_encoder(name: str = "vggt-1b", *, weights: Optional[str] = None, device: str = "cpu",
                **spec_overrides):
    """Build a registered encoder.

    Args:
        name: registry name (default "vggt-1b"); see `available_encoders()`.
        weights: weights file (model.safetensors / model.pt), a directory holding one, or a hub id.
        device: torch device string (default "cpu").
        **spec_overrides: layer (default -2), attention ("full"/"causal"), frames_kept
            ("all"/"last"), compute_dtype, storage_dtype, preprocess (PreprocessSpec or dict) or its
            fields preprocess_mode / target_size / extra_resize; plus backend ("featstore" or
            "official") and compile (bool: torch.compile the blocks, featstore backend).

    Raises:
        EncoderError: unknown name or option; WeightsError: weights missing or not matching.
    """
    if name not in _REGISTRY:
        raise EncoderError(f"unknown encoder {name!r}; available: {available_encoders()}")
    return _REGISTRY[name](weights=weights, device=device, **spec_overrides)


# ---- VGGT presets -------------------------------------------------------------------------


def _apply_overrides(spec: EncoderSpec, overrides: Dict[str, Any]) -> EncoderSpec:
    changes: Dict[str, Any] = {}
    pre: Dict[str, Any] = {}
    for k, v in overrides.items():
        if k in _PREPROCESS_SHORT:
            pre[_PREPROCESS_SHORT[k]] = v
        elif k in _SPEC_OVERRIDES:
            changes[k] = v
        else:
            raise EncoderError(
                f"unknown encoder option {k!r}; known: {sorted(_SPEC_OVERRIDES + tuple(_PREPROCESS_SHORT))} "
                f"and backend, compile"
            )
    if "preprocess" in changes and not isinstance(changes["preprocess"], PreprocessSpec):
        changes["preprocess"] = PreprocessSpec(**dict(changes["preprocess"]))
    if pre:
        base = changes.get("preprocess", spec.preprocess)
        changes["preprocess"] = dataclasses.replace(base, **pre)
    return spec.replace(**changes) if changes else spec


def _make_vggt(*, name: str, config: Dict[str, Any], weights, device, random_seed: Optional[int],
               default_target: int, backend: str = "featstore", compile: bool = False, **overrides):

    from . import vggt as V
    from .weights import load_aggregator_state, load_into, resolve_weights, sha256_file

    if backend not in ("featstore", "official"):
        raise EncoderError(f"backend must be 'featstore' or 'official'. Found {backend!r}")
    if weights is None and random_seed is None:
        raise WeightsError(
            f"encoder {name!r} needs weights: pass weights='/path/to/model.safetensors' (or model.pt), or "
            f"the hub id 'facebook/VGGT-1B' on a machine with internet (CLI: --weights). For a weightless "
            f"smoke test use the 'vggt-tiny' encoder."
        )
    # Check every argument before any work (building VGGT-1B on CPU takes seconds and 3.6 GB).
    path = resolve_weights(weights) if weights is not None else None
    spec = EncoderSpec(encoder=name, implementation=backend, code_version="?", config=config,
                       weights_sha256="?", preprocess=PreprocessSpec(target_size=default_target))
    spec = _apply_overrides(spec, overrides)
    if backend == "official":
        if spec.attention != "full":
            raise EncoderError("the official vggt package has no causal mode; use backend='featstore' "
                               "for attention='causal'")
        if compile:
            raise EncoderError("compile=True is only supported with backend='featstore'")
        try:
            from vggt.models.aggregator import Aggregator
        except ImportError as e:
            raise EncoderError(f"backend='official' needs the official `vggt` package ({e}). "
                               f"{OFFICIAL_INSTALL_HINT}") from e

    # Build on CPU, load, then move: a 5 GB checkpoint never sits twice on the GPU.
    if path is None:
        # Random weights come from our aggregator's seeded init, whichever backend runs them.
        ours = V.init_random_(V.VGGTAggregator(**config), random_seed)
        state, source = ours.state_dict(), f"random-seed-{random_seed}"
        digest = source
    else:
        ours, state, source = None, load_aggregator_state(path), str(path)
    if backend == "official":
        model = Aggregator(**{k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()})
        code_version = _official_version()
    else:
        model = ours if ours is not None else V.VGGTAggregator(**config)
        code_version = V.CODE_VERSION
    del ours
    load_into(model, state, source)
    del state
    if path is not None:
        digest = sha256_file(path)  # after the strict load: a wrong file fails fast, unhashed
    spec = spec.replace(code_version=code_version, weights_sha256=digest)
    model = model.to(device).eval().requires_grad_(False)
    if compile:
        model.compile_blocks()
    return V.VGGTEncoder(spec, model, device, backend=backend)


def _official_version() -> str:
    try:
        from importlib.metadata import version

        return "vggt-" + version("vggt")
    except Exception:  # vendored checkout without metadata
        return "vggt-unversioned"


def _vggt_1b(*, weights=None, device="cpu", **kw):
    from .vggt import VGGT_1B_CONFIG

    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in VGGT_1B_CONFIG.items()}
    return _make_vggt(name="vggt-1b", config=cfg, weights=weights, device=device, random_seed=None,
                      default_target=518, **kw)


def _vggt_tiny(*, weights=None, device="cpu", **kw):
    return _make_vggt(name="vggt-tiny", config=dict(TINY_CONFIG), weights=weights, device=device,
                      random_seed=None if weights is not None else TINY_SEED,
                      default_target=TINY_TARGET_SIZE, **kw)


def _vggt_official(*, weights=None, device="cpu", **kw):
    if kw.pop("backend", "official") != "official":
        raise EncoderError("encoder 'vggt-official' always uses backend='official'")
    return _vggt_1b(weights=weights, device=device, backend="official", **kw)


register_encoder("vggt-1b", _vggt_1b)
register_encoder("vggt-tiny", _vggt_tiny)
register_encoder("vggt-official", _vggt_official)
