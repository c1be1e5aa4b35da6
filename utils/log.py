"""Rank-aware logging: rank 0 writes to stdout and a log file; other ranks only report warnings. Training metrics go
to TensorBoard and a JSON-lines file."""
import json
import logging
import math
import sys
from pathlib import Path
from typing import Dict, Optional

from utils.fileio import open_append, write_text_atomic

LOG_FORMAT = '[%(asctime)s] %(message)s'
DATE_FORMAT = '%m-%d %H:%M:%S'


class NoFollowFileHandler(logging.FileHandler):
    """A log file opened for appending with `open_append`: a symbolic link in its place is refused, not followed."""

    def __init__(self, path: Path):
        super().__init__(path, mode='a', delay=True)
        self.stream = self._open()

    def _open(self):
        return open_append(self.baseFilename)


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
        file_handler = NoFollowFileHandler(log_file)
        file_handler.setFormatter(formatter)
        root.addHandler(file_handler)
    return logging.getLogger('viar')


class MetricWriter:
    """Scalars to TensorBoard and to `log.txt` (one JSON object per line) on rank 0; a no-op elsewhere.

    With `resume_step` (0 for a fresh start), entries after that step are dropped from both, so a restarted run's
    curves continue where its checkpoint was written; so is a line torn by a killed process.
    """

    def __init__(self, out_dir: Path, tb_name: str, enabled: bool, resume_step: Optional[int] = None):
        self.enabled = enabled
        self.tb = None
        self.json_path = Path(out_dir) / 'log.txt'
        if not enabled:
            return
        if resume_step is not None and self.json_path.is_file():
            kept = [line for line in self.json_path.read_text().splitlines() if _step_of(line) <= resume_step]
            write_text_atomic(self.json_path, ''.join(line + '\n' for line in kept))
        from torch.utils.tensorboard import SummaryWriter  # imported here: only rank 0 needs TensorBoard
        self.tb = SummaryWriter(str(Path(out_dir) / tb_name), purge_step=resume_step)
        self.tb_dir = Path(out_dir) / tb_name

    def write(self, step: int, scalars: Dict[str, float], **extra):
        """Record `scalars` (tag -> value, tags like 'loss/L_mean') at `step`, plus non-scalar `extra` in log.txt."""
        if not self.enabled:
            return
        for tag, value in scalars.items():
            if value is not None:
                self.tb.add_scalar(tag, value, step)
        with open_append(self.json_path) as f:
            f.write(json.dumps({'step': step, **extra, **scalars}) + '\n')

    def close(self):
        if self.tb is not None:
            self.tb.close()


def _step_of(line: str) -> float:
    """The step of a log.txt line; infinity for a blank or torn one (so that resuming drops it)."""
    try:
        return json.loads(line).get('step', 0)
    except (ValueError, AttributeError):
        return math.inf
