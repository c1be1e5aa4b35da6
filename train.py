"""Train VAR / VIAR on an ImageFolder dataset with a frozen multi-scale tokenizer, following the official recipe.

One process, or many under torchrun (NCCL on CUDA, gloo on CPU); `scripts/train.sh` is the paper's 8-GPU launch.
Checkpoints (`ar-ckpt-last.pth`, `ar-ckpt-best.pth`), `stdout.txt`, `log.txt` and TensorBoard go to --out_dir, and
`--resume auto` (the default) continues from the last checkpoint. `--init_from` starts from trained weights;
`--subnet_depth` trains a VARiant supernet (utils/supernet.py), e.g. fine-tuning a released VAR.
"""
import argparse
import logging
import random
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from models import VAR_PRESETS, VARConfig, VQVAEConfig, build_var, num_params
from models.subnet import SubnetSpec
from utils import dist, official
from utils.amp import AmpOptimizer
from utils.checkpoint import load_state_dict_strict, unwrap
from utils.cli import (ITERS, MAX_DEPTH, MAX_WIDTH, PROBABILITY, ArgumentParser, UserError, finite_float, int_range,
                       main_entry)
from utils.data import build_datasets, build_loaders, build_token_cache
from utils.loading import KIND_VAR, load_vae, model_checkpoint, read_var
from utils.log import MetricWriter, setup_logging
from utils.lr_sched import Schedule, param_groups
from utils.supernet import Supernet, add_supernet_flags, supernet_from_args
from utils.train_flags import (add_data_flags, add_optim_flags, add_run_flags, check_flags, configure_backends,
                               derive_plan, patch_nums_arg)
from utils.training import (STREAM_INIT, STREAM_SJFB, CheckpointFiles, StepResult, TrainLoop, mix_seed,
                            prepare_out_dir, restore_rng_states, resume_training, seed_process)

log = logging.getLogger('viar')

DEFAULT_DEPTH = 16

# Flag (argparse dest) -> VARConfig field. Unset flags (None) keep the preset's / config's value.
MODEL_FLAGS = {
    'depth': 'depth', 'embed_dim': 'embed_dim', 'num_heads': 'num_heads', 'drop_path_rate': 'drop_path_rate',
    'use_implicit': 'use_implicit', 'pre_depth': 'pre_depth', 'post_depth': 'post_depth',
    'no_grad_iters_range': 'no_grad_iters_range', 'grad_iters_range': 'grad_iters_range', 'eval_iters': 'eval_iters',
    'init_adaln': 'init_adaln', 'init_adaln_gamma': 'init_adaln_gamma', 'init_head': 'init_head',
    'init_std': 'init_std', 'shared_aln': 'shared_aln', 'attn_l2_norm': 'attn_l2_norm',
    'cond_drop_rate': 'cond_drop_rate',
}
DERIVED_FROM_DEPTH = ('embed_dim', 'num_heads', 'drop_path_rate')
# Flags that fix the transformer's shapes: --init_from takes them from its checkpoint instead.
ARCH_FLAGS = ('depth', 'embed_dim', 'num_heads', 'use_implicit', 'pre_depth', 'post_depth', 'p_depth', 'shared_aln',
              'attn_l2_norm')
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


# ---- the trainer ----------------------------------------------------------------------------------------------------
def token_losses(logits_BLV: torch.Tensor, gt_BL: torch.Tensor, label_smooth: float = 0.0) -> torch.Tensor:
    """Cross-entropy of every token (B, L); the training loss is its plain mean (official uniform 1/L weights)."""
    B, L, V = logits_BLV.shape
    return F.cross_entropy(logits_BLV.reshape(-1, V), gt_BL.reshape(-1), label_smoothing=label_smooth,
                           reduction='none').view(B, L)


