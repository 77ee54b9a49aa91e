"""The likelihood benchmark (bench/likelihood.py): its row configurations, options, table, that its figures are
those of ``torchdiffusion evaluate --likelihood``, and one smoke row end to end (no timing assertions)."""
import json
import math

import pytest
import torch

from torchdiffusion.build import build_module
from torchdiffusion.config import load_config
from torchdiffusion.evaluate.report import likelihood_report

NET_FIELDS = ("image_size", "in_channels", "channels", "channel_mult", "num_res_blocks", "attn_resolutions",
              "num_classes")


def test_row_configs_have_their_kind_budget_and_one_network(bench):
    """Each objective's config trains the kind it is named for, over the CPU-minute budget, on the same U-Net
    widths (the docstring's claim); only hybrid and vlb have variance channels; every preset samples ancestrally
    on 50 steps."""
    lb = bench("likelihood")
    for dataset in lb.DATASETS:
        nets = set()
        for objective in lb.OBJECTIVES:
            cfg = lb.row_config(dataset, objective, "/tmp/unused", 30, steps=123)
            t = cfg.train
            assert cfg.diffusion.objective.kind == objective and cfg.data.dataset == dataset
            assert (t.max_minutes, t.clock, t.lr_schedule_over, t.steps) == (30, "cpu", "time", 123)
            assert cfg.model.kind == "unet" and cfg.model.unet.learn_sigma == (objective in ("hybrid", "vlb"))
            assert (cfg.sample.sampler, cfg.sample.steps) == ("ddpm", 50)
            nets.add(tuple(getattr(cfg.model.unet, f) for f in NET_FIELDS))
        assert len(nets) == 1, nets
    names = {lb.row_config(d, o, "/tmp/unused", m).run_dir for d in lb.DATASETS for o in lb.OBJECTIVES
             for m in (30, 60)}
    assert len(names) == 2 * 4 * 2                     # one run folder per row, so --reuse finds the right one
    with pytest.raises(ValueError, match="simple"):
        lb.row_config("mnist", "ddpm", "/tmp/unused", 30)


def test_options_defaults_quick_and_explicit(bench):
    lb = bench("likelihood")
    full = lb.options(lb.parse_args([]))
    assert full["minutes"] == (30.0, 60.0) and full["eval_images"] == 1000 and full["ode_images"] == 200
    assert full["samples"] == 1000 and full["reference_steps"] == 1000 and full["vlb_steps"] == 0
    quick = lb.options(lb.parse_args(["--quick", "--samples", "32", "--minutes", "0.1", "0.2"]))
    assert quick["samples"] == 32 and quick["minutes"] == (0.1, 0.2)        # explicit options win over --quick
    assert quick["eval_images"] == lb.QUICK["eval_images"] < full["eval_images"]
    with pytest.raises(ValueError, match="vdm"):
        lb.options(lb.parse_args(["--objectives", "elbo"]))


def test_only_the_fixed_variance_model_gets_the_reference_sampler(bench):
    lb = bench("likelihood")
    assert lb.samplings("simple", 1000) == [{}, {"sampler": "ddpm", "steps": 1000, "spacing": "uniform"}]
    assert all(lb.samplings(o, 1000) == [{}] for o in ("hybrid", "vlb", "vdm"))
    assert lb.samplings("simple", 0) == [{}]


def _quality(steps, fd, learned):
    return {"sampler": "ddpm", "steps": steps, "learned_variance": learned, "fd": fd, "fd_floor": 2.5,
            "fd_ratio": fd / 2.5}


def test_table_lines_and_footer(bench):
    lb = bench("likelihood")
    rows = [{"dataset": "mnist", "objective": "simple", "minutes": 30.0, "params": 1.19e6, "steps": 4321,
             "bpd_bound": 1.2345, "bpd_bound_se": 0.0123, "bpd_ode": 1.1111, "bpd_ode_se": 0.0222,
             "quality": [_quality(50, 12.5, False), _quality(1000, 7.5, False)]},
            {"dataset": "mnist", "objective": "hybrid", "minutes": 30.0, "params": 1.19e6, "steps": 4000,
             "bpd_bound": 0.9876, "bpd_bound_se": 0.01, "quality": [_quality(50, 8.0, True)]}]
    lines = lb.format_table(rows).splitlines()
    simple, reference, hybrid = lines[2:5]
    assert "1.234 +- 0.012" in simple and "1.111 +- 0.022" in simple and "ddpm/50 " in simple
    assert reference.startswith(" " * 40) and "ddpm/1000" in reference and "+-" not in reference
    assert "ddpm/50+v" in hybrid and "0.988 +- 0.010" in hybrid and hybrid.split()[8] == "-"   # no ODE figure
    for line, fd, ratio in ((simple, "12.50", "5.00"), (reference, "7.50", "3.00"), (hybrid, "8.00", "3.20")):
        assert line.split()[-3:] == [fd, "2.50", ratio]
        assert len(line) == len(lines[0])                                    # the columns line up
    footer = "\n".join(lines[5:])
    assert all(a in footer for a in ("1.06", "1.05", "0.99", "2.94", "2.65", "below 1.0", "60 CPU-minutes"))


