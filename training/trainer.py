"""What the training loop and a model-specific trainer (ARTrainer, TokenizerTrainer) exchange."""
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Protocol, Sequence

import torch


@dataclass
class StepResult:
    """What one micro-batch reports to the loop."""
    loss: float                            # the training loss, averaged over ranks
    lr: float
    wd: float
    grad_norm: Optional[float] = None      # pre-clip norm; only on micro-batches that stepped
    scale_log2: Optional[float] = None     # fp16 loss scale
    skipped_steps: Optional[int] = None    # optimizer steps skipped so far for non-finite gradients (AmpOptimizer)
    metrics: Optional[Dict[str, float]] = None  # TensorBoard tag -> value, when asked for
    summary: str = ''                      # the model-specific part of the log line


class Trainer(Protocol):
    """What `TrainLoop` needs from a model-specific trainer (train.py's ARTrainer, train_tokenizer.py's)."""
    ckpt_kind: str                         # the 'kind' of its checkpoints: 'var' or 'vqvae'
    device: torch.device
    val_score: str                         # key of `evaluate`'s result that picks the best checkpoint (lower wins)
    tokens_per_image: Optional[int]
    rng_generators: Dict[str, random.Random]

    def step(self, it: int, batch, stepping: bool, want_metrics: bool) -> StepResult: ...

    def evaluate(self, loader) -> Dict[str, float]: ...

    def checkpoint(self) -> Dict[str, Any]: ...

    def load_checkpoint(self, ckpt: Dict[str, Any], path: Path): ...

    def replicated(self) -> Sequence[torch.nn.Module]: ...
