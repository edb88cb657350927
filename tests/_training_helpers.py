"""Shared pieces of the training tests: a copy of the sample data, a real store built on it with
`featstore build`, and the tiny model/dataset as training builds them."""

from __future__ import annotations

import os
import shutil

import torch

SAMPLE_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sample_data")


def sample_root(tmp_path, name: str = "data") -> str:
    """A private copy of sample_data/ (tests build stores inside it)."""
    root = os.path.join(str(tmp_path), name)
    shutil.copytree(SAMPLE_DATA, root, ignore=shutil.ignore_patterns("*.lmdb"))
    return root


def annotations(root: str) -> str:
    return os.path.join(root, "annotations.json")


def build_store(root: str, *, annotation_files=None, store=None, **overrides) -> str:
    """`featstore build --encoder vggt-tiny` on `root` with the given spec overrides; returns the store path."""
    from featstore.build.runner import BuildOptions, build

    opts = BuildOptions(data_root=root, annotations=list(annotation_files or [annotations(root)]), store=store,
                        encoder="vggt-tiny", spec_overrides=dict(overrides), progress=False, workers=0)
    report = build(opts)
    assert not report.failed, report.failed
    return opts.store_path()


def spec_for(**overrides):
    from training.vggt_online import resolve_spec

    return resolve_spec("vggt-tiny", **overrides)


def tiny_parts():
    from training.presets import image_processor, tiny_tokenizer

    return tiny_tokenizer(), image_processor()


def dataset(root: str, spec, *, store=None, vision_store=None, cache_miss: str = "error", files=None):
    from training.data import ConversationDataset

    tok, proc = tiny_parts()
    return ConversationDataset(list(files or [annotations(root)]), root, tok, proc, spec, store=store,
                               vision_store=vision_store, cache_miss=cache_miss)


def collate(ds, indices=None):
    from training.data import Collator

    items = [ds[i] for i in (range(len(ds)) if indices is None else indices)]
    return Collator(ds.tokenizer.pad_token_id)(items)


def model_inputs(batch: dict) -> dict:
    """The batch as the Trainer hands it to the model (statistics popped)."""
    return {k: v for k, v in batch.items() if not k.startswith("cache_")}


def tiny_model(spec, *, fusion: str = "per_image", scale: float = 1.0, seed: int = 0):
    from training.model import geometry_config
    from training.presets import tiny_tokenizer
    from training.train import build_model

    geo = geometry_config(2 * spec.config["embed_dim"], fusion=fusion, scale=scale)
    return build_model("qwen2.5-vl-tiny", tiny_tokenizer(), geo, seed=seed)


def online(spec, *, stream: bool = False):
    from training.vggt_online import OnlineVGGT

    overrides = dict(layer=spec.layer, attention=spec.attention, frames_kept=spec.frames_kept,
                     storage_dtype=spec.storage_dtype, preprocess=spec.preprocess,
                     reference_frame=spec.reference_frame)
    return OnlineVGGT(spec.encoder, overrides=overrides, stream=stream, expected_fingerprint=spec.fingerprint(),
                      patch_size=spec.config["patch_size"])


def loss_and_merger_grads(model, batch: dict):
    model.zero_grad(set_to_none=True)
    out = model(**model_inputs(batch))
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.merger.named_parameters()}
    return out.loss.detach(), grads


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))
