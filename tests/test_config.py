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
    with pytest.raises(ConfigError, match=r"unknown config key 'bogus'.*valid keys: name, out_dir, task, data"):
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


def test_schedule_options_reach_the_schedule_and_are_checked():
    """diffusion.schedule_options holds a schedule's own parameters (EDM sigma_data, VP beta_max, linear beta_end),
    and the denoiser's preconditioning uses them; an option the schedule lacks is refused, naming its options."""
    from torchdiffusion.build import build_module, build_schedule

    cfg = load_config("tiny", ["diffusion.schedule=edm", "diffusion.prediction=edm",
                               "diffusion.schedule_options={sigma_data: 0.3, p_mean: -0.5}"])
    sch = build_schedule(cfg)
    assert sch.sigma_data == 0.3 and sch.p_mean == -0.5 and build_module(cfg).sigma_data == 0.3
    assert build_schedule(load_config("tiny", ["diffusion.schedule=vp",
                                               "diffusion.schedule_options={beta_max: 10.0}"])).beta_max == 10.0
    lin = build_schedule(load_config("tiny", ["diffusion.T=100", "diffusion.schedule_options={beta_end: 0.01}"]))
    assert float(lin.betas[-1]) == pytest.approx(0.01 * 1000 / 100)
    with pytest.raises(ConfigError, match="schedule 'edm' takes no option.*beta_max.*its options: sigma_min"):
        load_config("tiny", ["diffusion.schedule=edm", "diffusion.schedule_options={beta_max: 1.0}"])


def test_sampler_options_and_choices_are_checked_when_the_config_loads():
    cfg = load_config("tiny", ["sample.sampler=heun", "sample.sampler_options={s_churn: 1.0}"])
    assert cfg.sample.sampler_options == {"s_churn": 1.0}
    with pytest.raises(ConfigError, match="sampler 'ddim' takes no option.*s_churn.*its options: eta"):
        load_config("tiny", ["sample.sampler=ddim", "sample.sampler_options={s_churn: 1.0}"])
    with pytest.raises(ConfigError, match="unknown sample.spacing 'even'"):
        load_config("tiny", ["sample.spacing=even"])
    with pytest.raises(ConfigError, match="unknown task 'gan'"):
        load_config("tiny", ["task=gan"])
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config("tiny", ["sample.sampler_options=3"])


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_non_finite_numbers_are_refused(value):
    with pytest.raises(ConfigError, match="train.lr must be a finite number"):
        load_config("tiny", [f"train.lr={value}"])
    with pytest.raises(ConfigError, match="sampler_options.eta must be a finite number"):
        load_config("tiny", [f"sample.sampler_options={{eta: {value}}}"])


def test_configs_of_the_earlier_layout_are_upgraded():
    """Checkpoints written before `task` existed still load: model.kind 'classifier' becomes the noisy_classifier
    task, the model.classifier section moves, and guidance 'none' with a scale meant classifier-free guidance."""
    from torchdiffusion.config import RunConfig, from_dict, to_dict, upgrade_config

    old = to_dict(RunConfig())
    del old["task"]
    old["model"]["classifier"] = old["model"].pop("noisy_classifier")
    old["model"]["kind"] = "classifier"
    old["sample"].update(guidance="none", guidance_scale=2.0)
    new = from_dict(RunConfig, upgrade_config(old))
    assert new.task == "noisy_classifier" and new.model.kind == "noisy_classifier"
    assert new.sample.guidance == "cfg" and new.sample.guidance_scale == 2.0
    today = to_dict(RunConfig())
    assert upgrade_config(today) == today
