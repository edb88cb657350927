"""Command-line arguments of `python -m training.train`: dataclasses for `HfArgumentParser`.

Three groups: `ModelArguments` (the Qwen model, the merger, what trains, the VGGT encoder spec
with the same words as `featstore build`), `DataArguments` (data root, annotations, the feature
cache, the Qwen vision-feature cache) and `TrainingArguments` (every `transformers.TrainingArguments`
flag; only the defaults a custom collator needs differ). `resolve_vggt` turns the flags into one
`VGGTSettings`, checking every combination before any work starts.

Example:
    >>> model_args, data_args, train_args = parse_args(["--data_root", "sample_data",
    ...     "--annotations", "sample_data/annotations.json", "--use_vggt_cache",
    ...     "--output_dir", "/tmp/out", "--use_cpu"])
    >>> resolve_vggt(model_args, data_args).mode
    'cached'
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import List, Literal, Optional

import transformers

from featstore.build.options import BuildOptions
from featstore.build.recipes import RECIPE_NAMES
from featstore.contract.dtypes import DTYPE_NAMES, STORAGE_DTYPE_NAMES
from featstore.contract.naming import DEFAULT_STORE_NAME
from featstore.contract.spec import EncoderSpec, PreprocessSpec, field_choices, field_default
from featstore.encoders.qwen_vision.config import DEFAULT_VISION_ATTENTION, VISION_ATTENTION_CHOICES
from training.presets import TINY_MODEL, TINY_VGGT, TINY_VISION, is_tiny

__all__ = ["ModelArguments", "DataArguments", "TrainingArguments", "VGGTSettings", "ArgumentError",
           "parse_args", "build_parser", "resolve_vggt", "DEFAULT_STORE_NAME", "PROG", "DESCRIPTION",
           "EPILOG"]

Mode = Literal["online_full", "online_causal_stream", "cached"]
Fusion = Literal["per_image", "last_to_all"]

# The --vggt_* spec flags take their choices and defaults from featstore's contract, the same
# source as `featstore build`'s flags, so that the two vocabularies cannot drift apart
# (tests/test_training_flags_contract.py). Literal[tuple] is Literal of its items.
Recipe = Literal[RECIPE_NAMES]
Attention = Literal[field_choices(EncoderSpec, "attention")]
FramesKept = Literal[field_choices(EncoderSpec, "frames_kept")]
ReferenceFrame = Literal[field_choices(EncoderSpec, "reference_frame")]
PreprocessMode = Literal[field_choices(PreprocessSpec, "mode")]
StorageDtype = Literal[STORAGE_DTYPE_NAMES]
ComputeDtype = Literal[DTYPE_NAMES]
VisionAttention = Literal[VISION_ATTENTION_CHOICES]  # the qwen vision encoders' vision_attention option
_DEFAULT_ENCODER = field_default(BuildOptions, "encoder")  # `featstore build --encoder`'s default
_LAYER = field_default(EncoderSpec, "layer")
_REFERENCE_FRAME = field_default(EncoderSpec, "reference_frame")
_PREPROCESS_MODE = field_default(PreprocessSpec, "mode")
_STORAGE_DTYPE = field_default(EncoderSpec, "storage_dtype")
_COMPUTE_DTYPE = field_default(EncoderSpec, "compute_dtype")

# Published recipes: VG-LLM adds each frame's features to its own image at scale 1;
# JanusVLN streams causally, keeps the last frame and adds it x0.2 to every image.
_DEFAULT_SCALE = {"per_image": 1.0, "last_to_all": 0.2}


class ArgumentError(ValueError):
    """A flag or a combination of flags is invalid (the message names them)."""


PROG = "python -m training.train"

# The top of `python -m training.train --help`: what it does and a run to start from (the options
# list is long: every transformers.TrainingArguments flag follows the project's own).
DESCRIPTION = """\
Fine-tune Qwen2.5-VL with VGGT geometry features added to its image tokens by a trained merger.
The features are read from a featstore store (--use_vggt_cache: VGGT is never built) or computed
online by a frozen VGGT. The options: the model, what trains and the VGGT spec (the same words as
`featstore build`), then the data and the feature caches, then every transformers
TrainingArguments flag (two with this project's defaults: --remove_unused_columns False,
--dataloader_non_blocking True). docs/TRAINING.md explains the modes; docs/LAUNCH.md multi-GPU.

