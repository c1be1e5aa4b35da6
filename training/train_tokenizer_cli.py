"""Train the multi-scale VQVAE tokenizer on an ImageFolder dataset (one process, or torchrun exactly like train.py).

Loss: L2 (optionally L1) reconstruction + the quantizer's commitment (beta) and codebook terms; an LPIPS perceptual
term with --lpips_weights (VGG16 weights you supply) and a PatchGAN hinge term with --gan_weight. Codes whose usage
has decayed are re-initialised from recent encoder residuals (--restart_every), identically on all ranks.
--out_dir receives vae-ckpt-last/best.pth (training state; `load_vae` reads them) and vae-last/best.pth (the bare
state dict: the released format), plus stdout.txt, log.txt and TensorBoard.

The trainer is training/tokenizer_trainer.py; the loop, checkpoints and resume are the rest of training/.
"""
import logging
import sys
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from models import VQVAE_PRESETS, VQVAEConfig, build_vqvae, num_params
from models.discriminator import PatchDiscriminator
from models.lpips import LPIPS, lpips_heads_state, vgg_features_state
from training import dist
from training.amp import AmpOptimizer
from training.checkpoints import CheckpointFiles, resume_training
from training.data import build_datasets, build_loaders
from training.dist import wrap_ddp
from training.flags import add_data_flags, add_optim_flags, add_run_flags, derive_plan, patch_nums_arg
from training.loop import TrainLoop, start_run
from training.optim import Schedule, adamw, param_groups
from training.seeds import STREAM_INIT, mix_seed, restore_rng_states, seed_process
from training.tokenizer_trainer import LossWeights, TokenizerTrainer, all_phis_used
from utils.checkpoint import load_file, load_state_dict_strict, strip_wrapper_prefixes
from utils.cli import (MAX_DEPTH, MAX_VOCAB, MAX_WIDTH, NON_NEGATIVE, NON_NEGATIVE_FLOAT, ArgumentParser, UserError,
                       finite_float, int_range, one_line)
from utils.log import MetricWriter
from utils.model_checkpoints import KIND_VQVAE, config_from, split_checkpoint

log = logging.getLogger('viar')

# Flag (argparse dest) -> VQVAEConfig field; unset flags keep the preset's value.
ARCH_FLAGS = ('vocab_size', 'z_channels', 'ch', 'ch_mult', 'num_res_blocks', 'patch_nums', 'beta',
              'share_quant_resi', 'quant_resi')
MAX_DISC_LAYERS = 8


