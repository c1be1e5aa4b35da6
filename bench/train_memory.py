"""Training memory of VAR and VIAR: parameters, gradients and AdamW state, and the activations one training step
saves for backward (every tensor autograd packs, counted with `saved_tensors_hooks`). With S-JFB the latter does not
depend on the number of no-grad iterations and grows linearly with the with-grad ones.

    python -m bench.train_memory          # the released sizes at batch 64 per GPU; allocates no memory

The full-size models run on fake tensors (torch's FakeTensorMode: shapes, dtypes and kernel choices of the CPU
backend, no data), so the attention is counted as the fused kernel saves it (q, k, v, output, log-sum-exp), not as
the math fallback of the meta device (which would keep B*H*L*L probabilities). Writes bench/results/train_memory.*.
"""
import argparse
import datetime
import json
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef

from models import VAR_PRESETS, build_var, num_params
from training.ar_trainer import token_losses
from utils.fileio import write_text_atomic

RESULTS = Path(__file__).resolve().parent / 'results'
ADAMW_STATES = 2          # exp_avg and exp_avg_sq per parameter
FP32_BYTES = 4
GiB = 2 ** 30
DEFAULT_BATCH = 64        # the paper: 512 images over 8 GPUs
VAR_SIZES = ('var-d16', 'var-d20', 'var-d24', 'var-d30')
VIAR_ITERS = ((0, 1), (10, 1), (0, 6), (10, 6), (0, 12), (10, 12))
AUTOCAST = {'fp32': None, 'bf16': torch.bfloat16}


@dataclass
class Saved:
    """What autograd keeps for backward, parameters excluded: summed over packed tensors, and per distinct storage
    (the memory actually retained: a tensor saved by two operations, or two views of one buffer, count once)."""
    packed: int
    retained: int


def saved_bytes(var, label_B: torch.Tensor, x_BLCv: torch.Tensor, gt_BL: torch.Tensor,
                sjfb_iters: Optional[Tuple[int, int]] = None, autocast_dtype=None) -> Saved:
    """Bytes autograd saves in one training forward of `var`, loss included."""
    params = {StorageWeakRef(t.untyped_storage()).cdata for t in [*var.parameters(), *var.buffers()]}
    packed, storages = 0, {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal packed
        storage = t.untyped_storage()
        key = StorageWeakRef(storage).cdata
        if key not in params:
            packed += t.numel() * t.element_size()
            storages[key] = storage.nbytes()
        return t

    device_type = x_BLCv.device.type
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits_BLV = var(label_B, x_BLCv, sjfb_iters=sjfb_iters)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_losses(logits_BLV, gt_BL).mean()
    return Saved(packed, sum(storages.values()))


def fake_batch(var, B: int, device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labels, teacher-forcing input and targets shaped like a real batch (zeros: only shapes matter here)."""
    label_B = torch.zeros(B, dtype=torch.long, device=device)
    x_BLCv = torch.zeros(B, var.L - 1, var.Cvae, device=device)
    gt_BL = torch.zeros(B, var.L, dtype=torch.long, device=device)
    return label_B, x_BLCv, gt_BL


def measure(preset: str, B: int, iters: Optional[Tuple[int, int]] = None) -> Dict:
    """Memory of one training step of a released-size model, in fp32 and under bf16 autocast, on fake tensors."""
    var = build_var(VAR_PRESETS[preset], device='meta').train()
    n = num_params(var)
    row = {'model': preset, 'implicit_iters': iters, 'params': n, 'param_bytes': FP32_BYTES * n,
           'grad_bytes': FP32_BYTES * n, 'adamw_bytes': FP32_BYTES * ADAMW_STATES * n}
    with FakeTensorMode(allow_non_fake_inputs=True):
        var = var.to_empty(device='cpu')
        for name, dtype in AUTOCAST.items():
            row[f'saved_{name}'] = asdict(saved_bytes(var, *fake_batch(var, B, 'cpu'), iters, dtype))
    return row


def render(rows: List[Dict], B: int, command: str) -> str:
    lines = [f'# Training memory per GPU (batch {B})', '',
             f'Command: `{command}`  ',
             f'Machine: {platform.node()} ({platform.machine()}), torch {torch.__version__}, {datetime.date.today()}; '
             f'fake tensors (shapes only, CPU kernel choices).', '',
             'Params, grads and AdamW state in fp32. *Saved*: activations autograd keeps for backward in one '
             'training step, parameters excluded, counted once per storage (the retained memory); in fp32 and under '
             'bf16 autocast (fp16 is the same size). Peak training memory is roughly params + grads + AdamW + saved.',
             '',
             '| model | S-JFB (no-grad, with-grad) | params | params GiB | grads GiB | AdamW GiB | saved fp32 GiB | '
             'saved bf16 GiB |', '|---|---|---|---|---|---|---|---|']
    for r in rows:
        it = '-' if r['implicit_iters'] is None else f'({r["implicit_iters"][0]}, {r["implicit_iters"][1]})'
        lines.append(f'| {r["model"]} | {it} | {r["params"]:,} | {r["param_bytes"] / GiB:.2f} | '
                     f'{r["grad_bytes"] / GiB:.2f} | {r["adamw_bytes"] / GiB:.2f} | '
                     f'{r["saved_fp32"]["retained"] / GiB:.2f} | {r["saved_bf16"]["retained"] / GiB:.2f} |')
    viar = {tuple(r['implicit_iters']): r for r in rows if r['implicit_iters'] is not None}
    if {(0, 1), (10, 1), (0, 12)} <= set(viar):
        for name in AUTOCAST:
            a, b, c = (viar[k][f'saved_{name}']['retained'] for k in ((0, 1), (10, 1), (0, 12)))
            lines.append(f'\nVIAR, {name}: each with-grad iteration adds {(c - a) / 11 / GiB:.3f} GiB; ten no-grad '
                         f'iterations add {(b - a) / GiB:.3f} GiB.')
    return '\n'.join(lines) + '\n'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--batch', type=int, default=DEFAULT_BATCH, help='images per GPU (the paper: 512 over 8 GPUs)')
    p.add_argument('--out', default=str(RESULTS / 'train_memory'), help='output path without extension')
    args = p.parse_args(argv)
    rows = [measure(name, args.batch) for name in VAR_SIZES]
    rows += [measure('viar-d30', args.batch, iters) for iters in VIAR_ITERS]
    command = 'python -m bench.train_memory' + ''.join(f' {a}' for a in (argv if argv is not None else sys.argv[1:]))
    text = render(rows, args.batch, command)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out.with_suffix('.md'), text)
    meta = {'command': command, 'torch': torch.__version__, 'machine': platform.platform(), 'batch': args.batch,
            'dtypes': 'params/grads/AdamW fp32; saved: fp32 and bf16 autocast', 'device': 'FakeTensorMode (cpu)',
            'rows': rows}
    write_text_atomic(out.with_suffix('.json'), json.dumps(meta, indent=1) + '\n')


if __name__ == '__main__':
    main()
