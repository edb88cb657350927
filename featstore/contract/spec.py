"""`EncoderSpec`: everything that decides the bytes of a cached feature, with a stable fingerprint.

The spec travels CLI -> store manifest -> training and is never derived again. Two specs with the same fingerprint promise the same features up to rounding;
`diff()` names the fields that differ so a refusal can say which one.

Stored features are [frames_kept, tokens, channels]: frames_kept = S ("all") or 1 ("last"),
tokens = patch tokens only, channels a rule of the encoder's family (VGGT: 2*embed_dim); the
encoder registry computes the shape (`featstore.encoders.stored_shape`). The patch size is the
encoder's own, `config["patch_size"]`: preprocessing sides are multiples of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Mapping, Optional, Tuple

from featstore.contract.dtypes import DTYPE_NAMES, STORAGE_DTYPE_NAMES
from featstore.errors import EncoderError

__all__ = ["EncoderSpec", "PreprocessSpec", "SPEC_VERSION", "ADDED_FIELDS", "spec_diff", "spec_mismatch_details", "field_choices",
           "field_default"]

# Bump when the meaning of a field changes (old fingerprints then stop matching on purpose).
SPEC_VERSION = 1
# Fields added to EncoderSpec after stores were first written, with the default that means what
# those stores hold: serialised only when set otherwise (EncoderSpec.to_dict).
ADDED_FIELDS = {"reference_frame": "first", "qwen_view": None}


@dataclass(frozen=True)
class PreprocessSpec:
    """Image -> tensor steps (see featstore.encoders.preprocess)."""

    mode: Literal["crop", "pad"] = "crop"
    """'crop': width -> target_size, centre-crop height; 'pad': longest side -> target_size, white pad."""
    target_size: int = 518
    """Official VGGT: 518. The JanusVLN family calls the same function with 644."""
    resample: Literal["bicubic"] = "bicubic"
    """PIL filter of the main resize; the official code uses bicubic only."""
    extra_resize: Optional[Tuple[int, int]] = None
    """Optional (height, width), multiples of the patch size, applied after crop/pad (e.g. the
    Qwen grid); torch bicubic with antialias, clamped to [0, 1]."""
    # Sides are checked as plain positive ints here; the patch size is the encoder's
    # (config["patch_size"]), so EncoderSpec checks them as its multiples (`check_patch_size`).

    def __post_init__(self):
        if self.mode not in ("crop", "pad"):
            raise EncoderError(f"preprocess.mode must be 'crop' or 'pad'. Found {self.mode!r}")
        if not _positive_int(self.target_size):
            raise EncoderError(f"preprocess.target_size must be a positive int (pixels). Found {self.target_size!r}")
        if self.resample != "bicubic":
            raise EncoderError(f"preprocess.resample must be 'bicubic'. Found {self.resample!r}")
        if self.extra_resize is not None:
            er = tuple(self.extra_resize) if isinstance(self.extra_resize, (list, tuple)) else ()
            if len(er) != 2 or not all(_positive_int(v) for v in er):
                raise EncoderError(f"preprocess.extra_resize must be (height, width), positive ints (pixels). "
                                   f"Found {self.extra_resize!r}")
            object.__setattr__(self, "extra_resize", er)

    def check_patch_size(self, patch_size: int) -> None:
        """Refuse sides that are not multiples of the encoder's `patch_size` (EncoderSpec calls it
        with its config's patch size: 14 for VGGT, 16 for a SigLIP-style encoder).

        Example:
            >>> from featstore.contract.spec import PreprocessSpec
            >>> PreprocessSpec(target_size=512).check_patch_size(16)
            >>> PreprocessSpec(target_size=512).check_patch_size(14)
            Traceback (most recent call last):
            ...
            featstore.errors.EncoderError: preprocess.target_size must be a positive multiple of 14 (the patch size). Found 512
        """
        if self.target_size % patch_size:
            raise EncoderError(f"preprocess.target_size must be a positive multiple of {patch_size} (the patch size). "
                               f"Found {self.target_size!r}")
        if self.extra_resize is not None and any(v % patch_size for v in self.extra_resize):
            raise EncoderError(f"preprocess.extra_resize must be (height, width), positive multiples of {patch_size}. "
                               f"Found {self.extra_resize!r}")


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


@dataclass(frozen=True)
class EncoderSpec:
    """What produced a stored feature. Get it with `featstore.encoders.resolve_spec(...)` (no
    model built) or `featstore.encoders.get_encoder(...).spec`.

    Example:
        >>> from featstore.encoders import resolve_spec
        >>> spec = resolve_spec("vggt-tiny")
        >>> spec.fingerprint() == EncoderSpec.from_dict(spec.to_dict()).fingerprint()
        True
    """

    encoder: str
    """Registry name, e.g. 'vggt-1b'."""
    implementation: str
    """Which code computes it: 'featstore' (in-tree aggregator) or 'official' (vggt package)."""
    code_version: str
    """Version of that implementation's numerics; bump when outputs change."""
    config: Mapping[str, Any]
    """Aggregator config (official Aggregator argument names)."""
    weights_sha256: str
    """sha256 of the weights file, or 'random-seed-<n>' for random presets."""
    layer: int = -2
    """Aggregator output index as the training code writes it (VG-LLM/JanusVLN: -2; Spatial-MLLM: -1)."""
    layer_resolved: Optional[int] = None
    """`layer` as a non-negative index (filled from config['depth'])."""
    tokens: Literal["patch"] = "patch"
    """Patch tokens only (camera and register tokens dropped)."""
    attention: Literal["full", "causal"] = "full"
    frames_kept: Literal["all", "last"] = "all"
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)
    compute_dtype: str = "bfloat16"
    """Autocast dtype on CUDA (CPU computes in float32: equal within bf16 tolerance, not bitwise)."""
    storage_dtype: str = "bfloat16"
    """dtype of the stored features; consumers cast to bf16 before the merger anyway. float8_e4m3fn
    stores a per-token scale beside them and reads back dequantised (featstore.format.fp8)."""
    spec_version: int = SPEC_VERSION
    reference_frame: Literal["first", "last"] = "first"
    """Which frame anchors the call (VG-LLM's and JanusVLN's `reference_frame`): 'first' encodes the
    frames in their order; 'last' encodes them reversed (the last frame gets frame 0's camera and
    register tokens, a causal stream starts from it) and flips the outputs back to the sample's order."""
    qwen_view: Optional[Literal["crop"]] = None
    """Qwen vision encoders: how the Qwen image derives from the VGGT view. 'crop': its first
    even x even patches (VG-LLM, JanusVLN). None for VGGT encoders (their input is the view itself)."""

    def __post_init__(self):
        object.__setattr__(self, "config", _canonical_config(self.config))
        if isinstance(self.preprocess, Mapping):
            object.__setattr__(self, "preprocess", _preprocess_from_dict(self.preprocess))
        patch = self.config.get("patch_size")
        if patch is not None:
            if not _positive_int(patch):
                raise EncoderError(f"config['patch_size'] must be a positive int. Found {patch!r}")
            self.preprocess.check_patch_size(patch)
        depth = self.config.get("depth")
        if not isinstance(depth, int) or depth < 1:
            raise EncoderError(f"config['depth'] must be a positive int. Found {depth!r}")
        if not isinstance(self.layer, int) or not -depth <= self.layer < depth:
            raise EncoderError(f"layer must be in -{depth}..{depth - 1} for depth {depth}. Found {self.layer!r}")
        resolved = self.layer % depth
        if self.layer_resolved is None:
            object.__setattr__(self, "layer_resolved", resolved)
        elif self.layer_resolved != resolved:
            raise EncoderError(
                f"layer_resolved={self.layer_resolved} does not match layer={self.layer} at depth {depth} "
                f"(expected {resolved}); leave layer_resolved out, it is derived from layer"
            )
        for name, allowed in (("tokens", ("patch",)), ("attention", ("full", "causal")),
                              ("frames_kept", ("all", "last")), ("reference_frame", ("first", "last")),
                              ("qwen_view", (None, "crop")),
                              ("compute_dtype", DTYPE_NAMES), ("storage_dtype", STORAGE_DTYPE_NAMES)):
            if getattr(self, name) not in allowed:
                raise EncoderError(f"{name} must be one of {list(allowed)}. Found {getattr(self, name)!r}")
        if not self.weights_sha256:
            raise EncoderError("weights_sha256 must name the weights (sha256 hex or 'random-seed-<n>')")

    # ---- serialisation ---------------------------------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-able dict (the manifest's `encoder` field). Fields added after stores were
        first written (`ADDED_FIELDS`) appear only when not at their default, so those stores'
        fingerprints (and their stored spec dicts) stay what they were."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if not (f.name in ADDED_FIELDS and getattr(self, f.name) == ADDED_FIELDS[f.name])}
        d["config"] = dict(self.config)
        d["preprocess"] = dataclasses.asdict(self.preprocess)
        if d["preprocess"]["extra_resize"] is not None:
            d["preprocess"]["extra_resize"] = list(d["preprocess"]["extra_resize"])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EncoderSpec":
        """Inverse of `to_dict`; unknown keys are an error (a newer writer, or a typo)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise EncoderError(f"Unknown encoder spec key(s): {unknown}. Known: {sorted(names)}. A spec written by "
                               "a newer featstore? Upgrade featstore to read it")
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(d))
        if missing:
            raise EncoderError(f"encoder spec lacks the key(s) {missing}; a spec dict comes from EncoderSpec.to_dict()")
        return cls(**dict(d))

    def fingerprint(self) -> str:
        """sha256 hex of the canonical JSON of `to_dict()` (sorted keys, no whitespace)."""
        return hashlib.sha256(self.canonical_json().encode("utf-8")).hexdigest()

    def canonical_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    def diff(self, other: "EncoderSpec") -> List[str]:
        """Names of fields that differ; nested ones dotted ('preprocess.target_size', 'config.depth')."""
        return spec_diff(self, other)

    def overrides(self) -> Dict[str, Any]:
        """The `get_encoder` / `resolve_spec` options that rebuild this spec from its preset.

        Example:
            >>> from featstore.encoders import resolve_spec
            >>> spec = resolve_spec("vggt-tiny", layer=-1)
            >>> resolve_spec(spec.encoder, **spec.overrides()) == spec
            True
        """
        return dict(layer=self.layer, attention=self.attention, frames_kept=self.frames_kept,
                    compute_dtype=self.compute_dtype, storage_dtype=self.storage_dtype,
                    preprocess=self.preprocess, backend=self.implementation, reference_frame=self.reference_frame)

    def replace(self, **changes) -> "EncoderSpec":
        """A copy with fields changed; `layer_resolved` is recomputed when `layer` changes."""
        if "layer" in changes and "layer_resolved" not in changes:
            changes["layer_resolved"] = None
        return dataclasses.replace(self, **changes)

    def __hash__(self) -> int:  # config is a dict: hash the canonical form instead
        return hash(self.canonical_json())


def field_choices(cls, name: str) -> Tuple[Any, ...]:
    """The closed choices of a `Literal[...]` field of EncoderSpec / PreprocessSpec (the CLI's
    `choices=`), e.g. field_choices(EncoderSpec, "attention") == ("full", "causal")."""
    return typing.get_args(typing.get_type_hints(cls)[name])


def field_default(cls, name: str) -> Any:
    """The default of a field of a spec or options dataclass (the CLI's `default=` and help)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _as_dict(spec) -> Dict[str, Any]:
    if isinstance(spec, EncoderSpec):
        return spec.to_dict()
    if isinstance(spec, Mapping):
        return {str(k): (dict(v) if isinstance(v, Mapping) else v) for k, v in spec.items()}
    raise TypeError(f"expected an EncoderSpec or its dict. Found {type(spec).__name__}")


def spec_diff(a, b) -> List[str]:
    """The fields in which two specs (EncoderSpec or their dicts, possibly partial) differ, sorted;
    nested ones dotted ('preprocess.target_size', 'config.depth'). The one spec comparison that
    build, writer, reader, merge and verify use."""
    da, db = _as_dict(a), _as_dict(b)
    out: List[str] = []
    for k in sorted(set(da) | set(db)):
        va, vb = da.get(k, ADDED_FIELDS.get(k)), db.get(k, ADDED_FIELDS.get(k))  # absent = its default
        if isinstance(va, dict) and isinstance(vb, dict):
            out += [f"{k}.{kk}" for kk in sorted(set(va) | set(vb)) if va.get(kk) != vb.get(kk)]
        elif va != vb:
            out.append(k)
    return out


def _field_value(d: Dict[str, Any], name: str):
    head, _, tail = name.partition(".")
    # A field of ADDED_FIELDS absent from a spec dict is at its default (to_dict leaves it out):
    # name that value, not None ("reference_frame: store has 'last', expected 'first'").
    value = d.get(head, ADDED_FIELDS.get(head))
    return value.get(tail) if tail and isinstance(value, dict) else value


def spec_mismatch_details(have, want, *, have_label: str = "store has", want_label: str = "expected") -> str:
    """Every differing field with both values: "layer: store has 23, expected 22; ...", all of them."""
    da, db = _as_dict(have), _as_dict(want)
    return "; ".join(f"{name}: {have_label} {_field_value(da, name)!r}, {want_label} {_field_value(db, name)!r}"
                     for name in spec_diff(da, db))


def _canonical_config(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in dict(cfg).items():
        if isinstance(v, tuple):
            v = list(v)
        out[str(k)] = v
    json.dumps(out)  # fail early on non-JSON values
    return out


def _preprocess_from_dict(d: Mapping[str, Any]) -> PreprocessSpec:
    names = {f.name for f in dataclasses.fields(PreprocessSpec)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise EncoderError(f"Unknown preprocess spec key(s): {unknown}. Known: {sorted(names)}. A spec written by "
                           "a newer featstore? Upgrade featstore to read it")
    d = dict(d)
    if d.get("extra_resize") is not None:
        d["extra_resize"] = tuple(d["extra_resize"])
    return PreprocessSpec(**d)
