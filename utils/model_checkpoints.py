"""The model checkpoint format (`model_checkpoint`: kind, config, weights) and the one `load_models` used by every CLI:
rebuild tokenizer and transformer from checkpoints alone.

Accepted files, for both models:
* this project's checkpoints: a dict with 'kind' ('var' or 'vqvae'), 'config' (the model's dataclass as a dict)
  and 'model' (state dict); training checkpoints add optimizer state etc.;
* the official training checkpoints (`ar-ckpt-*.pth`: ['trainer']['var_wo_ddp'] / ['trainer']['vae_local']);
* bare state dicts such as the released `viar.pth`, `var_d30.pth`, `vae_ch160v4096z32.pth` (also .safetensors):
  the architecture comes from `preset` when given, else it is read off the keys and shapes.
"""
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from models import VAR, VAR_PRESETS, VQVAE, VARConfig, VQVAEConfig, build_var, build_vqvae
from utils.checkpoint import CheckpointError, PathLike, load_file, load_state_dict_strict, strip_wrapper_prefixes

log = logging.getLogger('viar')

KIND_VAR, KIND_VQVAE = 'var', 'vqvae'


def model_checkpoint(kind: str, model: torch.nn.Module, **extra) -> Dict[str, Any]:
    """A self-describing checkpoint dict: kind, config, weights, plus anything in `extra`."""
    return {'kind': kind, 'config': model.config.to_dict(), 'model': model.state_dict(), **extra}


def config_from(cls, cfg: Any, path: PathLike):
    """`cls.from_dict(cfg)` of the config stored in checkpoint `path`, with a one-line error naming the file."""
    try:
        return cls.from_dict(cfg)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f'{path}: the stored config is invalid ({e})') from None


def split_checkpoint(obj: Any, kind: str, path: Path) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, Any]], Any]:
    """(state dict, config dict or None, the whole checkpoint) from any accepted file layout."""
    if not isinstance(obj, dict):
        raise CheckpointError(f'{path}: expected a state dict or checkpoint dict, found {type(obj).__name__}')
    if 'model' in obj and 'kind' in obj:
        if obj['kind'] != kind:
            raise CheckpointError(f'{path}: is a {obj["kind"]} checkpoint, but a {kind} checkpoint was expected')
        if not isinstance(obj['model'], dict):
            raise CheckpointError(f'{path}: its model entry is a {type(obj["model"]).__name__}, not a state dict')
        return obj['model'], obj.get('config'), obj
    if 'trainer' in obj and isinstance(obj['trainer'], dict):  # official training checkpoint
        key = 'var_wo_ddp' if kind == KIND_VAR else 'vae_local'
        if not isinstance(obj['trainer'].get(key), dict):
            raise CheckpointError(f'{path}: official training checkpoint without a trainer.{key} state dict')
        return obj['trainer'][key], None, obj
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None, obj
    raise CheckpointError(f'{path}: not a recognised checkpoint layout (top-level keys: {sorted(obj)[:8]})')


def _is_var_state(sd: Dict[str, torch.Tensor]) -> bool:
    return 'class_emb.weight' in sd


def read_var(path: PathLike, preset: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], VARConfig, Any]:
    """(state dict, config, the whole checkpoint object) of any accepted VAR/VIAR file, without building the model."""
    path = Path(path)
    sd, cfg, obj = split_checkpoint(load_file(path), KIND_VAR, path)
    sd = strip_wrapper_prefixes(sd)
    if not _is_var_state(sd):
        raise CheckpointError(f'{path}: does not look like a VAR/VIAR checkpoint (no class_emb.weight)')
    if cfg is not None:
        config = config_from(VARConfig, cfg, path)
    elif preset is not None:
        if preset not in VAR_PRESETS:
            raise ValueError(f'unknown preset {preset!r}; choose from {sorted(VAR_PRESETS)}')
        config = VAR_PRESETS[preset]
    else:
        config = VARConfig.from_state_dict(sd)
    return sd, config, obj