Examples:
  # a cached run on CPU on the bundled sample data (tiny random-weight presets, no download)
  featstore build --data-root sample_data --annotations sample_data/annotations.json \\
      --encoder vggt-tiny
  python -m training.train --data_root sample_data --annotations sample_data/annotations.json \\
      --use_vggt_cache --output_dir /tmp/run --max_steps 20 --use_cpu --report_to none
  # the same with VGGT run online (no store needed)
  python -m training.train --data_root sample_data --annotations sample_data/annotations.json \\
      --output_dir /tmp/run-online --max_steps 20 --use_cpu --report_to none
  # JanusVLN's recipe (a causal stream, the last frame's features x0.2 on every image, 644-px
  # views, their pixel bounds and what trains), cached; --recipe vgllm for VG-LLM's
  featstore build --data-root sample_data --annotations sample_data/annotations.json \\
      --encoder vggt-tiny --recipe janusvln --store /tmp/janus.lmdb
  python -m training.train --data_root sample_data --annotations sample_data/annotations.json \\
      --recipe janusvln --use_vggt_cache --vggt_cache_path /tmp/janus.lmdb \\
      --output_dir /tmp/run-janus --max_steps 5 --use_cpu --report_to none
  # Qwen2.5-VL-3B and VGGT-1B on GPUs: scripts/train_h800.sh (docs/LAUNCH.md)
