import subprocess
import sys

import pytest

from knowlip.config import ConfigError, load_config


def test_layers_merge_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  batch_size: 7\n  seed: 3\n")
    cfg = load_config(f, ["data.batch_size=9"])
    assert cfg.data.batch_size == 9  # command line beats the file
    assert cfg.data.seed == 3  # the file beats the defaults
    assert cfg.data.num_workers == 0  # defaults fill the rest


def test_unknown_key_in_yaml_names_path_and_suggests(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  batch_sise: 4\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown config key 'data.batch_sise'; did you mean 'data.batch_size'"):
        load_config(f)


def test_unknown_section_on_command_line():
    with pytest.raises(ConfigError, match=r"command line: unknown config key 'trian'; did you mean 'train'"):
        load_config(None, ["trian.lr=1"])


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"valid keys here: .*batch_size"):
        load_config(None, ["data.zzzzzz=1"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"'data.batch_size'"):
        load_config(None, ["data.batch_size=many"])


def test_bad_choice_suggests():
    with pytest.raises(ConfigError, match=r"'norm.mode'.*did you mean 'standardise'"):
        load_config(None, ["norm.mode=standardize"])


def test_open_dict_accepts_new_polarisation_with_typed_values():
    cfg = load_config(None, ["norm.clip_db.HH=[-30,5]"])
    assert list(cfg.norm.clip_db.HH) == [-30.0, 5.0]
    with pytest.raises(ConfigError):
        load_config(None, ["norm.clip_db.HH=[low,high]"])


def test_missing_file_and_bad_override_form(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["data.batch_size"])


def test_config_is_read_only():
    cfg = load_config()
    with pytest.raises(Exception):
        cfg.data.batch_size = 3


def test_cli_config_show_prints_resolved_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.5\n")
    out = subprocess.run([sys.executable, "-m", "knowlip.cli", "config", "show", str(f), "data.batch_size=33"],
                         capture_output=True, text=True, check=True).stdout
    assert "batch_size: 33" in out and "lr: 0.5" in out


def test_cli_config_typo_exits_2_with_suggestion():
    proc = subprocess.run([sys.executable, "-m", "knowlip.cli", "config", "show", "model.sise=base"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "did you mean 'model.size'" in proc.stderr


@pytest.mark.parametrize("override,match", [
    ("data.batch_size=0", "'data.batch_size': 0 must be at least 1"),
    ("pack.chip.min_valid_fraction=1.5", "in \\[0, 1\\]"),
    ("norm.clip_db.VV=[0,-25]", "clip range of VV"),
    ("model.queue_size=0", "model.queue_size"),
])
def test_out_of_range_values_fail_before_anything_runs(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


# Keys whose every value of their type is allowed, or that a check other than RANGES covers.
UNBOUNDED = {"train.global_batch_size", "train.stop_at", "model.queue_size", "model.text_dropout",
             "model.drop_path"}


def _numeric_keys(node: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        if isinstance(value, dict):
            keys += _numeric_keys(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            keys.append(f"{prefix}{key}")
    return keys


def test_every_numeric_key_has_a_range():
    from omegaconf import OmegaConf

    from knowlip.config import RANGES, default_config

    keys = _numeric_keys(OmegaConf.to_container(default_config()))
    assert len(keys) > 50
    unchecked = [k for k in keys if k not in RANGES and k not in UNBOUNDED]
    assert not unchecked, f"numeric keys that take any value: {unchecked}"


@pytest.mark.parametrize("override", [
    "mlflow.queue_size=-1", "mlflow.retry_s=0", "mlflow.system_interval_s=-5", "pack.jobs=0",
    "storage.coalesce_gap_bytes=-1", "train.weight_decay=-0.1", "train.tokenizer_vocab=10", "seed=-1",
    "data.seed=4294967296", "norm.dn_gain=0", "norm.fill=nan", "model.losses.itm_weight=-1",
    "model.losses.temp_init=0.9", "pack.max_scene_values=0", "synth.looks=0",
])
def test_numeric_keys_refuse_values_that_cannot_work(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key.split(".")[-1]):
        load_config(None, [override])
