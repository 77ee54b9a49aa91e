"""Configuration: dataclasses <-> YAML <-> key=value overrides, with errors that list valid keys."""
import pytest

from torchdiffusion.config import ConfigError, RunConfig, from_dict, load_config, presets, to_dict


def test_presets_load_and_roundtrip():
    assert {"demo", "tiny", "toy2d"} <= set(presets())
    for name in presets():
        cfg = load_config(name)
        assert from_dict(RunConfig, to_dict(cfg)) == cfg


def test_overrides_are_typed():
    cfg = load_config("tiny", ["train.steps=7", "train.lr=3e-4", "model.unet.channel_mult=[1,2,4]",
                               "data.subset=null", "train.channels_last=true"])
    assert cfg.train.steps == 7 and cfg.train.lr == 3e-4
    assert cfg.model.unet.channel_mult == (1, 2, 4)
    assert cfg.data.subset is None and cfg.train.channels_last is True


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stepz'.*valid keys under 'train':.*steps"):
        load_config(None, ["train.stepz=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'bogus'.*valid keys: name, out_dir, data"):
        load_config(None, ["bogus=1"])


def test_type_errors_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="train.steps must be an integer"):
        load_config(None, ["train.steps=1.5"])
    with pytest.raises(ConfigError, match="must be true or false"):
        load_config(None, ["train.channels_last=maybe"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.steps"])
    with pytest.raises(ConfigError, match="neither a file nor a preset"):
        load_config("no-such-preset")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(bad)
