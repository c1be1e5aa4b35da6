"""Train the multi-scale VQVAE tokenizer on an ImageFolder dataset (one process, or torchrun exactly like train.py).

Loss: L2 (optionally L1) reconstruction + the quantizer's commitment (beta) and codebook terms; an LPIPS perceptual
term with --lpips_weights (VGG16 weights you supply) and a PatchGAN hinge term with --gan_weight. Codes whose usage
has decayed are re-initialised from recent encoder residuals (--restart_every), identically on all ranks.
--out_dir receives vae-ckpt-last/best.pth (training state; `load_vae` reads them) and vae-last/best.pth (the bare
state dict: the released format), plus stdout.txt, log.txt and TensorBoard.
"""
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from models import VQVAE_PRESETS, VQVAE, VQVAEConfig, build_vqvae, num_params
from models.discriminator import PatchDiscriminator, hinge_d_loss, hinge_g_loss
from models.lpips import LPIPS, lpips_heads_state, vgg_features_state
from models.quantizer import USAGE_MARGIN, MultiScaleQuantizer
from training import dist
from training.amp import AmpOptimizer
from training.checkpoints import CheckpointFiles, prepare_out_dir, resume_training
from training.data import build_datasets, build_loaders
from training.flags import (add_data_flags, add_optim_flags, add_run_flags, check_flags, configure_backends,
                            derive_plan, patch_nums_arg)
from training.loop import TrainLoop
from training.optim import Schedule, param_groups
from training.seeds import STREAM_INIT, mix_seed, restore_rng_states, seed_process
from training.trainer import StepResult
from utils.checkpoint import load_file, load_state_dict_strict, strip_wrapper_prefixes, unwrap
from utils.cli import (MAX_DEPTH, MAX_VOCAB, MAX_WIDTH, NON_NEGATIVE, NON_NEGATIVE_FLOAT, ArgumentParser, UserError,
                       finite_float, int_range, main_entry, one_line)
from utils.log import MetricWriter, setup_logging
from utils.model_checkpoints import KIND_VQVAE, config_from, model_checkpoint, split_checkpoint

log = logging.getLogger('viar')

# Flag (argparse dest) -> VQVAEConfig field; unset flags keep the preset's value.
ARCH_FLAGS = ('vocab_size', 'z_channels', 'ch', 'ch_mult', 'num_res_blocks', 'patch_nums', 'beta',
              'share_quant_resi', 'quant_resi')
PSNR_RANGE = 2.0  # images live in [-1, 1]
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


def all_phis_used(q: MultiScaleQuantizer) -> bool:
    """Whether every Phi conv serves some scale (DDP must look for unused parameters otherwise)."""
    used = {id(q.phi(si)) for si in range(q.num_scales)}
    return all(id(m) in used for m in q.quant_resi.modules() if any(True for _ in m.parameters(recurse=False)))


def residual_rows(q: MultiScaleQuantizer, f_BChw: torch.Tensor) -> torch.Tensor:
    """Every scale's quantizer input (the pooled residual) as rows (N, Cvae): candidates for restarted codes."""
    f_hats = q.f_to_idxBl_or_fhat(f_BChw, to_fhat=True)
    rows = []
    for si, pn in enumerate(q.v_patch_nums):
        rest = f_BChw if si == 0 else f_BChw - f_hats[si - 1]
        rows.append(MultiScaleQuantizer._scale_residual(rest, (pn, pn), si == q.num_scales - 1))
    return torch.cat(rows)


@dataclass(frozen=True)
class LossWeights:
    rec_l2: float
    rec_l1: float
    lpips: float
    gan_g: float


