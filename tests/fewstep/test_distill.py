"""Few-step students end to end: `torchdiffusion distill METHOD TEACHER` trains each method's student from a tiny
teacher (a few steps on a 2-D toy set, or on the latents of a tiny autoencoder of random 8x8 images), `sample` draws
from it with the method's own sampler, and a distillation resumes like training, refusing a changed teacher."""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from torchdiffusion.app.cli import main
from torchdiffusion.build import COUPLING_FILE, build_schedule, distill_config, load_denoiser
from torchdiffusion.checkpoint import load_checkpoint, read_meta, save_checkpoint
from torchdiffusion.config import ConfigError
from torchdiffusion.data.toy import gaussian
from torchdiffusion.fewstep import ConsistencyFunction, MeanFlowDenoiser, ReflowObjective
from torchdiffusion.fewstep.rectified import COUPLED_NOISE
from torchdiffusion.latent import codec as codec_module
from torchdiffusion.sampling import get_sigmas
from torchdiffusion.schedules import get_schedule
from torchdiffusion.training import Trainer

# the eight methods of the issue, by the names the command line takes
NAMES = ("progressive", "consistency-distillation", "consistency-training", "consistency-tuning", "lcm", "reflow",
         "one-step", "meanflow")
TOY = ["model.mlp.hidden=32", "model.mlp.num_blocks=1", "data.subset=256", "train.batch_size=32", "train.log_every=1",
       "train.ckpt_every=0", "train.sample_every=0", "train.warmup_steps=0", "train.threads=1"]