class ARTrainer:
    """A VAR/VIAR (possibly DDP-wrapped), its frozen tokenizer and the optimizer; `step` trains one micro-batch.
    With a `supernet`, each optimizer step trains the full model or the subnet (VARiant)."""

    ckpt_kind = KIND_VAR
    val_score = 'L_tail'  # the official trainer keeps the checkpoint with the best last-scale validation loss

    def __init__(self, model: torch.nn.Module, vae, amp: AmpOptimizer, schedule: Schedule, label_smooth: float,
                 supernet: Optional[Supernet] = None, sjfb_seed: int = 0):
        self.model, self.var, self.vae = model, unwrap(model), vae
        self.amp, self.schedule, self.label_smooth = amp, schedule, label_smooth
        self.device = next(self.var.parameters()).device
        self.scale_sizes = [pn * pn for pn in self.var.patch_nums]
        self.tokens_per_image = self.var.L
        # The S-JFB draws (VIAR): the trainer's own generator, checkpointed with the other RNG streams.
        self.sjfb_rng = random.Random(sjfb_seed)
        self.rng_generators = {'sjfb': self.sjfb_rng}
        self.sjfb_draws: List[Tuple[int, int]] = []  # (no_grad_iters, grad_iters) since the last metrics
        self.supernet = supernet
        self.subnet_draws: List[Tuple[int, bool]] = []  # (optimizer step, subnet?) since the last metrics
        self.subnet_p = 0.0
        self.draws_checked = False
        if supernet is not None:
            self.val_score = 'L_tail_joint'  # VARiant aims at both: mean of the full model's and the subnet's

    def pyramid(self, batch) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """(labels, per-scale token maps) of a batch of images (tokenized here) or of cached tokens."""
        x, label_B = batch
        label_B = label_B.to(self.device, non_blocking=True)
        x = x.to(self.device, non_blocking=True)
        if x.is_floating_point():
            with torch.no_grad():  # fp32 outside autocast, as the official trainer
                return label_B, self.vae.img_to_idxBl(x)
        return label_B, list(x.split(self.scale_sizes, dim=1))

    def draw_sjfb_iters(self) -> Optional[Tuple[int, int]]:
        """(no_grad_iters, grad_iters) of one training forward, drawn from the configured ranges (None for VAR)."""
        config = self.var.config
        if not config.use_implicit:
            return None
        return self.sjfb_rng.randint(*config.no_grad_iters_range), self.sjfb_rng.randint(*config.grad_iters_range)

    def step(self, it: int, batch, stepping: bool, want_metrics: bool) -> StepResult:
        """lr -> forward/backward (AMP, accumulation) -> clip -> optimizer step (when `stepping`)."""
        lr, wd = self.schedule.apply(self.amp.optimizer, it)
        label_B, gt_idx_Bl = self.pyramid(batch)
        x_BLCv = self.vae.quantize.idxBl_to_var_input(gt_idx_Bl)
        gt_BL = torch.cat(gt_idx_Bl, dim=1)
        subnet = self.pick_subnet(it, stepping)
        sjfb_iters = self.draw_sjfb_iters()
        with self.amp.forward_context(stepping):
            logits_BLV = self.model(label_B, x_BLCv, sjfb_iters=sjfb_iters, subnet=subnet)
        loss_BL = token_losses(logits_BLV, gt_BL, self.label_smooth)
        stepped = self.amp.backward_step(loss_BL.mean(), stepping)
        loss = dist.all_reduce_mean(loss_BL.detach().mean()).item()  # a non-finite loss: see TrainLoop's guard
        if sjfb_iters is not None:
            self.sjfb_draws.append(sjfb_iters)
        res = StepResult(loss, lr, wd)
        if stepped is not None:
            res.grad_norm, res.scale_log2 = stepped[0].item(), stepped[1]
            res.skipped_steps = self.amp.skipped_steps
        if want_metrics:
            res.metrics = self.metrics(loss_BL.detach(), logits_BLV.detach(), gt_BL)
            m = res.metrics
            res.summary = f'loss {m["train/L_mean"]:.4f} tail {m["train/L_tail"]:.4f} acc {m["train/acc_mean"]:.2f}%'
            if self.sjfb_draws:
                no_grad_iters, grad_iters = (sum(d[i] for d in self.sjfb_draws) / len(self.sjfb_draws)
                                             for i in range(2))
                m.update({'sjfb/no_grad_iters': no_grad_iters, 'sjfb/grad_iters': grad_iters})
                res.summary += f' | sjfb {no_grad_iters:.1f}+{grad_iters:.1f}'
                self.sjfb_draws.clear()
            if self.subnet_draws:
                res.summary += self.subnet_metrics(m)
        return res

    def pick_subnet(self, it: int, stepping: bool) -> Optional[SubnetSpec]:
        """VARiant: the subnet to train at micro-batch `it`, or None for the full model; the same on every rank and
        micro-batch of an optimizer step."""
        if self.supernet is None:
            return None
        p, use_subnet = self.supernet.draw(it)
        if stepping:
            self.subnet_draws.append((it // self.amp.accum, use_subnet))
            self.subnet_p = p
        return self.supernet.spec if use_subnet else None

    def subnet_metrics(self, metrics: Dict[str, float]) -> str:
        """Add the subnet probability and the fraction of subnet steps since the last metrics (returns the log line's
        part), after checking that every rank drew the same: a mismatch would train different architectures."""
        if not dist.same_on_all_ranks(self.subnet_draws):
            raise RuntimeError(f'ranks drew different subnet/full choices in optimizer steps '
                               f'{self.subnet_draws[0][0]}..{self.subnet_draws[-1][0]}')
        if not self.draws_checked:
            log.info('VARiant: subnet draws agree on all %d rank(s) (checked at every log step)',
                     dist.get_world_size())
            self.draws_checked = True
        used = sum(s for _, s in self.subnet_draws)
        metrics.update({'subnet/probability': self.subnet_p, 'subnet/fraction': used / len(self.subnet_draws)})
        summary = f' | subnet p {self.subnet_p:.2f}, {used}/{len(self.subnet_draws)} step(s)'
        self.subnet_draws.clear()
        return summary

    @torch.no_grad()
    def metrics(self, loss_BL: torch.Tensor, logits_BLV: torch.Tensor, gt_BL: torch.Tensor) -> Dict[str, float]:
        """Loss and accuracy (%) overall, on the last scale ('tail') and per scale, averaged over ranks."""
        ce_BL = loss_BL if self.label_smooth == 0 else token_losses(logits_BLV, gt_BL)
        acc_BL = (logits_BLV.argmax(dim=-1) == gt_BL).float().mul_(100)
        last = self.scale_sizes[-1]
        names = ['train/L_mean', 'train/L_tail', 'train/acc_mean', 'train/acc_tail']
        values = [ce_BL.mean(), ce_BL[:, -last:].mean(), acc_BL.mean(), acc_BL[:, -last:].mean()]
        for pn, (bg, ed) in zip(self.var.patch_nums, self.var.begin_ends):
            names += [f'scale_L/{pn}x{pn}', f'scale_acc/{pn}x{pn}']
            values += [ce_BL[:, bg:ed].mean(), acc_BL[:, bg:ed].mean()]
        return dict(zip(names, dist.all_reduce_mean(torch.stack(values)).tolist()))

    @torch.no_grad()
    def evaluate(self, loader) -> Dict[str, float]:
        """Validation loss and accuracy (eval mode: no label dropout, fixed implicit iterations), over all ranks; for
        a supernet also the subnet's ('sub_' keys) and the mean of both last-scale losses."""
        self.var.eval()
        variants = {'': None}
        if self.supernet is not None:
            variants['sub_'] = self.supernet.spec
        sums = torch.zeros(len(variants), 5, device=self.device, dtype=torch.float64)
        last = self.scale_sizes[-1]
        for batch in loader:
            label_B, gt_idx_Bl = self.pyramid(batch)
            x_BLCv = self.vae.quantize.idxBl_to_var_input(gt_idx_Bl)
            gt_BL = torch.cat(gt_idx_Bl, dim=1)
            for row, subnet in enumerate(variants.values()):
                with self.amp.autocast():
                    logits_BLV = self.var(label_B, x_BLCv, subnet=subnet)
                ce_BL = token_losses(logits_BLV, gt_BL)
                acc_BL = (logits_BLV.argmax(dim=-1) == gt_BL).float().mul_(100)
                sums[row] += torch.stack([ce_BL.mean(1).sum(), ce_BL[:, -last:].mean(1).sum(), acc_BL.mean(1).sum(),
                                          acc_BL[:, -last:].mean(1).sum(), ce_BL.new_tensor(len(gt_BL))]).double()
        if dist.is_initialized():
            torch.distributed.all_reduce(sums)
        self.var.train()
        out = {}
        for row, prefix in enumerate(variants):
            n = max(sums[row, 4].item(), 1.0)
            for col, name in enumerate(('L_mean', 'L_tail', 'acc_mean', 'acc_tail')):
                out[prefix + name] = sums[row, col].item() / n
        if self.supernet is not None:
            out['L_tail_joint'] = (out['L_tail'] + out['sub_L_tail']) / 2
        return out

    def replicated(self) -> Sequence[torch.nn.Module]:
        return [self.var]

    def checkpoint(self) -> Dict[str, Any]:
        """Weights, config, the tokenizer's config (so `load_models` rebuilds both) and the optimizer state."""
        extra = {} if self.supernet is None else {'supernet': self.supernet.config(self.var.depth)}
        return model_checkpoint(KIND_VAR, self.var, vae_config=self.vae.config.to_dict(), amp=self.amp.state_dict(),
                                **extra)

    def load_checkpoint(self, ckpt: Dict[str, Any], path: Path):
        if ckpt.get('kind') != KIND_VAR or 'amp' not in ckpt:
            raise UserError(f'{path} is not a train.py checkpoint; pass --resume none to start fresh')
        saved, own = VARConfig.current_names(ckpt['config']), self.var.config.to_dict()
        diffs = [f'{k}={v} (flags: {own[k]})' for k, v in saved.items() if own.get(k) != v]
        if diffs:
            raise UserError(f'{path} was trained with {", ".join(diffs)}; pass the same model flags (or '
                            f'--init_from) or another --out_dir')
        saved_sn = ckpt.get('supernet')
        own_sn = None if self.supernet is None else self.supernet.config(self.var.depth)
        if saved_sn is None and own_sn is not None:
            raise UserError(f'{path} was trained without --subnet_depth; to train a supernet from it, pass '
                            f'--init_from {path} and another --out_dir')
        if saved_sn is not None and saved_sn != own_sn:
            own_sn = own_sn or {}
            diffs = [f'{k}={v} (flags: {own_sn.get(k)})' for k, v in saved_sn.items() if own_sn.get(k) != v]
            raise UserError(f'{path} is a VARiant supernet checkpoint with {", ".join(diffs)}; pass the same '
                            f'--subnet_depth, --bridge, --subnet_selection and phase flags, or another --out_dir')
        load_state_dict_strict(self.var, ckpt['model'], str(path))
        self.amp.load_state_dict(ckpt['amp'])


# ---- main -----------------------------------------------------------------------------------------------------------
def main(args):
    info = dist.init_distributed(args.device, args.dist_timeout)
    out_dir = prepare_out_dir(args.out_dir, info.is_main)
    setup_logging(info.rank, out_dir / 'stdout.txt')
    log.info('command: %s', ' '.join(sys.argv))
    check_flags(args)
    configure_backends(args.tf32, info.device)

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
    optimizer = torch.optim.AdamW(groups, lr=plan.peak_lr, betas=tuple(args.betas), weight_decay=0.0,
                                  fused=info.device.type == 'cuda' and args.afuse)
    model = var
    # A subnet step leaves layers outside the subnet unused only without a bridge: with one, they still run on the
    # bridge tokens. Unused parameters then keep no gradient (AdamW skips them), as in a single process.
    unused_params = supernet is not None and supernet.spec.bridge == 0
    if info.distributed:
        model = DistributedDataParallel(var, device_ids=[info.local_rank] if info.device.type == 'cuda' else None,
                                        find_unused_parameters=unused_params, forward_sync_buffers=False)
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
    start_it, best, rng_states = resume_training(files, args.resume, trainer, plan)
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


if __name__ == '__main__':
    main_entry(main, get_parser())
