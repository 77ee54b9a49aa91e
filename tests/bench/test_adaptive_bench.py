"""The adaptive-allocation benchmark (bench/adaptive.py): mean NFE counted row by row, the 'reaches fixed' rule
on rows with known answers, and the table."""
import torch

from torchdiffusion.data.toy import ring_mixture


def test_reach_picks_the_smallest_adaptive_nfe_at_or_below_fixed(bench):
    adaptive = bench("adaptive")
    rows = [{"nfe": 6, "method": "fixed", "mean_nfe": 6, "sw2_excess": 0.05},
            {"nfe": 8, "method": "fixed", "mean_nfe": 8, "sw2_excess": 0.01},
            {"nfe": 6, "method": "prefix", "mean_nfe": 6, "sw2_excess": 0.2},
            {"nfe": 8, "method": "prefix", "mean_nfe": 8, "sw2_excess": 0.05},
            {"nfe": 10, "method": "prefix", "mean_nfe": 10, "sw2_excess": 0.02}]
    got = {r["nfe"]: (r["adaptive_nfe"], r["ratio"]) for r in adaptive.reach(rows, "prefix")}
    assert got == {6: (8, 8 / 6), 8: (None, None)}


def test_run_counts_the_mean_nfe_of_every_method(bench):
    """On a ring with 96 samples: fixed rows cost their NFE exactly, both adaptive variants their target mean NFE
    (the probe's calls included), and the table has one line per NFE asked."""
    adaptive = bench("adaptive")
    res = adaptive.run_mixture(ring_mixture(8, 1.0, 0.05), 96, (6, 8), n_dirs=64)
    for r in res["rows"]:
        assert r["mean_nfe"] == r["nfe"]
    assert {(r["method"], r["nfe"]) for r in res["rows"]} == {
        ("fixed", 3), ("fixed", 5), ("fixed", 6), ("fixed", 8), ("probe", 6), ("probe", 8), ("prefix", 6),
        ("prefix", 8)}
    table = adaptive.format_table("ring2d", res, (6, 8))
    assert len([ln for ln in table.splitlines() if ln.startswith("| 6 ") or ln.startswith("| 8 ")]) == 2
    assert torch.isfinite(torch.tensor([r["sw2_excess"] for r in res["rows"]])).all()
