"""Guidance benchmark on MNIST (accuracy of requested classes, FD, diversity per scale, CFG and classifier
guidance): `python bench/guidance.py --img-dir docs/img --json outputs/bench_guidance.json`."""
import sys

from torchdiffusion.guidance_benchmark import main

if __name__ == "__main__":
    sys.exit(main())
