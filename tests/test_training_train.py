"""`python -m training.train` end to end on the sample data with the tiny presets (CPU)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from _training_helpers import annotations, build_store, sample_root

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _samples_seen(steps: int, batch: int = 2, dataset: int = 5) -> int:
    """Samples the Trainer feeds in `steps` steps: epochs end with a short last batch."""
    per_epoch = -(-dataset // batch)
    full, rest = divmod(steps, per_epoch)
    return full * dataset + min(rest * batch, dataset)


def _argv(root: str, out: str, *extra: str, steps: int = 2) -> list:
    return ["--data_root", root, "--annotations", annotations(root), "--output_dir", out,
            "--max_steps", str(steps), "--per_device_train_batch_size", "2", "--use_cpu", "--report_to", "none",
            "--logging_steps", "1", "--save_strategy", "no", "--seed", "0", "--disable_tqdm", "true", *extra]


def test_twenty_cached_steps_lower_the_loss_and_never_build_vggt(tmp_path, monkeypatch, caplog):
    from featstore.encoders.vggt import model as V
    from training.model import vggt_parameter_count
    from training.train import run

    root = sample_root(tmp_path)
    store = build_store(root)

    def no_vggt(*args, **kwargs):
        raise AssertionError("a VGGT aggregator was constructed in cached mode")

    monkeypatch.setattr(V.VGGTAggregator, "__init__", no_vggt)
    with caplog.at_level(logging.INFO, logger="training"):
        trainer = run(_argv(root, str(tmp_path / "out"), "--use_vggt_cache", "--learning_rate", "2e-3",
                            "--lr_scheduler_type", "constant", steps=20))
    fingerprint = json.loads(json.dumps(trainer.train_dataset.store.manifest))["fingerprint"]
    assert f"VGGT feature cache enabled: {store} (5 entries, fingerprint {fingerprint})" in caplog.messages
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    last = [r for r in trainer.state.log_history if "cache_hits" in r][-1]
    assert (last["cache_hits"], last["cache_misses"]) == (_samples_seen(20), 0) == (34, 0)
    assert vggt_parameter_count(trainer.model) == 0 and trainer.model.online_vggt is None
    assert trainer.train_dataset.pixel_dtype is None  # float32 training: pixel_values stay float32
    assert not [n for n, _ in trainer.model.named_parameters() if "aggregator" in n or "vggt" in n]
    assert os.path.isfile(tmp_path / "out" / "model.safetensors")


@pytest.mark.parametrize("field,build_flags,message", [
    ("layer", {"layer": -1}, "layer: store has -1, expected -2"),
    ("preprocess", {"preprocess_mode": "pad"}, "preprocess.mode: store has 'pad', expected 'crop'"),
])
def test_a_store_built_with_another_spec_is_refused_naming_the_field(tmp_path, capsys, field, build_flags, message):
    from training.train import main

    root = sample_root(tmp_path)
    store = build_store(root, **build_flags)
    assert main(_argv(root, str(tmp_path / "out"), "--use_vggt_cache")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {store}: the store was built with a different encoder spec (")
    assert message in err and "\n" not in err


def test_an_fp8_store_is_refused_unless_training_opts_in(tmp_path, capsys):
    from training.train import main, run

    root = sample_root(tmp_path)
    store = build_store(root, storage_dtype="float8_e4m3fn")
    assert main(_argv(root, str(tmp_path / "out"), "--use_vggt_cache")) == 2
    err = capsys.readouterr().err.strip()
    assert "storage_dtype: store has 'float8_e4m3fn', expected 'bfloat16'" in err and "\n" not in err
    assert "Train with the --vggt_* flags the store was built with" in err, err
    trainer = run(_argv(root, str(tmp_path / "out"), "--use_vggt_cache", "--vggt_storage_dtype", "float8_e4m3fn",
                        steps=1))
    assert trainer.train_dataset.store.path == store
    item = trainer.train_dataset[0]
    assert item["features"].dtype == torch.bfloat16  # dequantised for the merger
    last = [r for r in trainer.state.log_history if "cache_hits" in r][-1]
    assert (last["cache_hits"], last["cache_misses"]) == (2, 0)


def test_contradictory_flags_are_one_line_errors(tmp_path, capsys):
    from training.train import main

    root = sample_root(tmp_path)
    assert main(_argv(root, str(tmp_path / "o"), "--use_vggt_cache", "--vggt_mode", "online_full")) == 2
    assert capsys.readouterr().err == "error: --use_vggt_cache contradicts --vggt_mode online_full: drop one of them\n"
    assert main(_argv(root, str(tmp_path / "o"), "--vggt_fusion", "per_image", "--vggt_frames_kept", "last")) == 2
    assert "--vggt_frames_kept all (found last)" in capsys.readouterr().err
    assert main(_argv(root, str(tmp_path / "o"), "--compile_vision", "--tune_vision")) == 2
    assert capsys.readouterr().err.startswith("error: --compile_vision contradicts --tune_vision: it compiles a "
                                              "frozen tower only. Drop --compile_vision")
    assert main(_argv(root, str(tmp_path / "o"), "--compile_vision", "--use_vision_cache")) == 2
    assert capsys.readouterr().err.startswith("error: --compile_vision contradicts --use_vision_cache")
    assert main(_argv(root, str(tmp_path / "o"), "--use_vggt_cache")) == 2  # no store built yet
    assert "vggt_features.lmdb" in capsys.readouterr().err


@pytest.mark.slow
def test_compile_vision_trains_the_same_losses_under_gradient_checkpointing(tmp_path, caplog):
    """--compile_vision: the frozen tower's blocks compiled, with the gradient checkpointing the
    recipes turn on; two steps give the eager run's losses within rounding."""
    from training.train import run

    root = sample_root(tmp_path)
    build_store(root)
    losses = {}
    for name, extra in (("eager", ()), ("compiled", ("--compile_vision",))):
        with caplog.at_level(logging.INFO, logger="training"):
            trainer = run(_argv(root, str(tmp_path / name), "--use_vggt_cache", "--gradient_checkpointing",
                                "--tune_vision_merger", *extra))
        blocks = trainer.model.model.visual.blocks
        assert all((b._compiled_call_impl is not None) == (name == "compiled") for b in blocks)
        losses[name] = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert f"Qwen vision tower: {len(blocks)} blocks compiled (--compile_vision)" in caplog.messages
    assert len(losses["eager"]) == 2 and losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4)


