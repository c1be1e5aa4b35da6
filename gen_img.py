"""Class-conditional images and grids, zero-shot in-/out-painting and box editing, and convergence traces.

    python gen_img.py --use_implicit --save_grid                                    # the official README command
    python gen_img.py --classes 970 --seeds 10-19 --save_grid --out_dir grids       # our spellings, flat folder
    python gen_img.py --edit_image photo.jpg --box 0.25,0.25,0.75,0.75 --edit_mode inpaint
    python gen_img.py --edit_image photo.jpg --box 0.2,0.3,0.6,0.9 --edit_mode inpaint --edit_class 207
    python gen_img.py --classes 1,2 --seeds 0-3 --trace                             # residual/cosine per scale

The code is generation/gen_img_cli.py.
"""
from generation.gen_img_cli import get_parser, main
from utils.cli import main_entry

if __name__ == '__main__':
    main_entry(main, get_parser())