def test_likelihoods_are_those_of_the_evaluate_report(bench, mnist_path):
    """The bench's bound and ODE figures are ``torchdiffusion evaluate --likelihood``'s: the same test images
    (the ODE's the first of the bound's), the same noise, the same estimators."""
    lb = bench("likelihood")
    torch.manual_seed(0)
    den = build_module(load_config("tiny", ["diffusion.schedule=cosine", "diffusion.T=20"])).eval()
    with torch.no_grad():                              # weights off their initialisation: D depends on the image
        for p in den.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = lb.likelihoods(den, "mnist", eval_images=5, ode_images=2, ode_rtol=1e-2)
    ref = likelihood_report(den, ["vlb"], n=5)["bpd_vlb"]
    ode = likelihood_report(den, ["ode"], n=2, rtol=1e-2)["bpd_ode"]
    assert ours["bpd_bound"] == pytest.approx(ref["mean"], rel=1e-9) and ours["bpd_bound_n"] == 5
    assert ours["bpd_bound_se"] == pytest.approx(ref["stderr"], rel=1e-9) and ours["bound_T"] == 20
    assert ours["bpd_ode"] == pytest.approx(ode["mean"], rel=1e-6) and ours["bpd_ode_n"] == 2
    assert sum(ours["bound_terms"].values()) == pytest.approx(ours["bpd_bound"], rel=1e-9)
    assert "bpd_ode" not in lb.likelihoods(den, "mnist", eval_images=3, ode_images=0)


def test_quick_row_end_to_end_and_reuse(bench, tmp_path, feature_net, capsys):
    """One --quick VDM row on MNIST: trained within its CPU budget, its ELBO, ODE and FD reported; then --reuse
    takes the run's checkpoint instead of training again."""
    lb = bench("likelihood")
    out = tmp_path / "bench.json"
    args = ["--quick", "--datasets", "mnist", "--objectives", "vdm", "--samples", "16", "--eval-images", "4",
            "--vlb-steps", "0", "--threads", "1", "--out-dir", str(tmp_path / "runs"), "--json", str(out)]
    assert lb.main(args) == 0
    row, = json.loads(out.read_text())["rows"]
    err = capsys.readouterr().err  # each measurement says what it found as it goes
    assert f"mnist vdm 0.05 min: bound {row['bpd_bound']:.3f} +- {row['bpd_bound_se']:.3f}, ODE" in err
    assert "ddpm/50 FD" in err
    assert row["kind"] == "vdm" and not row["reused"] and 1 <= row["steps"] <= row["planned_steps"]
    step_seconds = 64 / row["step_images_per_s"]                        # batch 64 at the timed rate
    assert row["budget_seconds"] <= 0.05 * 60 + 2 * step_seconds         # stopped at the CPU budget (or the cap)
    assert row["bound_T"] == 0 and row["bpd_bound_n"] == 4 and row["bpd_ode_n"] == 2   # continuous-time ELBO
    assert math.isfinite(row["bpd_bound"]) and row["bpd_bound"] > 0 and math.isfinite(row["bpd_ode"])
    q, = row["quality"]
    assert (q["sampler"], q["steps"], q["samples"]) == ("ddpm", 50, 16) and q["fd"] > 0 and "fd_floor" in q
    ckpt = tmp_path / "runs" / "mnist-vdm-0.05min" / "checkpoints" / "last.safetensors"
    stamp = ckpt.stat().st_mtime_ns
    path, info = lb.train_row("mnist", "vdm", str(tmp_path / "runs"), 0.05, timed_steps=1, reuse=True,
                              log=lambda m: None)
    assert path == ckpt and info["reused"] and info["steps"] == row["steps"] and ckpt.stat().st_mtime_ns == stamp


def test_json_keeps_the_rows_measured_before_a_failure(bench, tmp_path, monkeypatch):
    """--json is written after every row: a run stopped in its second row keeps the first one's figures."""
    lb = bench("likelihood")
    monkeypatch.setattr(lb.backbones, "check_feature_nets", lambda datasets: None)
    seen = []

    def run_row(dataset, objective, out_dir, **kw):
        seen.append(objective)
        if len(seen) == 2:
            raise RuntimeError("stopped in the second row")
        return {"dataset": dataset, "objective": objective, "minutes": kw["minutes"], "bpd_bound": 1.5}

    monkeypatch.setattr(lb, "run_row", run_row)
    out = tmp_path / "bench.json"
    with pytest.raises(RuntimeError, match="second row"):
        lb.main(["--quick", "--datasets", "mnist", "--objectives", "simple", "hybrid", "--json", str(out)])
    assert seen == ["simple", "hybrid"]
    assert [(r["objective"], r["bpd_bound"]) for r in json.loads(out.read_text())["rows"]] == [("simple", 1.5)]