def test_a_miss_under_policy_compute_is_encoded_online_and_counted(tmp_path):
    from training.train import run

    root = sample_root(tmp_path)
    first_two = os.path.join(root, "first_two.json")
    with open(first_two, "w") as f:
        json.dump(json.load(open(annotations(root)))[:2], f)
    build_store(root, annotation_files=[first_two])  # 2 of the 5 samples stored
    trainer = run(_argv(root, str(tmp_path / "out"), "--use_vggt_cache", "--vggt_cache_miss", "compute",
                        "--per_device_train_batch_size", "5", steps=1))
    last = [r for r in trainer.state.log_history if "cache_hits" in r][-1]
    assert (last["cache_hits"], last["cache_misses"], last["cache_computed"]) == (2, 3, 3)
    assert trainer.model.online_vggt.built  # built on the first miss, outside the module tree
    from training.model import vggt_parameter_count

    assert vggt_parameter_count(trainer.model) == 0


@pytest.mark.slow
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_dataloader_workers_read_the_store_during_training(tmp_path, start_method):
    """A real `python` process trains with 2 DataLoader workers started by `start_method`;
    features come only from the store (cached mode, misses are errors)."""
    root = sample_root(tmp_path)
    build_store(root)
    out = str(tmp_path / "out")
    code = ("import multiprocessing as mp, sys; mp.set_start_method(sys.argv[1], force=True); "
            "from training.train import main; sys.exit(main(sys.argv[2:]))")
    argv = _argv(root, out, "--use_vggt_cache", "--dataloader_num_workers", "2", steps=3)
    proc = subprocess.run([sys.executable, "-c", code, start_method, *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "metrics.rank0.jsonl")) as f:
        records = [json.loads(line) for line in f]
    hits = [r["cache_hits"] for r in records if "cache_hits" in r]
    assert hits[-1] == _samples_seen(3) == 5 and hits == sorted(hits) and len(hits) >= 3
    assert "VGGT feature cache enabled:" in proc.stderr


