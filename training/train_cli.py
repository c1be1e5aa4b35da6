"""Train VAR / VIAR on an ImageFolder dataset with a frozen multi-scale tokenizer, following the official recipe.

One process, or many under torchrun (NCCL on CUDA, gloo on CPU); `scripts/train.sh` is the paper's 8-GPU launch.
Checkpoints (`ar-ckpt-last.pth`, `ar-ckpt-best.pth`), `stdout.txt`, `log.txt` and TensorBoard go to --out_dir, and
`--resume auto` (the default) continues from the last checkpoint. `--init_from` starts from trained weights;
`--subnet_depth` trains a VARiant supernet (training/supernet.py), e.g. fine-tuning a released VAR.

The trainer is training/ar_trainer.py; the loop, checkpoints and resume are the rest of training/.
"""
import argparse
import logging
import sys
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from models import VAR_PRESETS, VARConfig, VQVAEConfig, build_var, num_params
from models.blocks import MLP_ACTIVATIONS
from training import dist
from training.amp import AmpOptimizer
from training.ar_trainer import ARTrainer
from training.checkpoints import CheckpointFiles, resume_training
from training.data import build_datasets, build_loaders
from training.dist import wrap_ddp
from training.flags import add_data_flags, add_optim_flags, add_run_flags, derive_plan, patch_nums_arg
from training.loop import TrainLoop, start_run
from training.optim import Schedule, adamw, param_groups
from training.seeds import STREAM_INIT, STREAM_SJFB, mix_seed, restore_rng_states, seed_process
from training.supernet import add_supernet_flags, supernet_from_args
from training.token_cache import build_token_cache
from utils import official
from utils.checkpoint import load_state_dict_strict
from utils.cli import ITERS, MAX_DEPTH, MAX_WIDTH, PROBABILITY, ArgumentParser, UserError, finite_float, int_range
from utils.log import MetricWriter
from utils.model_checkpoints import load_vae, read_var

log = logging.getLogger('viar')


DEFAULT_DEPTH = 16

# Flag (argparse dest) -> VARConfig field. Unset flags (None) keep the preset's / config's value.
MODEL_FLAGS = {
    'depth': 'depth', 'embed_dim': 'embed_dim', 'num_heads': 'num_heads', 'drop_path_rate': 'drop_path_rate',
    'use_implicit': 'use_implicit', 'pre_depth': 'pre_depth', 'post_depth': 'post_depth',
    'no_grad_iters_range': 'no_grad_iters_range', 'grad_iters_range': 'grad_iters_range', 'eval_iters': 'eval_iters',
    'init_adaln': 'init_adaln', 'init_adaln_gamma': 'init_adaln_gamma', 'init_head': 'init_head',
    'init_std': 'init_std', 'shared_aln': 'shared_aln', 'attn_l2_norm': 'attn_l2_norm',
    'cond_drop_rate': 'cond_drop_rate', 'mlp_act': 'mlp_act',
}
DERIVED_FROM_DEPTH = ('embed_dim', 'num_heads', 'drop_path_rate')
# Flags that fix the transformer's shapes: --init_from takes them from its checkpoint instead.
ARCH_FLAGS = ('depth', 'embed_dim', 'num_heads', 'use_implicit', 'pre_depth', 'post_depth', 'p_depth', 'shared_aln',
              'attn_l2_norm', 'mlp_act')
# What the data and the tokenizer fix, and an --init_from checkpoint must agree with.
DATA_FIELDS = ('num_classes', 'patch_nums', 'vocab_size', 'Cvae')