def load_var(path: PathLike, preset: Optional[str] = None, device='cpu',
             expect_implicit: Optional[bool] = None) -> Tuple[VAR, Dict[str, Any]]:
    """Build and strictly load a VAR/VIAR; returns (model in eval mode, the whole checkpoint object)."""
    path = Path(path)
    sd, config, obj = read_var(path, preset)
    implicit_in_file = 'implicit_block_projection.0.weight' in sd
    if expect_implicit is not None and expect_implicit != implicit_in_file:
        what = 'a VIAR (implicit)' if implicit_in_file else 'an explicit VAR'
        flag = 'drop --use_implicit' if not implicit_in_file else 'add --use_implicit (or leave the flag out)'
        raise CheckpointError(f'{path}: is {what} checkpoint, which does not match the flags given; {flag}')
    var = build_var(config, device='meta')
    load_state_dict_strict(var, sd, str(path), assign=True)
    supernet = obj.get('supernet') if isinstance(obj, dict) else None
    if supernet:
        log.info('%s was trained as a VARiant supernet: %s subnet of %d layers %s after a bridge of %d scales; pick '
                 'the depth at run time with --subnet_depth / --bridge', path, supernet['selection'],
                 supernet['depth'], supernet['layers'], supernet['bridge'])
    return var.to(device).eval(), obj


def load_vae(path: PathLike, patch_nums: Optional[Sequence[int]] = None, device='cpu',
             fallback_config: Optional[Dict[str, Any]] = None) -> VQVAE:
    """Build and strictly load a (frozen) tokenizer."""
    path = Path(path)
    sd, cfg, _ = split_checkpoint(load_file(path), KIND_VQVAE, path)
    sd = strip_wrapper_prefixes(sd)
    if 'quantize.embedding.weight' not in sd:
        raise CheckpointError(f'{path}: does not look like a VQVAE checkpoint (no quantize.embedding.weight)')
    if cfg is not None:
        config = config_from(VQVAEConfig, cfg, path)
    elif fallback_config is not None:
        config = config_from(VQVAEConfig, fallback_config, path)
    else:
        config = VQVAEConfig.from_state_dict(sd, patch_nums=patch_nums)
    vae = build_vqvae(config, device='meta')
    load_state_dict_strict(vae, sd, str(path), assign=True)
    return vae.to(device).freeze()


def load_models(var_ckpt: PathLike, vae_ckpt: PathLike, preset: Optional[str] = None, device='cpu',
                expect_implicit: Optional[bool] = None) -> Tuple[VQVAE, VAR]:
    """(frozen tokenizer, VAR/VIAR in eval mode with the tokenizer attached), checked to fit each other."""
    var, obj = load_var(var_ckpt, preset=preset, device=device, expect_implicit=expect_implicit)
    vae_cfg = obj.get('vae_config') if isinstance(obj, dict) else None
    vae = load_vae(vae_ckpt, patch_nums=var.patch_nums, device=device, fallback_config=vae_cfg)
    check_compatible(vae, var, str(vae_ckpt), str(var_ckpt))
    return vae, var.attach_vae(vae)


def check_compatible(vae: VQVAE, var: VAR, vae_name: str = 'tokenizer', var_name: str = 'transformer'):
    """The transformer must use the tokenizer's vocabulary, latent width and scales."""
    problems = []
    if vae.V != var.V:
        problems.append(f'vocabulary {vae.V} vs {var.V}')
    if vae.Cvae != var.Cvae:
        problems.append(f'latent channels {vae.Cvae} vs {var.Cvae}')
    if tuple(vae.quantize.v_patch_nums) != tuple(var.patch_nums):
        problems.append(f'patch_nums {tuple(vae.quantize.v_patch_nums)} vs {tuple(var.patch_nums)}')
    if problems:
        raise CheckpointError(f'{vae_name} does not fit {var_name}: ' + '; '.join(problems))