def test_a_saved_run_reloads_with_its_merger_and_continues(tmp_path):
    import torch

    from training.train import run

    root = sample_root(tmp_path)
    build_store(root)
    first = run(_argv(root, str(tmp_path / "a"), "--use_vggt_cache", "--learning_rate", "1e-2", steps=2))
    saved = {k: v.detach().clone() for k, v in first.model.state_dict().items()}
    second = run(_argv(root, str(tmp_path / "b"), "--use_vggt_cache", "--model_name_or_path", str(tmp_path / "a"),
                       "--vggt_encoder", "vggt-tiny", "--learning_rate", "0", steps=1))
    reloaded = second.model.state_dict()
    assert set(reloaded) == set(saved)
    for k, v in saved.items():  # learning rate 0: the step changed nothing, so this is the loaded state
        assert torch.equal(reloaded[k], v), k
    from _training_helpers import spec_for, tiny_model

    fresh = tiny_model(spec_for(), seed=0).state_dict()  # the first run's initial weights
    assert not torch.equal(fresh["merger.mlp.0.weight"], saved["merger.mlp.0.weight"])  # trained, then reloaded


def test_a_miss_in_a_dataloader_worker_is_one_line_naming_key_and_sample(tmp_path, capsys):
    """Every key is in the store (the start-up check passes: tests/test_training_startup.py covers a
    missing key), but two samples now ask for their frames in another order: the entries are of
    another encoder call, a miss found in a DataLoader worker and reported as one line."""
    from training.train import main

    root = sample_root(tmp_path)
    build_store(root)
    samples = json.load(open(annotations(root)))
    for s in samples:
        if len(s.get("images", [])) > 1:
            s["images"] = s["images"][::-1]
    reordered = os.path.join(root, "reordered.json")
    with open(reordered, "w") as f:
        json.dump(samples, f)
    argv = _argv(root, str(tmp_path / "out"), "--use_vggt_cache", "--dataloader_num_workers", "2",
                 "--per_device_train_batch_size", "5", steps=1)
    argv[argv.index(annotations(root))] = reordered
    assert main(argv) == 2
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(line) == 1, err[-2000:]
    # the shuffled sampler decides which reordered sample a worker meets first
    import re

    pattern = (rf"error: VGGT feature cache miss for {re.escape(reordered)} sample (\d) "
               r"\(id '([^']+)'\): key '([^']+)' \(key '\3' in .* was computed on frames \[.*\], but \[.*\] were "
               r"asked for: the cached context differs \(a miss\)\. .*\)\. Build the store with "
               r"`featstore build --data-root .* --vggt_cache_miss compute to encode misses online$")
    match = re.match(pattern, line[0])
    assert match, line[0]
    assert match.group(2) == match.group(3) and len(samples[int(match.group(1))].get("images", [])) > 1


def test_batches_are_copied_to_the_gpu_without_blocking_unless_told_otherwise(tmp_path):
    """Non-blocking host-to-device copies are on by default (from pinned memory only); the flag and an
    explicit --accelerator_config both turn them off."""
    from training.args import parse_args

    base = ["--data_root", "sample_data", "--annotations", "sample_data/annotations.json", "--output_dir",
            str(tmp_path)]
    nb = lambda *extra: parse_args(base + list(extra))[2].accelerator_config.non_blocking  # noqa: E731
    assert nb() is True
    assert nb("--dataloader_non_blocking", "False") is False
    assert nb("--dataloader_pin_memory", "False") is False  # pageable memory: a non-blocking copy is a sync one
    assert nb("--accelerator_config", '{"non_blocking": false}') is False
    cfg = tmp_path / "acc.json"
    cfg.write_text('{"non_blocking": false}')
    assert nb("--accelerator_config", str(cfg)) is False