"""

EPILOG = """\
Every option is also accepted with dashes (--data-root for --data_root). A boolean option takes an
optional value: --use_vggt_cache is --use_vggt_cache True. See docs/TRAINING.md.
"""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The description and epilog as written (their examples keep their lines); "(default: X)"
    only where the help does not name its default itself and X is not None; a --no_X switch
    said to be the opposite of --X."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (isinstance(action, argparse._StoreFalseAction) and action.option_strings
                and action.option_strings[0].startswith("--no_")):
            return f"turn --{action.dest} off (the same as --{action.dest} False)"
        if "default" in text.lower() or action.default is None or action.default == []:
            return text
        return super()._get_help_string(action)


@dataclass
class ModelArguments:
    _argument_group_name = "model: Qwen2.5-VL, what trains, the merger and the VGGT spec (as `featstore build`)"

    recipe: Optional[Recipe] = field(default=None, metadata={
        "help": "set every knob as that repository's published training script does (layer, attention, frames "
                "kept, target size, reference frame, fusion and scale, min/max pixels, what trains; docs/TRAINING.md "
                "'Coming from JanusVLN / VG-LLM'); a flag given as well overrides the preset's value"})
    model_name_or_path: str = field(default=TINY_MODEL, metadata={
        "help": f"Qwen2.5-VL hub id or checkpoint folder; '{TINY_MODEL}' is a random-weight tiny model with "
                "an offline tokenizer (tests, demos)"})
    tune_merger: bool = field(default=True, metadata={
        "help": "train the geometry merger, the MLP that maps VGGT features to the LLM's width (default on)"})
    tune_llm: bool = field(default=True, metadata={
        "help": "train the language model and lm_head (default on; --no_tune_llm trains the merger alone, "
                "e.g. a first stage)"})
    tune_vision: bool = field(default=False, metadata={
        "help": "train Qwen's whole vision tower, visual.merger included (default off; refused with "
                "--use_vision_cache)"})
    tune_vision_merger: bool = field(default=False, metadata={
        "help": "train Qwen's vision merger `visual.merger` (vision features -> LLM width; JanusVLN's tune_mm_mlp) "
                "while the tower's blocks stay frozen (default off)"})
    vision_attention: VisionAttention = field(default=DEFAULT_VISION_ATTENTION, metadata={
        "help": "how Qwen's vision tower attends when it runs on pixels: auto (default: one_call where torch's "
                "varlen kernel runs, i.e. CUDA in bf16/fp16, 1.65x faster cached steps on an H100; stock "
                "elsewhere), stock (transformers' path for the model's attention implementation; under sdpa "
                "one call per window, ~180 a layer for 9 images) or one_call (every window, or every image in "
                "a full-attention layer, in one attention call a layer: the varlen kernel where present, else "
                "one padded SDPA call; same numbers up to rounding, backward included). A flash_attention_* "
                "model keeps its own path"})
    compile_vision: bool = field(default=False, metadata={
        "help": "torch.compile the blocks of Qwen's frozen vision tower when it runs on pixels (not with "
                "--tune_vision, --use_vision_cache or DeepSpeed ZeRO-3): the tower's forward in the cached step "
                "343 ms stock -> 38.7 ms for 9 images on an H100 (docs/BENCHMARKS.md), paid for by a compile "
                "in the first steps (and one more when the token count first changes). Same numbers within "
                "rounding (default off)"})
    vision_weights: Optional[str] = field(default=None, metadata={
        "help": "with --use_vision_cache: the Qwen2.5-VL checkpoint (folder, file or hub id) the store's "
                "vision features were built from, as `featstore build --encoder qwen2.5-vl-vision --weights`; "
                "the store must carry its sha256. Default: --model_name_or_path (the tiny model: the "
                "qwen2.5-vl-vision-tiny preset). Pass the base checkpoint when training resumes from a "
                "checkpoint of this project saved without vision blocks"})
    vggt_mode: Optional[Mode] = field(default=None, metadata={
        "help": "where features come from: online_full (one VGGT call per sample), online_causal_stream "
                "(one frame per call with the key/value cache) or cached (the store). Default: cached with "
                "--use_vggt_cache, else online_full for per_image and online_causal_stream for last_to_all"})
    vggt_fusion: Fusion = field(default="per_image", metadata={
        "help": "per_image (VG-LLM: frame k's features on image k) or last_to_all (JanusVLN: the last "
                "frame's features on every image of the sample)"})
    vggt_scale: Optional[float] = field(default=None, metadata={
        "help": "factor on the merger output before it is added (default 1.0 per_image, 0.2 last_to_all "
                "as JanusVLN)"})
    vggt_merger_hidden: Optional[int] = field(default=None, metadata={
        "help": "hidden width of the merger MLP (default 2 x VGGT channels: 4096 for VGGT-1B)"})
    vggt_encoder: Optional[str] = field(default=None, metadata={
        "help": f"featstore encoder preset, as `featstore build --encoder` (default {TINY_VGGT} with the tiny "
                f"model, else {_DEFAULT_ENCODER})"})
    vggt_weights: Optional[str] = field(default=None, metadata={
        "help": "VGGT weights (model.safetensors path, folder or hub id), as `featstore build --weights`"})
    vggt_layer: int = field(default=_LAYER, metadata={
        "help": f"aggregator layer, as `featstore build --layer` (default {_LAYER}: VG-LLM, JanusVLN)"})
    vggt_attention: Optional[Attention] = field(default=None, metadata={
        "help": "as `featstore build --attention` (default: full for per_image, causal for last_to_all; "
                "online modes imply it)"})
    vggt_frames_kept: Optional[FramesKept] = field(default=None, metadata={
        "help": "as `featstore build --frames-kept` (default: all for per_image, last for last_to_all)"})
    vggt_reference_frame: ReferenceFrame = field(default=_REFERENCE_FRAME, metadata={
        "help": f"as `featstore build --reference-frame` (default {_REFERENCE_FRAME}): first (the frames in their "
                "order, as VG-LLM's and JanusVLN's published scripts pass --reference_frame first) or last (VGGT "
                "sees them reversed, the features come back in the sample's order; with last_to_all the kept frame "
                "is the first)"})
    vggt_target_size: Optional[int] = field(default=None, metadata={
        "help": "as `featstore build --target-size` (default: the encoder preset's, 518 for vggt-1b)"})
    vggt_preprocess_mode: PreprocessMode = field(default=_PREPROCESS_MODE, metadata={
        "help": f"as `featstore build --preprocess-mode` (default {_PREPROCESS_MODE})"})
    vggt_storage_dtype: StorageDtype = field(default=_STORAGE_DTYPE, metadata={
        "help": f"as `featstore build --storage-dtype`: the store's dtype (default {_STORAGE_DTYPE}). float8_e4m3fn "
                "opts in to an fp8 store, whose features the merger receives dequantised to bfloat16; without it an "
                "fp8 store is refused"})
    vggt_compute_dtype: ComputeDtype = field(default=_COMPUTE_DTYPE, metadata={
        "help": f"as `featstore build --compute-dtype`: VGGT's autocast dtype on GPU (default {_COMPUTE_DTYPE})"})


@dataclass
class DataArguments:
    _argument_group_name = "data and the feature caches"

    data_root: str = field(default=None, metadata={
        "help": "folder of the images; annotation paths and store keys are relative to it (required; "
                "the --data-root of `featstore build`)"})
    annotations: List[str] = field(default_factory=list, metadata={
        "metavar": "FILE[@IMAGE_DIR][%N]",
        "help": "LLaVA/Qwen conversation JSON or JSONL files (one or more, required), each sample with "
                "'images' (ordered list) or 'image'; the --annotations the store was built with. FILE@IMAGE_DIR: "
                "the file's relative image paths start from IMAGE_DIR, a folder inside --data_root (VG-LLM's "
                "data_path); FILE%%N: keep N percent of its samples (1-100; VG-LLM's name%%N), the same ones "
                "`featstore build` keeps (docs/TRAINING.md)"})
    video_policy: Optional[str] = field(default=None, metadata={
        "metavar": "POLICY",
        "help": "which frames of a sample's 'video' (a folder of frames or a .mp4/.avi/.mov) it trains on: "
                "vgllm[:BASE_INTERVAL:MIN:MAX] (VG-LLM's rule, default vgllm:2:4:8) or linspace:N (N evenly "
                "spaced frames: Spatial-MLLM 16, VLM-3R 32); '<video>' becomes one '<image>' per frame. The "
                "--video-policy the store was built with (another is a miss: docs/TRAINING.md, Video samples)"})
    use_vggt_cache: bool = field(default=False, metadata={
        "help": f"read VGGT features from the store (<data_root>/{DEFAULT_STORE_NAME} unless "
                "--vggt_cache_path); VGGT is then never built. Build the store first: `featstore build "
                "--data-root DATA_ROOT --annotations FILE...` with the same VGGT spec flags"})
    vggt_cache_path: Optional[str] = field(default=None, metadata={
        "help": "the store's path (VGGT features, and the Qwen vision features with --use_vision_cache); "
                f"default <data_root>/{DEFAULT_STORE_NAME}. E.g. a copy on local disk (`featstore copy`)"})
    vggt_cache_miss: Literal["error", "compute"] = field(default="error", metadata={
        "help": "a sample missing from the store: error (default, names the key and the sample) or compute "
                "it online (VGGT is built on the first miss) and count it"})
    use_vision_cache: bool = field(default=False, metadata={
        "help": "read the frozen Qwen vision tower's output (feature set 'qwen_vision') from the store "
                "(--vggt_cache_path, else <data_root>/" + DEFAULT_STORE_NAME + ") instead of running the tower: "
                "the model then holds no vision block, only `visual.merger`. Works with every --vggt_mode; "
                "refused with --tune_vision"})
    min_pixels: Optional[int] = field(default=None, metadata={
        "help": "the Qwen image processor's lower pixel bound (VG-LLM/JanusVLN: 12544 = 16*28*28). featstore "
                "gives the processor the even-cropped VGGT view, which must lie within the bounds (else its grid "
                "would not match the geometry tokens: an error). Default: bounds that hold any view"})
    max_pixels: Optional[int] = field(default=None, metadata={
        "help": "the Qwen image processor's upper pixel bound (VG-LLM/JanusVLN: 451584 = 576*28*28); see "
                "--min_pixels"})
    system_prompt: str = field(default="You are a helpful assistant.", metadata={
        "help": "system turn prepended to samples without one ('' for none)"})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    _argument_group_name = "training: every transformers.TrainingArguments flag"

    # The collator builds the batch; the Trainer must not drop its VGGT keys.
    remove_unused_columns: bool = field(default=False, metadata={
        "help": "keep False: the batch carries the VGGT inputs the model's forward takes"})
    dataloader_non_blocking: bool = field(default=True, metadata={
        "help": "copy each batch to the GPU without waiting for the copy (from the pinned memory of "
                "--dataloader_pin_memory, on by default): the step's first host work overlaps the copy of its "
                "tens of MB of features. Sets accelerate's non_blocking unless --accelerator_config sets it "
                "(default on; --dataloader_non_blocking False for blocking copies)"})

    mm_projector_lr: Optional[float] = field(default=None, metadata={
        "help": "learning rate of every parameter whose name holds 'merger' (the geometry merger and Qwen's "
                "visual.merger), as VG-LLM's and JanusVLN's --mm_projector_lr (their scripts: 1e-5); default: "
                "--learning_rate for all (training/optim.py)"})
    vision_tower_lr: Optional[float] = field(default=None, metadata={
        "help": "with --mm_projector_lr: the learning rate of the other visual.* parameters (their scripts: 1e-6; "
                "only trained with --tune_vision)"})

    dataloader_batch_slots: bool = field(default=True, metadata={
        "help": "DataLoader workers (--dataloader_num_workers > 0) write each batch into shared-memory slots "
                "they keep, which the main process maps once and registers as pinned memory: the copy to the "
                "GPU comes straight from a slot, and no batch's shared memory is allocated, pinned again or "
                "freed per step (freeing tens of MB stalls the training thread; docs/PERFORMANCE.md). A worker "
                "whose slots are all in use sends the batch the ordinary way (default on; "
                "--dataloader_batch_slots False for the ordinary way always)"})

    def __post_init__(self):
        explicit = _sets_non_blocking(self.accelerator_config)
        if self.disable_tqdm is None and not _stderr_is_a_terminal():
            # Off a terminal (a log file, a job scheduler) tqdm's bar is a stream of \r-joined
            # redraws; the Trainer then prints each --logging_steps record as one line instead.
            self.disable_tqdm = True
        super().__post_init__()
        if not explicit:
            # Only from pinned memory is a non-blocking copy asynchronous (and safe: the pinned
            # buffer is kept until the copy is done); accelerate warns about the other case.
            # Batch slots are registered pinned memory themselves (training.batch_slots).
            pinned = self.dataloader_pin_memory or (self.dataloader_batch_slots and self.dataloader_num_workers > 0)
            self.accelerator_config.non_blocking = bool(self.dataloader_non_blocking and pinned)


def _stderr_is_a_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        return False


def _sets_non_blocking(config) -> bool:
    """Whether --accelerator_config (a dict, inline JSON, a JSON file path or an AcceleratorConfig) sets non_blocking."""
    import json

    if config is None:
        return False
    if isinstance(config, dict):
        return "non_blocking" in config
    if isinstance(config, str):  # inline JSON (as the command line gives it) or a JSON file's path
        try:
            if config.lstrip().startswith("{"):
                return "non_blocking" in json.loads(config)
            with open(config) as f:
                return "non_blocking" in json.load(f)
        except (OSError, ValueError):
            return False  # transformers reports the bad value itself
    return True  # an AcceleratorConfig object built by the caller: its value stands


@dataclass(frozen=True)
class VGGTSettings:
    """The resolved feature choices: where VGGT features come from and how they are fused, and
    whether Qwen's vision features come from the store (`vision_cached`)."""

    mode: Mode
    fusion: Fusion
    scale: float
    encoder: str
    weights: Optional[str]
    overrides: dict
    store_path: Optional[str]
    cache_miss: str
    vision_cached: bool = False  # Qwen's vision tower replaced by its cached output (--use_vision_cache)
    vision_store_path: Optional[str] = None  # the store holding the "qwen_vision" feature set
    vision_encoder: Optional[str] = None  # featstore preset of the cached vision features
    vision_weights: Optional[str] = None  # its checkpoint (None: the preset's random weights)

    @property
    def cached(self) -> bool:
        return self.mode == "cached"

    @property
    def stream(self) -> bool:
        return self.mode == "online_causal_stream"


