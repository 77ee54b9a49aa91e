"""The text-conditioning benchmark (bench/text_conditioning.py): both rows train their preset for the same CPU
budget with the learning rate over it and the preset's warm-up share; the table."""
import pytest

from torchdiffusion.config import load_config


@pytest.mark.parametrize("kind", ["text", "class"])
def test_rows_train_their_preset_for_the_same_cpu_budget(bench, tmp_path, kind):
    tc = bench("text_conditioning")
    cfg = tc.run_config(kind, 7.5, str(tmp_path), None)
    preset = load_config(tc.PRESETS[kind]).train
    t = cfg.train
    assert (t.max_minutes, t.lr_schedule_over, t.clock) == (7.5, "time", "cpu")
    assert cfg.captions.enabled == (kind == "text")
    assert t.warmup_steps / t.steps == pytest.approx(preset.warmup_steps / preset.steps, rel=1e-3)
    assert cfg.run_dir == tmp_path / f"{tc.PRESETS[kind]}-7.5min"


def test_the_table_has_one_line_per_model(bench):
    tc = bench("text_conditioning")
    rows = [{"model": m, "steps": 10, "train_seconds": 1.0, "accuracy": a, "fd": 50.0, "fd_floor": 5.0,
             "fd_ratio": 10.0, "attribute_agreement": 0.5} for m, a in (("text", 0.9), ("class", 0.95))]
    lines = tc.format_table(rows).splitlines()
    assert len(lines) == 4 and lines[2].split()[0] == "text" and "0.900" in lines[2] and "0.950" in lines[3]
