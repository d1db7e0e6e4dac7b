"""TensorBoard shows every validation at the optimizer step curve.csv and the samples name."""

from __future__ import annotations

import csv

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def test_validation_scalars_curve_and_samples_share_their_steps(trained_run):
    events = EventAccumulator(str(trained_run), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalar_steps = sorted({event.step for event in events.Scalars("val/bpb")})
    sample_steps = sorted({event.step for event in events.Tensors("val/sample/text_summary")})
    with (trained_run / "curve.csv").open() as f:
        curve_steps = sorted({int(float(row["step"])) for row in csv.DictReader(f)})
    assert curve_steps == [10, 20]  # tiny_overrides: 20 steps, a validation every 10
    assert scalar_steps == curve_steps == sample_steps