class TokenizerTrainer:
    """The tokenizer (possibly DDP-wrapped) with its optimizer, and optionally LPIPS and a discriminator."""

    ckpt_kind = KIND_VQVAE
    val_score = 'rec_l2'
    tokens_per_image = None

    def __init__(self, model: torch.nn.Module, amp: AmpOptimizer, schedule: Schedule, weights: LossWeights,
                 lpips: Optional[LPIPS], disc: Optional[torch.nn.Module], disc_amp: Optional[AmpOptimizer],
                 disc_start: int, restart_every: int, dead_threshold: float, micro_batch: int):
        self.model = model
        self.vae: VQVAE = unwrap(model)
        self.amp, self.schedule, self.weights, self.lpips = amp, schedule, weights, lpips
        self.disc, self.disc_amp, self.disc_start = disc, disc_amp, disc_start
        self.disc_raw = None if disc is None else unwrap(disc)
        self.restart_every, self.dead_threshold, self.micro_batch = restart_every, dead_threshold, micro_batch
        self.device = next(self.vae.parameters()).device
        self.rng_generators = {}
        self.restarted = 0  # codes restarted since the last metrics

    def step(self, it: int, batch, stepping: bool, want_metrics: bool) -> StepResult:
        """lr -> forward/backward of the tokenizer -> step; then the discriminator's step; then dead-code restarts."""
        lr, wd = self.schedule.apply(self.amp.optimizer, it)
        img = batch[0].to(self.device, non_blocking=True)
        gan_on = self.disc is not None and it >= self.disc_start
        with self.amp.forward_context(stepping):
            rec, usages, vq_loss = self.model(img, ret_usages=want_metrics)
            terms = {'rec_l2': F.mse_loss(rec.float(), img), 'rec_l1': F.l1_loss(rec.float(), img), 'vq': vq_loss}
            if self.lpips is not None:
                terms['lpips'] = self.lpips(rec, img).mean()
            if gan_on:
                # The discriminator judges with detached weights: this loss trains only the tokenizer.
                frozen = {k: v.detach() for k, v in self.disc_raw.named_parameters()}
                terms['gan_g'] = hinge_g_loss(torch.func.functional_call(self.disc_raw, frozen, (rec,)))
        loss = terms['vq'] + sum(getattr(self.weights, k) * v for k, v in terms.items() if k != 'vq')
        stepped = self.amp.backward_step(loss, stepping)
        if gan_on:
            self.schedule.apply(self.disc_amp.optimizer, it)
            with self.disc_amp.forward_context(stepping):
                logits_real, logits_fake = self.disc(torch.cat((img, rec.detach()))).chunk(2)
            terms['gan_d'] = hinge_d_loss(logits_real, logits_fake)
            self.disc_amp.backward_step(terms['gan_d'], stepping)
            terms.update(logit_real=logits_real.detach().float().mean(), logit_fake=logits_fake.detach().float().mean())
        if stepping and self.restart_every and (it + 1) % self.restart_every == 0:
            self.restarted += self.restart_dead_codes(img)

        loss_value = dist.all_reduce_mean(loss.detach().float()).item()  # a non-finite loss: see TrainLoop's guard
        res = StepResult(loss_value, lr, wd)
        if stepped is not None:
            res.grad_norm, res.scale_log2 = stepped[0].item(), stepped[1]
            res.skipped_steps = self.amp.skipped_steps
        if want_metrics:
            res.metrics, res.summary = self.metrics(terms, usages)
        return res

    def code_usage(self) -> float:
        """% of codes whose hit rate (EMA over all scales) reaches the quantizer's 'used' margin."""
        q = self.vae.quantize
        uniform = self.micro_batch * sum(pn * pn for pn in q.v_patch_nums) / q.vocab_size
        return (q.ema_vocab_hit_SV.sum(0) >= USAGE_MARGIN * uniform).float().mean().item() * 100

    def metrics(self, terms: Dict[str, torch.Tensor], usages: Optional[List[float]]) -> Tuple[Dict[str, float], str]:
        names = sorted(terms)
        values = dist.all_reduce_mean(torch.stack([terms[k].detach().float() for k in names])).tolist()
        m = {f'loss/{k}': v for k, v in zip(names, values)}
        usage = self.code_usage()
        m.update({'codes/used_pct': usage, 'codes/restarted': float(self.restarted)})
        for pn, u in zip(self.vae.quantize.v_patch_nums, usages or []):
            m[f'codes/used_pct_{pn}x{pn}'] = u
        extra = ''.join(f' {k} {m[f"loss/{k}"]:.4f}' for k in ('lpips', 'gan_g', 'gan_d') if k in terms)
        summary = (f'rec {m["loss/rec_l2"]:.4f} l1 {m["loss/rec_l1"]:.4f} vq {m["loss/vq"]:.4f}{extra} | codes '
                   f'{usage:.1f}% used, {self.restarted} restarted')
        self.restarted = 0
        return m, summary

    @torch.no_grad()
    def restart_dead_codes(self, img: torch.Tensor) -> int:
        """Re-initialise codes whose hit rate fell below the threshold from random quantizer inputs of this batch.

        The hit EMA is all-reduced, so every rank finds the same dead codes; rank 0's picks are broadcast, so the
        codebooks stay identical. Their Adam moments are zeroed and their EMA set to a uniform share (a grace period).
        """
        q = self.vae.quantize
        uniform_SV = torch.tensor([self.micro_batch * pn * pn / q.vocab_size for pn in q.v_patch_nums],
                                  device=self.device)
        dead = q.ema_vocab_hit_SV.sum(0) < self.dead_threshold * uniform_SV.sum()
        n = int(dead.sum())
        if n == 0:
            return 0
        rows = residual_rows(q, self.vae.quant_conv(self.vae.encoder(img)).float())
        new = rows[torch.randint(len(rows), (n,), device=rows.device)]
        if dist.is_initialized():
            tdist.broadcast(new, src=0)
        q.embedding.weight[dead] = new.to(q.embedding.weight.dtype)
        q.ema_vocab_hit_SV[:, dead] = uniform_SV[:, None]
        state = self.amp.optimizer.state.get(q.embedding.weight, {})
        for key in ('exp_avg', 'exp_avg_sq'):
            if key in state:
                state[key][dead] = 0
        return n

    @torch.no_grad()
    def evaluate(self, loader) -> Dict[str, float]:
        """Reconstruction L2 / L1 / PSNR and the % of codes used over the validation set, over all ranks."""
        self.vae.eval()
        q = self.vae.quantize
        sums = torch.zeros(4, device=self.device, dtype=torch.float64)
        hits_V = torch.zeros(q.vocab_size, device=self.device)
        for img, _ in loader:
            img = img.to(self.device, non_blocking=True)
            with self.amp.autocast():
                rec = self.vae(img)[0].float()
            mse_B = (rec - img).square().mean(dim=(1, 2, 3))
            psnr_B = 10 * torch.log10(PSNR_RANGE ** 2 / (rec.clamp(-1, 1) - img).square().mean(dim=(1, 2, 3)))
            sums += torch.stack([mse_B.sum(), (rec - img).abs().mean(dim=(1, 2, 3)).sum(), psnr_B.sum(),
                                 mse_B.new_tensor(len(img))]).double()
            hits_V += torch.cat(self.vae.img_to_idxBl(img), dim=1).flatten().bincount(minlength=q.vocab_size)
        if dist.is_initialized():
            tdist.all_reduce(sums)
            tdist.all_reduce(hits_V)
        self.vae.train()
        n = max(sums[3].item(), 1.0)
        return {'rec_l2': sums[0].item() / n, 'rec_l1': sums[1].item() / n, 'psnr': sums[2].item() / n,
                'codes_used_pct': (hits_V > 0).float().mean().item() * 100}

    def replicated(self) -> Sequence[torch.nn.Module]:
        return [self.vae] + ([self.disc_raw] if self.disc_raw is not None else [])

    def checkpoint(self) -> Dict[str, Any]:
        """The tokenizer (loadable by `load_vae`), its optimizer, the discriminator and the quantizer's EMA clock."""
        extra = {'amp': self.amp.state_dict(), 'record_hit': self.vae.quantize.record_hit}
        if self.disc_raw is not None:
            extra.update(disc=self.disc_raw.state_dict(), disc_amp=self.disc_amp.state_dict())
        return model_checkpoint(KIND_VQVAE, self.vae, **extra)

    def load_checkpoint(self, ckpt: Dict[str, Any], path: Path):
        if ckpt.get('kind') != KIND_VQVAE or 'amp' not in ckpt:
            raise UserError(f'{path} is not a train_tokenizer.py checkpoint; pass --resume none to start fresh')
        own = self.vae.config.to_dict()
        diffs = [f'{k}={v} (flags: {own[k]})' for k, v in ckpt['config'].items() if own.get(k) != v]
        if diffs:
            raise UserError(f'{path} was trained with {", ".join(diffs)}; pass the same flags or another --out_dir')
        if (self.disc_raw is None) != ('disc' not in ckpt):
            raise UserError(f'{path} was trained {"with" if "disc" in ckpt else "without"} a discriminator; match '
                            f'--gan_weight or use another --out_dir')
        load_state_dict_strict(self.vae, ckpt['model'], str(path))
        self.amp.load_state_dict(ckpt['amp'])
        self.vae.quantize.record_hit = ckpt['record_hit']
        if self.disc_raw is not None:
            load_state_dict_strict(self.disc_raw, ckpt['disc'], f'{path} (discriminator)')
            self.disc_amp.load_state_dict(ckpt['disc_amp'])


