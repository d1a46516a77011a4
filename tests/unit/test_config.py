import subprocess
import sys

import pytest
import yaml

from brainage_hpc.config import (
    BUILTIN_CONFIG_DIR,
    ConfigError,
    RunConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_override,
    save_config,
)


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.lr=3e-4", "data.shape=[32,40,32]", "model.name=sfcn", "train.precision=bf16-mixed"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.data.shape == [32, 40, 32]
    assert cfg.model.name == "sfcn"
    assert cfg.train.precision == "bf16-mixed"
    assert isinstance(cfg, RunConfig)


def test_precision_number_is_accepted_as_string(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  precision: 32\n")
    assert load_config(p).train.precision == "32"


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("train:\n  lerning_rate: 0.1\n", "unknown key 'train.lerning_rate'"),
        ("trian:\n  lr: 0.1\n", "unknown key 'trian'. Did you mean 'train'?"),
        ("train:\n  epochs: many\n", "train.epochs='many' must be an integer"),
        ("train:\n  backend: dpp\n", "Did you mean 'ddp'?"),
        ("model: [1, 2]\n", "'model' must be a mapping"),
        ("train: {lr: 0.1\n", "invalid YAML"),
    ],
)
def test_bad_yaml_is_one_line_naming_key_and_file(tmp_path, text, fragment):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert fragment in msg
    assert str(p) in msg
    assert "\n" not in msg


@pytest.mark.parametrize("override", ["train.lr", "=3", "train..lr=1", "train.lr=[1,", "trian.lr=1"])
def test_malformed_override(override):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert "\n" not in str(err.value)


def test_parse_override_types():
    assert parse_override("train.deterministic=true") == (["train", "deterministic"], True)
    assert parse_override("name=my run") == (["name"], "my run")


def test_round_trip(tmp_path):
    cfg = load_config(None, ["model.params={width: 4}", "train.epochs=3"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(path)
    assert again == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert yaml.safe_load(path.read_text())["model"]["params"] == {"width": 4}


@pytest.mark.parametrize("path", sorted(BUILTIN_CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_builtin_configs_load(path):
    cfg = load_config(path)
    assert cfg.model.name in ("cnn3d", "sfcn", "cvae")
    assert len(cfg.data.shape) == 3


def test_builtin_config_by_name():
    assert load_config("cnn_demo").model.name == "cnn3d"
    with pytest.raises(ConfigError, match="built-in"):
        load_config("no_such_config")


def test_cli_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "brainage_hpc.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in ("synth", "preprocess", "train", "evaluate", "gradcam", "tabular"):
        assert name in out.stdout


def test_cli_config_error_is_one_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("data:\n  shards: x\n  bacth_size: 4\n")
    out = subprocess.run(
        [sys.executable, "-m", "brainage_hpc.cli", "train", "--config", str(p), "--run-dir", str(tmp_path / "r")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    lines = [l for l in out.stderr.strip().splitlines() if "error" in l]
    assert len(lines) == 1 and "data.bacth_size" in lines[0] and str(p) in lines[0]
