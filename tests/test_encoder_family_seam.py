"""The seam for a new encoder family: a test-only family with 16-px patches and a channel rule that
is not VGGT's 2 x embed_dim ("tile16": C = 3 x embed_dim / 2), registered here with the public
`register_encoder`, then built, verified (with a recompute) and read. No featstore module is
touched or patched: if a layer still assumed 14-px patches or 2 x embed_dim channels, the build's
size estimate, the writer's shape checks, verify's expected shape or the read would refuse it."""

import os

import pytest
import torch

from featstore import FeatureStore
from featstore.build.runner import BuildOptions, build
from featstore.contract.spec import EncoderSpec, PreprocessSpec
from featstore.encoders import get_encoder, register_encoder, resolve_spec, stored_shape
from featstore.encoders.preprocess import preprocess_image
from featstore.errors import EncoderError
from featstore.ops.verify import verify_store

from _featstore_helpers import make_images

NAME = "test-tile16"
FEATURE_SET = "tiles16"
CONFIG = {"patch_size": 16, "embed_dim": 16, "depth": 1}


class Tile16(torch.nn.Module):
    """A 16 x 16 patch embedding and a norm: [S, 3, H, W] -> [S, h*w, 3*embed_dim/2]."""

    def __init__(self, embed_dim: int, patch_size: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Conv2d(3, 3 * embed_dim // 2, patch_size, stride=patch_size)
        self.norm = torch.nn.LayerNorm(3 * embed_dim // 2)

    def forward(self, x):
        return self.norm(self.embed(x).flatten(2).transpose(1, 2))


class Tile16Encoder:
    """The `featstore.encoders.base.Encoder` protocol for Tile16 (one call per sequence)."""

    def __init__(self, spec, device):
        self.spec, self.device = spec, torch.device(device)
        self.patch_size = int(spec.config["patch_size"])
        self.model = Tile16(spec.config["embed_dim"], self.patch_size, seed=7).eval().requires_grad_(False)

    def load_image(self, path):
        return preprocess_image(path, self.spec.preprocess, patch_size=self.patch_size)

    def patch_grid(self, height, width):
        return height // self.patch_size, width // self.patch_size

    @torch.inference_mode()
    def encode(self, frames):
        b, s = frames.shape[:2]
        y = self.model(frames.flatten(0, 1).float()).unflatten(0, (b, s))
        return (y[:, -1:] if self.spec.frames_kept == "last" else y).contiguous()

    def encode_stream(self, frames):
        raise EncoderError("tile16 has no causal stream")


def _spec(*, weights=None, **options):
    options.pop("compile", None)
    if options.pop("backend", "test") != "test":
        raise EncoderError("tile16 runs backend 'test' only")
    if isinstance(options.get("preprocess"), dict):
        options["preprocess"] = PreprocessSpec(**options["preprocess"])
    base = EncoderSpec(encoder=NAME, implementation="test", code_version="tile16-1", config=CONFIG,
                       weights_sha256="random-seed-7", layer=-1, preprocess=PreprocessSpec(target_size=64))
    return base.replace(**options) if options else base


def _factory(*, weights=None, device="cpu", **options):
    return Tile16Encoder(_spec(weights=weights, **options), device)


@pytest.fixture(scope="module", autouse=True)
def tile16_family():
    register_encoder(NAME, _factory, spec=_spec, feature_set=FEATURE_SET, overwrite=True,
                     channels=lambda spec: 3 * int(spec.config["embed_dim"]) // 2)


def test_spec_takes_the_patch_size_from_the_config():
    assert resolve_spec(NAME).preprocess.target_size == 64  # a multiple of 16, not of 14
    with pytest.raises(EncoderError, match="multiple of 16"):
        resolve_spec(NAME, preprocess=PreprocessSpec(target_size=70))


@pytest.mark.parametrize("storage_dtype", ["bfloat16", "float8_e4m3fn"])
def test_a_16px_family_is_built_verified_and_read(tmp_path, storage_dtype):
    data = str(tmp_path / "data")
    keys = [f"scene/{i:03d}.png" for i in range(3)]
    make_images(data, keys, size=(96, 80))
    report = build(BuildOptions(data_root=data, encoder=NAME, device="cpu", progress=False, workers=0,
                                spec_overrides={"storage_dtype": storage_dtype}))
    assert report.computed == 3 and not report.failed
    store = os.path.join(data, "vggt_features.lmdb")

    verified = verify_store(store, data_root=data, recompute=3, seed=0)
    assert verified.ok and len(verified.recomputed) == 3, verified

    # 96 x 80 -> the crop view at width 64: 64 x 48 (multiples of 16) -> 4 x 3 patches, 24 channels.
    spec = resolve_spec(NAME, storage_dtype=storage_dtype)
    assert stored_shape(spec, 96, 80, 1) == (1, 12, 24)
    encoder = get_encoder(NAME, storage_dtype=storage_dtype)
    with FeatureStore(store, feature_set=FEATURE_SET) as fs:
        assert fs.manifest["fingerprint"] == spec.fingerprint()
        out = fs.read_into(keys, dtype=torch.float32)
        assert tuple(out.shape) == (3, 1, 12, 24)
        for i, key in enumerate(keys):
            want = encoder.encode(encoder.load_image(os.path.join(data, key))[None, None])[0]
            tol = 0.07 if storage_dtype == "float8_e4m3fn" else 0.01
            torch.testing.assert_close(out[i], want, rtol=tol, atol=tol)
