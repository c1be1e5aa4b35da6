"""VAR (explicit depth) and VIAR (pre-blocks, one weight-tied implicit block, post-blocks) next-scale transformers.

One class: `VARConfig.use_implicit` selects the trunk (models/trunk.py), which is the only place the two differ.
"""
import contextlib
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .blocks import MLP_ACTIVATIONS, AdaLNBeforeHead, AdaLNSelfAttn, SharedAdaLin
from .config_base import ConfigBase
from .implicit import FusionMLP
from .sampler import autoregressive_infer_cfg
from .schedules import IterSchedule, LinearSchedule
from .subnet import SubnetSpec
from .trunk import ImplicitStage, run_trunk, trunk_stages
from .vqvae import DEFAULT_PATCH_NUMS

HEAD_DIM = 64                 # width = 64 * depth, heads = depth
DROP_PATH_PER_24_LAYERS = 0.1  # drop_path_rate = 0.1 * depth / 24
FIRST_L = 1                   # the first scale is a single start token


@dataclass(frozen=True)
class VARConfig(ConfigBase):
    """Everything needed to rebuild a VAR/VIAR transformer. `None` fields are derived from `depth`."""
    depth: int = 16
    embed_dim: Optional[int] = None        # 64 * depth
    num_heads: Optional[int] = None        # depth
    drop_path_rate: Optional[float] = None  # 0.1 * depth / 24
    num_classes: int = 1000
    patch_nums: Tuple[int, ...] = DEFAULT_PATCH_NUMS
    vocab_size: int = 4096
    Cvae: int = 32
    mlp_ratio: float = 4.0
    mlp_act: str = 'gelu_tanh'             # FFN and fusion MLP: the official GELU(tanh), or 'gelu' (exact; faster on CPUs)
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    norm_eps: float = 1e-6
    shared_aln: bool = False
    cond_drop_rate: float = 0.1
    attn_l2_norm: bool = True
    init_adaln: float = 0.5
    init_adaln_gamma: float = 1e-5
    init_head: float = 0.02
    init_std: float = -1.0                 # < 0: sqrt(1 / (3 * embed_dim))
    use_implicit: bool = False
    pre_depth: int = 5
    post_depth: int = 5
    no_grad_iters_range: Tuple[int, int] = (0, 10)  # S-JFB: inclusive range of the detached iterations drawn
    grad_iters_range: Tuple[int, int] = (1, 12)     # S-JFB: inclusive range of the recorded iterations drawn
    eval_iters: int = 10                            # validation forward and the default sampling schedule

    # Fields saved under older names: checkpoints written with them still load.
    RENAMED_FIELDS = {'implicit_no_grad_iters': 'no_grad_iters_range', 'implicit_grad_iters': 'grad_iters_range',
                      'implicit_eval_iters': 'eval_iters'}

    def __post_init__(self):
        derived = {'embed_dim': HEAD_DIM * self.depth, 'num_heads': self.depth,
                   'drop_path_rate': DROP_PATH_PER_24_LAYERS * self.depth / 24}
        for name, value in derived.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.depth < 1:
            raise ValueError(f'depth must be >= 1, got {self.depth}')
        if self.embed_dim % self.num_heads:
            raise ValueError(f'embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}')
        if self.mlp_act not in MLP_ACTIVATIONS:
            raise ValueError(f'mlp_act must be one of {", ".join(MLP_ACTIVATIONS)}, got {self.mlp_act!r}')
        if len(self.patch_nums) < 2 or list(self.patch_nums) != sorted(self.patch_nums) or self.patch_nums[0] != 1:
            raise ValueError(f'patch_nums must increase from 1 over at least 2 scales, got {self.patch_nums}')
        if self.use_implicit:
            if not (0 <= self.pre_depth <= self.depth and 0 <= self.post_depth <= self.depth):
                raise ValueError(f'pre_depth {self.pre_depth} and post_depth {self.post_depth} must lie in '
                                 f'[0, depth={self.depth}]')
            for name, lo_min in (('no_grad_iters_range', 0), ('grad_iters_range', 1)):
                lo, hi = getattr(self, name)
                if not lo_min <= lo <= hi:
                    raise ValueError(f'{name}=({lo}, {hi}) must satisfy {lo_min} <= min <= max')
            if self.eval_iters < 0:
                raise ValueError(f'eval_iters must be >= 0, got {self.eval_iters}')

    @property
    def L(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)

    @classmethod
    def from_state_dict(cls, sd: Dict[str, torch.Tensor], **overrides) -> 'VARConfig':
        """Recover the architecture of a bare (e.g. released) VAR/VIAR state dict from its keys and shapes.

        Without attn_l2_norm nothing in the weights stores the head count; it then defaults to width / 64 unless
        `num_heads` is given in `overrides`.
        """
        try:
            C, Cvae = sd['word_embed.weight'].shape
            lvl_1L = sd['lvl_1L'].reshape(-1)
            num_classes = sd['class_emb.weight'].shape[0] - 1
            vocab_size = sd['head.weight'].shape[0]
        except KeyError as e:
            raise ValueError(f'not a VAR/VIAR state dict: key {e} is missing') from None
        counts = torch.bincount(lvl_1L).tolist()
        patch_nums = tuple(math.isqrt(n) for n in counts)
        if any(pn * pn != n for pn, n in zip(patch_nums, counts)):
            raise ValueError(f'lvl_1L does not describe square token maps (tokens per scale: {counts})')

        def count(prefix: str) -> int:
            return len({k[len(prefix):].split('.')[0] for k in sd if k.startswith(prefix)})

        use_implicit = 'implicit_block_projection.0.weight' in sd
        prefix = 'implicit_block.' if use_implicit else 'blocks.0.'
        scale_key = prefix + 'attn.scale_mul_1H11'
        attn_l2_norm = scale_key in sd
        num_heads = sd[scale_key].shape[1] if attn_l2_norm else max(1, C // HEAD_DIM)
        mlp_ratio = sd[prefix + 'ffn.fc1.weight'].shape[0] / C
        kw = dict(embed_dim=C, num_heads=num_heads, num_classes=num_classes, patch_nums=patch_nums,
                  vocab_size=vocab_size, Cvae=Cvae, mlp_ratio=mlp_ratio, attn_l2_norm=attn_l2_norm,
                  shared_aln='shared_ada_lin.1.weight' in sd, use_implicit=use_implicit)
        if use_implicit:
            pre, post = count('pre_blocks.'), count('post_blocks.')
            # The nominal depth only sets drop-path rates and init; released VIAR uses width 64 * depth.
            depth = C // HEAD_DIM if C % HEAD_DIM == 0 else max(pre, post, 1)
            kw.update(depth=max(depth, pre, post), pre_depth=pre, post_depth=post)
        else:
            kw.update(depth=count('blocks.'))
        kw.update(overrides)
        return cls(**kw)


class VAR(nn.Module):
    """Class-conditional next-scale prediction transformer; `config.use_implicit` selects the VIAR trunk.

    A pure function of its weights and inputs: it holds no random generator and no state from the last call (class
    dropout in training draws from torch's global RNG, like dropout).
    """

    def __init__(self, config: VARConfig = VARConfig()):
        super().__init__()
        self.config = config
        C, D = config.embed_dim, config.embed_dim
        self.C, self.D, self.Cvae, self.V = C, D, config.Cvae, config.vocab_size
        self.depth, self.num_heads = config.depth, config.num_heads
        self.num_classes, self.cond_drop_rate = config.num_classes, config.cond_drop_rate
        self.use_implicit = config.use_implicit
        self.patch_nums = tuple(config.patch_nums)
        self.first_l = FIRST_L
        self.L = config.L
        self.num_stages_minus_1 = len(self.patch_nums) - 1
        self.begin_ends: List[Tuple[int, int]] = []
        cur = 0
        for pn in self.patch_nums:
            self.begin_ends.append((cur, cur + pn * pn))
            cur += pn * pn

        # Input embeddings.
        init_std = math.sqrt(1 / C / 3)
        self.word_embed = nn.Linear(self.Cvae, C)
        self.class_emb = nn.Embedding(self.num_classes + 1, C)  # the last row is the null class used by CFG
        nn.init.trunc_normal_(self.class_emb.weight.data, mean=0, std=init_std)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C))
        nn.init.trunc_normal_(self.pos_start.data, mean=0, std=init_std)
        pos_1LC = []
        for pn in self.patch_nums:
            pe = torch.empty(1, pn * pn, C)
            nn.init.trunc_normal_(pe, mean=0, std=init_std)
            pos_1LC.append(pe)
        self.pos_1LC = nn.Parameter(torch.cat(pos_1LC, dim=1))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), C)
        nn.init.trunc_normal_(self.lvl_embed.weight.data, mean=0, std=init_std)

        # Trunk.
        if config.shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(inplace=False), SharedAdaLin(D, 6 * C))
        else:
            self.shared_ada_lin = nn.Identity()
        dpr = torch.linspace(0, config.drop_path_rate, config.depth, device='cpu').tolist()

        def make_block(layer_idx: int) -> AdaLNSelfAttn:
            return AdaLNSelfAttn(C, D, config.num_heads, mlp_ratio=config.mlp_ratio, drop=config.drop_rate,
                                 attn_drop=config.attn_drop_rate, drop_path=dpr[layer_idx], norm_eps=config.norm_eps,
                                 shared_aln=config.shared_aln, attn_l2_norm=config.attn_l2_norm,
                                 mlp_act=config.mlp_act)

        # VAR: self.blocks; VIAR: self.pre_blocks, self.implicit_block_projection (the fusion MLP),
        # self.implicit_block, self.post_blocks; in this order, which is the order of initialisation.
        self.stages = trunk_stages(config)
        for stage in self.stages:
            if isinstance(stage, ImplicitStage):
                setattr(self, stage.fusion, FusionMLP(C, config.mlp_act))
                setattr(self, stage.block, make_block(stage.layer))
            else:
                setattr(self, stage.name, nn.ModuleList([make_block(stage.first_layer + i)
                                                         for i in range(stage.depth)]))

        # Scale index of every token and the block-causal mask; persistent because released checkpoints hold them.
        d = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(self.patch_nums)]).view(1, self.L, 1)
        dT = d.transpose(1, 2)
        self.register_buffer('lvl_1L', dT[:, 0].contiguous())
        self.register_buffer('attn_bias_for_masking',
                             torch.where(d >= dT, 0.0, -torch.inf).reshape(1, 1, self.L, self.L).contiguous())

        self.head_nm = AdaLNBeforeHead(C, D, norm_eps=config.norm_eps)
        self.head = nn.Linear(C, self.V)

        self._vae = None
        self.init_weights(config.init_adaln, config.init_adaln_gamma, config.init_head, config.init_std)

    # ---- construction helpers ------------------------------------------------------------------------------------
    @property
    def trunk_blocks(self) -> List[AdaLNSelfAttn]:
        """All transformer blocks in execution order (the implicit block once)."""
        return [block for stage in self.stages for block in
                ([getattr(self, stage.block)] if isinstance(stage, ImplicitStage) else getattr(self, stage.name))]

    @torch.no_grad()
    def init_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02,
                     init_std: float = -1.0):
        """The official initialisation: trunc-normal Linears/Embeddings, small head, damped AdaLN and residuals."""
        if init_std < 0:
            init_std = math.sqrt(1 / self.C / 3)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight.data, std=init_std)
                if m.bias is not None:
                    m.bias.data.zero_()
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight.data, std=init_std)
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.data.fill_(1.0)
                m.bias.data.zero_()
        self.head.weight.data.mul_(init_head)
        self.head.bias.data.zero_()
        self.head_nm.ada_lin[-1].weight.data.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.data.zero_()
        # VIAR rescales its few blocks by the nominal depth it stands in for, VAR by its block count (= depth).
        residual_div = math.sqrt(2 * self.depth)
        for block in self.trunk_blocks:
            block.attn.proj.weight.data.div_(residual_div)
            block.ffn.fc2.weight.data.div_(residual_div)
            if block.shared_aln:
                block.ada_gss.data[:, :, 2:].mul_(init_adaln)
                block.ada_gss.data[:, :, :2].mul_(init_adaln_gamma)
            else:
                block.ada_lin[-1].weight.data[2 * self.C:].mul_(init_adaln)
                block.ada_lin[-1].weight.data[:2 * self.C].mul_(init_adaln_gamma)
                block.ada_lin[-1].bias.data.zero_()

    def attach_vae(self, vae) -> 'VAR':
        """Give the model its (frozen) tokenizer for sampling; kept outside the state dict like the official proxy."""
        self._vae = (vae,)
        return self

    @property
    def vae(self):
        if self._vae is None:
            raise RuntimeError('no VQVAE attached: call var.attach_vae(vae) (build_vae_var does this)')
        return self._vae[0]

    # ---- pieces shared by teacher forcing and sampling -------------------------------------------------------------
    def get_logits(self, h_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """Head on fp32 inputs; logits (B, L, V) in fp32."""
        return self.head(self.head_nm(h_BLC.float(), cond_BD.float()).float()).float()

    # ---- teacher-forced forward ----------------------------------------------------------------------------------
    def forward(self, label_B: torch.LongTensor, x_BLCv_wo_first_l: torch.Tensor,
                sjfb_iters: Optional[Tuple[int, int]] = None, subnet: Optional[SubnetSpec] = None) -> torch.Tensor:
        """Teacher forcing: logits (B, L, V) for all scales at once under the block-causal mask.

        For VIAR, `sjfb_iters=(no_grad_iters, grad_iters)` are the S-JFB counts of this call (a trainer draws them);
        the default (0, config.eval_iters) is the deterministic validation forward. For VAR, `subnet` runs the scales
        after its bridge through its layers only (VARiant); the bridge scales still run every layer.
        """
        B = x_BLCv_wo_first_l.shape[0]
        device_type = x_BLCv_wo_first_l.device.type
        has_autocast = torch.amp.is_autocast_available(device_type)  # False on the meta device
        # Embeddings are computed in fp32 even under autocast (official numerics).
        with torch.autocast(device_type=device_type, enabled=False) if has_autocast else contextlib.nullcontext():
            if self.training and self.cond_drop_rate > 0:
                # Class dropout for CFG. (The official model also drops labels in eval mode; we do not, so that
                # validation losses are deterministic.)
                drop = torch.rand(B, device=label_B.device) < self.cond_drop_rate
                label_B = torch.where(drop, self.num_classes, label_B)
            cond_BD = self.class_emb(label_B)
            sos = cond_BD.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
            x_BLC = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l.float())), dim=1)
            x_BLC = x_BLC + self.lvl_embed(self.lvl_1L.expand(B, -1)) + self.pos_1LC
        cond_gss = self.shared_ada_lin(cond_BD)
        autocast_on = has_autocast and torch.is_autocast_enabled(device_type)
        main_type = torch.get_autocast_dtype(device_type) if autocast_on else x_BLC.dtype
        x_BLC, cond_gss = x_BLC.to(main_type), cond_gss.to(main_type)
        attn_bias = self.attn_bias_for_masking.to(main_type)

        if self.use_implicit and subnet is not None:
            raise ValueError('VARiant depth switching (subnet) applies to explicit VAR models, not VIAR')
        no_grad_iters, grad_iters = (0, self.config.eval_iters) if sjfb_iters is None else sjfb_iters
        layers = None if subnet is None else subnet.layers(self.depth)
        x_BLC, _ = run_trunk(self, x_BLC, cond_gss, attn_bias, no_grad_iters=no_grad_iters, grad_iters=grad_iters,
                             layers=layers, inactive_tokens=0 if subnet is None else self.bridge_tokens(subnet.bridge))
        return self.get_logits(x_BLC, cond_BD)

    def bridge_tokens(self, bridge: int) -> int:
        """Number of tokens in the first `bridge` scales."""
        return self.begin_ends[min(bridge, len(self.patch_nums)) - 1][1] if bridge > 0 else 0

    # ---- sampling ------------------------------------------------------------------------------------------------
    def autoregressive_infer_cfg(self, B: int, label_B, g_seed: Optional[int] = None, cfg: float = 1.5,
                                 top_k: int = 0, top_p: float = 0.0, more_smooth: bool = False,
                                 iter_left: Optional[int] = None, iter_right: Optional[int] = None,
                                 schedule: Optional[IterSchedule] = None, **sampler_kwargs):
        """The official sampling entry point: images (B, 3, H, W) in [0, 1].

        `iter_left`/`iter_right` give the official linear schedule of implicit iterations (one left out: the
        checkpoint's `eval_iters`); `schedule` overrides it; with none of them, the checkpoint's own schedule
        (`models.sampler.default_schedule`). Further keyword arguments (image_seeds, kv_policy, solver, edit, trace,
        return_idx, ...) go to `models.sampler.autoregressive_infer_cfg`.
        """
        if schedule is None and (iter_left, iter_right) != (None, None):
            eval_iters = self.config.eval_iters
            schedule = LinearSchedule(eval_iters if iter_left is None else iter_left,
                                      eval_iters if iter_right is None else iter_right)
        return autoregressive_infer_cfg(self, B, label_B, g_seed=g_seed, cfg=cfg, top_k=top_k, top_p=top_p,
                                        more_smooth=more_smooth, schedule=schedule, **sampler_kwargs)

    def extra_repr(self) -> str:
        kind = f'VIAR(pre={self.config.pre_depth}, post={self.config.post_depth})' if self.use_implicit else 'VAR'
        return f'{kind}, depth={self.depth}, C={self.C}, heads={self.num_heads}, patch_nums={self.patch_nums}'


