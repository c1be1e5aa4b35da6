"""bench.demo_recipe: the recipe rows change one thing at a time, and the zoomed row is the official transform's."""
from pathlib import Path

import numpy as np
from PIL import Image

from bench import demo_recipe
from pipelines import demo
from training.data import build_transform


def test_tokenizer_variants_go_from_the_old_recipe_to_the_demos_one_change_at_a_time():
    plans = list(demo_recipe.tokenizer_variants(demo.FULL).values())
    assert (plans[0].mid_reso, plans[0].tokenizer_betas, plans[0].gan_weight) == (1.125, (0.5, 0.9), 0)
    assert (plans[1].mid_reso, plans[1].tokenizer_betas) == (demo.FULL.mid_reso, (0.5, 0.9))
    assert plans[2].tokenizer_betas == demo.FULL.tokenizer_betas and plans[2].gan_weight == 0
    assert plans[-1] == demo.FULL and demo.FULL.gan_weight > 0
    for a, b in zip(plans, plans[1:]):   # every other field equal: each row changes exactly one thing ...
        changed = [k for k in demo.asdict(a) if demo.asdict(a)[k] != demo.asdict(b)[k]]
        assert len(changed) == 1
        # ... and that thing reaches train_tokenizer.py's command line
        assert (demo.common_train_args(Path('d'), a, 0, False) + demo.tokenizer_recipe_args(a)
                != demo.common_train_args(Path('d'), b, 0, False) + demo.tokenizer_recipe_args(b))
    args = demo.tokenizer_recipe_args(demo.FULL)
    iterations = demo.FULL.train_per_class * 10 // demo.FULL.batch_size * demo.FULL.tokenizer_epochs
    assert float(args[args.index('--gan_weight') + 1]) == demo.FULL.gan_weight
    assert int(args[args.index('--disc_start') + 1]) == int(iterations * demo.FULL.gan_from)


def test_zoomed_set_holds_the_official_centre_crops(tmp_path):
    rng = np.random.default_rng(0)
    files = []
    for i in range(3):
        files.append(tmp_path / f'{i}.png')
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(files[-1])
    path = demo_recipe.zoomed_npz(files, tmp_path / 'zoomed.npz')
    with np.load(path) as f:
        images = f['arr_0']
    transform = build_transform(32, train=False, mid_reso=1.125)
    for f, img in zip(files, images):
        expected = (transform(Image.open(f).convert('RGB')).numpy().transpose(1, 2, 0) + 1) * 127.5
        assert np.abs(img.astype(float) - expected).max() <= 0.5 + 1e-4
        assert not np.array_equal(img, np.asarray(Image.open(f)))   # zoomed, so not the image itself