def get_parser() -> ArgumentParser:
    p = ArgumentParser(description='Train the multi-scale VQVAE tokenizer (torchrun for several GPUs or nodes).')
    add_data_flags(p)
    m = p.add_argument_group('tokenizer', 'flags override --preset')
    m.add_argument('--preset', choices=sorted(VQVAE_PRESETS), default='vae-ch160v4096z32')
    m.add_argument('--init_from', metavar='CKPT', help='start from these tokenizer weights (e.g. the released '
                                                       'vae_ch160v4096z32.pth); fixes the architecture')
    m.add_argument('--vocab_size', type=int_range(2, MAX_VOCAB), help='codebook size')
    m.add_argument('--z_channels', type=int_range(1, MAX_WIDTH), help='latent channels (Cvae)')
    m.add_argument('--ch', type=int_range(1, MAX_WIDTH), help='base width of encoder and decoder')
    m.add_argument('--ch_mult', type=int_range(1, MAX_WIDTH), nargs='+',
                   help='width multiplier per level (levels - 1 = log2 downsample)')
    m.add_argument('--num_res_blocks', type=int_range(1, MAX_DEPTH))
    m.add_argument('--patch_nums', '--pn', type=patch_nums_arg,
                   help="token-map sides, coarse to fine (1_2_3_4_6_8; '256' = the released scales); with "
                        '--init_from, the scales of a bare state dict')
    m.add_argument('--beta', type=NON_NEGATIVE_FLOAT, help='commitment weight (default 0.25)')
    m.add_argument('--share_quant_resi', type=int_range(0, MAX_DEPTH),
                   help='number of Phi convs shared over the scales (default 4)')
    m.add_argument('--quant_resi', type=finite_float(-1, 1), help='Phi residual ratio (default 0.5)')
    m.add_argument('--vocab_init', type=finite_float(), default=-1.0,
                   help='codebook init: <0 uniform(+-|v|/V), >0 trunc-normal std v, 0 PyTorch default')

    lo = p.add_argument_group('losses and codes')
    lo.add_argument('--l2_weight', type=NON_NEGATIVE_FLOAT, default=1.0, help='L2 reconstruction weight')
    lo.add_argument('--l1_weight', type=NON_NEGATIVE_FLOAT, default=0.0, help='L1 reconstruction weight')
    lo.add_argument('--lpips_weights', metavar='PATH', help="perceptual term: torchvision's ImageNet VGG16 weights "
                                                            '(vgg16-397923af.pth); off when not given')
    lo.add_argument('--lpips_heads', metavar='PATH', help="LPIPS v0.1 linear heads (the lpips package's vgg.pth); "
                                                          'without them all channels weigh the same')
    lo.add_argument('--lpips_weight', type=NON_NEGATIVE_FLOAT, default=1.0, help='weight of the perceptual term')
    lo.add_argument('--gan_weight', type=NON_NEGATIVE_FLOAT, default=0.0,
                    help='weight of the PatchGAN hinge term (0: no GAN)')
    lo.add_argument('--disc_start', type=NON_NEGATIVE, default=0, help='iteration from which the GAN terms are on')
    lo.add_argument('--disc_width', type=int_range(1, MAX_WIDTH), default=64, help='discriminator base width')
    lo.add_argument('--disc_layers', type=int_range(1, MAX_DISC_LAYERS), default=3,
                    help='stride-2 layers of the discriminator')
    lo.add_argument('--disc_lr_mult', type=NON_NEGATIVE_FLOAT, default=1.0,
                    help="discriminator lr = this x the tokenizer's")
    lo.add_argument('--restart_every', type=NON_NEGATIVE, default=200,
                    help='check for dead codes every N iterations (0: off)')
    lo.add_argument('--dead_threshold', type=NON_NEGATIVE_FLOAT, default=0.03,
                    help='a code is dead when its hit rate (EMA, all scales) is below this fraction of a uniform share')

    add_optim_flags(p, batch_size=256, epochs=100, base_lr=1e-4, weight_decay=0.0, betas=(0.5, 0.9),
                    schedule='cos', lr_end=0.01, grad_clip=2.0)
    add_run_flags(p, 'vae')
    return p


def tokenizer_config(args) -> Tuple[VQVAEConfig, Optional[Dict[str, torch.Tensor]]]:
    """(config, initial weights or None): from --init_from, or --preset with explicit flags on top."""
    given = {k: getattr(args, k) for k in ARCH_FLAGS if getattr(args, k) is not None}
    if args.init_from:
        fixed = [k for k in given if k != 'patch_nums']
        if fixed:
            raise UserError(f'--init_from fixes the architecture; drop {", ".join("--" + k for k in fixed)}')
        if not Path(args.init_from).is_file():
            raise UserError(f'--init_from {args.init_from}: file not found')
        weights, stored, _ = split_checkpoint(load_file(args.init_from), KIND_VQVAE, Path(args.init_from))
        if stored is not None:
            config = config_from(VQVAEConfig, stored, args.init_from)
        else:
            try:
                config = VQVAEConfig.from_state_dict(strip_wrapper_prefixes(weights), patch_nums=args.patch_nums)
            except (ValueError, KeyError) as e:
                raise UserError(f'--init_from {args.init_from}: {one_line(e)} (--pn)') from None
        if args.patch_nums is not None and tuple(args.patch_nums) != tuple(config.patch_nums):
            raise UserError(f'--pn {args.patch_nums} does not match the scales {config.patch_nums} of --init_from')
        return config, weights
    base = VQVAE_PRESETS[args.preset].to_dict()
    base.update(given)
    return VQVAEConfig.from_dict(base), None


def build_lpips(args, device: torch.device) -> LPIPS:
    """The perceptual network from user-supplied weight files, with a clear error when they are missing."""
    for flag, path in (('--lpips_weights', args.lpips_weights), ('--lpips_heads', args.lpips_heads)):
        if path is not None and not Path(path).is_file():
            raise UserError(f"{flag} {path} not found: the perceptual term needs torchvision's ImageNet VGG16 weights "
                            f'(vgg16-397923af.pth from download.pytorch.org/models) and optionally the LPIPS heads; '
                            f'leave --lpips_weights out to train without it')
    model = LPIPS()
    load_state_dict_strict(model.features, vgg_features_state(load_file(args.lpips_weights)),
                           f'{args.lpips_weights} (VGG16 features)')
    if args.lpips_heads:
        load_state_dict_strict(model.lins, lpips_heads_state(load_file(args.lpips_heads)),
                               f'{args.lpips_heads} (LPIPS heads)')
    return model.to(device)