def get_parser() -> ArgumentParser:
    p = ArgumentParser(description='Train VAR / VIAR with the official recipe (torchrun for several GPUs or nodes). '
                                   'Official flag spellings (--bs, --ep, --tblr, --fp16 1, --use_implicit=True, ...) '
                                   'are accepted.')
    bool_flag = argparse.BooleanOptionalAction
    d = add_data_flags(p)
    d.add_argument('--vae_ckpt', default='ckpts/vae_ch160v4096z32.pth',
                   help='frozen tokenizer: the released .pth or a train_tokenizer.py checkpoint')
    d.add_argument('--patch_nums', '--pn', type=patch_nums_arg,
                   help="the tokenizer's scales, needed only for a bare state dict whose scales are not the released "
                        "10 (official spelling 1_2_3_4_6_8; '256' = the released scales)")
    d.add_argument('--token_cache', metavar='DIR', help='tokenize the training set once into DIR and train on the '
                                                        'cached tokens (centre crops: no random-crop augmentation)')

    m = p.add_argument_group('model', 'flags override --preset; scales and vocabulary come from the tokenizer, the '
                                      'number of classes from the data')
    m.add_argument('--preset', choices=sorted(VAR_PRESETS), help='architecture and init (with --init_from: the '
                                                                 'architecture of a bare state dict)')
    m.add_argument('--init_from', metavar='CKPT',
                   help='start from these weights (fresh optimizer, iteration 0): a train.py checkpoint, an exported '
                        'or released state dict (e.g. var_d30.pth) or an official training checkpoint; fixes the '
                        'architecture. A resumable checkpoint in --out_dir takes precedence')
    m.add_argument('--depth', type=int_range(1, MAX_DEPTH),
                   help=f'width 64 x depth, heads = depth (default {DEFAULT_DEPTH})')
    m.add_argument('--embed_dim', type=int_range(1, MAX_WIDTH), help='width (default 64 x depth)')
    m.add_argument('--num_heads', type=int_range(1, MAX_WIDTH), help='attention heads (default depth)')
    m.add_argument('--drop_path_rate', type=finite_float(0, 1, hi_open=True),
                   help='stochastic depth (default 0.1 x depth / 24)')
    m.add_argument('--use_implicit', action=bool_flag, help='VIAR: pre-blocks, a weight-tied implicit block, '
                                                            'post-blocks')
    m.add_argument('--pre_depth', type=int_range(0, MAX_DEPTH),
                   help='VIAR explicit blocks before the implicit block (default 5)')
    m.add_argument('--post_depth', type=int_range(0, MAX_DEPTH), help='VIAR explicit blocks after it (default 5)')
    m.add_argument('--p_depth', type=int_range(0, MAX_DEPTH),
                   help='official spelling: sets both --pre_depth and --post_depth')
    m.add_argument('--no_grad_iters_range', '--no_grad_iters', type=ITERS, nargs=2, metavar=('MIN', 'MAX'),
                   help='S-JFB: inclusive range from which each step draws its implicit iterations run under no_grad '
                        '(default 0 10; --no_grad_iters is the older spelling)')
    m.add_argument('--grad_iters_range', '--grad_iters', type=ITERS, nargs=2, metavar=('MIN', 'MAX'),
                   help='S-JFB: inclusive range from which each step draws its iterations backpropagated through '
                        '(default 1 12; --grad_iters is the older spelling)')
    m.add_argument('--eval_iters', type=ITERS, help='implicit iterations of the validation forward, and the schedule '
                                                    'sampling uses by default (default 10)')
    m.add_argument('--sjfb_shared_draws', action=bool_flag, default=False,
                   help='draw the same S-JFB counts on every rank, so no rank waits for a deeper draw '
                        '(default: independent per-rank draws, as the official code)')
    m.add_argument('--init_adaln_gamma', '--alng', type=finite_float(), help='AdaLN gamma init (default 1e-5; presets: '
                                                                    'per depth)')
    m.add_argument('--init_adaln', '--aln', type=finite_float(), help='AdaLN scale/shift init (default 0.5)')
    m.add_argument('--init_head', '--hd', type=finite_float(), help='head init scale (default 0.02)')
    m.add_argument('--init_std', '--ini', type=finite_float(), help='weight init std (default -1: sqrt(1 / 3C))')
    m.add_argument('--shared_aln', '--saln', action=bool_flag, help='one AdaLN projection shared by all blocks')
    m.add_argument('--attn_l2_norm', '--anorm', action=bool_flag, help='l2-normalised q/k attention (default on)')
    m.add_argument('--mlp_act', choices=sorted(MLP_ACTIVATIONS),
                   help='activation of the FFNs and the fusion MLP: the official gelu_tanh (default), or gelu (exact '
                        'GELU, at most 5e-4 apart; its CPU kernel is 2.5x faster)')
    m.add_argument('--cond_drop_rate', type=PROBABILITY, help='class-label dropout for guidance (default 0.1)')
    m.add_argument('--compile', action=bool_flag, default=False, help='torch.compile every transformer block')

    o = add_optim_flags(p, batch_size=768, epochs=250, base_lr=1e-4, weight_decay=0.05, betas=(0.9, 0.95),
                        schedule='lin0', lr_end=0.01, grad_clip=2.0)
    o.add_argument('--label_smooth', '--ls', type=finite_float(0, 1, hi_open=True), default=0.0)
    add_supernet_flags(p)
    add_run_flags(p, 'ar')
    official.add_official_train_flags(p)
    return p


