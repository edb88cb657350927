"""The Qwen2.5-VL vision presets: qwen2.5-vl-vision (a checkpoint's tower) and
qwen2.5-vl-vision-tiny (random, for tests). One unit per image; feature set "qwen_vision"."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

from featstore.contract.spec import EncoderSpec, PreprocessSpec
from featstore.encoders.qwen_vision.config import DEFAULT_TARGET_SIZE as QWEN_DEFAULT_TARGET
from featstore.encoders.qwen_vision.config import TINY_SEED as QWEN_TINY_SEED
from featstore.encoders.qwen_vision.config import TINY_TARGET_SIZE as QWEN_TINY_TARGET
from featstore.encoders.qwen_vision.config import DEFAULT_VISION_ATTENTION, TINY_VISION_CONFIG, VISION_ATTENTION_CHOICES
from featstore.encoders.registry import apply_overrides, register_encoder
from featstore.errors import EncoderError, WeightsError

QWEN_BACKEND = "transformers"


def _qwen_frame(source, spec: EncoderSpec, *, patch_size: int, name: Optional[str] = None, uint8: bool = False):
    from featstore.encoders.preprocess import qwen_frame

    return qwen_frame(source, spec.preprocess, patch_size=patch_size,
                      merge_size=int(spec.config["spatial_merge_size"]), name=name, uint8=uint8)


def qwen_channels(spec: EncoderSpec) -> int:
    """C of a stored Qwen vision token: the tower's hidden size (its output before the merger)."""
    return int(spec.config["hidden_size"])


def qwen_shape(spec: EncoderSpec, width: int, height: int, num_frames: int):
    """(F, N, C) of a unit of `num_frames` images: one feature per image (F = num_frames), the
    view's patch grid trimmed to whole merge blocks (qwen_view's crop), C = hidden_size."""
    from featstore.encoders.preprocess import grid_tokens

    tokens = grid_tokens(width, height, spec.preprocess, int(spec.config["patch_size"]),
                         int(spec.config["spatial_merge_size"]))
    return num_frames, tokens, qwen_channels(spec)


@dataclasses.dataclass(frozen=True)
class QwenVisionPreset:
    """A Qwen2.5-VL vision tower preset (merger removed): its spec (`spec`, no model) and its
    encoder (`build`, a `featstore.encoders.qwen_vision.encoder.QwenVisionEncoder`).

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
        from featstore.encoders.qwen_vision.config import CODE_VERSION as QWEN_CODE_VERSION
        from featstore.encoders.qwen_vision.config import spec_config
        from featstore.encoders.qwen_vision.weights import resolve_checkpoint

        options = dict(options)
        backend = options.pop("backend", QWEN_BACKEND)
        if backend != QWEN_BACKEND:
            raise EncoderError(f"encoder {self.name!r} runs transformers' Qwen2.5-VL code only: backend must be "
                               f"{QWEN_BACKEND!r}. Found {backend!r}")
        compile = bool(options.pop("compile", False))  # how it runs, not what it computes: not in the spec
        # How the tower attends (featstore.encoders.qwen_vision.attention): a build option like
        # compile, not a spec field: "one_call" gives the stock numbers up to rounding (within the
        # recompute tolerance), so a store built either way has one fingerprint.
        vision_attention = options.pop("vision_attention", DEFAULT_VISION_ATTENTION)
        if vision_attention not in VISION_ATTENTION_CHOICES:
            raise EncoderError(f"encoder {self.name!r}: vision_attention {vision_attention!r} is not one of "
                               f"{', '.join(VISION_ATTENTION_CHOICES)}")
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
        spec = apply_overrides(spec, options)
        for field, want in (("layer", -1), ("attention", "full"), ("frames_kept", "all"),
                            ("reference_frame", "first")):
            if getattr(spec, field) != want:
                raise EncoderError(
                    f"encoder {self.name!r} offers {field}={want!r} only (the vision tower's output before the "
                    f"merger, each image on its own). Found {getattr(spec, field)!r}")
        return spec, ckpt, vision_attention, compile

    @property
    def family_hooks(self) -> Dict[str, Any]:
        """The Qwen vision hooks for the registry (`register_encoder` takes them from `build`'s
        preset): the Qwen image as frame, the merge-trimmed grid, hidden_size channels."""
        return {"preprocess": _qwen_frame, "shape": qwen_shape, "channels": qwen_channels}

    def spec(self, *, weights=None, **options) -> EncoderSpec:
        """The spec `build` would give, without a model (the checkpoint is hashed, not loaded)."""
        spec, ckpt, _, _ = self._prepare(weights, options)
        return spec.replace(weights_sha256=ckpt.sha256() if ckpt is not None else f"random-seed-{self.random_seed}")

    def build(self, *, weights=None, device="cpu", **options):
        """Build the tower on CPU, load the checkpoint strictly (or seed it), then move it to `device`."""
        spec, ckpt, vision_attention, compile = self._prepare(weights, options)
        from featstore.encoders.qwen_vision.attention import set_vision_attention
        from featstore.encoders.qwen_vision.encoder import (QwenVisionEncoder, build_vision_tower,
                                                            compile_tower_blocks, init_random_)
        from featstore.encoders.qwen_vision.weights import load_vision_into, load_vision_state

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
        set_vision_attention(model, vision_attention)
        if compile:
            compile_tower_blocks(model)
        return QwenVisionEncoder(spec.replace(weights_sha256=digest), model, device)


_QWEN = QwenVisionPreset("qwen2.5-vl-vision", QWEN_DEFAULT_TARGET)
_QWEN_TINY = QwenVisionPreset("qwen2.5-vl-vision-tiny", QWEN_TINY_TARGET, vision_config=TINY_VISION_CONFIG,
                              random_seed=QWEN_TINY_SEED)

for _preset in (_QWEN, _QWEN_TINY):
    # One unit per image: the tower attends within one image only.
    register_encoder(_preset.name, _preset.build, spec=_preset.spec, unit="image", feature_set="qwen_vision")
del _preset