def test_pixel_values_leave_the_workers_in_the_towers_compute_dtype_and_give_the_same_tower_output(tmp_path):
    """pixel_dtype: the dtype the patch embedding computes in (bf16 weights, or float32 weights
    under --bf16 autocast); casting there, in the worker, rounds as the tower would: same output."""
    from types import SimpleNamespace

    from _training_helpers import collate, dataset, spec_for, tiny_parts
    from training.model import geometry_config
    from training.train import build_model, pixel_dtype

    tok, _ = tiny_parts()
    spec = spec_for()
    model = build_model("qwen2.5-vl-tiny", tok, geometry_config(2 * int(spec.config["embed_dim"])), seed=0).eval()
    flags = lambda bf16=False, fp16=False: SimpleNamespace(bf16=bf16, fp16=fp16)  # noqa: E731
    assert pixel_dtype(model, flags()) is None  # float32 compute: keep float32
    assert pixel_dtype(model, flags(bf16=True)) is torch.bfloat16
    assert pixel_dtype(model, flags(fp16=True)) is torch.float16

    root = sample_root(tmp_path)
    ds = dataset(root, spec)
    batch = collate(ds, [0])
    pixels, grid = batch["pixel_values"], batch["image_grid_thw"]
    assert pixels.dtype is torch.float32
    visual = model.model.visual
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = visual(pixels, grid_thw=grid, return_dict=True).pooler_output
            got = visual(pixels.to(torch.bfloat16), grid_thw=grid, return_dict=True).pooler_output
        assert torch.equal(got, want)
        model.to(torch.bfloat16)
        assert pixel_dtype(model, flags()) is torch.bfloat16
        want = visual(pixels, grid_thw=grid, return_dict=True).pooler_output
        got = visual(pixels.to(torch.bfloat16), grid_thw=grid, return_dict=True).pooler_output
        assert torch.equal(got, want)
        # the check can fail: float16 rounds otherwise than bfloat16
        assert not torch.equal(visual(pixels.to(torch.float16), grid_thw=grid, return_dict=True).pooler_output, want)

    ds.pixel_dtype = torch.bfloat16
    assert ds[0]["pixel_values"].dtype is torch.bfloat16
    assert torch.equal(ds[0]["pixel_values"], pixels.to(torch.bfloat16))


def test_training_under_bf16_ships_bf16_pixel_values(tmp_path):
    from training.train import run

    root = sample_root(tmp_path)
    build_store(root)
    trainer = run(_argv(root, str(tmp_path / "out"), "--use_vggt_cache", "--bf16", "true", steps=1))
    assert trainer.train_dataset.pixel_dtype is torch.bfloat16
    assert trainer.train_dataset[0]["pixel_values"].dtype is torch.bfloat16
    assert [r["loss"] for r in trainer.state.log_history if "loss" in r]


def test_progress_bar_is_off_when_stderr_is_not_a_terminal_unless_asked_for(tmp_path, monkeypatch):
    import training.args as args_mod

    base = ["--data_root", "sample_data", "--annotations", "sample_data/annotations.json", "--output_dir",
            str(tmp_path)]
    tqdm_off = lambda *extra: args_mod.parse_args(base + list(extra))[2].disable_tqdm  # noqa: E731
    monkeypatch.setattr(args_mod, "_stderr_is_a_terminal", lambda: False)
    assert tqdm_off() is True  # a log file gets one line per logging step, not \r-joined redraws
    assert tqdm_off("--disable_tqdm", "False") is False
    monkeypatch.setattr(args_mod, "_stderr_is_a_terminal", lambda: True)
    assert tqdm_off() is False  # a terminal keeps transformers' bar
