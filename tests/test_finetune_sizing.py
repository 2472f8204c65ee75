"""Fine-tuning sized by the benchmark: epochs, and early stopping on training accuracy."""

import pytest

from mmunlearn.commands import open_model
from mmunlearn.data.batches import ImageCache
from mmunlearn.errors import ConfigError
from mmunlearn.train.finetune import FinetuneConfig, answer_accuracy, finetune, stop_sample, training_examples


def test_steps_win_over_epochs_and_epochs_scale_with_the_benchmark():
    assert FinetuneConfig(steps=7).main_steps(10_000) == 7
    assert FinetuneConfig(epochs=2.0, batch_size=16).main_steps(800) == 100
    assert FinetuneConfig(epochs=2.0, batch_size=16).main_steps(1600) == 200
    with pytest.raises(ConfigError, match="steps or epochs"):
        FinetuneConfig(steps=0, epochs=0.0)
    for bad in ({"stop_accuracy": 1.5}, {"stop_every": 0.0}, {"stop_sample": 0}):
        with pytest.raises(ConfigError):
            FinetuneConfig(**bad)


def test_stop_sample_is_fixed_distinct_and_per_kind(small_bench):
    ex = training_examples(small_bench, 3)
    a, b = stop_sample(ex, 20, seed=1), stop_sample(ex, 20, seed=1)
    assert set(a) == {"vqa", "qa"}
    for kind in a:
        ids = [e.id for e in a[kind]]
        assert ids == [e.id for e in b[kind]] and len(ids) == len(set(ids)) == 20
        assert all(e.kind == kind for e in a[kind])


def test_early_stopping_ends_training_at_the_target(small_bench):
    adapter = open_model("tiny", small_bench)
    cfg = FinetuneConfig(epochs=12.0, vision_warmup_steps=100, stop_accuracy=0.25, stop_every=0.5, stop_sample=48,
                         save_every=0)
    log = finetune(adapter, small_bench, cfg, progress=False)
    assert log["stopped_early_at"] is not None and log["steps"] == log["stopped_early_at"] < log["max_steps"]
    last = log["stop_checks"][-1]
    assert last["step"] == log["steps"] and min(last["vqa"], last["qa"]) >= 0.25
    assert all(min(c["vqa"], c["qa"]) < 0.25 for c in log["stop_checks"][:-1])
    # the recorded accuracy is the model's: measured again on the same sample after training
    check = stop_sample(training_examples(small_bench, cfg.oversample_text), 48, cfg.seed)
    assert answer_accuracy(adapter, check["qa"], ImageCache(small_bench), 16) == pytest.approx(last["qa"], abs=1e-4)


def test_no_checks_without_a_target(small_bench):
    adapter = open_model("tiny", small_bench)
    log = finetune(adapter, small_bench, FinetuneConfig(steps=20, vision_warmup_steps=0, stop_accuracy=0.0,
                                                        save_every=0), progress=False)
    assert log["stop_checks"] == [] and log["stopped_early_at"] is None and log["steps"] == 20


def test_untrained_model_gets_nothing_right(small_bench):
    adapter = open_model("tiny", small_bench)
    ex = stop_sample(training_examples(small_bench, 1), 32, 0)["qa"]
    assert answer_accuracy(adapter, ex, ImageCache(small_bench), 8) == 0.0
