"""Preprocessing: golden sizes and pixels on generated images, equality with the official loader."""

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featstore.encoders import get_encoder
from featstore.encoders.preprocess import preprocess_image, stack_frames
from featstore.contract.spec import PreprocessSpec
from featstore.errors import EncoderError, ImageDecodeError

VENDOR = Path(__file__).resolve().parents[1] / ".vendor" / "vggt_official"
LOAD_FN = VENDOR / "vggt" / "utils" / "load_fn.py"


def _noise(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    ch = {"RGB": 3, "RGBA": 4}[mode]
    return Image.fromarray(rng.integers(0, 256, (h, w, ch), dtype=np.uint8), mode)


def _save(img, path):
    img.save(path)
    return path


def _to_tensor(img):
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255


@pytest.mark.parametrize("mode,size,want", [
    ("crop", (640, 480), (392, 518)),   # VGGT.md: 640x480 -> 518x392
    ("crop", (480, 640), (518, 518)),   # portrait: 690 high, centre-cropped to 518
    ("pad", (640, 480), (518, 518)),
    ("pad", (480, 640), (518, 518)),
    ("crop", (518, 518), (518, 518)),
])
def test_output_sizes(tmp_path, mode, size, want):
    p = _save(_noise(*size), tmp_path / "a.png")
    assert tuple(preprocess_image(p, PreprocessSpec(mode=mode)).shape) == (3, *want)


def test_janusvln_644_target(tmp_path):
    p = _save(_noise(640, 480), tmp_path / "a.png")
    assert tuple(preprocess_image(p, PreprocessSpec(target_size=644)).shape) == (3, 490, 644)
    assert tuple(preprocess_image(p, PreprocessSpec(mode="pad", target_size=644)).shape) == (3, 644, 644)


def test_crop_pixels_equal_pil_bicubic_then_centre_crop(tmp_path):
    img = _noise(480, 640, seed=1)
    p = _save(img, tmp_path / "portrait.png")
    ref = _to_tensor(img.resize((518, 686), Image.Resampling.BICUBIC))[:, 84:602]  # (686-518)//2 = 84
    assert torch.equal(preprocess_image(p), ref)


def test_pad_portrait_is_white_left_and_right(tmp_path):
    img = _noise(480, 640, seed=2)
    x = preprocess_image(_save(img, tmp_path / "p.png"), PreprocessSpec(mode="pad"))
    inner = _to_tensor(img.resize((392, 518), Image.Resampling.BICUBIC))
    assert torch.equal(x[:, :, 63:455], inner)  # (518-392)//2 = 63 on the left
    assert (x[:, :, :63] == 1).all() and (x[:, :, 455:] == 1).all()


def test_rgba_is_composited_on_white(tmp_path):
    arr = np.zeros((480, 640, 4), np.uint8)
    arr[..., 0] = 200          # red-ish where opaque
    arr[:, 320:, 3] = 255      # right half opaque, left half fully transparent
    x = preprocess_image(_save(Image.fromarray(arr, "RGBA"), tmp_path / "a.png"))
    assert torch.allclose(x[:, :, :200], torch.ones(3, 392, 200))             # transparent -> white
    assert torch.allclose(x[:, :, 330:, ], torch.tensor([200 / 255, 0, 0]).view(3, 1, 1).expand(3, 392, 188))


def test_extra_resize_and_bytes_input(tmp_path):
    p = _save(_noise(640, 480), tmp_path / "a.png")
    spec = PreprocessSpec(extra_resize=(392, 504))
    x = preprocess_image(p, spec)
    assert x.shape == (3, 392, 504) and x.min() >= 0 and x.max() <= 1
    assert torch.equal(preprocess_image(p.read_bytes(), spec), x)  # pure function of bytes + spec
    with pytest.raises(EncoderError, match="extra_resize must be .* positive multiples of 14. Found \\(390, 504\\)"):
        PreprocessSpec(extra_resize=(390, 504)).check_patch_size(14)


def test_stack_frames_pads_mixed_sizes_white_centred():
    a, b = torch.zeros(3, 392, 518), torch.zeros(3, 518, 392)
    s = stack_frames([a, b])
    assert s.shape == (2, 3, 518, 518)
    assert (s[0, :, :63] == 1).all() and (s[0, :, 63:455] == 0).all() and (s[0, :, 455:] == 1).all()


@pytest.mark.parametrize("content,match", [
    (b"", "empty"),
    (b"this is not an image", "cannot identify"),
])
def test_bad_files_raise_image_decode_error_naming_the_file(tmp_path, content, match):
    p = tmp_path / "bad_frame.jpg"
    p.write_bytes(content)
    with pytest.raises(ImageDecodeError, match=match) as e:
        preprocess_image(p)
    assert "bad_frame.jpg" in str(e.value)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(tmp_path, fmt):
    p = tmp_path / f"t.{fmt.lower()}"
    _noise(640, 480).save(p, fmt)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match=r"t\.(png|jpeg).*truncated"):
        preprocess_image(p)


def test_too_small_and_too_elongated(tmp_path):
    with pytest.raises(ImageDecodeError, match=r"tiny\.png.*10x10"):
        preprocess_image(_save(_noise(10, 10), tmp_path / "tiny.png"))
    with pytest.raises(ImageDecodeError, match="too elongated"):
        preprocess_image(_save(_noise(3000, 20), tmp_path / "strip.png"))
    with pytest.raises(ImageDecodeError, match="cannot read"):
        preprocess_image(tmp_path / "missing.png")