def main(args):
    info, out_dir = start_run(args)

    config, init_weights = tokenizer_config(args)
    lpips = build_lpips(args, info.device) if args.lpips_weights else None
    train_set, val_set = build_datasets(args.data_path, config.image_size, args.mid_reso, args.hflip,
                                        args.skip_bad_images)
    plan = derive_plan(args, info.world_size, len(train_set), info.device.type)

    torch.manual_seed(mix_seed(args.seed, STREAM_INIT))  # identical initial weights on every rank
    vae = build_vqvae(config, info.device)
    if init_weights is not None:
        load_state_dict_strict(vae, init_weights, args.init_from)
    else:
        vae.quantize.init_vocab(args.vocab_init)
    disc = None
    if args.gan_weight > 0:
        disc = PatchDiscriminator(width=args.disc_width, num_down=args.disc_layers).to(info.device)
    seed_process(args.seed, info.rank)

    groups, _ = param_groups(vae)
    optimizer = adamw(groups, plan.peak_lr, args.betas)
    model = wrap_ddp(vae, info, find_unused=not all_phis_used(vae.quantize))
    amp = AmpOptimizer(model, optimizer, plan.precision, args.grad_clip, args.accum)
    disc_model = disc_amp = None
    if disc is not None:
        disc_groups, _ = param_groups(disc)
        for g in disc_groups:
            g['lr_sc'] = args.disc_lr_mult
        disc_opt = adamw(disc_groups, plan.peak_lr, args.betas)
        disc_model = wrap_ddp(disc, info)
        disc_amp = AmpOptimizer(disc_model, disc_opt, plan.precision, args.grad_clip, args.accum)
    schedule = Schedule(plan.peak_lr, plan.warmup_iters, plan.max_iters, args.schedule, args.warmup_start,
                        args.lr_end, args.weight_decay, plan.wd_end)
    weights = LossWeights(args.l2_weight, args.l1_weight, args.lpips_weight, args.gan_weight)
    trainer = TokenizerTrainer(model, amp, schedule, weights, lpips, disc_model, disc_amp, args.disc_start,
                               args.restart_every, args.dead_threshold, plan.micro_batch)

    log.info('data: %d training images from %s; validation: %s; images %dpx', len(train_set), args.data_path,
             f'{len(val_set)} images' if val_set else 'none (no val/ folder)', config.image_size)
    log.info('tokenizer: %s parameters, vocabulary %d x %d, scales %s%s', f'{num_params(vae):,}', config.vocab_size,
             config.z_channels, config.patch_nums, f' (from {args.init_from})' if args.init_from else '')
    log.info('losses: L2 x %g, L1 x %g, VQ (beta %g), LPIPS %s, GAN %s; dead-code restarts %s', args.l2_weight,
             args.l1_weight, config.beta, f'x {args.lpips_weight:g}' if lpips else 'off',
             f'x {args.gan_weight:g} from iteration {args.disc_start}' if disc else 'off',
             f'every {args.restart_every} it below {args.dead_threshold:g} x uniform' if args.restart_every else 'off')
    log.info('plan: %s', plan.describe(args))

    files = CheckpointFiles(out_dir, 'vae', weights_prefix='vae', keep_last=args.keep_last)
    start_it, best, rng_states = resume_training(files, args, trainer, plan)
    sampler, loader, val_loader = build_loaders(train_set, val_set, plan.local_batch, info.rank, info.world_size,
                                                args.seed, plan.workers, pin_memory=info.device.type == 'cuda')
    tb_name = f'tb-VQVAE-v{config.vocab_size}z{config.z_channels}ch{config.ch}__b{args.batch_size}ep{args.epochs}'
    writer = MetricWriter(out_dir, tb_name, info.is_main, resume_step=start_it)
    if start_it:  # last: everything above may draw random numbers
        restore_rng_states(rng_states, trainer.rng_generators, args.seed, info.rank, info.world_size, start_it)

    progress = sys.stderr.isatty() if args.progress is None else args.progress
    code = TrainLoop(args, plan, trainer, sampler, loader, val_loader, writer, files, info.is_main, info.world_size,
                     progress and info.is_main).run(start_it, best)
    writer.close()
    dist.destroy()
    return code