def wrap_ddp(module: torch.nn.Module, info, find_unused: bool = False) -> torch.nn.Module:
    if not info.distributed:
        return module
    return DistributedDataParallel(module, device_ids=[info.local_rank] if info.device.type == 'cuda' else None,
                                   find_unused_parameters=find_unused, forward_sync_buffers=False)


def main(args):
    info = dist.init_distributed(args.device, args.dist_timeout)
    out_dir = prepare_out_dir(args.out_dir, info.is_main)
    setup_logging(info.rank, out_dir / 'stdout.txt')
    log.info('command: %s', ' '.join(sys.argv))
    check_flags(args)
    configure_backends(args.tf32, info.device)

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
    fused = info.device.type == 'cuda'
    optimizer = torch.optim.AdamW(groups, lr=plan.peak_lr, betas=tuple(args.betas), weight_decay=0.0, fused=fused)
    model = wrap_ddp(vae, info, find_unused=not all_phis_used(vae.quantize))
    amp = AmpOptimizer(model, optimizer, plan.precision, args.grad_clip, args.accum)
    disc_model = disc_amp = None
    if disc is not None:
        disc_groups, _ = param_groups(disc)
        for g in disc_groups:
            g['lr_sc'] = args.disc_lr_mult
        disc_opt = torch.optim.AdamW(disc_groups, lr=plan.peak_lr, betas=tuple(args.betas), weight_decay=0.0,
                                     fused=fused)
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
    start_it, best, rng_states = resume_training(files, args.resume, trainer, plan)
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


if __name__ == '__main__':
    main_entry(main, get_parser())