def read_init(args) -> Tuple[Optional[VARConfig], Optional[Dict[str, torch.Tensor]]]:
    """(config, weights) of --init_from; (None, None) without it."""
    if not args.init_from:
        return None, None
    fixed = [f'--{k}' for k in ARCH_FLAGS if getattr(args, k) is not None]
    if fixed:
        raise UserError(f'--init_from fixes the architecture; drop {", ".join(fixed)}')
    if not Path(args.init_from).is_file():
        raise UserError(f'--init_from {args.init_from}: file not found')
    sd, config, _ = read_var(args.init_from, preset=args.preset)
    return config, sd


def build_var_config(args, num_classes: int, vae_config: VQVAEConfig, init: Optional[VARConfig] = None) -> VARConfig:
    """The transformer's config: --init_from's (else --preset or the defaults), then explicit flags, then what the
    tokenizer and data fix (scales, vocabulary, latent width, classes)."""
    if init is not None:
        base = init.to_dict()
    elif args.preset:
        base = VAR_PRESETS[args.preset].to_dict()
    else:
        base = VARConfig(depth=args.depth or DEFAULT_DEPTH).to_dict()
    flags = {field: getattr(args, dest) for dest, field in MODEL_FLAGS.items() if getattr(args, dest) is not None}
    if args.p_depth is not None:
        flags.setdefault('pre_depth', args.p_depth)
        flags.setdefault('post_depth', args.p_depth)
    if 'depth' in flags:
        base.update({k: None for k in DERIVED_FROM_DEPTH})  # re-derive width, heads, drop path from the new depth
    base.update(flags)
    base.update(num_classes=num_classes, patch_nums=vae_config.patch_nums, vocab_size=vae_config.vocab_size,
                Cvae=vae_config.z_channels)
    return VARConfig.from_dict(base)


def load_tokenizer(path: str, device: torch.device, patch_nums=None):
    if not Path(path).is_file():
        raise UserError(f'tokenizer checkpoint not found: {path} (--vae_ckpt; the released one is '
                        f'vae_ch160v4096z32.pth, or train one with train_tokenizer.py)')
    try:
        vae = load_vae(path, patch_nums=patch_nums, device=device)
    except ValueError as e:
        if 'patch_nums' not in str(e):
            raise
        raise UserError(f'{path}: {e} (--pn, e.g. --pn 1_2_3_4_6_8)') from None
    if patch_nums is not None and tuple(vae.config.patch_nums) != tuple(patch_nums):
        raise UserError(f'--pn {patch_nums} does not match the scales {vae.config.patch_nums} stored in {path}')
    return vae


