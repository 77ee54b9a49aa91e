"""Scalar logging: the JSON lines, and the TensorBoard event file as TensorBoard's own reader sees it."""
import pytest

from torchdiffusion.training.tracking import ScalarWriter, read_metrics, rewrite_metrics

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                        reason="the tensorboard package (a dependency) is not installed")


def _scalars(log_dir, tag):
    acc = event_accumulator.EventAccumulator(str(log_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_event_file_and_jsonl(tmp_path):
    w = ScalarWriter(tmp_path)
    w.add_scalars(10, {"loss": 0.5})
    w.add_scalars(20, {"loss": 0.25, "lr": 1e-3})
    w.close()
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1
    assert _scalars(tmp_path, "loss") == [(10, 0.5), (20, 0.25)]
    assert _scalars(tmp_path, "lr") == [(20, pytest.approx(1e-3, rel=1e-6))]
    assert [m["step"] for m in read_metrics(tmp_path)] == [10, 20]


def test_a_continued_run_replaces_the_steps_after_its_checkpoint(tmp_path):
    """A run killed at step 30 after a checkpoint at 20 and continued from it: TensorBoard shows the continued
    run's 30, not both, and the JSON lines agree."""
    w = ScalarWriter(tmp_path)
    for step, loss in ((10, 1.0), (20, 0.8), (30, 0.7)):
        w.add_scalars(step, {"loss": loss})
    w.close()
    rewrite_metrics(tmp_path, [m for m in read_metrics(tmp_path) if m["step"] <= 20])
    w = ScalarWriter(tmp_path, purge_step=21)
    w.add_scalars(30, {"loss": 0.6})
    w.close()
    assert _scalars(tmp_path, "loss") == [(10, 1.0), (20, pytest.approx(0.8)), (30, pytest.approx(0.6))]
    assert [(m["step"], m["loss"]) for m in read_metrics(tmp_path)] == [(10, 1.0), (20, 0.8), (30, 0.6)]
