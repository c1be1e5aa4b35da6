"""Export a checkpoint's weights in the released format: a bare state dict `.pth` (the official code loads it with
`load_state_dict(strict=True)`) and `.safetensors`.

    python -m utils.export local_output/ar-ckpt-best.pth --out_dir ckpts --name viar-mine
    python -m utils.export local_output/vae-ckpt-best.pth --out_dir ckpts      # tokenizers too
"""
import json
import logging
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from utils.checkpoint import load_file, save_atomic, save_safetensors, strip_wrapper_prefixes
from utils.cli import ArgumentParser, UserError, main_entry, refuse_overwriting_inputs
from utils.model_checkpoints import KIND_VAR

log = logging.getLogger('viar')

FORMATS = ('pth', 'safetensors')


def weights_of(obj, path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(bare state dict, safetensors metadata) from our checkpoints, official training checkpoints, or bare dicts."""
    if not isinstance(obj, dict):
        raise UserError(f'{path}: expected a checkpoint dict, found {type(obj).__name__}')
    meta: Dict[str, str] = {}
    if 'kind' in obj and 'model' in obj:
        sd = obj['model']
        meta = {'kind': obj['kind'], 'config': json.dumps(obj.get('config'))}
        if 'vae_config' in obj:
            meta['vae_config'] = json.dumps(obj['vae_config'])
    elif isinstance(obj.get('trainer'), dict) and 'var_wo_ddp' in obj['trainer']:
        sd = obj['trainer']['var_wo_ddp']
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = obj
    else:
        raise UserError(f'{path}: not a recognised checkpoint (top-level keys: {sorted(obj, key=str)[:8]})')
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise UserError(f'{path}: its weights are not a state dict (parameter name -> tensor)')
    return {k: v.detach().cpu().contiguous() for k, v in strip_wrapper_prefixes(sd).items()}, meta


def bare_weights_caveats(meta: Dict[str, str]) -> List[str]:
    """What a loader of the bare weights would get wrong about this checkpoint: the weights' shapes give the
    architecture, but not a non-default activation (VARConfig.mlp_act), which they then read as the official one."""
    config = json.loads(meta.get('config') or 'null')
    if meta.get('kind') == KIND_VAR and isinstance(config, dict) and config.get('mlp_act', 'gelu_tanh') != 'gelu_tanh':
        return [f'the model uses mlp_act={config["mlp_act"]!r}, which the bare weights do not record: loaders of the '
                f'exported files assume the official gelu_tanh (outputs move by ~1e-3); sample from the checkpoint '
                f'itself to keep it']
    return []


def export(ckpt: Path, out_dir: Path, name: Optional[str] = None, formats=FORMATS) -> List[Path]:
    """Write `out_dir/<name>.pth` and/or `.safetensors`; returns the files written."""
    ckpt = Path(ckpt)
    name = name or ckpt.stem.replace('-ckpt', '')
    paths = {fmt: Path(out_dir) / f'{name}.{fmt}' for fmt in FORMATS if fmt in formats}
    refuse_overwriting_inputs({'the checkpoint': ckpt}, list(paths.values()), '--out_dir or --name')
    sd, meta = weights_of(load_file(ckpt), ckpt)
    for caveat in bare_weights_caveats(meta):
        log.warning(f'{ckpt}: {caveat}')
    if 'pth' in paths:
        save_atomic(sd, paths['pth'])
    if 'safetensors' in paths:
        save_safetensors(sd, paths['safetensors'], metadata=meta or None)
    return list(paths.values())


def get_parser() -> ArgumentParser:
    p = ArgumentParser(description='Export checkpoint weights as a bare state dict (.pth, official format) and '
                                   '.safetensors.')
    p.add_argument('ckpt', help='a train.py / train_tokenizer.py checkpoint (or any state-dict file)')
    p.add_argument('--out_dir', default='.', help='folder for the exported files')
    p.add_argument('--name', help='file name without extension (default: the checkpoint name without "-ckpt")')
    p.add_argument('--formats', nargs='+', choices=FORMATS, default=list(FORMATS))
    return p


def main(args):
    for path in export(Path(args.ckpt), Path(args.out_dir), args.name, args.formats):
        print(f'wrote {path}')
    return 0


if __name__ == '__main__':
    main_entry(main, get_parser())