STUDENT = ["distill.couplings=64", "distill.coupling_steps=4", "distill.teacher_steps=4", "distill.levels=6"]


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def out_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Two tiny two-moons teachers of 10 steps: the toy2d preset (linear schedule, v-prediction) and a rectified
    flow (schedule rf, velocity prediction) for reflow."""
    out = tmp_path_factory.mktemp("teachers")
    assert main(["train", "--config", "toy2d", f"out_dir={out}", "name=linear", "train.steps=10", *TOY]) == 0
    assert main(["train", "--config", "toy2d", f"out_dir={out}", "name=rf", "diffusion.schedule=rf",
                 "diffusion.prediction=velocity", "train.steps=10", *TOY]) == 0
    return {k: out / k / "checkpoints" / "last.safetensors" for k in ("linear", "rf")}


# method: (teacher, the sampler `sample` uses by default)
CASES = {"progressive": ("linear", "ddim"), "consistency-distillation": ("linear", "consistency"),
         "consistency-training": (None, "consistency"), "consistency-tuning": ("linear", "consistency"),
         "reflow": ("rf", "euler"), "one-step": ("rf", "ddim"), "meanflow": (None, "meanflow")}


@pytest.mark.parametrize("method", CASES)
def test_each_method_distils_through_the_cli_and_samples_with_its_sampler(method, teachers, tmp_path, capsys):
    teacher, sampler = CASES[method]
    source = [str(teachers[teacher])] if teacher else ["-", "--config", "toy2d", *TOY]
    one_round = ["distill.rounds=1"] if method == "progressive" else []  # its teacher is the given one
    assert main(["distill", method, *source, f"out_dir={tmp_path}", "name=s", "train.steps=3", *STUDENT,
                 *one_round, "train.sample_every=3"]) == 0
    ckpt = Path(out_json(capsys)["runs"][-1]["checkpoint"])
    assert (ckpt.parents[1] / "samples" / "step_0000003.png").is_file()  # the training hook draws the student too
    den, cfg, meta = load_denoiser(ckpt)
    assert cfg.task == "distill" and cfg.distill.method == method and meta["step"] == 3
    assert cfg.sample.sampler == sampler
    assert meta.get("teacher_sha256") == (sha256(teachers[teacher]) if teacher else None)
    assert isinstance(den, ConsistencyFunction) == (sampler == "consistency")
    assert isinstance(getattr(den, "inner", den), MeanFlowDenoiser) == (method == "meanflow")
    if sampler == "consistency":  # the boundary condition f(x, epsilon) = x, with the sampler's epsilon
        eps = cfg.sample.sampler_options["sigma_min"]
        x = torch.randn(4, 2)
        assert eps == den.sigma_min and torch.equal(den(x, torch.full((4,), eps)), x)
    assert main(["sample", str(ckpt), "--n", "5", "--out", str(tmp_path / "samples")]) == 0
    drawn = out_json(capsys)
    x = np.load(drawn["npz"])["samples"]
    assert drawn["sampler"] == sampler and x.shape == (5, 2) and np.isfinite(x).all()
    if sampler == "consistency":  # multistep: denoise at 20, re-noise to 0.5, denoise again
        assert main(["sample", str(ckpt), "--n", "5", "--sigmas", "20,0.5", "--out", str(tmp_path / "two")]) == 0
        drawn_two = out_json(capsys)
        two = np.load(drawn_two["npz"])["samples"]
        assert drawn_two["steps"] == 2 and drawn_two["sigmas"] == [20.0, 0.5]  # the grid's steps, not sample.steps
        assert f"_{2}steps_" in Path(drawn_two["npz"]).name
        assert two.shape == (5, 2) and np.isfinite(two).all() and not np.array_equal(two, x)


@pytest.mark.parametrize("method,starts_from_teacher", [("consistency-distillation", True), ("reflow", True),
                                                         ("consistency-training", False)])
def test_students_start_from_the_teachers_weights_where_the_method_says(method, starts_from_teacher, teachers,
                                                                       tmp_path):
    teacher = teachers["rf" if method == "reflow" else "linear"]
    cfg = distill_config(method, teacher, [f"out_dir={tmp_path}", *STUDENT])
    student = Trainer(cfg, progress=False)
    ema = load_checkpoint(teacher)[1]["ema"]
    same = [torch.equal(v, ema[k]) for k, v in student.net.state_dict().items()]
    assert all(same) == starts_from_teacher
    assert all(torch.equal(v, student.net.state_dict()[k]) for k, v in student.ema.model.state_dict().items())
    student.close()


def _groups(path):
    return load_checkpoint(path)[1]


@pytest.mark.parametrize("method,teacher", [("consistency-distillation", "linear"), ("reflow", "rf")])
def test_the_same_command_again_continues_exactly(method, teacher, teachers, tmp_path, capsys):
    """A distillation stopped after one step (its time budget) and run again ends with the weights, EMA, optimizer
    state and target network of an uninterrupted run; reflow's couplings are drawn once and reused."""
    cmd = ["distill", method, str(teachers[teacher]), "name=s", "train.steps=5", *STUDENT]
    assert main([*cmd, f"out_dir={tmp_path / 'a'}"]) == 0
    capsys.readouterr()
    assert main([*cmd, f"out_dir={tmp_path / 'b'}", "train.max_minutes=1e-9"]) == 0
    run = tmp_path / "b" / "s"
    assert out_json(capsys)["runs"][0]["steps"] == 1
    assert read_meta(run / "checkpoints" / "last.safetensors")["step"] == 1
    coupled = run / COUPLING_FILE
    before = coupled.stat().st_mtime_ns if method == "reflow" else None
    assert main([*cmd, f"out_dir={tmp_path / 'b'}"]) == 0
    a, b = (_groups(tmp_path / r / "s" / "checkpoints" / "last.safetensors") for r in ("a", "b"))
    groups = ("model", "ema", "optim") + (("objective",) if method != "reflow" else ())
    for group in groups:
        assert a[group] and a[group].keys() == b[group].keys(), group
        for k in a[group]:
            assert torch.equal(a[group][k], b[group][k]), (group, k)
    if method == "reflow":
        assert coupled.stat().st_mtime_ns == before  # read again, not drawn again
        pairs = _groups(tmp_path / "a" / "s" / COUPLING_FILE)["coupling"]
        assert pairs["noise"].shape == (64, 2)
        assert torch.equal(pairs["samples"], _groups(coupled)["coupling"]["samples"])  # drawn alike in both runs


