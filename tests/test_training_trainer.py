"""FeatstoreTrainer on a real tiny transformers model: the counters never reach the model,
data time and cache totals reach log_history (and the printed line and metrics file), the hit
rate is right, and totals are summed over ranks under torchrun (gloo)."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("transformers")

from _tiny_trainer import RecordingLlama, build, expected_counts  # noqa: E402
from _training_launch import child_env, free_port, read_metrics, run_group, torchrun  # noqa: E402

from training.trainer import STAT_KEYS, metrics_path  # noqa: E402


def _train_logs(trainer) -> list[dict]:
    return [r for r in trainer.state.log_history if "loss" in r]


@pytest.mark.parametrize("batch,accum,workers", [(2, 1, 0), (1, 2, 2)], ids=["batch2", "accum2-workers2"])
def test_counters_reach_log_history_not_the_model(tmp_path, capsys, batch, accum, workers):
    RecordingLlama.seen_keys = set()
    # 12 samples, 6 optimizer steps of `batch * accum` = 2 samples: exactly one epoch, so the
    # final totals do not depend on the shuffle order.
    trainer = build(str(tmp_path), sleep_s=0.05, per_device_train_batch_size=batch,
                    gradient_accumulation_steps=accum, dataloader_num_workers=workers)
    trainer.train()

    # num_items_in_batch is the Trainer's own loss-scaling argument, not a batch key
    assert RecordingLlama.seen_keys - {"num_items_in_batch"} == {"input_ids", "labels", "attention_mask"}
    logs = _train_logs(trainer)
    assert [r["step"] for r in logs] == [2, 4, 6]
    for r in logs:
        samples = r["step"] * 2
        assert r["cache_hits"] + r["cache_misses"] == samples
        assert r["cache_hit_rate"] == pytest.approx(r["cache_hits"] / samples)
        assert 0 <= r["cache_computed"] <= r["cache_misses"]
        assert r["data_time"] >= 0 and r["step_time"] >= r["data_time"]
    if workers == 0:
        # The collator sleeps 0.05 s per batch in this process, all inside the timed fetches
        # (accelerate's loader fetches one batch ahead, so one window can hold two and the last none).
        waited = sum(r["data_time"] * 2 for r in logs)  # 2 steps per log window
        assert waited >= 0.9 * 0.05 * (12 // batch)
    expect = expected_counts(range(12))
    assert {k: logs[-1][k] for k in STAT_KEYS} == expect
    assert logs[-1]["cache_hit_rate"] == pytest.approx(8 / 12)

    printed = capsys.readouterr().out
    assert "'cache_hit_rate'" in printed and "'data_time'" in printed
    on_disk = read_metrics(metrics_path(str(tmp_path), 0))
    assert [{k: r[k] for k in ("step", *STAT_KEYS)} for r in on_disk if "loss" in r] == \
        [{k: r[k] for k in ("step", *STAT_KEYS)} for r in logs]


def test_batches_without_counters_log_only_times(tmp_path):
    trainer = build(str(tmp_path), max_steps=2)
    trainer.data_collator = _strip_counters(trainer.data_collator)
    trainer.train()
    (log,) = _train_logs(trainer)
    assert "data_time" in log and not any(k in log for k in (*STAT_KEYS, "cache_hit_rate"))


def test_partial_counters_are_refused(tmp_path):
    trainer = build(str(tmp_path), max_steps=1)
    collate = trainer.data_collator
    trainer.data_collator = lambda samples: {k: v for k, v in collate(samples).items() if k != "cache_computed"}
    with pytest.raises(KeyError, match=r"not \['cache_computed'\].*STAT_KEYS"):
        trainer.train()


def _strip_counters(collate):
    return lambda samples: {k: v for k, v in collate(samples).items() if k not in STAT_KEYS}


@pytest.mark.slow
def test_totals_are_summed_over_ranks(tmp_path):
    out = str(tmp_path / "ddp")
    cmd = torchrun("--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                   os.path.join(os.path.dirname(__file__), "_tiny_trainer.py"), "--output_dir", out,
                   "--num_samples", "12", "--max_steps", "3")
    res = run_group(cmd, timeout=240, env=child_env())
    assert res.returncode == 0, res.stdout[-4000:]
    per_rank = [[r for r in read_metrics(metrics_path(out, rank)) if "loss" in r] for rank in (0, 1)]
    # 2 ranks x 3 steps x batch 2 = the 12 samples once: totals over both ranks are exact.
    for logs in per_rank:
        assert [r["step"] for r in logs] == [1, 2, 3]
        assert {k: logs[-1][k] for k in STAT_KEYS} == expected_counts(range(12))
        assert [r["cache_hits"] + r["cache_misses"] for r in logs] == [4, 8, 12]
    assert [r["loss"] for r in per_rank[0]] == [r["loss"] for r in per_rank[1]]
