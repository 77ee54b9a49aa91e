"""The step count of a sampling spec: the explicit grid's intervals, else `steps`."""
from torchdiffusion.sampling import SampleConfig, get_sigmas, grid_steps


def test_grid_steps_counts_the_explicit_grid_as_get_sigmas_builds_it():
    for grid in ((80.0, 0.8), (80.0, 0.8, 0.0), (5.0,)):
        spec = SampleConfig(steps=50, sigmas=grid)
        assert grid_steps(spec) == len(get_sigmas(None, 50, "uniform", sigmas=grid)) - 1
    assert grid_steps(SampleConfig(steps=7)) == 7