def test_a_changed_teacher_is_refused_and_a_moved_one_accepted(teachers, tmp_path, capsys):
    t, moved = tmp_path / "teacher.safetensors", tmp_path / "elsewhere.safetensors"
    shutil.copy(teachers["linear"], t)
    shutil.copy(teachers["linear"], moved)
    def cmd(teacher, *extra):
        return ["distill", "consistency-distillation", str(teacher), f"out_dir={tmp_path}", "name=s", "train.steps=4",
                *STUDENT, *extra]

    assert main(cmd(t, "train.max_minutes=1e-9")) == 0
    last = tmp_path / "s" / "checkpoints" / "last.safetensors"
    assert read_meta(last)["teacher_sha256"] == sha256(t) and read_meta(last)["step"] == 1
    meta, groups = load_checkpoint(t)
    groups["ema"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in groups["ema"].items()}
    save_checkpoint(t, meta=meta, **groups)  # the same configuration, other weights
    capsys.readouterr()
    assert main(cmd(t)) == 2
    err = capsys.readouterr().err
    assert "teacher with sha256" in err and sha256(moved)[:12] in err and sha256(t)[:12] in err
    assert read_meta(last)["step"] == 1  # nothing trained
    assert main(cmd(moved)) == 0  # the original file at another path continues
    assert read_meta(last)["step"] == 4 and read_meta(last)["teacher"] == str(moved)


def test_progressive_keeps_one_checkpoint_per_round_with_the_steps_halving(teachers, tmp_path, capsys):
    cmd = ["distill", "progressive", str(teachers["linear"]), f"out_dir={tmp_path}", "name=pd",
           "distill.teacher_steps=8", "train.steps=2"]
    assert main(cmd) == 0
    runs = out_json(capsys)["runs"]
    paths = [Path(r["checkpoint"]) for r in runs]
    assert [p.parents[1].name for p in paths] == ["round1-4step", "round2-2step", "round3-1step"]
    grids, previous = [], teachers["linear"]
    for path in paths:
        _, cfg, meta = load_denoiser(path)
        assert cfg.sample.sampler == "ddim" and meta["teacher_sha256"] == sha256(previous) and meta["step"] == 2
        grids.append(cfg.sample.sigmas)
        previous = path
    assert [len(g) - 1 for g in grids] == [4, 2, 1] and grids[1] == grids[0][::2] and grids[2] == grids[1][::2]
    teacher_grid = get_sigmas(build_schedule(cfg), 8, cfg.distill.spacing)
    assert grids[0] == tuple(float(s) for s in teacher_grid[::2])
    hashes = [sha256(p) for p in paths]
    assert main(cmd) == 0  # every round is done: running it again changes nothing
    assert [sha256(p) for p in paths] == hashes and [r["steps_this_run"] for r in out_json(capsys)["runs"]] == [0] * 3
    assert main(["sample", str(paths[-1]), "--n", "3", "--out", str(tmp_path / "samples")]) == 0
    drawn = out_json(capsys)
    assert (drawn["sampler"], drawn["steps"]) == ("ddim", 1) and np.load(drawn["npz"])["samples"].shape == (3, 2)


def test_bad_method_names_and_missing_teachers_are_refused(teachers, capsys):
    with pytest.raises(ValueError, match="unknown distill method 'consistency'") as e:
        distill_config("consistency", teachers["linear"])
    assert all(repr(name) in str(e.value) for name in NAMES)
    assert main(["distill", "pd", str(teachers["linear"])]) == 2
    err = capsys.readouterr().err
    assert "unknown distill method 'pd'" in err and all(repr(name) in err for name in NAMES)
    with pytest.raises(ValueError, match="'progressive' needs a teacher checkpoint"):
        distill_config("progressive", "-")
    with pytest.raises(ValueError, match="latent diffusion model"):
        distill_config("lcm", teachers["linear"])
    with pytest.raises(ConfigError, match="distill.teacher_steps must be a power of two"):
        distill_config("progressive", teachers["linear"], ["distill.teacher_steps=6"])
    with pytest.raises(ValueError, match="not both"):
        distill_config("meanflow", teachers["linear"], config="toy2d")


