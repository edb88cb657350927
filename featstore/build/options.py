"""What a build is asked to do (`BuildOptions`, filled by `featstore build`'s flags or by a
caller) and what one rank of it knows once the spec and the feature set are resolved
(`BuildContext`, made once in `featstore.build.runner` and read by the stages after it).

Example:
    >>> from featstore.build.options import BuildOptions
    >>> BuildOptions(data_root="data").store_path()
    'data/vggt_features.lmdb'
    >>> BuildOptions(data_root="data", shard=(1, 4)).store_path()
    'data/vggt_features.shard-1-of-4.lmdb'
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable

from featstore.contract.naming import DEFAULT_STORE_NAME, shard_store_name
from featstore.contract.spec import EncoderSpec

__all__ = ["BuildOptions", "BuildContext"]

logger = logging.getLogger("featstore")


@dataclass
class BuildOptions:
    """Everything one build needs; the CLI fills it from its flags."""

    data_root: str
    annotations: list[str] = field(default_factory=list)
    # Which frames of a "video" sample (featstore.build.video; None: VG-LLM's vgllm:2:4:8).
    video_policy: str | None = None
    store: str | None = None
    encoder: str = "vggt-1b"
    feature_set: str | None = None  # None: the encoder's (featstore.encoders.feature_set_of)
    weights: str | None = None
    device: str = "auto"
    spec_overrides: dict = field(default_factory=dict)
    force: bool = False
    dry_run: bool = False
    workers: int = min(4, os.cpu_count() or 1)
    batch_frames: int = 16  # frames per forward; batching amortises kernel launches
    shard: tuple[int, int] = (0, 1)  # (index, count) for multi-host builds
    commit_entries: int = 64
    commit_bytes: int = 512 << 20
    progress: bool = True
    compile: bool = False  # torch.compile the encoder's blocks (GPU; same features within bf16 noise)
    # The Qwen vision tower's attention (qwen2.5-vl-vision encoders; featstore.encoders.qwen_vision.
    # attention): None is the encoder's default ("auto"); "stock", "one_call" (qwen_vision.config).
    vision_attention: str | None = None
    # Frames cross from the decode workers to the GPU loop as uint8 where that is exact (every
    # value k/255: the VGGT and Qwen views without extra_resize), a quarter of the float32 bytes
    # to pass, stack, pin and copy; they become float32 on the device. False: float32 all the way
    # (same features; kept for benchmarks/build_bench.py's before/after).
    uint8_frames: bool = True
    # On CUDA, a thread of the decode loader receives each decoded unit from its worker and
    # copies it into pinned memory (DataLoader's pin_memory), so that the GPU loop's thread only
    # stacks pinned frames and launches the forward. Receiving (one pipe read, one shared-memory
    # mapping, first touch of its pages) costs about 1-2 ms a unit; done in the GPU loop it kept
    # a fast forward waiting (docs/BENCHMARKS.md, vision build). False: the GPU loop receives and
    # pins (same features; kept for benchmarks/vision_build_bench.py's before/after).
    pin_frames: bool = True
    # Embed each distinct frame of a batch once (its patch embedding, VGGT's per-frame DINOv2 ViT,
    # depends on the frame alone) where the encoder offers it (`encodes_indexed`: VGGT on the
    # in-tree backend), compiled or not; the rest of the call runs per unit as before.
    # Same features within rounding (docs/BUILD.md, "Frame reuse"). False: every frame of every
    # unit is embedded (`--no-frame-reuse`).
    frame_reuse: bool = True

    def build_options(self) -> dict:
        """The encoder options that choose how the features are computed, not what they are (beside
        `compile`, which every preset takes): passed only when set, since most presets lack them."""
        return {} if self.vision_attention is None else {"vision_attention": self.vision_attention}

    def store_path(self) -> str:
        if self.store:
            return self.store
        name = DEFAULT_STORE_NAME
        if self.shard[1] > 1:
            name = shard_store_name(*self.shard)
        return os.path.join(self.data_root, name)


@dataclass(frozen=True)
class BuildContext:
    """One rank's build once the spec and the feature set are known: what every stage after
    planning reads (the freshness split, the estimate, the pipeline, the commit and the
    manifest's summary). Made once per build by `featstore.build.runner`."""

    opts: BuildOptions
    spec: EncoderSpec
    feature_set: str
    rank: int = 0
    world: int = 1  # ranks of this build (torchrun); each computes a contiguous part of the to-do list
    t0: float = 0.0  # time.perf_counter() when the build started: elapsed_s counts from it
    fingerprint: str = ""  # spec.fingerprint(), computed once

    def __post_init__(self):
        if not self.fingerprint:
            object.__setattr__(self, "fingerprint", self.spec.fingerprint())

    @property
    def store_path(self) -> str:
        return self.opts.store_path()

    @property
    def shard(self) -> tuple[int, int]:
        """(index, count) of `--shard I/N`: this host's part of the plan."""
        return self.opts.shard

    @property
    def show_progress(self) -> bool:
        """The progress bar: rank 0 only, unless --no-progress."""
        return self.opts.progress and self.rank == 0

    @property
    def log(self) -> Callable[[str], None]:
        """Logs the plan summary once per build (rank 0); a no-op on the other ranks."""
        return logger.info if self.rank == 0 else _quiet


def _quiet(_msg: str) -> None:
    pass
