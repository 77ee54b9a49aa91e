"""Ways in and out: diffusers models loaded as denoisers and ours exported as diffusers pipelines; the denoiser as
an ONNX or TorchScript graph."""
