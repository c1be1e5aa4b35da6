"""bench.inception_precision: the report on synthetic numbers and the input checks (the scoring itself is
evaluation.evaluate, tested in test_evaluator.py)."""
import pytest

from bench import inception_precision as bench
from utils.cli import UserError

FLOOR = 'real training images (floor)'


def _r(fid: float, se: float) -> dict:
    return {'fid': fid, 'fid_se': se, 'sfid': 2 * fid, 'precision': 0.5, 'recall': 0.25, 'n': 1000}


def test_report_puts_the_shift_against_the_standard_error():
    results = {'fp32': {FLOOR: _r(20.0, 0.4), 'samples': _r(100.0, 1.0)},
               'bf16': {FLOOR: _r(19.6, 0.4), 'samples': _r(98.0, 1.0)}}
    meta = {'command': 'python -m bench.inception_precision', 'seconds': 120, 'reference': 'ref.npz',
            'reference_images': 1000, 'floor': FLOOR, 'resamples': 20, 'speed_batch': 32,
            'machine': {'cpu': 'test CPU', 'cpu_threads': 2, 'gpu': None, 'torch': '2', 'python': '3',
                        'platform': 'linux'}}
    report = bench.to_markdown(results, {'fp32': 14.0, 'bf16': 35.0, 'peak_gflops': 240.0}, meta)
    assert f'| {FLOOR} | 1000 | 20.00 ± 0.40 | 19.60 ± 0.40 | -0.40 (-2.0%) | -1.0 | 1.00x | 1.00x |' in report
    assert '| samples | 1000 | 100.00 ± 1.00 | 98.00 ± 1.00 | -2.00 (-2.0%) | -2.0 | 5.00x | 5.00x |' in report
    assert 'bf16 35.0 images/s (2.50x)' in report and 'Largest relative FID shift: 2.0%' in report


def test_bad_inputs_name_the_flag(tmp_path, monkeypatch):
    with pytest.raises(UserError, match='NAME=PATH'):
        bench.parse_set('samples.npz')
    with pytest.raises(UserError, match='--reference: .*absent.npz does not exist'):
        bench.main(bench.get_parser().parse_args(['--reference', str(tmp_path / 'absent.npz'),
                                                  f'x={tmp_path / "x.npz"}']))
    (tmp_path / 'ref.npz').write_bytes(b'')
    (tmp_path / 'x.npz').write_bytes(b'')
    with pytest.raises(UserError, match="--floor 'real"):
        bench.main(bench.get_parser().parse_args(['--reference', str(tmp_path / 'ref.npz'),
                                                  f'x={tmp_path / "x.npz"}']))
    # Without sets it scores the demo's, and says how to make them when they are absent.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match='run `bash scripts/demo.sh` first'):
        bench.main(bench.get_parser().parse_args([]))
    assert bench.demo_sets()[-1] == ('VIAR `const:3`', bench.DEMO / 'samples' / 'const_3.npz')
