"""Tiny model factories and checkpoints shared by the tests (re-exported by conftest)."""
from pathlib import Path

import torch

from models import VARConfig, VQVAEConfig, build_var, build_vqvae
from utils.checkpoint import save_atomic
from utils.model_checkpoints import KIND_VAR, KIND_VQVAE, model_checkpoint

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = ROOT / 'tests' / 'fixtures' / 'official_tiny'


def tiny_vae_config(**kw) -> VQVAEConfig:
    """A 16px tokenizer with 4 scales, small enough to run in milliseconds."""
    base = dict(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=(1, 2, 3, 8))
    base.update(kw)
    return VQVAEConfig(**base)


def tiny_var_config(**kw) -> VARConfig:
    """A 2-block, 64-wide transformer; AdaLN gains and head are initialised large so every path matters."""
    base = dict(depth=2, embed_dim=64, num_heads=2, num_classes=5, patch_nums=(1, 2, 3, 4), vocab_size=32, Cvae=8,
                init_adaln_gamma=0.5, init_head=1.0, cond_drop_rate=0.0)
    base.update(kw)
    return VARConfig(**base)


def make_vae(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_vqvae(tiny_vae_config(**kw))


def make_var(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_var(tiny_var_config(**kw))


def save_tiny_checkpoints(folder: Path, **var_kw) -> Path:
    """folder/ar.pth (a tiny VIAR unless var_kw says otherwise) and folder/vae.pth, as train.py would save them."""
    var = make_var(**({'use_implicit': True, 'pre_depth': 1, 'post_depth': 1} if not var_kw else var_kw))
    vae = make_vae(patch_nums=var.patch_nums)
    save_atomic(model_checkpoint(KIND_VAR, var, vae_config=vae.config.to_dict()), folder / 'ar.pth')
    save_atomic(model_checkpoint(KIND_VQVAE, vae), folder / 'vae.pth')
    return folder
