"""Training speed vs the measured matmul peak: `python bench/train_speed.py [--configs demo cifar] [--json out.json]`.

See `torchdiffusion.train_speed` (also `torchdiffusion bench train-speed`)."""
from torchdiffusion.train_speed import main

if __name__ == "__main__":
    raise SystemExit(main())