def build_parser() -> transformers.HfArgumentParser:
    """The parser of `python -m training.train`: the three dataclasses' flags, one group each,
    under DESCRIPTION (with the examples) and over EPILOG."""
    return transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments), prog=PROG,
                                         description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter)


def parse_args(argv: Optional[List[str]] = None):
    """Parse `argv` (default sys.argv[1:]) -> (ModelArguments, DataArguments, TrainingArguments).

    `--recipe NAME` puts that recipe's flags (featstore.build.recipes) before the given ones, so that a
    flag given explicitly overrides the preset's value (argparse keeps the last)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name = _recipe_in(argv)
    if name is not None:
        from featstore.build.recipes import get_recipe

        argv = get_recipe(name).training_flags() + argv
    parser = build_parser()
    model_args, data_args, train_args = parser.parse_args_into_dataclasses(args=argv)
    return model_args, data_args, train_args


def _recipe_in(argv: List[str]) -> Optional[str]:
    """The value of the last --recipe in argv (None: none, or an unknown value argparse will name)."""
    name = None
    for i, arg in enumerate(argv):
        if arg == "--recipe" and i + 1 < len(argv):
            name = argv[i + 1]
        elif arg.startswith("--recipe="):
            name = arg.split("=", 1)[1]
    return name if name in RECIPE_NAMES else None


def resolve_vggt(model_args: ModelArguments, data_args: DataArguments) -> VGGTSettings:
    """Check the flags together and fill the derived defaults.

    Raises:
        ArgumentError: a missing or contradictory flag (the message names the flags and values).
    """
    if not data_args.data_root:
        raise ArgumentError("--data_root is required: the folder the annotation paths are relative to")
    if not os.path.isdir(data_args.data_root):
        raise ArgumentError(f"--data_root {data_args.data_root}: not a directory; pass the folder the annotation "
                            "paths are relative to")
    if not data_args.annotations:
        raise ArgumentError("--annotations FILE... is required (LLaVA/Qwen conversation JSON or JSONL)")
    from featstore.errors import PlanError
    from featstore.build.annotations import annotation_sources

    try:  # every FILE[@IMAGE_DIR][%N] checked before any work, with the words featstore build uses
        annotation_sources(data_args.annotations, data_args.data_root)
        from featstore.build.video import parse_video_policy

        parse_video_policy(data_args.video_policy)
    except PlanError as e:
        raise ArgumentError(str(e)) from None
    fusion = model_args.vggt_fusion
    mode = model_args.vggt_mode
    if data_args.use_vggt_cache and mode not in (None, "cached"):
        raise ArgumentError(f"--use_vggt_cache contradicts --vggt_mode {mode}: drop one of them")
    if mode is None:
        mode = "cached" if data_args.use_vggt_cache else (
            "online_full" if fusion == "per_image" else "online_causal_stream")
    attention = model_args.vggt_attention
    implied = {"online_full": "full", "online_causal_stream": "causal"}.get(mode)
    if attention is None:
        attention = implied or ("full" if fusion == "per_image" else "causal")
    elif implied is not None and attention != implied:
        raise ArgumentError(f"--vggt_mode {mode} computes attention={implied}; --vggt_attention {attention} "
                            "contradicts it: drop --vggt_attention")
    frames_kept = model_args.vggt_frames_kept or ("all" if fusion == "per_image" else "last")
    if fusion == "per_image" and frames_kept != "all":
        raise ArgumentError("--vggt_fusion per_image needs one feature per image: --vggt_frames_kept all "
                            f"(found {frames_kept})")
    vision_cached = bool(data_args.use_vision_cache)
    if vision_cached and model_args.tune_vision:
        raise ArgumentError("--use_vision_cache contradicts --tune_vision: the cached vision features were computed "
                            "by the frozen tower's weights, so a trained tower would make them stale. Drop "
                            "--tune_vision (--tune_vision_merger still trains visual.merger) or --use_vision_cache")
    if model_args.compile_vision and vision_cached:
        raise ArgumentError("--compile_vision contradicts --use_vision_cache: with cached vision features no "
                            "tower runs. Drop --compile_vision")
    if model_args.compile_vision and model_args.tune_vision:
        raise ArgumentError("--compile_vision contradicts --tune_vision: it compiles a frozen tower only. Drop "
                            "--compile_vision, or train without --tune_vision (--tune_vision_merger still "
                            "trains visual.merger)")
    if data_args.vggt_cache_path and mode != "cached" and not vision_cached:
        raise ArgumentError(f"--vggt_cache_path is only read with --use_vggt_cache or --use_vision_cache "
                            f"(mode is {mode}); add one of them, or drop --vggt_cache_path")
    encoder = model_args.vggt_encoder or (TINY_VGGT if is_tiny(model_args.model_name_or_path) else _DEFAULT_ENCODER)
    overrides = dict(layer=model_args.vggt_layer, attention=attention, frames_kept=frames_kept,
                     preprocess_mode=model_args.vggt_preprocess_mode, storage_dtype=model_args.vggt_storage_dtype,
                     compute_dtype=model_args.vggt_compute_dtype, reference_frame=model_args.vggt_reference_frame)
    if model_args.vggt_target_size is not None:
        overrides["target_size"] = model_args.vggt_target_size
    scale = _DEFAULT_SCALE[fusion] if model_args.vggt_scale is None else float(model_args.vggt_scale)
    # One store holds both feature sets: VGGT's and (feature set "qwen_vision") the vision tower's.
    path = data_args.vggt_cache_path or os.path.join(data_args.data_root, DEFAULT_STORE_NAME)
    return VGGTSettings(mode=mode, fusion=fusion, scale=scale, encoder=encoder, weights=model_args.vggt_weights,
                        overrides=overrides, store_path=path if mode == "cached" else None,
                        cache_miss=data_args.vggt_cache_miss, vision_cached=vision_cached,
                        vision_store_path=path if vision_cached else None,
                        vision_encoder=(None if not vision_cached else
                                        TINY_VISION if is_tiny(model_args.model_name_or_path) and
                                        not model_args.vision_weights else "qwen2.5-vl-vision"),
                        vision_weights=(None if not vision_cached else model_args.vision_weights or
                                        (None if is_tiny(model_args.model_name_or_path)
                                         else model_args.model_name_or_path)))
