"""Rank-aware logging: rank 0 writes to stdout and a log file; other ranks only report warnings."""
import logging
import sys
from pathlib import Path
from typing import Optional

LOG_FORMAT = '[%(asctime)s] %(message)s'
DATE_FORMAT = '%m-%d %H:%M:%S'


def setup_logging(rank: int = 0, log_file: Optional[Path] = None, level: int = logging.INFO) -> logging.Logger:
    """Configure the root logger once per process and return the project logger."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    formatter = logging.Formatter(LOG_FORMAT, datefmt=DATE_FORMAT)
    stream = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    stream.setFormatter(formatter)
    root.addHandler(stream)
    root.setLevel(level if rank == 0 else logging.WARNING)
    if rank == 0 and log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, mode='a')
        file_handler.setFormatter(formatter)
        root.addHandler(file_handler)
    return logging.getLogger('viar')
