"""bench.inception_speed: one row per backend, precision and batch size, written under the name asked for."""
import json

import pytest

from bench import inception_speed as bench
from utils.cli import run


def test_rows_per_precision_and_batch_size_under_the_name_asked_for(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, 'RESULTS_DIR', tmp_path)
    code = run(bench.main, bench.get_parser(), ['--batch-sizes', '1', '2', '--batches', '1', '--warmup', '0',
                                                '--image-size', '8', '--backends', 'fast',
                                                '--precisions', 'fp32', 'bf16', '--name', 'speed_test'])
    assert code == 0
    rows = json.loads((tmp_path / 'speed_test.json').read_text())['rows']
    assert sorted((r['precision'], r['batch_size']) for r in rows) == [('bf16', 1), ('bf16', 2), ('fp32', 1),
                                                                        ('fp32', 2)]
    assert all(r['images_per_s_best'] > 0 and r['backend'] == 'fast' for r in rows)
    table = (tmp_path / 'speed_test.md').read_text()
    assert '| cpu | ' in table and '| bf16 | 2 |' in table and 'precisions fp32, bf16' in table


@pytest.mark.parametrize('name', ['../out', 'a b', ''])
def test_results_name_must_be_a_plain_file_name(name, capsys):
    with pytest.raises(SystemExit) as e:
        bench.get_parser().parse_args(['--name', name])
    assert e.value.code == 2 and '--name' in capsys.readouterr().err
