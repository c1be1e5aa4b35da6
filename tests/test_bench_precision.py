"""bench.precision's pieces: paired image differences, the training-log readers and the report."""
import json

import numpy as np
import pytest

from bench import precision
from utils.cli import UserError


def _npz(path, images):
    np.savez(path, arr_0=np.asarray(images, dtype=np.uint8))
    return path


def test_paired_difference(tmp_path):
    a = np.zeros((4, 2, 2, 3), np.uint8)
    b = a.copy()
    b[1] = 8                                  # one image off by 8 everywhere
    diff = precision.paired_difference(_npz(tmp_path / 'a.npz', a), _npz(tmp_path / 'b.npz', b))
    assert diff == {'mean_abs_pixel_diff': 2.0, 'identical_images': 0.75}
    with pytest.raises(UserError, match='different shapes'):
        precision.paired_difference(tmp_path / 'a.npz', _npz(tmp_path / 'c.npz', a[:3]))


def test_log_readers(tmp_path):
    log = tmp_path / 'log.txt'
    records = [{'step': 1, 'speed/images_per_s': 1.0}, {'step': 20, 'speed/images_per_s': 10.0},
               {'step': 40, 'speed/images_per_s': 30.0}, {'step': 40, 'epoch': 1, 'val/L_mean': 3.0}]
    log.write_text('\n'.join(json.dumps(r) for r in records) + '\nnot a record\n')
    read = precision.log_records(log)
    assert read == records
    assert precision.training_images_per_s(read) == 20.0          # median of the intervals after the first step


def test_report_says_whether_the_gap_is_within_the_errors():
    metrics = {p: {'fid': fid, 'fid_se': 1.0, 'sfid': 5.0, 'sfid_se': 0.5, 'precision': 0.5, 'precision_se': 0.01,
                   'recall': 0.4, 'recall_se': 0.01} for p, fid in (('fp32', 10.0), ('bf16', 11.0))}
    runs = {p: {'seconds': 60.0, 'images_per_s': speed, 'val': [{'epoch': 1, 'step': 5, 'val/L_mean': loss,
                                                                    'val/L_tail': loss + 0.1}]}
            for p, speed, loss in (('fp32', 10.0, 3.0), ('bf16', 20.0, 3.01))}
    meta = {'command': 'c', 'date': 'd', 'machine': 'm', 'seconds': 60.0, 'samples': 100, 'per_class': 10,
            'reference_n': 100, 'resamples': 5}
    sets = {p: {'seconds': 1.0} for p in metrics}
    pair = {'mean_abs_pixel_diff': 1.0, 'identical_images': 0.5}
    text = precision.to_markdown(meta, metrics, sets, pair, runs)
    assert '| fp32 | 10.00 ± 1.00 |' in text and 'within two joint standard errors' in text
    assert '| 1 | 5 | 3.0000 | 3.0100 | +0.0100 |' in text and '(2.00x)' in text
    metrics['bf16']['fid'] = 14.0
    assert 'outside two joint standard errors' in precision.to_markdown(meta, metrics, sets, pair, runs)
