"""The CPU demo in --quick mode end to end, on synthetic Fashion-MNIST-format idx files (no apt needed)."""
import json

import numpy as np
from PIL import Image

from pipelines import demo
from tests.test_fashion_mnist import _write_idx
from utils.cli import run


def test_quick_demo_end_to_end(tmp_path, monkeypatch):
    raw = tmp_path / 'raw'
    raw.mkdir()
    _write_idx(raw, 'train', 400, 0)
    _write_idx(raw, 't10k', 40, 1)
    out, data = tmp_path / 'out', tmp_path / 'data'
    argv = ['--quick', '--out', str(out), '--data', str(data), '--raw_dir', str(raw)]
    assert run(demo.main, demo.get_parser(), argv) == 0

    report = (out / 'report.md').read_text()
    for picture in ('samples_grid.png', 'loss_curves.png', 'convergence.png'):
        assert f']({picture})' in report
        assert Image.open(out / picture).size[0] > 0
    results = json.loads((out / 'metrics.json').read_text())
    schedules = list(demo.QUICK.schedules)
    assert list(results['metrics']) == [demo.FLOOR_ROW, demo.RECONSTRUCTION_ROW] + schedules
    for m in results['metrics'].values():
        assert np.isfinite([m['fid'], m['sfid']]).all() and 0 <= m['precision'] <= 1 and 0 <= m['recall'] <= 1
        assert m['inception_score'] is None and 'logits' in m['inception_score_unavailable']
        assert m['n'] == 40 and m['fid_se'] > 0 and m['sfid_se'] > 0     # 4 images per class in every row
    # The report's table: the floor row first, 'value ± standard error' cells, FID as a multiple of the floor's.
    table = [line for line in report.splitlines() if line.startswith('| ')]
    assert table[0].startswith('| row | N | FID | sFID | precision | recall | FID / floor |')
    assert table[1].startswith(f'| {demo.FLOOR_ROW} | 40 | ') and '1.00x' in table[1]
    assert all(line.count(' ± ') == 4 for line in table[1:4])
    assert '- [' in report and 'FID <= 2.5x the floor' in report
    assert set(results['speed']) == set(schedules) and all(s['images_per_s'] > 0 for s in results['speed'].values())
    assert set(results['times']) >= {'train the tokenizer', 'train VIAR', 'evaluate FID / sFID / precision / recall'}
    grid = Image.open(out / 'samples_grid.png')
    assert grid.size == (demo.QUICK.grid_seeds * 34 + 2, 10 * 34 + 2)  # 32px images, 2px padding, 10 class rows

    # Re-running reuses every finished stage and rewrites the same report sections.
    assert run(demo.main, demo.get_parser(), argv) == 0
    assert json.loads((out / 'metrics.json').read_text())['metrics'] == results['metrics']


def test_demo_trains_on_the_images_as_they_are(tmp_path):
    """The reference set is unzoomed, so the demo's models must train on unzoomed images: --mid_reso 1 from the plan,
    and at 1 the training transform (random crop included) returns every pixel unchanged."""
    from training.data import build_transform
    for plan in (demo.FULL, demo.QUICK):
        args = demo.common_train_args(tmp_path, plan, 0, quick=False)
        assert float(args[args.index('--mid_reso') + 1]) == plan.mid_reso == 1.0
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    x = build_transform(32, train=True, mid_reso=1.0)(Image.fromarray(pixels))
    assert np.array_equal(((x + 1) * 127.5).round().byte().permute(1, 2, 0).numpy(), pixels)
    zoomed = build_transform(32, train=True, mid_reso=1.125)(Image.fromarray(pixels))
    assert not np.array_equal(((zoomed + 1) * 127.5).round().byte().permute(1, 2, 0).numpy(), pixels)
