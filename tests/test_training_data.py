"""Training data: labels, placeholders, the grid rule, cache reads, misses and frame-list checks."""

from __future__ import annotations

import json
import os

import pytest
import torch

from _training_helpers import annotations, build_store, collate, dataset, sample_root, spec_for


def _write(root: str, name: str, samples) -> str:
    path = os.path.join(root, name)
    with open(path, "w") as f:
        json.dump(samples, f)
    return path


def test_labels_cover_assistant_content_and_its_end_token_only(tmp_path):
    root = sample_root(tmp_path)
    ds = dataset(root, spec_for())
    tok = ds.tokenizer
    for i in range(len(ds)):
        item = ds[i]
        sup = item["labels"] != -100
        text = tok.decode(item["input_ids"][sup])
        answer = ds.samples[i]["conversations"][1]["value"]
        assert text == answer + "<|im_end|>\n"
        assert torch.equal(item["labels"][sup], item["input_ids"][sup])
        # the prompt is Qwen's chat layout
        full = tok.decode(item["input_ids"])
        assert full.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
        assert full.endswith(f"<|im_start|>assistant\n{answer}<|im_end|>\n")


def test_each_image_placeholder_becomes_its_vision_tokens_in_order(tmp_path):
    root = sample_root(tmp_path)
    ds = dataset(root, spec_for())
    item = ds[0]  # 4 landscape frames: VGGT 112x84 -> 8x6 patches -> 4x3 merged = 12 tokens each
    ids = item["input_ids"].tolist()
    assert ids.count(ds.vision_start) == 4 == ids.count(ds.vision_end)
    assert ids.count(ds.image_pad) == 48
    assert torch.equal(item["mm_token_type_ids"], (item["input_ids"] == ds.image_pad).long())
    assert item["image_grid_thw"].tolist() == [[1, 6, 8]] * 4
    portrait = ds[4]  # 72x96 -> crop to 112x112 -> 8x8 patches -> 16 tokens
    assert portrait["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert portrait["input_ids"].tolist().count(ds.image_pad) == 16


def test_grid_rule_trims_an_odd_vggt_grid_to_even(tmp_path):
    root = sample_root(tmp_path)
    spec = spec_for(target_size=126)  # 96x72 -> 126x98 -> 9x7 patches (odd both ways) -> Qwen 8x6
    item = dataset(root, spec)[1]
    assert item["grid"] == (7, 9)
    assert item["image_grid_thw"].tolist() == [[1, 6, 8]] * 2


def _reference_pixels(view: torch.Tensor, processor):
    """What VG-LLM's and JanusVLN's `process_image_unified_vggt` does with one VGGT view, step by
    step: trim width and height to whole merge blocks, crop `images[:, :, :height, :width]`, then the
    image processor on the float crop with do_rescale=False."""
    patch, merge = processor.patch_size, processor.merge_size
    images = view[None]
    _, _, height, width = images.shape
    if (width // patch) % merge > 0:
        width = width - (width // patch) % merge * patch
    if (height // patch) % merge > 0:
        height = height - (height // patch) % merge * patch
    images = images[:, :, :height, :width]
    return processor(images, return_tensors="pt", do_rescale=False)


@pytest.mark.parametrize("target", [112, 126])  # 8x6 patches (even), 9x7 (odd both ways)
def test_qwen_pixels_are_the_references_crop_bit_for_bit(tmp_path, target):
    """The dataset's pixel_values == the references' processor call on the cropped VGGT view (0
    difference), and differ from the old resize of the view to the trimmed grid."""
    import numpy as np
    from PIL import Image

    from featstore.encoders.preprocess import preprocess_image

    root = sample_root(tmp_path)
    spec = spec_for(target_size=target)
    ds = dataset(root, spec)
    item = ds[1]
    views = [preprocess_image(os.path.join(root, k), spec.preprocess) for k in ds.units[1].frames]
    refs = [_reference_pixels(v, ds.image_processor) for v in views]
    want = torch.cat([r["pixel_values"] for r in refs])
    assert torch.equal(item["image_grid_thw"], torch.cat([r["image_grid_thw"] for r in refs]))
    assert item["pixel_values"].shape == want.shape
    assert torch.equal(item["pixel_values"], want)
    if target == 126:  # the resize the dataset used to make gives other pixels
        side = 28
        hh, ww = item["image_grid_thw"][0, 1] // 2, item["image_grid_thw"][0, 2] // 2
        u8 = [Image.fromarray((v * 255).round().byte().permute(1, 2, 0).numpy()).resize(
            (int(ww) * side, int(hh) * side), Image.Resampling.BICUBIC) for v in views]
        resized = ds.image_processor(images=[np.asarray(u) for u in u8], return_tensors="pt")["pixel_values"]
        assert not torch.equal(resized, want)


VGLLM_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".vendor", "vgllm", "src",
                          "qwen_vl", "data", "data_qwen.py")


def _reference_tokenize():
    """VG-LLM's `preprocess_qwen_2_visual` (the same in JanusVLN), taken from the vendored file alone
    (its module imports decord); skipped when the file is absent."""
    import ast
    import copy

    import transformers

    if not os.path.isfile(VGLLM_DATA):
        pytest.skip(f"VG-LLM not vendored at {VGLLM_DATA}")
    with open(VGLLM_DATA) as f:
        tree = ast.parse(f.read())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "preprocess_qwen_2_visual")
    ns = {"copy": copy, "torch": torch, "transformers": transformers, "IGNORE_INDEX": -100, "Dict": dict,
          "List": list}
    exec(compile(ast.Module([fn], []), VGLLM_DATA, "exec"), ns)
    return ns["preprocess_qwen_2_visual"]


class _ListChatTemplate:
    """The tokenizer as transformers 4.x's apply_chat_template behaved for their code: a list of ids."""

    def __init__(self, tok):
        self.tok, self.chat_template = tok, None

    def __deepcopy__(self, memo):
        return _ListChatTemplate(self.tok)

    def apply_chat_template(self, conv):
        return list(self.tok.apply_chat_template(conv, chat_template=self.chat_template, tokenize=True,
                                                 return_dict=False))


def test_tokens_and_labels_equal_the_references(tmp_path):
    """input_ids and labels of a JanusVLN-style sample (history images, "<image>\\n" in the first
    turn, two rounds) equal VG-LLM's / JanusVLN's: the first turn's "<image>\\n" loses its newline
    (their _get_item), and every token after an assistant header is supervised (content,
    <|im_end|>, the closing newline). Their code masks the header as its first 3 tokens, which is
    "<|im_start|>assistant\\n" under Qwen's tokenizer; the byte-level test tokenizer splits
    "assistant" into bytes, so here the whole header is masked on their side too."""
    preprocess = _reference_tokenize()
    root = sample_root(tmp_path)
    conv = [{"from": "human", "value": "History:<image>\n<image>\nNow:<image>\nWhere next?"},
            {"from": "gpt", "value": "TURN_LEFT"},
            {"from": "human", "value": "And then?"},
            {"from": "gpt", "value": "STOP"}]
    path = _write(root, "janus.json", [{"id": "ep/002.jpg", "images": [f"scene_a/00{i}.jpg" for i in range(3)],
                                        "conversations": conv}])
    ds = dataset(root, spec_for(), files=[path])
    item = ds[0]
    counts = [int(t.prod()) // 4 for t in item["image_grid_thw"]]
    theirs_conv = json.loads(json.dumps(conv))
    theirs_conv[0]["value"] = theirs_conv[0]["value"].replace("<image>\n", "<image>")  # their _get_item
    out = preprocess([theirs_conv], _ListChatTemplate(ds.tokenizer), grid_thw=counts)
    want_ids, want_labels = out["input_ids"][0], out["labels"][0].clone()
    header = ds.tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    ids = want_ids.tolist()
    for i in range(len(ids) - len(header) + 1):
        if ids[i:i + len(header)] == header:
            want_labels[i:i + len(header)] = -100
    assert torch.equal(item["input_ids"], want_ids)
    assert torch.equal(item["labels"], want_labels)
    assert "<|vision_end|>Now" in ds.tokenizer.decode(item["input_ids"])  # the newline went


def test_image_count_mismatch_names_the_sample(tmp_path):
    from training.data import DataError

    root = sample_root(tmp_path)
    bad = _write(root, "bad.json", [{"id": "two_for_one", "images": ["scene_a/000.jpg", "scene_a/001.jpg"],
                                     "conversations": [{"from": "human", "value": "<image> what?"},
                                                       {"from": "gpt", "value": "x"}]}])
    with pytest.raises(DataError) as e:
        dataset(root, spec_for(), files=[bad])
    assert str(e.value) == (f"{bad} sample 0 (id 'two_for_one'): 1 '<image>' placeholder(s) for 2 image(s); "
                            "each image needs exactly one placeholder, paired in order")


def test_single_image_form_and_role_content_turns(tmp_path):
    root = sample_root(tmp_path)
    path = _write(root, "qwen.jsonl", [])
    with open(path, "w") as f:
        f.write(json.dumps({"image": "misc/rgba.png", "conversations": [
            {"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "Red."}]}) + "\n")
    ds = dataset(root, spec_for(), files=[path])
    item = ds[0]
    assert item["images"] == 1 and item["image_grid_thw"].tolist() == [[1, 6, 8]]
    assert ds.tokenizer.decode(item["input_ids"][item["labels"] != -100]) == "Red.<|im_end|>\n"


def test_collator_pads_every_sequence_key(tmp_path):
    root = sample_root(tmp_path)
    ds = dataset(root, spec_for())
    batch = collate(ds, [0, 4])
    lengths = [len(ds[0]["input_ids"]), len(ds[4]["input_ids"])]
    assert batch["input_ids"].shape == (2, max(lengths))
    short = lengths.index(min(lengths))
    assert batch["attention_mask"][short].tolist() == [1] * min(lengths) + [0] * (max(lengths) - min(lengths))
    assert (batch["labels"][short, min(lengths):] == -100).all()
    assert (batch["mm_token_type_ids"][short, min(lengths):] == 0).all()
    assert (batch["input_ids"][short, min(lengths):] == ds.tokenizer.pad_token_id).all()
    assert batch["image_grid_thw"].shape == (5, 3)
    for key in ("cache_hits", "cache_misses", "cache_computed"):
        assert batch[key].dim() == 0 and batch[key].dtype == torch.int64


def test_cached_read_returns_the_stored_features(tmp_path):
    from featstore.store.reader import FeatureStore

    root = sample_root(tmp_path)
    spec = spec_for()
    path = build_store(root)
    ds = dataset(root, spec, store=FeatureStore(path, expected_encoder=spec.to_dict()))
    item = ds[0]
    assert item["source"] == 1 and item["hits"] == 1 and item["frames"] is None
    with FeatureStore(path) as st:
        assert torch.equal(item["features"], st.get("scene_a_step3").features)
    assert item["features"].shape == (4, 48, 128) and item["features"].dtype == torch.bfloat16


def test_missing_entry_raises_naming_the_key_and_the_sample(tmp_path):
    from featstore.store.reader import FeatureStore
    from training.data import CacheMissError

    root = sample_root(tmp_path)
    spec = spec_for()
    only_first = _write(root, "first.json", [json.load(open(annotations(root)))[0]])
    path = build_store(root, annotation_files=[only_first])
    ds = dataset(root, spec, store=FeatureStore(path, expected_encoder=spec.to_dict()))
    assert ds[0]["hits"] == 1
    with pytest.raises(CacheMissError) as e:
        ds[1]
    msg = str(e.value)
    assert msg.startswith(f"VGGT feature cache miss for {annotations(root)} sample 1 (id 'scene_a_step1'): "
                          "key 'scene_a_step1'")
    assert "--vggt_cache_miss compute" in msg


def test_frame_list_mismatch_is_a_miss_never_a_wrong_feature(tmp_path):
    """The store holds key 'scene_a_step3' computed on frames 000-003; a sample with the same id
    but other frames must not get those features."""
    from featstore.store.reader import FeatureStore
    from training.data import CacheMissError

    root = sample_root(tmp_path)
    spec = spec_for()
    path = build_store(root)
    other = _write(root, "other.json", [{"id": "scene_a_step3", "images": ["scene_b/000.jpg", "scene_b/001.jpg",
                                                                            "scene_b/002.jpg", "scene_b/003.jpg"],
                                         "conversations": [{"from": "human", "value": "<image>" * 4},
                                                           {"from": "gpt", "value": "x"}]}])
    store = FeatureStore(path, expected_encoder=spec.to_dict())
    with pytest.raises(CacheMissError, match="key 'scene_a_step3'.*computed on frames"):
        dataset(root, spec, store=store, files=[other])[0]
    item = dataset(root, spec, store=store, files=[other], cache_miss="compute")[0]
    assert (item["misses"], item["computed"], item["hits"], item["source"]) == (1, 1, 0, 2)
    assert item["features"] is None and item["frames"].shape == (4, 3, 84, 112)
