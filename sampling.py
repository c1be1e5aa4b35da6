"""Generate N images per class (default 50 x 1000 classes) as PNGs plus an ADM-format .npz, for FID evaluation.

    torchrun --nproc_per_node=8 sampling.py --ckpt ckpts/viar.pth --vae_ckpt ckpts/vae_ch160v4096z32.pth --cfg 1.5

The code is generation/sampling_cli.py.
"""
from generation.sampling_cli import get_parser, main
from utils.cli import main_entry

if __name__ == '__main__':
    main_entry(main, get_parser())
