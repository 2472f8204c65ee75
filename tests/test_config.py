from dataclasses import dataclass, field

import pytest

from mmunlearn import config as C
from mmunlearn.errors import ConfigError
from mmunlearn.registry import Registry
from mmunlearn.train.engine import LoraOptions, OptimConfig
from mmunlearn.train.finetune import FinetuneConfig


@dataclass
class Inner:
    r: int = 4


@dataclass
class Outer:
    lr: float = 1.0
    names: tuple[str, ...] = ("a",)
    inner: Inner = field(default_factory=Inner)
    opt: Inner | None = None


def test_overrides_and_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 2\ninner:\n  r: 8\n")
    cfg = C.load(Outer, p, ["names=[x, y]", "opt.r=3"])
    assert cfg == Outer(lr=2.0, names=("x", "y"), inner=Inner(8), opt=Inner(3))
    assert C.load(Outer, None, ["names=b,c"]).names == ("b", "c")


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'inner'"):
        C.load(Outer, None, ["iner.r=1"])
    with pytest.raises(ConfigError, match="expected int"):
        C.load(Outer, None, ["inner.r=abc"])
    assert C.load(Outer, None, ["lr=3e-4"]).lr == 3e-4
    with pytest.raises(ConfigError, match="expected a number"):
        C.load(Outer, None, ["lr=fast"])
    with pytest.raises(ConfigError, match="key=value"):
        C.parse_overrides(["lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        C.load(Outer, bad)


def test_finetune_config_lora_from_overrides():
    cfg = C.load(FinetuneConfig, None, ["lora.r=4", "trainable=[language]"])
    assert cfg.lora == LoraOptions(r=4) and cfg.trainable == ("language",)
    with pytest.raises(ConfigError, match="unknown parameter group"):
        OptimConfig(trainable=("vision", "ears"))


def test_registry_suggests():
    reg: Registry[int] = Registry("thing")
    reg.register("alpha")(1)
    with pytest.raises(ConfigError, match="did you mean 'alpha'"):
        reg.get("alpah")
    with pytest.raises(ValueError, match="twice"):
        reg.register("alpha")(2)
