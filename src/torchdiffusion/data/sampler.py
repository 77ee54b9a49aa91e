"""A deterministic, resumable batch order that any number of data-parallel processes can share."""
from __future__ import annotations

import torch

from ..utils import hash_seed


class EpochSampler:
    """Deterministic, resumable batches of indices into a dataset of size n.

    Epoch e uses the permutation drawn from (seed, e) alone, cut into global batches of ``batch_size``
    (the last, smaller one dropped when drop_last). Iterating yields int64 index tensors forever, moving
    on to the next epoch at the end of each one; ``state_dict()`` records (epoch, position) so that
    ``load_state_dict`` continues with exactly the same sequence. With ``world_size`` > 1, rank r gets
    the r-th of world_size disjoint slices of every global batch (batch_size must be divisible by
    world_size; a last partial batch is split as evenly as possible).
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, drop_last: bool = True, *, rank: int = 0,
                 world_size: int = 1):
        n, batch_size, world_size, rank = int(n), int(batch_size), int(world_size), int(rank)
        if n <= 0 or batch_size <= 0:
            raise ValueError(f"n and batch_size must be positive, got n={n}, batch_size={batch_size}")
        if drop_last and batch_size > n:
            raise ValueError(f"batch_size {batch_size} is larger than the dataset ({n}) and drop_last is set, "
                             f"so an epoch would have no batches")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
        self.n, self.batch_size, self.seed, self.drop_last = n, batch_size, int(seed), bool(drop_last)
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.position = 0  # global batches already yielded in the current epoch
        self._perm_epoch, self._perm = None, None

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(hash_seed(self.seed, epoch))
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def global_batch(self, epoch: int, position: int) -> torch.Tensor:
        """The full (all ranks) batch number `position` of `epoch`."""
        if not 0 <= position < len(self):
            raise IndexError(f"batch {position} out of range for {len(self)} batches per epoch")
        return self.permutation(epoch)[position * self.batch_size:(position + 1) * self.batch_size]

    def _shard(self, batch: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return batch
        return torch.tensor_split(batch, self.world_size)[self.rank]

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        batch = self._shard(self.global_batch(self.epoch, self.position))
        self.position += 1
        return batch.clone()

    def next_batch(self) -> torch.Tensor:
        """This rank's next batch of indices (same as ``next(sampler)``)."""
        return next(self)

    def epoch_batches(self, epoch: int) -> list:
        """All of this rank's batches of one epoch (does not move the sampler)."""
        return [self._shard(self.global_batch(epoch, i)).clone() for i in range(len(self))]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n": self.n,
                "batch_size": self.batch_size, "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        """Restore (epoch, position); the data order must be the same (n, batch_size, seed, drop_last), the
        sharding (rank, world_size) may differ."""
        for k in ("n", "batch_size", "seed", "drop_last"):
            if k in state and state[k] != getattr(self, k):
                raise ValueError(f"sampler state has {k}={state[k]!r} but this sampler has {getattr(self, k)!r}; "
                                 f"resuming would change the data order")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self):
            raise ValueError(f"invalid sampler state epoch={epoch}, position={position}")
        self.epoch, self.position = epoch, position
