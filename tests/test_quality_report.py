"""The quality table shared by the demo and the reproduction benchmark: floor row, standard errors, FID / floor."""
import pytest

from evaluation.quality_report import quality_table, target_lines


def _row(fid, se=None, n=1000):
    row = {'fid': fid, 'sfid': fid * 2, 'precision': 0.5, 'recall': 0.25, 'n': n}
    if se is not None:
        row.update(fid_se=se, sfid_se=se * 2, precision_se=0.01, recall_se=0.02)
    return row


def test_floor_row_uncertainties_and_ratio():
    lines = quality_table({'floor': _row(20.0, 0.5), 'model': _row(50.0, 1.25)}, 'floor',
                          extra={'model': {'images/s': '12.0'}}, extra_columns=('images/s',))
    assert lines[0] == '| row | N | FID | sFID | precision | recall | FID / floor | images/s |'
    assert lines[2] == '| floor | 1000 | 20.00 ± 0.50 | 40.00 ± 1.00 | 0.500 ± 0.010 | 0.250 ± 0.020 | 1.00x | - |'
    assert lines[3] == '| model | 1000 | 50.00 ± 1.25 | 100.00 ± 2.50 | 0.500 ± 0.010 | 0.250 ± 0.020 | 2.50x | 12.0 |'


def test_rows_without_errors_and_a_missing_floor():
    lines = quality_table({'floor': _row(10.0)}, 'floor')
    assert ' ± ' not in lines[2]
    with pytest.raises(ValueError, match='floor'):
        quality_table({'model': _row(10.0)}, 'floor')


def test_target_lines():
    assert target_lines([('FID <= 2x', '1.5x', True), ('recall >= 0.3', '0.1', False)]) == [
        '- [x] FID <= 2x: 1.5x', '- [ ] recall >= 0.3: 0.1']