@pytest.fixture(scope="module")
def latent_teacher(tmp_path_factory):
    """A class-conditional latent teacher with label dropout (2 steps, then random weights) on a tiny autoencoder
    (2 steps) of random 8x8 images in three classes."""
    out = tmp_path_factory.mktemp("latent")
    mp = pytest.MonkeyPatch()
    mp.setattr(codec_module, "cache_dir", lambda: out / "cache")
    g = np.random.default_rng(0)
    np.savez(out / "d.npz", x=g.integers(0, 256, (32, 8, 8, 1), dtype=np.uint8), y=g.integers(0, 3, 32))
    common = [f"out_dir={out}", f"data.dataset={out / 'd.npz'}", "train.batch_size=8", "train.steps=2",
              "train.sample_every=0", "train.ckpt_every=0", "train.threads=1"]
    assert main(["train", *common, "name=ae", "task=autoencoder", "model.kind=autoencoder",
                 "model.autoencoder.image_size=8", "model.autoencoder.factor=2", "model.autoencoder.channels=8",
                 "model.autoencoder.channel_mult=[1, 2]", "model.autoencoder.latent_channels=2",
                 "model.autoencoder.norm_groups=4", "model.autoencoder.disc_layers=0",
                 "autoencoder_loss.perceptual_weight=0"]) == 0
    assert main(["train", *common, "name=ldm", f"data.autoencoder={out / 'ae' / 'checkpoints' / 'last.safetensors'}",
                 "model.unet.image_size=4", "model.unet.in_channels=2", "model.unet.channels=8",
                 "model.unet.channel_mult=[1]", "model.unet.attn_resolutions=[]", "model.unet.mid_attention=false",
                 "model.unet.norm_groups=4", "model.unet.num_classes=3", "diffusion.objective.cond_drop_prob=0.2",
                 "sample.guidance=cfg", "sample.guidance_scale=3"]) == 0
    teacher = out / "ldm" / "checkpoints" / "last.safetensors"
    meta, groups = load_checkpoint(teacher)  # weights far from the zero-initialised start: every input matters
    g = torch.Generator().manual_seed(0)
    for group in ("model", "ema"):
        groups[group] = {k: 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                         for k, v in groups[group].items()}
    save_checkpoint(teacher, meta=meta, **groups)
    yield out, teacher
    mp.undo()


def test_lcm_students_start_as_their_teacher_and_sample_guided_images_in_four_steps(latent_teacher, tmp_path,
                                                                                    capsys):
    out, teacher = latent_teacher
    over = [f"out_dir={tmp_path}", "name=lcm", "train.steps=2", "distill.levels=8"]
    cfg = distill_config("lcm", teacher, over)
    fresh = Trainer(cfg, progress=False)
    den, _, _ = load_denoiser(teacher)
    x, sigma, y = torch.randn(3, 2, 4, 4), torch.tensor([0.5, 3.0, 40.0]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        want = den(x, sigma, class_labels=y)
        for w in (1.0, 6.0):  # the guidance-scale input starts with no effect
            got = fresh.module(x, sigma, class_labels=y, guidance_scale=torch.full((3,), w))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    fresh.close()
    assert main(["distill", "lcm", str(teacher), *over]) == 0
    ckpt = Path(out_json(capsys)["runs"][0]["checkpoint"])
    _, cfg, meta = load_denoiser(ckpt)
    s = cfg.sample
    assert (s.sampler, s.steps, s.guidance, s.guidance_scale) == ("consistency", 4, "embedded", 3.0)
    grid = get_sigmas(build_schedule(cfg), 8, "trailing")[:-1]  # the skipping-step grid, every 125th of 1000 steps
    assert set(s.sigmas[:-1]) <= {float(v) for v in grid} and s.sampler_options["sigma_min"] == float(grid[-1])
    assert meta["teacher_sha256"] == sha256(teacher) and meta["data"]["autoencoder_sha256"]
    assert main(["sample", str(ckpt), "--n", "3", "--class", "1", "--out", str(tmp_path / "samples")]) == 0
    images = np.load(out_json(capsys)["npz"])["images"]
    assert images.shape == (3, 8, 8, 1) and images.dtype == np.uint8


def test_reflow_validates_on_the_coupled_pairs_not_on_fresh_noise():
    """The trainer's validation passes its own fixed noise; a coupled batch must still pair each sample with its
    partner noise, so that the best checkpoint is chosen by the reflow loss."""
    rf = get_schedule("rf")
    obj, den = ReflowObjective(rf, prediction="velocity"), gaussian(0.5, 0.3, dim=2)
    g = torch.Generator().manual_seed(0)
    x0, partner, fresh = (torch.randn(16, 2, generator=g) for _ in range(3))
    sigma = rf.sample_sigmas(16, generator=g)
    coupled = obj.per_sample(den, x0, {COUPLED_NOISE: partner}, sigma=sigma, noise=fresh)
    torch.testing.assert_close(coupled, obj.per_sample(den, x0, {}, sigma=sigma, noise=partner))
    assert not torch.allclose(coupled, obj.per_sample(den, x0, {}, sigma=sigma, noise=fresh))