def test_encoder_load_image_follows_its_spec(tmp_path):
    p = _save(_noise(640, 480), tmp_path / "a.png")
    enc = get_encoder("vggt-tiny")
    x = enc.load_image(p)
    assert x.shape == (3, 84, 112) and enc.patch_grid(*x.shape[1:]) == (6, 8)
    assert get_encoder("vggt-tiny", preprocess_mode="pad").load_image(p).shape == (3, 112, 112)


@pytest.fixture
def official_load_fn(monkeypatch):
    """The official loader, with a stand-in for torchvision's ToTensor (uint8 HWC -> float CHW / 255)."""
    if not LOAD_FN.is_file():
        pytest.skip(f"official vggt not vendored at {VENDOR}")
    tv = types.ModuleType("torchvision")
    tf = types.ModuleType("torchvision.transforms")

    class ToTensor:
        def __call__(self, img):
            return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div(255)

    tf.ToTensor = ToTensor
    tv.transforms = tf
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.transforms", tf)
    spec = importlib.util.spec_from_file_location("_official_load_fn", LOAD_FN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.load_and_preprocess_images


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_equals_official_loader(tmp_path, official_load_fn, mode):
    paths = [
        _save(_noise(640, 480, seed=1), tmp_path / "land.png"),
        _save(_noise(480, 640, seed=2), tmp_path / "port.png"),
        _save(_noise(333, 517, "RGBA", seed=3), tmp_path / "rgba.png"),
        _save(_noise(1000, 301, seed=4), tmp_path / "wide.jpg"),
    ]
    for p in paths:
        want = official_load_fn([str(p)], mode=mode)[0]
        assert torch.equal(preprocess_image(p, PreprocessSpec(mode=mode)), want), p.name
    want = official_load_fn([str(p) for p in paths[:2]], mode=mode)  # mixed sizes in one call
    got = stack_frames([preprocess_image(p, PreprocessSpec(mode=mode)) for p in paths[:2]])
    assert torch.equal(got, want)


@pytest.mark.parametrize("mode, size", [("crop", (96, 72)), ("crop", (72, 96)), ("pad", (96, 72)), ("pad", (72, 97))])
def test_uint8_view_holds_the_float_views_values_times_255(tmp_path, mode, size):
    """The build's workers take the view as uint8 (`uint8=True`); made float32 by `to_float`, it
    is the float32 view bit for bit, crop and pad (its white border) alike; the Qwen image too."""
    from featstore.build.frames import to_float
    from featstore.encoders.preprocess import qwen_frame

    path = _save(_noise(*size), tmp_path / f"{mode}_{size[0]}x{size[1]}.png")
    spec = PreprocessSpec(mode=mode, target_size=56)
    as_float = preprocess_image(path, spec, patch_size=14)
    as_u8 = preprocess_image(path, spec, patch_size=14, uint8=True)
    assert as_u8.dtype == torch.uint8 and as_u8.is_contiguous() and as_u8.shape == as_float.shape
    assert torch.equal(to_float(as_u8), as_float)
    if mode == "pad":
        assert (as_u8 == 255).any() and (as_float == 1.0).any()  # the white border is there in both
    q_float = qwen_frame(path, spec, patch_size=14)
    q_u8 = qwen_frame(path, spec, patch_size=14, uint8=True)
    assert q_u8.dtype == torch.uint8 and torch.equal(to_float(q_u8), q_float)


def test_uint8_is_declined_where_extra_resize_leaves_the_k_over_255_grid(tmp_path):
    path = _save(_noise(96, 72), tmp_path / "a.png")
    spec = PreprocessSpec(mode="crop", target_size=56, extra_resize=[28, 42])
    out = preprocess_image(path, spec, patch_size=14, uint8=True)
    assert out.dtype == torch.float32 and torch.equal(out, preprocess_image(path, spec, patch_size=14))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_to_float_is_the_decoders_division_for_every_byte(device):
    """k/255 as the decoders compute it (float32 true division on the CPU), for all 256 k, also
    on the GPU (where dividing by a Python number is a multiplication by its reciprocal)."""
    from featstore.build.frames import to_float

    k = torch.arange(256, dtype=torch.uint8)
    expected = torch.from_numpy(np.arange(256, dtype=np.uint8)).float().div(255)
    assert torch.equal(to_float(k.to(device)).cpu(), expected)


def test_a_registered_reader_without_uint8_still_serves_the_build(tmp_path, monkeypatch):
    """A frame reader registered before `uint8=` existed gets no such argument: it returns
    float32, which the build's workers then check value by value (exact_uint8)."""
    import dataclasses

    from featstore.build.frames import exact_uint8
    from featstore.encoders import preprocess_frame, registry, resolve_spec

    path = _save(_noise(96, 72), tmp_path / "a.png")
    spec = resolve_spec("vggt-tiny")
    calls = []

    def old_reader(source, spec, *, patch_size, name=None):
        calls.append(name)
        return preprocess_image(source, spec.preprocess, patch_size=patch_size, name=name)

    monkeypatch.setitem(registry._REGISTRY, "vggt-tiny",
                        dataclasses.replace(registry._REGISTRY["vggt-tiny"], preprocess=old_reader))
    out = preprocess_frame(str(path), spec, 14, uint8=True)
    assert calls and out.dtype == torch.float32
    assert torch.equal(exact_uint8(out), preprocess_image(path, spec.preprocess, patch_size=14, uint8=True))
