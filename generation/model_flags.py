"""Which model the generation CLIs load and how it runs: the checkpoint flags (with architecture assertions),
the device and the autocast precision; shared by sampling.py, gen_img.py and the benchmarks."""
import argparse
import contextlib
from typing import Tuple

import torch

from models import VAR, VAR_PRESETS, VQVAE
from utils.cli import NON_NEGATIVE, POSITIVE, UserError
from utils.hub import resolve_checkpoint
from utils.model_checkpoints import load_models

DTYPES = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}


def add_model_args(parser: argparse.ArgumentParser):
    g = parser.add_argument_group('model')
    g.add_argument('--ckpt', '--ckpt_path', dest='ckpt', default='ckpts/viar.pth',
                   help='VAR/VIAR checkpoint: ours (config inside), an official training checkpoint, or a released '
                        'state dict (.pth/.safetensors); hf:OWNER/REPO/FILE takes it from the Hugging Face Hub '
                        '(cached: later runs need no network)')
    g.add_argument('--vae_ckpt', default='ckpts/vae_ch160v4096z32.pth',
                   help='tokenizer checkpoint (a path or hf:OWNER/REPO/FILE)')
    g.add_argument('--preset', choices=sorted(VAR_PRESETS), default=None,
                   help='architecture of a bare released state dict (default: read off its keys and shapes)')
    g.add_argument('--use_implicit', action=argparse.BooleanOptionalAction, default=None,
                   help='assert the checkpoint is VIAR (or, with --no-use_implicit, VAR); default: whatever it is')
    g.add_argument('--depth', type=POSITIVE, default=None, help='assert the checkpoint has this (nominal) depth')
    g.add_argument('--pre_depth', type=NON_NEGATIVE, default=None,
                   help='assert the VIAR checkpoint has this many pre-blocks')
    g.add_argument('--post_depth', type=NON_NEGATIVE, default=None, help='assert this many post-blocks')
    g.add_argument('--device', default='auto', choices=['auto', 'cuda', 'cpu'])
    g.add_argument('--precision', '--dtype', dest='precision', default='auto', choices=['auto', *DTYPES],
                   help='autocast precision of the transformer on the device in use, the CPU included (auto: fp16 '
                        'on CUDA as the official sampler, fp32 on the CPU); --dtype is the older spelling')


def resolve_device(name: str) -> torch.device:
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name == 'cuda' and not torch.cuda.is_available():
        raise UserError('--device cuda was asked for but no CUDA GPU is visible')
    return torch.device(name)


def autocast_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of --precision NAME on `device`."""
    if name == 'auto':
        return torch.float16 if device.type == 'cuda' else torch.float32
    return DTYPES[name]


@contextlib.contextmanager
def sampling_mode(device: torch.device, dtype: torch.dtype):
    """no_grad and autocast around sampling. Not inference_mode: autocast keeps its cast copies of the weights only
    outside it, so under inference_mode every bf16/fp16 call casts every weight again (~10% of a CPU sample)."""
    with torch.no_grad(), autocast(device, dtype):
        yield


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast context for sampling (none for fp32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def load_from_args(args, device: torch.device) -> Tuple[VQVAE, VAR]:
    """Load tokenizer and transformer, checking the optional architecture assertions."""
    ckpt, vae_ckpt = resolve_checkpoint(args.ckpt, '--ckpt'), resolve_checkpoint(args.vae_ckpt, '--vae_ckpt')
    vae, var = load_models(ckpt, vae_ckpt, preset=args.preset, device=device, expect_implicit=args.use_implicit)
    cfg = var.config
    for flag in ('depth', 'pre_depth', 'post_depth'):
        want = getattr(args, flag)
        if want is not None and want != getattr(cfg, flag) and (flag == 'depth' or cfg.use_implicit):
            raise UserError(f'{args.ckpt} has {flag}={getattr(cfg, flag)}, but --{flag} {want} was given')
    return vae, var
