"""The sampling benchmark's measuring code on a tiny case (the benchmark itself is run by hand)."""
import torch

from bench.efficiency import machine, run_case, to_markdown


def test_run_case_and_report():
    shape = dict(depth=2, embed_dim=64, num_heads=2, patch_nums=(1, 2, 4), vocab_size=64, Cvae=8,
                 use_implicit=True, pre_depth=1, post_depth=1)
    rows = [run_case('tiny', shape, s, 'per_iteration', None, 2, 1, torch.device('cpu'), torch.float32)
            for s in ('const:3', 'list:1,1,0')]
    full, small = rows
    assert full['iters_per_scale'] == [3, 3, 3] and small['iters_per_scale'] == [1, 1, 0]
    assert full['kv_cache_bytes'] > small['kv_cache_bytes'] > 0 and full['images_per_s'] > 0
    md = to_markdown(rows, {'suite': 'test', 'command': 'x', 'machine': machine(), 'dtype': 'float32', 'batch': 2,
                            'repeats': 1})
    assert md.count('| tiny |') == 2 and 'const:3' in md
    var_shape = dict(shape, use_implicit=False, depth=4)
    full, sub = (run_case('v', var_shape, None, None, dn, 1, 1, torch.device('cpu'), torch.float32)
                 for dn in (None, (2, 1)))
    assert full['layers_per_scale'] == [4, 4, 4] and sub['layers_per_scale'] == [4, 2, 2]
    assert sub['kv_cache_bytes'] < full['kv_cache_bytes']
