"""The torchrun path: `torchrun --nproc-per-node 2` starts two processes whose Trainer joins the process group
from torchrun's environment (training.init_distributed), trains 3 steps of the toy MLP, and ends with the same
weights on both ranks; rank 0 alone writes the checkpoint, which matches a one-process run of the same global
batch. Takes about 15 s (two fresh interpreters importing torch)."""
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file

from torchdiffusion.checkpoint import load_checkpoint
from torchdiffusion.config import load_config
from torchdiffusion.training import Trainer

OVERRIDES = ["train.steps=3", "train.batch_size=64", "train.ckpt_every=0", "train.log_every=1",
             "train.warmup_steps=0", "train.lr_schedule=constant", "train.threads=1"]
TOL = 1e-5  # float32 all-reduce sums the two halves of the batch gradient in another order than one process

WORKER = textwrap.dedent("""
    import sys

    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    from torchdiffusion.config import load_config
    from torchdiffusion.training import Trainer

    out, overrides = sys.argv[1], sys.argv[2:]
    tr = Trainer(load_config("toy2d", [f"out_dir={out}", *overrides]), progress=False)
    tr.fit()
    info = tr.dist
    save_file({k: v.contiguous() for k, v in tr.net.state_dict().items()}, f"{out}/rank{info.rank}.safetensors",
              metadata={"rank": str(info.rank), "world_size": str(info.world_size), "backend": str(info.backend),
                        "initialized": str(dist.is_initialized())})
    dist.destroy_process_group()
""")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_torchrun_two_processes_agree_and_rank0_writes_the_checkpoint(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "two"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           str(out), *OVERRIDES]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    ranks = []
    for r in (0, 1):
        path = out / f"rank{r}.safetensors"
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        assert meta == {"rank": str(r), "world_size": "2", "backend": "gloo", "initialized": "True"}
        ranks.append(load_file(str(path)))
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k  # DDP: one all-reduced gradient, one update on both

    ckpt = out / "toy2d" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["best.safetensors", "last.safetensors"]
    meta, groups = load_checkpoint(ckpt / "last.safetensors")
    assert meta["step"] == 3 and meta["world_size"] == 2
    for k in ranks[0]:
        assert torch.equal(groups["model"][k], ranks[0][k]), k

    one = Trainer(load_config("toy2d", [f"out_dir={tmp_path / 'one'}", *OVERRIDES]), progress=False)
    one.fit()
    for k, v in one.net.state_dict().items():
        torch.testing.assert_close(ranks[0][k], v, rtol=TOL, atol=TOL, msg=k)
