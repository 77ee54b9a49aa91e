"""The denoiser as a portable graph: ONNX (onnxruntime and friends), a ``torch.export`` program (``.pt2``, for
AOTInductor / ExecuTorch on C++ and mobile) and TorchScript (``torch.jit``, deprecated in recent PyTorch but still
what many C++ and mobile apps load).

The exported function is the denoiser of this library's contract, preconditioning included:
``D(x, sigma[, class_labels]) -> x0`` with x (N, *shape) float32 in VE coordinates (x = x0 + sigma n), sigma (N,)
float32 and, for a class-conditional model, class_labels (N,) int64 (label K is the null class). The batch axis N
is dynamic. A sampler written against this contract (any of docs/theory.md's) runs the exported file.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from ..utils import check_choice

ONNX_OPSET = 18          # the ONNX operator set the export targets
FORMATS = ("onnx", "torch-export", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torch-export": ".pt2", "torchscript": ".pt"}
EXAMPLE_BATCH = 2        # batch of the example inputs the graph is traced with (the batch axis stays dynamic)


class ExportedDenoiser(nn.Module):
    """D(x, sigma[, class_labels]) with positional arguments only, as exporters want."""

    def __init__(self, denoiser, class_conditional: bool):
        super().__init__()
        self.denoiser = denoiser
        self.class_conditional = class_conditional

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None):
        if self.class_conditional:
            return self.denoiser(x, sigma, class_labels=class_labels)
        return self.denoiser(x, sigma)


def example_inputs(shape: tuple, class_conditional: bool, num_classes: int | None = None) -> tuple:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(EXAMPLE_BATCH, *shape, generator=g)
    sigma = torch.linspace(0.5, 5.0, EXAMPLE_BATCH)
    if not class_conditional:
        return x, sigma
    return x, sigma, torch.arange(EXAMPLE_BATCH) % (num_classes or 1)


def input_names(class_conditional: bool) -> list[str]:
    return ["x", "sigma", "class_labels"][: 3 if class_conditional else 2]


def dynamic_batch(names: list[str]) -> dict:
    batch = torch.export.Dim("batch", min=1)
    return {n: {0: batch} for n in names}


def export_onnx(denoiser, path, shape: tuple, *, num_classes: int | None = None, opset: int = ONNX_OPSET) -> Path:
    """Write the denoiser as an ONNX graph at `path` (inputs x, sigma[, class_labels]; output x0; dynamic batch)."""
    conditional = num_classes is not None
    module = ExportedDenoiser(denoiser, conditional).eval()
    args = example_inputs(shape, conditional, num_classes)
    names = input_names(conditional)
    dynamic = dynamic_batch(names)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(module, args, str(path), input_names=names, output_names=["x0"], opset_version=opset,
                          dynamo=True, dynamic_shapes=dynamic, external_data=False, optimize=False)
    return path


def export_torchscript(denoiser, path, shape: tuple, *, num_classes: int | None = None) -> Path:
    """Write the denoiser as a traced TorchScript module at `path` (``torch.jit.load`` in Python, C++ or mobile)."""
    conditional = num_classes is not None
    module = ExportedDenoiser(denoiser, conditional).eval()
    args = example_inputs(shape, conditional, num_classes)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks become constants, as intended
        traced = torch.jit.trace(module, args, check_trace=False)
    traced.save(str(path))
    return path


def export_program(denoiser, path, shape: tuple, *, num_classes: int | None = None) -> Path:
    """Write the denoiser as a ``torch.export`` program at `path` (``torch.export.load(path).module()`` runs it)."""
    conditional = num_classes is not None
    module = ExportedDenoiser(denoiser, conditional).eval()
    args = example_inputs(shape, conditional, num_classes)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.export.export(module, args, dynamic_shapes=dynamic_batch(input_names(conditional)))
    torch.export.save(program, str(path))
    return path


def export(denoiser, path, shape: tuple, fmt: str, *, num_classes: int | None = None) -> Path:
    """Export in `fmt` (FORMATS)."""
    check_choice("export format", fmt, FORMATS)
    fn = {"onnx": export_onnx, "torch-export": export_program, "torchscript": export_torchscript}[fmt]
    return fn(denoiser, path, shape, num_classes=num_classes)
