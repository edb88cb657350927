"""Regenerate the small sample data root shipped in sample_data/ (deterministic).

Two short "navigation episodes" of four 96x72 frames each, a portrait PNG and an RGBA PNG,
and an annotation file in the LLaVA/Qwen conversation format that training reads.

    python scripts/make_sample_data.py [OUT_DIR]   # default: sample_data
"""

import json
import os
import sys

import numpy as np
from PIL import Image


def frame(seed: int, width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin((x + y) / (7 + seed % 5))], -1)
    cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
    blob = np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / (2 * (0.15 * width) ** 2)))[..., None]
    img = np.clip(base * (1 - blob) + rng.uniform(0, 1, 3) * blob, 0, 1)
    return Image.fromarray((img * 255).astype(np.uint8))


def main(out: str) -> None:
    samples = []
    for scene, seed in (("scene_a", 10), ("scene_b", 20)):
        os.makedirs(os.path.join(out, scene), exist_ok=True)
        names = []
        for i in range(4):
            name = f"{scene}/{i:03d}.jpg"
            frame(seed + i, 96, 72).save(os.path.join(out, name), quality=90)
            names.append(name)
        samples.append({
            "id": f"{scene}_step3",
            "images": names,
            "conversations": [
                {"from": "human", "value": "<image>" * len(names) + "\nWhere should the robot go next?"},
                {"from": "gpt", "value": "Turn left and move forward 0.5 m."},
            ],
        })
        samples.append({
            "id": f"{scene}_step1",
            "images": names[:2],
            "conversations": [
                {"from": "human", "value": "<image><image>\nWhat changed between the views?"},
                {"from": "gpt", "value": "The camera moved forward."},
            ],
        })
    os.makedirs(os.path.join(out, "misc"), exist_ok=True)
    frame(30, 72, 96).save(os.path.join(out, "misc/portrait.png"))
    rgba = frame(31, 80, 60).convert("RGBA")
    alpha = np.full((60, 80), 255, np.uint8)
    alpha[:, :20] = 0
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(os.path.join(out, "misc/rgba.png"))
    samples.append({
        "id": "portrait_q",
        "image": "misc/portrait.png",
        "conversations": [
            {"from": "human", "value": "<image>\nIs the door open?"},
            {"from": "gpt", "value": "Yes."},
        ],
    })
    with open(os.path.join(out, "annotations.json"), "w") as f:
        json.dump(samples, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "sample_data")
