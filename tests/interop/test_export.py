"""ONNX and TorchScript exports compute the denoiser: outputs equal PyTorch's to 1e-4 at batch sizes 1 and 7."""
import numpy as np
import pytest
import torch

from torchdiffusion.interop.export import export_onnx, export_program, export_torchscript
from torchdiffusion.nets import UNet
from torchdiffusion.precond import Precond
from torchdiffusion.schedules import get_schedule


def _denoiser(num_classes, schedule):
    net = UNet(image_size=16, channels=16, channel_mult=(1, 2), attn_resolutions=(8,), num_heads=2, norm_groups=8,
               num_classes=num_classes)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return Precond(net, get_schedule(schedule), "edm" if schedule == "edm" else "eps").eval()


def _inputs(n, num_classes):
    g = torch.Generator().manual_seed(n)
    x, sigma = torch.randn(n, 1, 16, 16, generator=g), torch.rand(n, generator=g) * 10 + 0.01
    return (x, sigma) if num_classes is None else (x, sigma, torch.randint(0, num_classes + 1, (n,), generator=g))


@pytest.mark.parametrize("num_classes,schedule", [(None, "linear"), (10, "edm")])
def test_onnx_matches_pytorch(tmp_path, num_classes, schedule):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'torchdiffusion[onnx]')")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install 'torchdiffusion[onnx]')")
    den = _denoiser(num_classes, schedule)
    path = export_onnx(den, tmp_path / "d.onnx", (1, 16, 16), num_classes=num_classes)
    session = ort.InferenceSession(str(path))
    names = [i.name for i in session.get_inputs()]
    assert names == ["x", "sigma"] + (["class_labels"] if num_classes else [])
    for n in (1, 7):
        args = _inputs(n, num_classes)
        with torch.no_grad():
            ref = den(*args[:2], **({"class_labels": args[2]} if num_classes else {})).numpy()
        out = session.run(None, dict(zip(names, (a.numpy() for a in args))))[0]
        assert out.shape == ref.shape and np.abs(out - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("fmt", ["torchscript", "torch-export"])
@pytest.mark.parametrize("num_classes", [None, 10])
def test_torchscript_and_torch_export_match_pytorch(tmp_path, num_classes, fmt):
    den = _denoiser(num_classes, "cosine")
    if fmt == "torchscript":
        with pytest.warns(DeprecationWarning):  # torch.jit.load is deprecated in recent PyTorch; it still works
            loaded = torch.jit.load(str(export_torchscript(den, tmp_path / "d.pt", (1, 16, 16),
                                                           num_classes=num_classes)))
    else:
        loaded = torch.export.load(str(export_program(den, tmp_path / "d.pt2", (1, 16, 16),
                                                      num_classes=num_classes))).module()
    for n in (1, 7):
        args = _inputs(n, num_classes)
        with torch.no_grad():
            ref = den(*args[:2], **({"class_labels": args[2]} if num_classes else {}))
            torch.testing.assert_close(loaded(*args), ref, rtol=1e-4, atol=1e-4)
