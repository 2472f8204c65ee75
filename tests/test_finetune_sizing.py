"""Fine-tuning sized by the benchmark: epochs, and early stopping on training accuracy."""

import math

import pytest

from mmunlearn.commands import open_model
from mmunlearn.data.batches import ImageCache
from mmunlearn.errors import ConfigError
from mmunlearn.train import finetune as finetune_module
from mmunlearn.train.finetune import (
    FinetuneConfig,
    answer_accuracy,
    excluded_entities,
    finetune,
    stop_sample,
    training_examples,
    vision_warmup,
)


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


def test_vision_warmup_grows_with_the_people():
    assert [FinetuneConfig().warmup_steps_for(n) for n in (0, 40, 160)] == [600, 600, 600]  # fixed by default
    cfg = FinetuneConfig(vision_warmup_power=2)  # 600 steps up to 40 people, then with the square of the people
    assert [cfg.warmup_steps_for(n) for n in (0, 20, 40, 60, 80, 160)] == [600, 600, 600, 1350, 2400, 9600]
    # linearly where question-free identity views add images per person
    assert [cfg.warmup_steps_for(n, 1.0) for n in (20, 40, 80, 120, 160)] == [600, 600, 1200, 1800, 2400]
    assert FinetuneConfig(vision_warmup_steps=0).warmup_steps_for(160) == 0
    with pytest.raises(ConfigError, match="vision_warmup_identities"):
        FinetuneConfig(vision_warmup_identities=0)
    with pytest.raises(ConfigError, match="vision_warmup_power"):
        FinetuneConfig(vision_warmup_power=-1)


def test_vision_warmup_counts_people_not_utility_shapes(small_bench):
    """The utility shapes are classes of the identity head but do not lengthen the warm-up."""
    ex = training_examples(small_bench, 1)
    people = {e.entity for e in ex if e.image is not None and e.split != "utility"}
    shapes = {e.entity for e in ex if e.image is not None and e.split == "utility"}
    assert people and shapes
    cfg = FinetuneConfig(steps=1, vision_warmup_steps=2, vision_warmup_identities=len(people) // 2,
                         vision_warmup_power=2)
    warm = vision_warmup(open_model("tiny", small_bench), small_bench, ex, cfg, progress=False)
    assert warm.steps == cfg.warmup_steps_for(len(people)) == math.ceil(2 * (len(people) / (len(people) // 2)) ** 2)
    assert warm.head.out_features == len(people | shapes)


@pytest.fixture(scope="module")
def views_bench(tmp_path_factory):
    """8 people with 4 question-free identity views each (the opt-in ``identity_views``)."""
    from mmunlearn.data.fictitious import FictitiousConfig, make_fictitious

    return make_fictitious(tmp_path_factory.mktemp("views") / "data",
                           FictitiousConfig(num_people=8, train_images=2, test_images=1, identity_views=4))


def test_vision_warmup_sees_identity_views_but_not_an_oracles_excluded_people(views_bench, monkeypatch):
    """The oracle never sees the forget people: neither their questions nor their question-free views."""
    opened = []
    real = finetune_module.open_image
    monkeypatch.setattr(finetune_module, "open_image", lambda path, *a: opened.append(path) or real(path, *a))
    cfg = FinetuneConfig(steps=1, vision_warmup_steps=3, vision_warmup_identities=4, exclude_forget="forget10")
    forget = views_bench.forget_set("forget10")
    ex = training_examples(views_bench, 1, excluded_entities(views_bench, cfg.exclude_forget), cfg.exclude_kinds)
    warm = vision_warmup(open_model("tiny", views_bench), views_bench, ex, cfg, progress=False)
    kept = {ent: v for ent, v in views_bench.identity_views().items() if ent not in forget}
    assert forget and len(kept) == 8 - len(forget)
    assert sorted(opened) == sorted(p for v in kept.values() for p in v)
    assert warm.steps == math.ceil(3 * len(kept) / 4) and math.isfinite(warm.loss)
    assert not set(forget) & set(warm.classes) and warm.head.out_features == len(warm.classes)


def test_warmup_probe_bench_names_people_on_views_it_never_trained_on(views_bench):
    """``bench/warmup_probe.py`` prints how often the warm-up's identity head names the person, on training images
    and on held-out views; a short warm-up on 8 people already beats chance on both."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(root / "bench" / "warmup_probe.py"), "--data", str(views_bench.root),
                          "--set", "vision_warmup_steps=120"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    m = re.search(r"people 8  identity views 32  steps 120 .* training images ([\d.]+) \(16\), held-out views "
                  r"([\d.]+) \(8\)", run.stdout)
    assert m, run.stdout
    assert float(m[1]) >= 0.5 and float(m[2]) > 1 / 8
