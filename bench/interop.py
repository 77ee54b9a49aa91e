"""How closely the ways in and out agree with the library: the largest absolute difference of each path's output
from the PyTorch denoiser (or from diffusers' own pipeline), and how long each export takes.

    python bench/interop.py [--json outputs/bench/interop.json]

Rows: a diffusers UNet2DModel (random weights, v-prediction, scaled-linear betas) sampled by our DDIM against
diffusers' DDIMPipeline from the same noise (10 steps); our default MNIST U-Net (random weights, class-conditional)
exported to diffusers and run by UNet2DModel; the same denoiser through ONNX (onnxruntime), torch.export and
TorchScript at batch sizes 1 and 7.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from torchdiffusion.build import load_denoiser
from torchdiffusion.interop.diffusers import export_diffusers
from torchdiffusion.interop.export import export_onnx, export_program, export_torchscript
from torchdiffusion.nets import UNet
from torchdiffusion.precond import ClampX0, Precond
from torchdiffusion.sampling import get_sigmas, sample_ddim
from torchdiffusion.schedules import get_schedule

SHAPE = (1, 28, 28)
CLASSES = 10


def randomized(module, std, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


def diffusers_in(tmp: Path, steps: int = 10) -> float:
    import diffusers

    unet = randomized(diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8, norm_num_groups=8), 0.1)
    unet.save_pretrained(tmp / "in" / "unet")
    diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                            prediction_type="v_prediction").save_pretrained(tmp / "in" / "scheduler")
    (tmp / "in" / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler.from_pretrained(tmp / "in" / "scheduler"))
    theirs = pipe(batch_size=4, generator=torch.Generator().manual_seed(3), num_inference_steps=steps, eta=0.0,
                  output_type="np", use_clipped_model_output=True).images
    den, _, _ = load_denoiser(tmp / "in")
    sig = get_sigmas(den.schedule, steps, "leading")
    noise = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = sample_ddim(ClampX0(den), noise * (1 + sig[0] ** 2).sqrt(), sig)
    return float(np.abs((ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() - theirs).max())


def rows(tmp: Path) -> list[dict]:
    import diffusers
    import onnxruntime as ort

    out = [{"path": "diffusers UNet2DModel -> our DDIM vs DDIMPipeline (10 steps)", "batch": 4,
            "max_abs_diff": diffusers_in(tmp)}]
    den = Precond(randomized(UNet(num_classes=CLASSES), 0.05), get_schedule("linear"), "eps").eval()
    t0 = time.time()
    export_diffusers(den, tmp / "out")
    secs = time.time() - t0
    unet = diffusers.UNet2DModel.from_pretrained(str(tmp / "out" / "unet")).eval()
    exported = {"onnx": None, "torch.export": None, "torchscript": None}
    times = {}
    for name, fn, file in (("onnx", export_onnx, "d.onnx"), ("torch.export", export_program, "d.pt2"),
                           ("torchscript", export_torchscript, "d.pt")):
        t0 = time.time()
        exported[name] = fn(den, tmp / file, SHAPE, num_classes=CLASSES)
        times[name] = time.time() - t0
    session = ort.InferenceSession(str(exported["onnx"]))
    program = torch.export.load(str(exported["torch.export"])).module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        script = torch.jit.load(str(exported["torchscript"]))
    for n in (1, 7):
        g = torch.Generator().manual_seed(n)
        x, sigma = torch.randn(n, *SHAPE, generator=g), torch.rand(n, generator=g) * 10 + 0.01
        y = torch.randint(0, CLASSES + 1, (n,), generator=g)
        with torch.no_grad():
            ref = den(x, sigma, class_labels=y)
            t = den.schedule.net_time(sigma).float()
            net_ref = den.net(den.net_input(x, sigma)[0], t, class_labels=y)
            results = {
                "diffusers (our U-Net exported, raw network output)": unet(den.net_input(x, sigma)[0], t,
                                                                            class_labels=y).sample - net_ref,
                "onnx (onnxruntime)": torch.from_numpy(session.run(None, {"x": x.numpy(), "sigma": sigma.numpy(),
                                                                          "class_labels": y.numpy()})[0]) - ref,
                "torch.export": program(x, sigma, y) - ref,
                "torchscript": script(x, sigma, y) - ref,
            }
        for name, diff in results.items():
            key = name.split(" ")[0]
            out.append({"path": name, "batch": n, "max_abs_diff": float(diff.abs().max()),
                        "export_seconds": round(secs if key == "diffusers" else times.get(key, 0.0), 2)})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        res = rows(Path(tmp))
    print("| path | batch | max abs difference | export seconds |\n|---|---|---|---|")
    for r in res:
        print(f"| {r['path']} | {r['batch']} | {r['max_abs_diff']:.2e} | {r.get('export_seconds', '-')} |")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
