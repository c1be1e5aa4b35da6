"""Convergence of the implicit layer per scale (VIAR paper Fig. 3): mean relative residual ||z_{t+1} - z_t|| / ||z_t||
and cosine similarity of consecutive iterates, per scale and iteration, over a batch of class-conditional samples.

    python -m bench.convergence --ckpt local_output/demo/viar/ar-ckpt-last.pth \
        --vae_ckpt local_output/demo/tokenizer/vae-ckpt-last.pth          # -> bench/results/convergence.{md,json,png}
"""
import argparse
import sys
from pathlib import Path

import torch

from bench.efficiency import machine, machine_line
from models.fixed_point import make_solver
from models.sampler import autoregressive_infer_cfg, image_seed
from models.schedules import ConstantSchedule
from utils.fileio import write_text_atomic
from utils.model_checkpoints import load_models
from utils.plots import write_trace

RESULTS = Path(__file__).resolve().parent / 'results'
# The paper's Fig. 3 reading: cosine similarity reaches 0.98 by 5 iterations at the largest scales.
REPORT_AT = (1, 2, 3, 5, 10)


def mean_trace(var, iters: int, num_images: int, cfg: float, solver: str, seed: int):
    """Run `num_images` images (classes cycling) one at a time and average residual/cosine per (scale, iteration)."""
    sums = {}
    for i in range(num_images):
        trace = {}
        autoregressive_infer_cfg(var, 1, torch.tensor([i % var.num_classes]), cfg=cfg,
                                 schedule=ConstantSchedule(iters), image_seeds=[image_seed(seed, i)],
                                 solver=make_solver(solver), trace=trace)
        for si, steps in trace.items():
            for step in steps:
                acc = sums.setdefault((si, step['it']), [0.0, 0.0])
                acc[0] += step['residual'] / num_images
                acc[1] += step['cosine'] / num_images
    return {si: [{'it': it, 'residual': sums[(si, it)][0], 'cosine': sums[(si, it)][1]} for it in range(iters)]
            for si in range(len(var.patch_nums))}


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--ckpt', required=True, help='a VIAR checkpoint')
    p.add_argument('--vae_ckpt', required=True)
    p.add_argument('--iters', type=int, default=12)
    p.add_argument('--num_images', type=int, default=20)
    p.add_argument('--cfg', type=float, default=1.5)
    p.add_argument('--solvers', nargs='+', default=['picard', 'anderson'])
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args()
    vae, var = load_models(args.ckpt, args.vae_ckpt)
    if not var.use_implicit:
        sys.exit(f'{args.ckpt}: an explicit VAR has no fixed-point iterations')
    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = ['# Convergence of the implicit layer (paper Fig. 3 analogue)', '',
             f"Command: `python -m bench.convergence {' '.join(sys.argv[1:])}`  ",
             f'Machine: {machine_line(machine())}', '',
             f'Model: `{args.ckpt}` ({var.config.embed_dim} wide); {args.num_images} images, cfg {args.cfg}, '
             f'{args.iters} iterations at every scale; mean over images of the relative residual '
             f'(and of the cosine similarity) between consecutive iterates.', '']
    for solver in args.solvers:
        with torch.inference_mode():
            trace = mean_trace(var, args.iters, args.num_images, args.cfg, solver, args.seed)
        stem = RESULTS / f'convergence_{solver}'
        write_trace(trace, var.patch_nums, stem.with_suffix('.json'), stem.with_suffix('.png'))
        at = [t for t in REPORT_AT if t <= args.iters]
        lines += [f'## Solver `{solver}` ([plot](convergence_{solver}.png))', '',
                  '| scale | ' + ' | '.join(f'residual @{t}' for t in at) + ' | ' +
                  ' | '.join(f'cosine @{t}' for t in at) + ' |', '|---' * (1 + 2 * len(at)) + '|']
        for si, pn in enumerate(var.patch_nums):
            steps = trace[si]
            lines.append(f'| {pn}x{pn} | ' + ' | '.join(f'{steps[t - 1]["residual"]:.1e}' for t in at) + ' | ' +
                         ' | '.join(f'{steps[t - 1]["cosine"]:.4f}' for t in at) + ' |')
        lines.append('')
    lines += ['Paper (ImageNet, VIAR-d30): at the largest scales the cosine similarity exceeds 0.98 by 5 iterations '
              'and the layer has almost converged after 10 (Fig. 3); constant schedules 2/5/8/10 give cosine '
              '0.914/0.985/0.997/0.999.', '']
    write_text_atomic(RESULTS / 'convergence.md', '\n'.join(lines))
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