def main(args):
    info, out_dir = start_run(args)

    vae = load_tokenizer(args.vae_ckpt, info.device, args.patch_nums)
    image_size = vae.config.image_size
    for note in official.apply_official_train_flags(args, image_size, vae.config.patch_nums):
        log.info(note)
    train_set, val_set = build_datasets(args.data_path, image_size, args.mid_reso, args.hflip, args.skip_bad_images)
    plan = derive_plan(args, info.world_size, len(train_set), info.device.type)
    init_config, init_weights = read_init(args)
    config = build_var_config(args, len(train_set.classes), vae.config, init_config)
    if init_config is not None:
        misfit = [f'{k} {getattr(init_config, k)} (data/tokenizer: {getattr(config, k)})' for k in DATA_FIELDS
                  if getattr(init_config, k) != getattr(config, k)]
        if misfit:
            raise UserError(f'--init_from {args.init_from} does not fit the data and --vae_ckpt: {", ".join(misfit)}')
    supernet = supernet_from_args(args, config.use_implicit, config.depth, len(config.patch_nums),
                                  plan.iters_per_epoch, args.accum)

    torch.manual_seed(mix_seed(args.seed, STREAM_INIT))  # identical initial weights on every rank
    var = build_var(config, info.device)
    if init_weights is not None:
        load_state_dict_strict(var, init_weights, f'--init_from {args.init_from}')
        del init_weights
    seed_process(args.seed, info.rank)
    if args.compile:
        log.info('torch.compile: compiling every transformer block')
        for block in var.trunk_blocks:
            block.compile()
    groups, counts = param_groups(var)
    optimizer = adamw(groups, plan.peak_lr, args.betas, fused=args.afuse)
    # A subnet step leaves layers outside the subnet unused only without a bridge: with one, they still run on the
    # bridge tokens. Unused parameters then keep no gradient (AdamW skips them), as in a single process.
    unused_params = supernet is not None and supernet.spec.bridge == 0
    model = wrap_ddp(var, info, find_unused=unused_params)
    amp = AmpOptimizer(model, optimizer, plan.precision, args.grad_clip, args.accum)
    schedule = Schedule(plan.peak_lr, plan.warmup_iters, plan.max_iters, args.schedule, args.warmup_start,
                        args.lr_end, args.weight_decay, plan.wd_end)
    sjfb_seed = mix_seed(args.seed, STREAM_SJFB, 0 if args.sjfb_shared_draws else info.rank)
    trainer = ARTrainer(model, vae, amp, schedule, args.label_smooth, supernet, sjfb_seed)

    kind = 'VIAR' if config.use_implicit else 'VAR'
    log.info('data: %d training images in %d classes from %s; validation: %s; images %dpx, scales %s',
             len(train_set), len(train_set.classes), args.data_path,
             f'{len(val_set)} images' if val_set else 'none (no val/ folder)', image_size, config.patch_nums)
    log.info('model: %s depth %d, width %d, %d heads, %s parameters (%s decayed, %s not)', kind, config.depth,
             config.embed_dim, config.num_heads, f'{num_params(var):,}', f'{counts["decay"]:,}',
             f'{counts["no_decay"]:,}')
    if config.use_implicit:
        log.info('S-JFB: no_grad_iters drawn from %s, grad_iters from %s (inclusive ranges), %s draws; validation at '
                 '%d iterations', config.no_grad_iters_range, config.grad_iters_range,
                 'shared' if args.sjfb_shared_draws else 'per-rank', config.eval_iters)
    if args.init_from:
        log.info('initial weights: %s', args.init_from)
    if supernet is not None:
        log.info('VARiant supernet: %s%s', supernet.describe(config.depth, len(config.patch_nums), args.epochs),
                 ' | DDP looks for unused parameters (no bridge)' if unused_params and info.distributed else '')
    log.info('plan: %s', plan.describe(args))

    files = CheckpointFiles(out_dir, 'ar', keep_last=args.keep_last)
    start_it, best, rng_states = resume_training(files, args, trainer, plan)
    if start_it and args.init_from:
        log.info('--init_from only starts a run: continuing from the resumed checkpoint instead')

    dataset = train_set
    if args.token_cache:
        dataset = build_token_cache(args.token_cache, vae, train_set, image_size, args.mid_reso, args.hflip,
                                    info.rank, info.world_size, plan.local_batch, plan.workers, dist.barrier)
    sampler, loader, val_loader = build_loaders(dataset, val_set, plan.local_batch, info.rank, info.world_size,
                                                args.seed, plan.workers, pin_memory=info.device.type == 'cuda')
    sub = '' if supernet is None else f'-sub{supernet.spec.depth}N{supernet.spec.bridge}'
    tb_name = (f'tb-{kind}d{config.depth}{sub}__b{args.batch_size}ep{args.epochs}lr{args.base_lr:g}'
               f'wd{args.weight_decay:g}')
    writer = MetricWriter(out_dir, tb_name, info.is_main, resume_step=start_it)
    # Last: everything above may draw random numbers; the loop must continue exactly where the checkpoint stopped.
    if start_it:
        restore_rng_states(rng_states, trainer.rng_generators, args.seed, info.rank, info.world_size, start_it)

    progress = sys.stderr.isatty() if args.progress is None else args.progress
    loop = TrainLoop(args, plan, trainer, sampler, loader, val_loader, writer, files, info.is_main, info.world_size,
                     progress and info.is_main)
    code = loop.run(start_it, best)
    writer.close()
    dist.destroy()
    return code
