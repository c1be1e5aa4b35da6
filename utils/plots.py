"""Plots shared by the CLIs, the demo and the benchmarks (matplotlib, drawn off-screen)."""
import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from utils.fileio import atomic_write, write_json_atomic  # noqa: E402

MIN_RESIDUAL = 1e-12  # floor for the log axis
MARKERS = ('o', 's', '^', 'D', 'v', 'P')
BAND_STYLES = ('-', '--', ':', '-.')
LABEL_OFFSETS = ((0, 14), (0, -22), (0, 30), (0, -38))   # points: label positions taken in turn along the x axis


def write_trace(trace: Dict[int, List[dict]], patch_nums: Sequence[int], json_path: Path, png_path: Path):
    """A fixed-point trace ({scale: [{'it', 'residual', 'cosine'}, ...]}) as JSON and as the paper's Fig. 3: relative
    residual and cosine similarity against the iteration, one line per scale."""
    data = {f'scale_{si}_{pn}x{pn}': trace.get(si, []) for si, pn in enumerate(patch_nums)}
    write_json_atomic(json_path, data)
    fig, (ax_r, ax_c) = plt.subplots(1, 2, figsize=(10, 4))
    for si, pn in enumerate(patch_nums):
        steps = trace.get(si, [])
        if steps:
            its = [s['it'] + 1 for s in steps]
            ax_r.semilogy(its, [max(s['residual'], MIN_RESIDUAL) for s in steps], marker='.', label=f'{pn}x{pn}')
            ax_c.plot(its, [s['cosine'] for s in steps], marker='.', label=f'{pn}x{pn}')
    ax_r.set(xlabel='iteration', ylabel='||z_{t+1} - z_t|| / ||z_t||', title='relative residual')
    ax_c.set(xlabel='iteration', ylabel='cos(z_{t+1}, z_t)', title='cosine similarity')
    ax_r.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_write(png_path) as f:
        fig.savefig(f, format='png', dpi=120)
    plt.close(fig)


def plot_training_curves(tokenizer_log: Path, model_log: Path, png: Path):
    """Curves from the trainers' JSON-lines logs: tokenizer losses and code usage, the transformer's loss."""

    def series(path: Path, key: str):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        pts = [(r['step'], r[key]) for r in rows if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for key, label in (('loss/rec_l2', 'reconstruction (L2)'), ('loss/vq', 'VQ')):
        axes[0].plot(*series(tokenizer_log, key), label=label)
    axes[0].set(title='tokenizer losses', xlabel='iteration', yscale='log')
    axes[0].legend()
    axes[1].plot(*series(tokenizer_log, 'codes/used_pct'))
    axes[1].set(title='tokenizer codes in use (%)', xlabel='iteration', ylim=(0, 105))
    for key, label in (('train/L_mean', 'train, all scales'), ('train/L_tail', 'train, last scale'),
                       ('val/L_mean', 'val, all scales')):
        xs, ys = series(model_log, key)
        if xs:
            axes[2].plot(xs, ys, marker='o' if key.startswith('val') else None, label=label)
    axes[2].set(title='cross-entropy', xlabel='iteration')
    axes[2].legend()
    fig.tight_layout()
    with atomic_write(png) as f:
        fig.savefig(f, format='png', dpi=110)
    plt.close(fig)


def plot_quality_vs_speed(points: Sequence[dict], png: Path, title: str,
                          bands: Sequence[Tuple[str, float, float]] = ()):
    """FID against images/s with bootstrap error bars, one labelled point per dict ({'label', 'group', 'images_per_s',
    'fid', 'fid_se'}), one colour per group; `bands` (label, FID, standard error) are horizontal references such as
    real images."""
    fig, ax = plt.subplots(figsize=(11, 5.5))
    for i, group in enumerate(dict.fromkeys(p['group'] for p in points)):
        members = [p for p in points if p['group'] == group]
        ax.errorbar([p['images_per_s'] for p in members], [p['fid'] for p in members],
                    yerr=[p.get('fid_se') or 0 for p in members], fmt=MARKERS[i % len(MARKERS)], capsize=3,
                    label=group)
    # Labels staggered above and below their points in order of speed, with a leader line, so that neighbours
    # with similar FIDs do not print over each other.
    for i, p in enumerate(sorted(points, key=lambda p: p['images_per_s'])):
        ax.annotate(p['label'], (p['images_per_s'], p['fid']), textcoords='offset points',
                    xytext=LABEL_OFFSETS[i % len(LABEL_OFFSETS)], fontsize=7, ha='center',
                    arrowprops={'arrowstyle': '-', 'color': 'grey', 'lw': 0.5})
    for (label, fid, se), style in zip(bands, BAND_STYLES):
        ax.axhspan(fid - se, fid + se, color='grey', alpha=0.25)
        ax.axhline(fid, color='grey', lw=1, ls=style, label=label)
    ax.set(xlabel='images/s (sampling, CPU)', ylabel='FID (± bootstrap standard error)', title=title)
    ax.margins(y=0.12)   # room for the outermost labels
    ax.legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.01, 1))   # outside: the labels fill the axes
    fig.tight_layout()
    with atomic_write(png) as f:
        fig.savefig(f, format='png', dpi=120)
    plt.close(fig)
