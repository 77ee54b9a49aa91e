"""diffusers in and out, end to end on this CPU: a diffusers UNet2DModel folder sampled by our DDIM equals diffusers'
own DDIMPipeline from the same noise; our U-Net exported as a pipeline folder computes our outputs in diffusers."""
import json

import numpy as np
import pytest
import torch

from torchdiffusion.build import load_denoiser
from torchdiffusion.interop.diffusers import (MappingError, betas_from_scheduler_config, export_diffusers,
                                              unet_to_diffusers_config)
from torchdiffusion.nets import UNet
from torchdiffusion.precond import ClampX0, Precond
from torchdiffusion.sampling import get_sigmas, sample_ddim
from torchdiffusion.schedules import get_schedule

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install 'torchdiffusion[diffusers]')")

STEPS = 10


def _randomize(module, std=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    """A randomly initialised tiny UNet2DModel (v-prediction, scaled-linear betas) saved as a pipeline folder."""
    d = tmp_path_factory.mktemp("dfolder")
    unet = _randomize(diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8, norm_num_groups=8))
    unet.save_pretrained(d / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                            beta_end=0.012, prediction_type="v_prediction").save_pretrained(d / "scheduler")
    (d / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                                                    "scheduler": ["diffusers", "DDPMScheduler"]}))
    return d


def test_diffusers_model_samples_like_diffusers_ddim_pipeline(diffusers_folder):
    """Same noise, same 10 DDIM steps (leading spacing, x0 clipped and eps re-derived from it, as diffusers'
    use_clipped_model_output): our loader + our DDIM agree with DDIMPipeline to 1e-4."""
    pipe = diffusers.DDIMPipeline.from_pretrained(str(diffusers_folder))
    theirs = pipe(batch_size=3, generator=torch.Generator().manual_seed(3), num_inference_steps=STEPS, eta=0.0,
                  output_type="np", use_clipped_model_output=True).images  # (N, H, W, C) in [0, 1]
    den, cfg, meta = load_denoiser(diffusers_folder)
    assert meta["data_shape"] == [1, 8, 8] and den.prediction == "v" and cfg.sample.clip_x0
    noise = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(3))  # the pipeline's VP-space x_T
    sigmas = get_sigmas(den.schedule, STEPS, "leading")
    with torch.no_grad():
        ours = sample_ddim(ClampX0(den), noise * (1 + sigmas[0] ** 2).sqrt(), sigmas)  # VP -> VE coordinates
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(ours - theirs).max() < 1e-4
    assert np.abs(theirs - theirs.mean()).max() > 0.05  # not a constant image


def test_sample_command_takes_a_diffusers_folder(diffusers_folder, tmp_path):
    from torchdiffusion.app.cli import main

    assert main(["sample", str(diffusers_folder), "--n", "2", "--steps", "3", "--out", str(tmp_path)]) == 0
    assert np.load(tmp_path / "ddim_3steps_seed0.npz")["images"].shape == (2, 8, 8, 1)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
def test_betas_match_diffusers(kind):
    s = diffusers.DDPMScheduler(num_train_timesteps=200, beta_schedule=kind)
    ours = betas_from_scheduler_config(dict(s.config))
    torch.testing.assert_close(ours.float(), s.betas.float(), rtol=1e-5, atol=1e-7)


def _our_unet(**kw):
    net = UNet(image_size=16, channels=16, channel_mult=(1, 2), attn_resolutions=(8,), num_heads=2, norm_groups=8,
               **kw)
    return _randomize(net, std=0.05, seed=1).eval()


@pytest.mark.parametrize("kw", [{"num_classes": 3}, {"scale_shift": False, "mid_attention": False}])
def test_export_to_diffusers_gives_our_outputs(tmp_path, kw):
    net = _our_unet(**kw)
    den = Precond(net, get_schedule("cosine", T=100), "v")
    export_diffusers(den, tmp_path / "pipe")
    unet = diffusers.UNet2DModel.from_pretrained(str(tmp_path / "pipe" / "unet")).eval()
    x, t = torch.randn(4, 1, 16, 16), torch.tensor([0.0, 10.0, 50.0, 99.0])
    y = torch.tensor([0, 1, 2, 3]) if "num_classes" in kw else None
    with torch.no_grad():
        ours, theirs = net(x, t, class_labels=y), unet(x, t, class_labels=y).sample
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert ours.abs().max() > 1e-2
    pipe = diffusers.DDPMPipeline.from_pretrained(str(tmp_path / "pipe"))
    torch.testing.assert_close(torch.as_tensor(pipe.scheduler.alphas_cumprod).double(),
                               den.schedule.alpha_bar, rtol=1e-6, atol=1e-7)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    if "num_classes" not in kw:  # an unconditional pipeline runs end to end
        img = pipe(batch_size=1, num_inference_steps=2, output_type="np").images
        assert img.shape == (1, 16, 16, 1)


def test_what_does_not_map_is_named():
    with pytest.raises(MappingError, match="does not halve exactly"):
        unet_to_diffusers_config(UNet(channel_mult=(1, 2, 2, 2), attn_resolutions=()))  # 28 -> 14 -> 7 -> 4
    assert unet_to_diffusers_config(UNet())["block_out_channels"] == [32, 64, 64]  # 28 -> 14 -> 7 halves
    with pytest.raises(MappingError, match="cond_channels"):
        unet_to_diffusers_config(_our_unet(cond_channels=1))
    with pytest.raises(MappingError, match="fourier_features"):
        unet_to_diffusers_config(_our_unet(fourier_features=(7, 8)))
    with pytest.raises(MappingError, match="continuous"):
        export_diffusers(Precond(_our_unet(), get_schedule("edm"), "edm"), "/nonexistent")


def test_few_step_students_are_refused_with_the_formats_that_work(tmp_path):
    """A consistency or MeanFlow student is not a diffusers scheduler step: refused before anything is written."""
    from torchdiffusion.fewstep import ConsistencyFunction, MeanFlowDenoiser
    cm = ConsistencyFunction(Precond(_our_unet(), get_schedule("linear"), "eps"))
    mf = MeanFlowDenoiser(UNet(image_size=16, channels=16, channel_mult=(1, 2), attn_resolutions=(), norm_groups=8,
                               interval_embed=True), get_schedule("rf"))
    for student in (cm, mf):
        with pytest.raises(MappingError, match="torch-export or torchscript"):
            export_diffusers(student, tmp_path / "out")
    assert not (tmp_path / "out").exists()
