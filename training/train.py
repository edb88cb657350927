"""`python -m training.train`: parse, build, run, close.

Builds the tokenizer and image processor, checks the feature store against the encoder spec
the flags describe (cached mode; no VGGT is built), opens the cached Qwen vision features
(--use_vision_cache; the model is then built without vision blocks), builds the model, the
dataset and the `FeatstoreTrainer`, trains, and saves the model to --output_dir. See
docs/TRAINING.md.

Example (the bundled sample data, tiny presets, CPU):
    featstore build --data-root sample_data --annotations sample_data/annotations.json --encoder vggt-tiny
    python -m training.train --data_root sample_data --annotations sample_data/annotations.json \\
        --use_vggt_cache --output_dir /tmp/run --max_steps 20 --use_cpu --report_to none
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import List, Optional

import torch

from featstore.encoders import stored_channels
from featstore.encoders.qwen_vision.tower_index import TowerWindows
from featstore.errors import FeatstoreError
from training.args import ArgumentError, parse_args, resolve_vggt
from training.data import Collator, ConversationDataset, DataError
from training.preempt import Preemption, exit_status, resume_hint
from training.trainer import FeatstoreTrainer
from training.vggt_online import OnlineVGGT, resolve_spec

__all__ = ["main", "run", "check_coverage", "open_feature_cache", "open_vision_cache", "vision_spec", "build_model",
           "load_tokenizer_and_processor", "checkpoint_recipe", "VISION_FEATURE_SET"]

VISION_FEATURE_SET = "qwen_vision"  # the store's feature set of the frozen Qwen vision tower's output

logger = logging.getLogger("training")


_CACHE_MISMATCH_ADVICE = ("Train with the --vggt_* flags the store was built with, or build a store for "
                          "these flags (featstore build with the same --layer/--attention/--frames-kept/"
                          "--reference-frame/--target-size/--preprocess-mode/--weights) and pass it as "
                          "--vggt_cache_path")


_VISION_MISMATCH_ADVICE = ("Pass --vision_weights with the Qwen checkpoint the features were built from (and the "
                           "--vggt_target_size/--vggt_preprocess_mode of that build), or build them for this run: "
                           "featstore build --encoder qwen2.5-vl-vision --weights CHECKPOINT with the same "
                           "--target-size/--preprocess-mode). A vision set whose spec has no qwen_view (or "
                           "qwen_view None) was built before featstore cropped the Qwen image as VG-LLM and "
                           "JanusVLN do (it resized it): rebuild that set with featstore build --encoder "
                           "qwen2.5-vl-vision --force; the VGGT set is unaffected")


def open_feature_cache(store_path: str, spec):
    """Check the store against `spec` and log it; returns a `FeatureStore` for the workers.

    Raises:
        FingerprintMismatchError: the store's manifest differs from `spec` (names the fields).
        StoreNotFoundError: nothing at `store_path`.
    """
    from featstore.store.reader import FeatureStore
    from featstore.store.layout import check_fingerprint

    probe = FeatureStore(store_path)
    try:
        manifest = probe.manifest
        check_fingerprint(manifest, spec, path=probe.path, advice=_CACHE_MISMATCH_ADVICE)
        entries = len(probe)
    finally:
        probe.close()  # workers open their own (never inherit an environment across fork)
    logger.info("VGGT feature cache enabled: %s (%d entries, fingerprint %s)", probe.path, entries,
                manifest.get("fingerprint", spec.fingerprint()))
    return FeatureStore(store_path, expected_encoder=spec)


def open_vision_cache(settings, expected_encoder=None):
    """The store of cached Qwen vision features (feature set "qwen_vision", keyed by frame) for
    the workers, after logging its size.

    Args:
        settings: the resolved `VGGTSettings` (`vision_store_path`: --vggt_cache_path or
            <data_root>/vggt_features.lmdb, the store that also holds the VGGT features).
        expected_encoder: the vision encoder's spec the store must have been built with (its
            fingerprint records the tower's weights), or None to accept the store's.

    Raises:
        StoreNotFoundError: nothing at the path.
        FingerprintMismatchError: the store's vision spec differs from `expected_encoder`.
    """
    from featstore.store.reader import FeatureStore

    path = settings.vision_store_path
    from featstore.store.layout import check_fingerprint

    from featstore.errors import FeatureSetNotFoundError

    probe = FeatureStore(path, feature_set=VISION_FEATURE_SET)
    try:
        try:
            probe.manifest
        except FeatureSetNotFoundError:
            # Name the encoder: `featstore build --feature-set qwen_vision` alone would write the
            # default encoder's VGGT features into that set.
            raise FeatureSetNotFoundError(
                f"--use_vision_cache: {probe.path} holds no cached Qwen vision features (feature set "
                f"{VISION_FEATURE_SET!r}); build them into it: featstore build --data-root DATA_ROOT --annotations "
                f"FILE --store {probe.path} --encoder {_vision_build_flags(settings)} (with the --target-size/"
                "--preprocess-mode of the VGGT features), or train without --use_vision_cache") from None
        if expected_encoder is not None:
            check_fingerprint(probe.manifest, expected_encoder, path=f"{probe.path} (feature set {VISION_FEATURE_SET})",
                              advice=_VISION_MISMATCH_ADVICE)
        entries = len(probe)
    finally:
        probe.close()  # workers open their own
    logger.info("Qwen vision feature cache enabled: %s (feature set %s, %d entries)", probe.path,
                VISION_FEATURE_SET, entries)
    return FeatureStore(path, feature_set=VISION_FEATURE_SET, expected_encoder=expected_encoder)


def _vision_build_flags(settings) -> str:
    """`--encoder NAME [--weights CHECKPOINT]` of the build that writes the vision features training expects."""
    weights = f" --weights {settings.vision_weights}" if settings.vision_weights else " --weights CHECKPOINT"
    return settings.vision_encoder + ("" if settings.vision_encoder.endswith("-tiny") else weights)


def vision_spec(settings, vggt_spec):
    """The spec the cached vision features must have: the tower of `settings.vision_weights` (its
    sha256), the same image view as the VGGT features (training derives Qwen's image from it),
    bfloat16 (the dtype visual.merger consumes). Builds no model; hashes the checkpoint once."""
    from featstore.encoders import resolve_spec as resolve_encoder_spec

    return resolve_encoder_spec(settings.vision_encoder, weights=settings.vision_weights,
                                preprocess_mode=vggt_spec.preprocess.mode,
                                target_size=vggt_spec.preprocess.target_size)


def check_coverage(dataset, store, vision_store, cache_miss: str) -> None:
    """Before step 1: every sample's key is in the VGGT store, and every frame's key in the vision
    store (one read transaction each, no value read; docs/OPERATIONS.md has the cost). A gap is
    found now, not at the step that reaches it.

    Raises:
        CacheMissError: samples without an entry, under --vggt_cache_miss error (under compute
            they are logged and encoded online when reached).
        VisionCacheMissError: frames without cached vision features (always an error).
    """
    from training.data import CacheMissError, VisionCacheMissError

    t0 = time.perf_counter()
    samples = [(unit, where) for unit, where in zip(dataset.units, dataset.wheres) if unit is not None]
    checked = 0
    for what, st, keys_of in (("VGGT", store, lambda u: [u.key]), ("vision", vision_store, lambda u: list(u.frames))):
        if st is None:
            continue
        wanted = list(dict.fromkeys(k for unit, _ in samples for k in keys_of(unit)))
        checked += len(wanted)
        missing = set(st.missing(wanted))
        if not missing:
            continue
        hit = [(unit, where) for unit, where in samples if missing.intersection(keys_of(unit))]
        example = "; ".join(f"{where} (key {sorted(missing.intersection(keys_of(unit)))[0]!r})"
                            for unit, where in hit[:3])
        text = (f"{len(hit)} of {len(samples)} samples have no {what} features in {st.path} ({len(missing)} of "
                f"{len(wanted)} keys missing), e.g. {example}")
        if what == "vision":
            raise VisionCacheMissError(f"{text}. Build them: featstore build --data-root {dataset.data_root} "
                                       "--annotations ... --encoder qwen2.5-vl-vision --weights CHECKPOINT (it "
                                       "computes only what is missing), or train without --use_vision_cache")
        if cache_miss == "error":
            raise CacheMissError(f"{text}. Build them: featstore build --data-root {dataset.data_root} --annotations "
                                 "... with the same encoder flags (it computes only what is missing), or pass "
                                 "--vggt_cache_miss compute to encode them online")
        logger.warning(f"{text}; --vggt_cache_miss compute: they are encoded online when reached")
    if checked:
        logger.info("coverage: %d keys checked in the store(s) before step 1 in %.2f s", checked,
                    time.perf_counter() - t0)


def load_tokenizer_and_processor(name: str, min_pixels=None, max_pixels=None):
    """(tokenizer, image processor): the offline tiny pair, or the checkpoint's own; the
    processor's pixel bounds are --min_pixels/--max_pixels (presets.processor_size)."""
    from training import presets

    if presets.is_tiny(name):
        return presets.tiny_tokenizer(), presets.image_processor(min_pixels, max_pixels)
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    bounds = presets.processor_size(min_pixels, max_pixels)  # explicit size=: see presets.image_processor
    return AutoTokenizer.from_pretrained(name), Qwen2VLImageProcessorPil.from_pretrained(name, size=bounds)


def build_model(name: str, tokenizer, geometry: dict, *, seed: int = 42, vision_cached: bool = False,
                dtype: Optional[torch.dtype] = None):
    """The Qwen2_5_VLWithGeometry model: random tiny weights, or `from_pretrained(name)`.

    A hub checkpoint loads with exactly the merger's keys missing (initialised fresh); a
    checkpoint of this class, or of VG-LLM / JanusVLN (their `merger.*`; their `vggt.*` is
    ignored here), also restores its merger, whose shapes are checked first (a mismatch names the
    key). The merger's width: `geometry["hidden"]` (--vggt_merger_hidden), else the checkpoint's
    (`vggt_merger_hidden_dim`, or this package's saved `vggt_geometry`). With `vision_cached` the
    model is built without vision blocks (training.model): `visual.merger` and the LLM still load,
    the blocks' checkpoint keys are unexpected. A checkpoint saved so holds no vision blocks, and
    is refused without `vision_cached` (its tower would be random).

    `dtype`: the weights' dtype (`run` passes bfloat16 under --bf16, else float32, as VG-LLM and
    JanusVLN load theirs: `torch_dtype=torch.bfloat16 if training_args.bf16 else None`); None
    keeps transformers' default ("auto": the checkpoint's dtype; float32 for the tiny model)."""
    from transformers import AutoConfig

    from training import presets
    from training.checkpoints import CheckpointError, check_merger_shapes, merger_hidden, read_recipe
    from training.merger import GeometryMerger
    from training.model import GEOMETRY_CONFIG_KEY, VISION_CACHED_CONFIG_KEY, Qwen2_5_VLWithGeometry

    if presets.is_tiny(name):
        config = presets.tiny_config(tokenizer)
        setattr(config, GEOMETRY_CONFIG_KEY, geometry)
        setattr(config, VISION_CACHED_CONFIG_KEY, bool(vision_cached))
        torch.manual_seed(seed)
        return Qwen2_5_VLWithGeometry._from_config(config, **({} if dtype is None else {"dtype": dtype}))
    config = AutoConfig.from_pretrained(name)
    saved = getattr(config, GEOMETRY_CONFIG_KEY, None) or {}
    if saved and saved.get("in_channels") != geometry["in_channels"]:
        raise ArgumentError(f"--model_name_or_path {name}: its merger takes {saved['in_channels']} channels, the "
                            f"VGGT spec gives {geometry['in_channels']}; pass the --vggt_encoder (and --vggt_*) "
                            "flags the checkpoint was trained with, or start from a base Qwen2.5-VL checkpoint")
    if getattr(config, VISION_CACHED_CONFIG_KEY, False) and not vision_cached:
        raise ArgumentError(f"--model_name_or_path {name}: this checkpoint was trained with --use_vision_cache and "
                            "holds no vision blocks (only visual.merger); continue with --use_vision_cache, or "
                            "copy the frozen tower's weights (visual.blocks.*, visual.patch_embed.*) back into it")
    try:
        hidden = merger_hidden(read_recipe(config), geometry.get("hidden"), name)
    except CheckpointError as e:
        raise ArgumentError(str(e)) from None
    geometry = dict(saved, **geometry)
    geometry["hidden"] = hidden if hidden is not None else saved.get("hidden")
    if os.path.isdir(name):  # the merger's shapes, before the loader meets them (a hub id: the loader checks)
        with torch.device("meta"):
            merger = GeometryMerger(geometry["in_channels"], config.text_config.hidden_size, geometry["hidden"])
        try:
            check_merger_shapes(name, merger.state_dict())
        except CheckpointError as e:
            raise ArgumentError(str(e)) from None
    setattr(config, GEOMETRY_CONFIG_KEY, geometry)
    setattr(config, VISION_CACHED_CONFIG_KEY, bool(vision_cached))
    return Qwen2_5_VLWithGeometry.from_pretrained(name, config=config,
                                                  **({} if dtype is None else {"dtype": dtype}))


def checkpoint_recipe(name: str):
    """The VG-LLM / JanusVLN recipe fields of checkpoint `name`'s config.json (training.checkpoints),
    or None (the tiny model, a base Qwen2.5-VL checkpoint)."""
    from training import presets
    from training.checkpoints import CheckpointError, read_recipe

    if presets.is_tiny(name):
        return None
    from transformers import AutoConfig

    try:
        return read_recipe(AutoConfig.from_pretrained(name))
    except CheckpointError as e:
        raise ArgumentError(f"--model_name_or_path {name}: {e}") from None


def pixel_dtype(model, train_args) -> Optional[torch.dtype]:
    """The dtype the vision tower's patch embedding computes in, when lower than float32: its
    weights' (a bf16/fp16 checkpoint, DeepSpeed's bf16) or, with float32 weights, autocast's
    (--bf16 / --fp16: the conv casts its input). pixel_values cast to it in the workers give the
    same tower output (one rounding either way). None (keep float32) when the tower computes in
    float32, or is not built (--use_vision_cache: no pixel_values)."""
    visual = getattr(getattr(model, "model", None), "visual", None)
    proj = getattr(getattr(visual, "patch_embed", None), "proj", None)
    if proj is None:
        return None
    if proj.weight.dtype in (torch.bfloat16, torch.float16):
        return proj.weight.dtype
    if train_args.bf16:
        return torch.bfloat16
    if train_args.fp16:
        return torch.float16
    return None


def run(argv: Optional[List[str]] = None, *, vision_store=None):
    """Everything `main` does, raising errors instead of printing them. Returns the trainer.

    `vision_store`: with --use_vision_cache, a store object to read the vision features from
    instead of `open_vision_cache(settings)` (e.g. a separate store of them)."""
    from training.checkpoints import apply_recipe, check_recipe_spec
    from training.model import geometry_config, set_trainable, vision_block_parameter_count

    model_args, data_args, train_args = parse_args(argv)
    settings = resolve_vggt(model_args, data_args)
    # A VG-LLM / JanusVLN checkpoint: its recipe fields (lam, reference_frame), its vggt.* as the VGGT weights.
    recipe = checkpoint_recipe(model_args.model_name_or_path)
    settings = apply_recipe(recipe, model_args, settings, model_args.model_name_or_path)
    spec = resolve_spec(settings.encoder, weights=settings.weights, **settings.overrides)  # builds no VGGT
    check_recipe_spec(recipe, spec, model_args.model_name_or_path)
    store = open_feature_cache(settings.store_path, spec) if settings.cached else None
    if not settings.vision_cached:
        vision_store = None
    elif vision_store is None:
        vision_store = open_vision_cache(settings, vision_spec(settings, spec))
    if train_args.deepspeed and not torch.cuda.is_available():
        import deepspeed  # ZeRO-3 on CPU needs the gloo group before the model is built (TRAINING.md)

        deepspeed.init_distributed("gloo")
    tokenizer, image_processor = load_tokenizer_and_processor(model_args.model_name_or_path, data_args.min_pixels,
                                                              data_args.max_pixels)
    dataset = ConversationDataset(data_args.annotations, data_args.data_root, tokenizer, image_processor, spec,
                                  store=store, vision_store=vision_store, cache_miss=settings.cache_miss,
                                  system_prompt=data_args.system_prompt, video_policy=data_args.video_policy)
    check_coverage(dataset, store, vision_store, settings.cache_miss)  # before any model is built
    if store is not None:  # a plan other than the one the store was built from: said once
        from featstore.build.plan_record import plan_notes, plan_of_manifest

        for line in plan_notes(plan_of_manifest(store.manifest), data_args.data_root, data_args.annotations):
            logger.info(f"featstore plan: {line}")
    geometry = geometry_config(stored_channels(spec), hidden=model_args.vggt_merger_hidden,
                               fusion=settings.fusion, scale=settings.scale)
    # bf16 weights under --bf16, float32 otherwise: as VG-LLM and JanusVLN load their model.
    model = build_model(model_args.model_name_or_path, tokenizer, geometry, seed=train_args.seed,
                        vision_cached=settings.vision_cached,
                        dtype=torch.bfloat16 if train_args.bf16 else torch.float32)
    model.config.reference_frame = spec.reference_frame  # saved: the recipe field training.export writes
    dataset.pixel_dtype = pixel_dtype(model, train_args)  # before the workers start: they get it
    if not settings.cached or settings.cache_miss == "compute":
        # Online modes, or cached with misses computed: built lazily, outside the module tree.
        model.attach_vggt(OnlineVGGT(settings.encoder, weights=settings.weights, overrides=settings.overrides,
                                     stream=settings.stream, expected_fingerprint=spec.fingerprint(),
                                     patch_size=int(spec.config["patch_size"])))
    if not settings.vision_cached:  # a tower that runs on pixels: how it attends (--vision_attention)
        from featstore.encoders.qwen_vision.attention import set_vision_attention

        impl = set_vision_attention(model.model.visual, model_args.vision_attention)
        logger.info("Qwen vision tower attention: %s (--vision_attention %s)", impl, model_args.vision_attention)
    if model_args.compile_vision:
        from transformers.integrations import is_deepspeed_zero3_enabled

        from featstore.encoders.qwen_vision.encoder import compile_tower_blocks

        if is_deepspeed_zero3_enabled():
            raise ArgumentError("--compile_vision is not offered under DeepSpeed ZeRO-3, which partitions the "
                                "tower's weights and gathers them in hooks a compiled block does not run; use "
                                "ZeRO-2 (training/configs/zero2.json) or drop --compile_vision")
        compile_tower_blocks(model.model.visual)
        logger.info("Qwen vision tower: %d blocks compiled (--compile_vision)", len(model.model.visual.blocks))
    counts = set_trainable(model, merger=model_args.tune_merger, llm=model_args.tune_llm,
                           vision=model_args.tune_vision,
                           vision_merger=model_args.tune_vision or model_args.tune_vision_merger)
    visual = model.model.visual
    logger.info("Qwen vision tower: %s; vision-block parameters %d, visual.merger parameters %d",
                "cached features (blocks not built)" if settings.vision_cached else "run on pixels",
                vision_block_parameter_count(model),
                sum(getattr(p, "ds_numel", p.numel()) for p in visual.merger.parameters()))  # ZeRO-3: full size
    logger.info("VGGT mode %s (encoder %s, fingerprint %s), fusion %s, scale %g; %d samples; trainable "
                "parameters %s", settings.mode, settings.encoder, spec.fingerprint()[:16], settings.fusion,
                settings.scale, len(dataset), counts)
    # A tower that runs on pixels gets its index from the workers (training.collate.Collator).
    tower_windows = None if settings.vision_cached else TowerWindows.of(model.config.vision_config)
    if train_args.label_names is None:
        train_args.label_names = ["labels"]
    # SIGINT/SIGTERM while training: a checkpoint at the next step boundary, then stop (training.preempt).
    preemption = Preemption()
    # processing_class: checkpoints then hold the tokenizer, so --model_name_or_path can resume from them.
    trainer = FeatstoreTrainer(model=model, args=train_args, train_dataset=dataset, processing_class=tokenizer,
                               data_collator=Collator(tokenizer.pad_token_id, tower_windows=tower_windows),
                               callbacks=[preemption])
    trainer.preemption = preemption
    with preemption.handling_signals():  # also over the final save: a signal then must not cut it short
        # --resume_from_checkpoint DIR continues from a checkpoint-N folder (model, optimizer, RNG, data position)
        trainer.train(resume_from_checkpoint=train_args.resume_from_checkpoint)
        if preemption.signum is not None:
            return trainer  # stopped early: the checkpoint holds the run; no final model
        trainer.save_model(train_args.output_dir)
        if trainer.is_world_process_zero():
            image_processor.save_pretrained(train_args.output_dir)
    return trainer


def main(argv: Optional[List[str]] = None) -> int:
    """Entry of `python -m training.train`; returns the exit status (2 for bad input)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    logger.setLevel(logging.INFO)
    try:
        trainer = run(argv)
    except (ArgumentError, DataError, FeatstoreError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before training started (or after it ended): nothing to save
        print("training: interrupted before the first training step; nothing was saved", file=sys.stderr)
        return exit_status(signal.SIGINT)
    finally:
        close_distributed()
    stop = trainer.preemption
    if stop.signum is not None:
        if trainer.is_world_process_zero():
            print(resume_hint(stop.signum, stop.step, stop.checkpoint, stop.save_seconds), file=sys.stderr, flush=True)
        return exit_status(stop.signum)
    if stop.received is not None and trainer.is_world_process_zero():
        # After the last step's end: the run finished, and the final save was not cut short.
        print(f"training: {signal.Signals(stop.received).name} arrived after the last step: training had finished, "
              f"and its model is saved in {trainer.args.output_dir}", file=sys.stderr, flush=True)
    return 0


def close_distributed() -> None:
    """Destroy the process group torchrun / DeepSpeed set up, so that its threads end before the
    interpreter does: one left to the interpreter's exit aborted a rank after a finished run
    ("terminate called without an active exception", SIGABRT) on a loaded 2-core machine."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _one_line(error: BaseException) -> str:
    """The error's own message. An error raised in a DataLoader worker is re-raised in the main
    process with the worker's traceback folded into its message; keep only the original line."""
    text = str(error)
    if "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


if __name__ == "__main__":
    sys.exit(main())
