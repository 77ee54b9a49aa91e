"""Exact sampler benchmark on Gaussian mixtures: `python bench/samplers.py --out outputs/bench_samplers [--quick]`."""
from torchdiffusion.sampling.benchmark import main

if __name__ == "__main__":
    main()
