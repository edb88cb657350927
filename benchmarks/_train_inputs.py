"""Inputs of the training benchmarks (train_bench.py, train_zero_bench.py), made on the spot:

- the model configs: Qwen2.5-VL-3B's released dimensions (random weights) or the tiny preset,
  with the offline tokenizer's special ids; VGGT-1B or the tiny VGGT;
- a random-weight VGGT checkpoint in the official key layout (`aggregator.*` in a
  model.safetensors), so `featstore build --encoder vggt-1b --weights` and training's
  `--vggt_weights` load it like the released file;
- generated 640x480 JPEG frames grouped into 9-frame samples, with a conversation annotation
  file (one `<image>` per frame);
- the feature store, built by `featstore build --annotations` in a subprocess (the command a
  user runs; its GPU memory is gone when the benchmark starts measuring);
- a checkpoint folder (config, weights, tokenizer, image processor) that `python -m
  training.train --model_name_or_path` loads, for the DeepSpeed runs.

Everything lands in one work folder and is reused when already there (the two benchmarks of
one GPU run share it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

__all__ = ["QWEN25_VL_3B_TEXT", "QWEN25_VL_3B_VISION", "Inputs", "bench_parser", "model_config", "vggt_choice",
           "prepare", "write_vggt_checkpoint", "write_model_folder", "child_env"]

# Qwen2.5-VL-3B-Instruct's released config.json (text and vision parts).
QWEN25_VL_3B_TEXT = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
    num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6, hidden_act="silu",
    tie_word_embeddings=True,
    # head_dim 128: sum(mrope_section) == 64
    rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
)
QWEN25_VL_3B_VISION = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048, patch_size=14,
    spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
    in_chans=3, tokens_per_second=2, hidden_act="silu",
)
QUESTION = "\nWhere should the robot go next?"
ANSWER = "Turn left and move forward 0.5 m."


def bench_parser(doc: str, *, budget_s: float, work_help: str, smoke_help: str) -> argparse.ArgumentParser:
    """The flags both benchmarks take: --out (default $OUT), --work, --smoke, --budget-s."""
    p = argparse.ArgumentParser(description=doc.split("\n", 1)[0], epilog=doc.split("\n", 1)[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    out = os.environ.get("OUT")
    p.add_argument("--out", default=out, required=not out, help="folder for the results (default $OUT)")
    p.add_argument("--work", default=None, help=work_help + " (default: a new temp dir)")
    p.add_argument("--smoke", action="store_true", help=smoke_help)
    p.add_argument("--budget-s", type=float, default=budget_s, help=f"wall-clock budget (default {budget_s:g})")
    return p


def model_config(tokenizer, *, smoke: bool):
    """The Qwen2_5_VLConfig to build with random weights: the tiny preset, or 3B dimensions.

    Special token ids come from `tokenizer` (the offline tiny tokenizer): they lie inside the
    3B vocabulary, whose embedding and lm_head keep the released size (151936 rows)."""
    from transformers import Qwen2_5_VLConfig

    from training.presets import SPECIAL_TOKENS, tiny_config

    if smoke:
        return tiny_config(tokenizer)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(QWEN25_VL_3B_TEXT, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    return Qwen2_5_VLConfig(text_config=text, vision_config=dict(QWEN25_VL_3B_VISION), tie_word_embeddings=True,
                            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def vggt_choice(smoke: bool):
    """(encoder preset name, aggregator config): the tiny VGGT for smoke runs, else VGGT-1B."""
    from featstore.encoders.vggt.config import TINY_CONFIG, VGGT_1B_CONFIG

    return ("vggt-tiny", TINY_CONFIG) if smoke else ("vggt-1b", VGGT_1B_CONFIG)


def write_vggt_checkpoint(path: str, config: dict, *, seed: int = 0) -> str:
    """A random aggregator (featstore's seeded init, activations O(1)) saved as the official
    checkpoint lays it out: `aggregator.<name>` keys in one safetensors file. bf16 on disk
    (half the bytes to hash and read); the encoder loads it into its fp32 weights."""
    from safetensors.torch import save_file

    from featstore.encoders.vggt.model import VGGTAggregator, init_random_

    model = init_random_(VGGTAggregator(**config), seed)
    state = {"aggregator." + k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous()
             for k, v in model.state_dict().items()}
    tmp = path + ".tmp"
    save_file(state, tmp)
    os.replace(tmp, path)
    return path


def child_env() -> dict:
    """This environment with the repository importable (subprocesses: featstore build, training)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH", "")) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


@dataclass
class Inputs:
    root: str  # data root: frames, annotations, store
    annotations: str
    store: str
    encoder: str  # featstore encoder preset the store was built with
    weights: str  # the random VGGT checkpoint
    units: int
    samples: int
    frames_per_sample: int
    build: dict  # featstore build's JSON report


def _write_samples(root: str, units: int, frames: int, samples: int) -> str:
    """`units` distinct 9-frame units of generated frames; `samples` conversation samples cycling
    over them (same frames, same key: the store holds each unit once)."""
    from build_bench import make_images  # generated 640x480 JPEGs, ep*/NNNNN.jpg

    make_images(root, units * frames)
    paths = [f"ep{i // 50:04d}/{i:05d}.jpg" for i in range(units * frames)]
    records = []
    for s in range(samples):
        u = s % units
        records.append({"images": paths[u * frames: (u + 1) * frames], "conversations": [
            {"from": "human", "value": "<image>" * frames + QUESTION}, {"from": "gpt", "value": ANSWER}]})
    path = os.path.join(root, "train.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def prepare(work: str, *, smoke: bool, units: int, frames: int, samples: int, log=print) -> Inputs:
    """Make (or reuse) the frames, annotations, VGGT checkpoint and store under `work`.

    Raises:
        RuntimeError: `featstore build` failed (its output tail is in the message).
    """
    marker = os.path.join(work, "inputs.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            found = Inputs(**json.load(f))
        if (found.units, found.samples, found.frames_per_sample) == (units, samples, frames):
            log(f"reusing inputs in {work}")
            return found
    os.makedirs(work, exist_ok=True)
    root = os.path.join(work, "data")
    os.makedirs(root, exist_ok=True)
    encoder, config = vggt_choice(smoke)
    weights = write_vggt_checkpoint(os.path.join(work, "vggt_random.safetensors"), config)
    annotations = _write_samples(root, units, frames, samples)
    store = os.path.join(root, "vggt_features.lmdb")
    cmd = [sys.executable, "-m", "featstore", "build", "--data-root", root, "--annotations", annotations,
           "--store", store, "--encoder", encoder, "--weights", weights, "--no-progress", "--json"]
    log("$ " + " ".join(cmd))
    res = subprocess.run(cmd, env=child_env(), capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"featstore build exited {res.returncode}: {(res.stdout + res.stderr)[-3000:]}")
    report = _last_json(res.stdout)
    inputs = Inputs(root=root, annotations=annotations, store=store, encoder=encoder, weights=weights, units=units,
                    samples=samples, frames_per_sample=frames, build=report)
    with open(marker, "w") as f:
        json.dump(asdict(inputs), f)
    return inputs


def _last_json(text: str) -> dict:
    """The last JSON object printed in `text` (`--json` prints one, indented) or {} when none."""
    lines = text.strip().splitlines()
    for start in range(len(lines) - 1, -1, -1):
        if lines[start].startswith("{"):
            try:
                value = json.loads("\n".join(lines[start:]))
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return {}


def write_model_folder(folder: str, in_channels: int, *, smoke: bool, device: str) -> str:
    """A random-weight checkpoint folder of `Qwen2_5_VLWithGeometry` (3B dimensions, or tiny)
    with the offline tokenizer and image processor: what `--model_name_or_path` loads.

    Built with `_from_config` on `device` in bf16 (the 3B model initialises in seconds on a GPU,
    minutes on a CPU), saved with `save_pretrained`. Reused when already written."""
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    from training.model import GEOMETRY_CONFIG_KEY, Qwen2_5_VLWithGeometry, geometry_config
    from training.presets import image_processor, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = model_config(tokenizer, smoke=smoke)
    setattr(config, GEOMETRY_CONFIG_KEY, geometry_config(in_channels))
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLWithGeometry._from_config(config, dtype=torch.bfloat16)
    tmp = folder + ".tmp"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    image_processor().save_pretrained(tmp)
    del model
    os.replace(tmp, folder)
    return folder
