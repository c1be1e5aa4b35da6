"""The benchmarks' measuring helpers against hand counts and the allocated caches."""
import pytest
import torch

from bench import speed
from bench.measure import count_flops, interleaved_timings, kv_cache_bytes, saved_for_backward_bytes, sampling_flops
from evaluation.inception_weights import load_offline_inception
from models import VARConfig, build_var
from models.sampler import autoregressive_infer_cfg
from models.schedules import ListSchedule
from models.subnet import SubnetSpec
from tests.tiny import make_vae, make_var


def test_flop_counter_against_hand_count():
    C, V, Cv, H = 64, 32, 8, 2
    var = build_var(VARConfig(depth=1, embed_dim=C, num_heads=H, num_classes=5, patch_nums=(1, 2, 3), vocab_size=V,
                              Cvae=Cv), 'meta').eval()
    B, L = 2, 1 + 4 + 9
    label = torch.zeros(B, dtype=torch.long, device='meta')
    x = torch.zeros(B, L - 1, Cv, device='meta')
    flops = count_flops(lambda: var(label, x))
    mm = lambda rows, k, n: 2 * rows * k * n  # noqa: E731  multiply-adds of a (rows x k) @ (k x n) product
    hand = (mm(B * (L - 1), Cv, C)                                     # word_embed
            + mm(B, C, 6 * C)                                          # block AdaLN
            + mm(B * L, C, 3 * C) + 2 * mm(B * H * L, C // H, L)       # qkv, scores and mixing
            + mm(B * L, C, C) + mm(B * L, C, 4 * C) + mm(B * L, 4 * C, C)  # proj, fc1, fc2
            + mm(B, C, 2 * C) + mm(B * L, C, V))                       # head AdaLN, head
    assert flops == hand


def test_sampling_flops_on_meta_scale_with_iterations():
    var = build_var(VARConfig(depth=2, embed_dim=64, num_heads=2, patch_nums=(1, 2, 4), vocab_size=32, Cvae=8,
                              num_classes=5, use_implicit=True, pre_depth=1, post_depth=1), 'meta').eval()
    var.attach_vae(make_vae(patch_nums=(1, 2, 4)).to('meta'))
    few, many = (sampling_flops(var, ListSchedule(n)) for n in ((1, 1, 1), (2, 2, 2)))
    assert few['decode'] == many['decode'] > 0
    assert many['transformer'] > few['transformer'] > 0


@pytest.mark.parametrize('policy,caps', [('per_iteration', (3, 3, 3, 3)), ('per_iteration', (2, 0, 1, 4)),
                                         ('lean', (2, 0, 1, 4)), ('lean', (0, 0, 0, 0))])
def test_kv_formula_matches_allocated_viar(policy, caps):
    var = make_var(use_implicit=True, pre_depth=1, post_depth=1).eval()
    var.attach_vae(make_vae(patch_nums=var.patch_nums).freeze())
    stats = {}
    autoregressive_infer_cfg(var, 3, 1, schedule=ListSchedule(caps), kv_policy=policy, stats=stats, g_seed=0)
    assert stats['kv_bytes'] == kv_cache_bytes(var, caps, policy, batch=3)


@pytest.mark.parametrize('subnet', [None, SubnetSpec(2, 2), SubnetSpec(3, 1)])
def test_kv_formula_matches_allocated_var(subnet):
    var = make_var(depth=4).eval()
    var.attach_vae(make_vae(patch_nums=var.patch_nums).freeze())
    stats = {}
    autoregressive_infer_cfg(var, 2, 1, subnet=subnet, stats=stats, g_seed=0)
    layers = subnet.layers_per_scale(4, 4) if subnet else None
    assert stats['kv_bytes'] == kv_cache_bytes(var, [0] * 4, batch=2, layers_per_scale=layers)


def test_saved_bytes_hand_count():
    a = torch.randn(10, requires_grad=True)
    b = torch.randn(10, requires_grad=True)
    assert saved_for_backward_bytes(lambda: (a * b).sum()) == 2 * 10 * 4  # mul saves both operands
    with torch.no_grad():
        assert saved_for_backward_bytes(lambda: (a * b).sum()) == 0


def test_interleaved_timings_and_fractions_of_the_peak(monkeypatch):
    clock = iter(range(100))
    monkeypatch.setattr('bench.measure.time.perf_counter', lambda: float(next(clock)))   # every call takes 1 s
    order = []
    times = interleaved_timings({'a': lambda: order.append('a'), 'b': lambda: order.append('b')}, rounds=2, warmup=1)
    assert order == ['a', 'b'] * 3 and times == {'a': [1.0, 1.0], 'b': [1.0, 1.0]}
    a = torch.randn(256, 256)
    tasks = {('peak', 'mm', 'fp32'): (None, 100e9, 1),
             ('sampling', 'tiny', 'fp32'): (lambda: (a @ a).exp_().cumsum(0), 25e9, 4)}
    monkeypatch.setattr(speed, 'interleaved_timings', lambda tasks, rounds, warmup, device: {
        ('peak', 'mm', 'fp32'): [2.0, 1.0], ('sampling', 'tiny', 'fp32'): [0.5, 1.0]})
    rows = speed.measure(tasks, rounds=2, warmup=0, device=torch.device('cpu'))
    sampling = rows[1]
    assert sampling['items_per_s_best'] == 8 and sampling['items_per_s_median'] == pytest.approx(4 / 0.75, rel=1e-3)
    assert sampling['peak_gflops'] == 100 and sampling['gflops_best'] == 50 and sampling['fraction_of_peak'] == 0.5
    markdown = speed.to_markdown(rows, {
        'command': 'x', 'date': 'd', 'machine': {'cpu': 'c', 'cpu_count': 2, 'gpu': None, 'torch': 't'}, 'threads': 1,
        'rounds': 2, 'warmup': 0, 'load_average_before_after': ['0', '0']})
    assert '| sampling | tiny | fp32 | 4 | 8 images/s |' in markdown
    # The profiled split: the matmul is a FLOP op, exp and cumsum are not.
    assert 0 < sampling['flop_op_time_share'] < 1 and 'flop_op_time_share' not in rows[0]
    others = [name for name, _ in sampling['largest_other_ops']]
    assert 'aten::mm' not in others and {'aten::exp_', 'aten::cumsum'} & set(others)
    assert '## Where the time goes' in markdown and '| sampling | tiny | fp32 |' in markdown.split('## Where')[1]


def test_speed_training_step_counts_forward_and_backward():
    case = speed.SUITES['quick']['training'][0]
    step, flops = speed.training_workload(case, torch.device('cpu'), 'bf16')
    _, var = speed.build_case(case.label, case.shape, 'meta')
    label, x = torch.zeros(2, dtype=torch.long, device='meta'), torch.zeros(2, var.L - 1, var.Cvae, device='meta')
    assert 2.5 < flops / count_flops(lambda: var(label, x)) < 3.5       # backward ~ twice the forward


@pytest.mark.parametrize('precision, dtype', [('fp32', torch.float32), ('bf16', torch.bfloat16)])
def test_speed_inception_runs_at_its_label(monkeypatch, precision, dtype):
    # The network's own autocast region switches off an outer one: the bf16 row must build a bf16 network.
    built = []
    monkeypatch.setattr(speed, 'load_offline_inception',
                        lambda *a, **k: built.append(load_offline_inception(*a, **k)) or built[-1])
    case = speed.SUITES['quick']['inception'][0]
    run, _ = speed.inception_workload(case, torch.device('cpu'), precision, 64)
    seen = []
    conv = next(m for m in built[0].modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    run()
    assert seen == [dtype]
