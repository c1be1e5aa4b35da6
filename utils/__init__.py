"""Data, distributed helpers, checkpoint I/O, logging, lr schedules and metrics."""
