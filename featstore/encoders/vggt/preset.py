"""The VGGT presets: vggt-1b (in-tree aggregator, needs weights), vggt-tiny (random, for tests and
demos) and vggt-official (the installed official `vggt` package)."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

from featstore.contract.spec import EncoderSpec, PreprocessSpec
from featstore.encoders.registry import apply_overrides, register_encoder
from featstore.encoders.vggt.config import CODE_VERSION, TINY_CONFIG, TINY_SEED, TINY_TARGET_SIZE, VGGT_1B_CONFIG
from featstore.errors import EncoderError, WeightsError

OFFICIAL_INSTALL_HINT = (
    "pip install git+https://github.com/facebookresearch/vggt (it does not list torch as a "
    "dependency), or put a checkout's parent folder of `vggt/` on PYTHONPATH"
)

BACKENDS = ("featstore", "official")


def vggt_channels(spec: EncoderSpec) -> int:
    """C of a stored VGGT token: 2 x embed_dim, the frame-attention and global-attention outputs
    of the layer side by side (the official aggregator's concatenation)."""
    return 2 * int(spec.config["embed_dim"])


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
        >>> from featstore.encoders import TINY_CONFIG, VGGTPreset, stored_channels
        >>> p = VGGTPreset("tiny-seed-3", TINY_CONFIG, default_target=112, random_seed=3)
        >>> p.register(overwrite=True)
        >>> p.spec().weights_sha256, stored_channels(p.spec())
        ('random-seed-3', 128)
    """

    name: str
    config: Dict[str, Any]
    default_target: int
    random_seed: Optional[int] = None
    backend: Optional[str] = None
    spec_name: Optional[str] = None

    @property
    def family_hooks(self) -> Dict[str, Any]:
        """VGGT's hooks for the registry (`register_encoder` takes them from `build`'s preset):
        stored channels 2 x embed_dim; the view itself is the frame (no `preprocess` hook) and
        every frame's whole patch grid is stored (no `shape` hook)."""
        return {"channels": vggt_channels}

    def register(self, *, overwrite: bool = False) -> None:
        """Register this preset under its name (with `family_hooks`)."""
        register_encoder(self.name, self.build, spec=self.spec, overwrite=overwrite)

    def _prepare(self, weights, options: Dict[str, Any]):
        """Every argument checked before any work (building VGGT-1B takes seconds and 3.6 GB)."""
        from featstore.encoders.vggt.weights import resolve_weights

        options = dict(options)
        backend = options.pop("backend", self.backend or "featstore")
        compile = options.pop("compile", False)
        if options.pop("vision_attention", "auto") not in ("auto", "stock"):  # the defaults: nothing to choose
            raise EncoderError(f"encoder {self.name!r} has no vision tower: vision_attention is an option of the "
                               "qwen2.5-vl-vision encoders; leave --vision-attention out")
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
        spec = apply_overrides(spec, options)
        if backend == "official":
            if spec.attention != "full":
                raise EncoderError("the official vggt package has no causal mode; use backend='featstore' "
                                   "for attention='causal'")
            if compile:
                raise EncoderError("compile=True is only supported with backend='featstore'")
        return spec, path, backend, bool(compile)

    def spec(self, *, weights=None, **options) -> EncoderSpec:
        """The spec `build` would give, without a model (the weights file is hashed, not loaded)."""
        from featstore.encoders.vggt.weights import weights_sha256

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
        from featstore.encoders.vggt import model as V
        from featstore.encoders.vggt.encoder import VGGTEncoder
        from featstore.encoders.vggt.weights import load_aggregator_state, load_into, weights_sha256

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


for _preset in (_VGGT_1B, _VGGT_TINY, _VGGT_OFFICIAL):
    _preset.register()
del _preset
