"""Training engine: loop, seeds, checkpoints and resume, AMP, optimizer schedules, distributed, data, flags."""
