"""Every numeric config key has a range rule; model params are checked against the constructor (issue 14 T2, S7, U2)."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from brainage_hpc.config import ConfigError, RunConfig, load_config
from brainage_hpc.config_rules import RULES, check_params


def _numeric_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += _numeric_keys(tp, f"{prefix}{f.name}.")
        elif tp in (int, float) or typing.get_args(tp) in ((int,), (float,)):
            keys.append(f"{prefix}{f.name}")
    return keys


def test_every_numeric_key_has_a_range_rule():
    missing = [k for k in _numeric_keys(RunConfig) if k not in RULES]
    assert not missing, f"add a line to brainage_hpc/config_rules.py RULES for: {missing}"


@pytest.mark.parametrize("override, text", [
    ("train.epochs=0", "train.epochs=0 must be >= 1"),
    ("train.lr=0", "train.lr=0.0 must be > 0"),
    ("train.lr=.inf", "must be a finite number"),
    ("data.augment.flip_prob=1.5", "data.augment.flip_prob=1.5 must be in [0, 1]"),
    ("train.zero_stage=4", "train.zero_stage=4 must be in [0, 3]"),
    ("train.dist_timeout_s=1", "train.dist_timeout_s=1 must be in [10, 86400]"),
    ("data.shape=[32,32]", "must have 3 entries"),
])
def test_out_of_range_values_are_one_line_errors(override, text):
    with pytest.raises(ConfigError) as err:
        load_config("cnn_demo", [override])
    assert text in str(err.value) and "\n" not in str(err.value)


def test_all_problems_in_one_line():
    with pytest.raises(ConfigError, match=r"data.batch_size=0 must be >= 1; .*train.grad_accum=0 must be >= 1"):
        load_config("cnn_demo", ["data.batch_size=0", "train.grad_accum=0"])


def test_model_params_against_the_constructor():
    def ctor(width: int = 8, dropout: float = 0.1, padding: typing.Literal["valid", "same"] = "valid",
             channels: typing.Sequence[int] = (4, 8), head: int | None = None) -> None: ...

    check_params({"width": 4, "dropout": 0.0, "padding": "same", "channels": [2, 3], "head": None}, ctor, "model.params")
    for bad, text in [({"width": "abc"}, "model.params.width='abc' must be an integer"),
                      ({"width": 0}, "must be >= 1"), ({"dropout": 1.0}, "must be in [0, 1)"),
                      ({"padding": "full"}, "must be one of 'valid', 'same'"), ({"channels": [4, "x"]}, "a list of an integer"),
                      ({"head": 2.5}, "an integer or null")]:
        with pytest.raises(ConfigError, match=None) as err:
            check_params(bad, ctor, "model.params")
        assert text in str(err.value), (bad, str(err.value))