def _var(depth: int, **kw) -> VARConfig:
    # The VAR README's per-depth AdaLN gamma init (d16/d20: 1e-3, d24: 1e-4, d30: 1e-5).
    alng = {16: 1e-3, 20: 1e-3, 24: 1e-4}.get(depth, 1e-5)
    return VARConfig(depth=depth, init_adaln_gamma=alng, **kw)


VAR_PRESETS: Dict[str, VARConfig] = {
    'var-d16': _var(16),
    'var-d20': _var(20),
    'var-d24': _var(24),
    'var-d30': _var(30),
    'viar-d30': _var(30, use_implicit=True, pre_depth=5, post_depth=5),
    # The CPU demo (Fashion-MNIST, 32px, with vae-demo-fmnist32): width 128, 1 pre- and 1 post-block, short S-JFB.
    'viar-demo': VARConfig(depth=4, embed_dim=128, num_heads=4, num_classes=10, patch_nums=(1, 2, 3, 4, 6, 8),
                           vocab_size=256, Cvae=16, init_adaln_gamma=1e-3, use_implicit=True, pre_depth=1,
                           post_depth=1, no_grad_iters_range=(0, 3), grad_iters_range=(1, 3), eval_iters=3),
    # Its explicit counterpart for the reproduction benchmark: same width, 9 blocks, so viar-demo has 39 % of its
    # parameters (the paper's VIAR has 38.4 % of VAR-d30's).
    'var-demo': VARConfig(depth=9, embed_dim=128, num_heads=4, num_classes=10, patch_nums=(1, 2, 3, 4, 6, 8),
                          vocab_size=256, Cvae=16, init_adaln_gamma=1e-3),
}
