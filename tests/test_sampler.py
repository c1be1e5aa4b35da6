"""The sampler: per-image seeding, KV-cache policies, solvers, adaptive and budget schedules, zero-shot editing."""
import contextlib
import io

import pytest
import torch

from generation import sampling_cli
from generation.sampling_flags import describe_schedule, schedule_from_args
from models.fixed_point import AndersonAcceleration, FixedPointIteration, make_solver
import models.sampler as sampler_module
from models.sampler import (autoregressive_infer_cfg, check_sampling_args, compiled_trunk_step, default_schedule,
                            image_seed, implicit_iteration_flops, make_edit_spec, resolve_schedule, top_k_top_p_filter_,
                            zero_shot_edit)
from models.schedules import (AdaptiveSchedule, BudgetSchedule, ConstantSchedule, LinearSchedule, ListSchedule,
                              ScheduleError, allocate_budget, parse_schedule)
from tests.tiny import make_vae, make_var


def _model(**kw):
    var = make_var(**kw).eval()
    return var.attach_vae(make_vae(patch_nums=var.patch_nums).freeze())


@pytest.fixture(scope='module')
def viar():
    return _model(use_implicit=True, pre_depth=1, post_depth=1)


def _sample(var, labels, seeds, **kw):
    return autoregressive_infer_cfg(var, len(labels), torch.tensor(labels), image_seeds=seeds, top_k=8, top_p=0.95,
                                    cfg=1.5, **kw)


@pytest.mark.parametrize('implicit', [False, True])
def test_same_seed_same_image_whatever_the_batch(implicit):
    var = _model(use_implicit=implicit, pre_depth=1, post_depth=1)
    labels, seeds = [0, 1, 2, 3, 4], [image_seed(7, i) for i in range(5)]
    whole = _sample(var, labels, seeds)
    parts = torch.cat([_sample(var, labels[:2], seeds[:2]), _sample(var, labels[2:3], seeds[2:3]),
                       _sample(var, labels[3:], seeds[3:])])
    assert torch.allclose(whole, parts, atol=1e-5)
    other = _sample(var, labels, [image_seed(8, i) for i in range(5)])
    assert all(not torch.allclose(whole[i], other[i], atol=1e-3) for i in range(5))
    assert image_seed(7, 3) != image_seed(3, 7) and image_seed(7, 3) == seeds[3]


def test_kv_policies(viar):
    labels, seeds = [0, 1, 2], [image_seed(0, i) for i in range(3)]
    stats_it, stats_lean = {}, {}
    # With one iteration per scale both policies hold exactly the same keys/values.
    a, ia = _sample(viar, labels, seeds, schedule=ConstantSchedule(1), kv_policy='per_iteration', return_idx=True)
    b, ib = _sample(viar, labels, seeds, schedule=ConstantSchedule(1), kv_policy='lean', return_idx=True)
    assert torch.allclose(a, b, atol=1e-6) and all(torch.equal(x, y) for x, y in zip(ia, ib))
    _sample(viar, labels, seeds, schedule=ConstantSchedule(4), kv_policy='per_iteration', stats=stats_it)
    _sample(viar, labels, seeds, schedule=ConstantSchedule(4), kv_policy='lean', stats=stats_lean)
    # Lean keeps one layer's worth of implicit cache; per-iteration keeps one per iteration index.
    imp_it, imp_lean = stats_it['kv_caches'].implicit.nbytes, stats_lean['kv_caches'].implicit.nbytes
    assert imp_it == 4 * imp_lean > 0
    assert stats_it['kv_bytes'] - imp_it == stats_lean['kv_bytes'] - imp_lean
    with pytest.raises(ValueError, match='KV-cache policy'):
        _sample(viar, labels, seeds, kv_policy='greedy')


def test_per_iteration_caches_are_preallocated_exactly(viar):
    stats = {}
    _sample(viar, [0, 1], [1, 2], schedule=ListSchedule((2, 1, 0, 3)), stats=stats)
    caches = stats['kv_caches']
    assert stats['iters'] == [2, 1, 0, 3]
    sizes = {it: (c.len, c.max_len) for it, c in caches.implicit.items()}
    assert sizes == {0: (21, 21), 1: (17, 17), 2: (16, 16)}  # scales with more than `it` iterations: 1+4+16, 1+16, 16
    assert all(c.len == c.max_len == viar.L for c in caches.explicit['pre_blocks'] + caches.explicit['post_blocks'])


def _contractive(var):
    # Shrink the fusion MLP's output so the implicit map is a strong contraction: iterations converge quickly.
    with torch.no_grad():
        var.implicit_block_projection[2].weight.mul_(0.05)
    return var


def test_adaptive_schedule_stops_early_and_records_counts():
    var = _contractive(_model(use_implicit=True, pre_depth=1, post_depth=1))
    stats, trace = {}, {}
    _sample(var, [0, 1], [3, 4], schedule=AdaptiveSchedule(1e-3, 30), stats=stats, trace=trace)
    assert all(1 <= n < 30 for n in stats['iters'])
    for si, n in enumerate(stats['iters']):
        assert len(trace[si]) == n and trace[si][-1]['residual'] < 1e-3
        assert all(step['residual'] >= 1e-3 for step in trace[si][:-1])


def test_anderson_converges_faster_than_plain_iteration():
    torch.manual_seed(0)
    A = torch.randn(3, 16, 16) * 0.3  # spectral radius near 1: plain iteration crawls or diverges
    b = torch.randn(3, 16)
    f = lambda z, it: torch.tanh(torch.einsum('bij,bj->bi', A, z) + b)  # noqa: E731
    runs = {}
    for solver in (FixedPointIteration(), AndersonAcceleration()):
        trace = []
        solver.solve(f, torch.zeros(3, 16) + 0.1, 40, tol=1e-4, trace=trace)
        runs[solver.name] = trace
    assert runs['anderson'][-1]['residual'] < 1e-4 and len(runs['anderson']) < 40
    assert len(runs['picard']) == 40 and runs['picard'][-1]['residual'] > 1e-4
    assert isinstance(make_solver('anderson'), AndersonAcceleration)


def test_anderson_inside_the_sampler(viar):
    stats = {}
    img = _sample(viar, [0], [5], schedule=ConstantSchedule(4), solver=AndersonAcceleration(), stats=stats)
    assert torch.isfinite(img).all() and stats['iters'] == [4] * 4


def test_allocate_budget():
    curves = [[1.0, 0.2, 0.1, 0.05], [1.0, 0.9, 0.8, 0.7], [0.5, 0.1, 0.01, 0.001]]
    sched = allocate_budget(curves, costs=[1, 1, 1], budget=6)
    # From (1, 1, 1) the next drops are 0.1 / 0.1 / 0.09: scale 0, then scale 1 twice (0.1 each) beat 0.09.
    assert sched.iters == (2, 3, 1)
    costly = allocate_budget(curves, costs=[1, 10, 1], budget=6, min_iters=0)
    assert sum(c * n for c, n in zip([1, 10, 1], costly.iters)) <= 6 and costly.iters[1] == 0
    assert allocate_budget(curves, [1, 1, 1], budget=100).iters == (3, 3, 3)  # capped by the measured curves
    with pytest.raises(ScheduleError, match='below the cost'):
        allocate_budget(curves, [1, 1, 1], budget=2)


def test_resolve_budget_schedules(viar):
    iters = resolve_schedule(viar, parse_schedule('budget:9,4'))
    assert isinstance(iters, ListSchedule) and sum(iters.iters) <= 9 and max(iters.iters) <= 4
    gflops = sum(implicit_iteration_flops(viar, si) for si in range(4)) / 1e9 * 2
    flops = resolve_schedule(viar, BudgetSchedule(gflops, unit='gflops', cap=4))
    spent = sum(n * implicit_iteration_flops(viar, si) / 1e9 for si, n in enumerate(flops.iters))
    assert spent <= gflops * (1 + 1e-9)
    with pytest.raises(ScheduleError, match='resolved'):
        BudgetSchedule(5).caps(4)


def test_editing_keeps_source_tokens_and_generates_the_region(viar):
    torch.manual_seed(0)
    img = torch.rand(2, 3, 8, 8) * 2 - 1
    gt = viar.vae.img_to_idxBl(img)
    keep = torch.ones(2, 4, 4)
    keep[:, 1:4, 1:4] = 0  # in-paint a 3x3 box of the finest grid
    spec = make_edit_spec(gt, keep, viar.patch_nums)
    out, idx = autoregressive_infer_cfg(viar, 2, torch.tensor([1, 3]), image_seeds=[1, 2], top_k=0, cfg=1.5,
                                        edit=spec, return_idx=True)
    generated = 0
    for si, (mask, g, s) in enumerate(zip(spec.keep_masks, gt, idx)):
        m = mask.reshape(2, -1)
        assert torch.equal(s[m], g[m]), f'scale {si}: kept tokens changed'
        generated += (s[~m] != g[~m]).sum().item()
    assert spec.keep_masks[0].all()  # the 1x1 scale is always the source's
    assert not spec.keep_masks[-1].all() and spec.keep_masks[-1].any()
    assert generated > 0
    assert out.shape == (2, 3, 8, 8)
    # The one-call API gives the same result.
    again = zero_shot_edit(viar, img, keep, torch.tensor([1, 3]), image_seeds=[1, 2], top_k=0, cfg=1.5)
    assert torch.allclose(again, out, atol=1e-6)


def test_sampling_argument_errors(viar):
    parser = sampling_cli.get_parser()
    for kw, msg in ((dict(top_p=1.5), 'top_p'), (dict(top_k=-1), 'top_k'), (dict(cfg=-1.0), 'cfg'),
                    (dict(cfg=float('nan')), 'cfg'), (dict(top_p=float('inf')), 'top_p')):
        with pytest.raises(ValueError, match=msg):
            autoregressive_infer_cfg(viar, 1, 0, **kw)
        # The CLIs' flag types run the same check and show its message.
        (knob, value), = kw.items()
        with pytest.raises(ValueError) as e:
            check_sampling_args(**kw)
        err = io.StringIO()
        with pytest.raises(SystemExit), contextlib.redirect_stderr(err):
            parser.parse_args([f'--{knob}', str(value)])
        assert f'argument --{knob}: {e.value}' in err.getvalue()
    with pytest.raises(ScheduleError, match='scales'):
        autoregressive_infer_cfg(viar, 1, 0, schedule=ListSchedule((1, 2)))
    with pytest.raises(ValueError, match='class ids'):
        autoregressive_infer_cfg(viar, 1, torch.tensor([99]))
    with pytest.raises(ValueError, match='image seeds'):
        autoregressive_infer_cfg(viar, 2, 0, image_seeds=[1])


def official_top_k_top_p_filter_(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """The previous filter (the official one), kept verbatim: top-k by threshold, then top-p over a full sort."""
    if 0 < top_k < logits_BlV.shape[-1]:
        kth = logits_BlV.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits_BlV.masked_fill_(logits_BlV < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        sorted_remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        sorted_remove[..., -1:] = False
        logits_BlV.masked_fill_(sorted_remove.scatter(sorted_idx.ndim - 1, sorted_idx, sorted_remove), -torch.inf)
    return logits_BlV


def _logits(seed: int, kind: str) -> torch.Tensor:
    """(3, 50, 4096) logits: plain float32, bf16 (many equal values) or coarsely rounded (ties everywhere)."""
    x = torch.randn(3, 50, 4096, generator=torch.Generator().manual_seed(seed)) * (1 + seed % 4)
    if kind == 'bf16':
        return x.bfloat16()
    return (x * 4).round() / 4 if kind == 'tied' else x


@pytest.mark.parametrize('kind', ['float32', 'bf16', 'tied'])
@pytest.mark.parametrize('top_k,top_p', [(900, 0.96), (10, 0.5), (1, 0.9), (4095, 0.999), (900, 0.0), (0, 0.8),
                                         (5000, 0.96), (2, 0.05)])
def test_filter_draws_the_same_tokens_as_the_official_filter(kind, top_k, top_p):
    for seed in range(3):
        logits = _logits(seed, kind)
        new = top_k_top_p_filter_(logits.clone(), top_k, top_p)
        old = official_top_k_top_p_filter_(logits.clone(), top_k, top_p)
        assert torch.equal(new, old)
        draws = [torch.multinomial(x.float().softmax(-1).view(-1, 4096), 1, generator=torch.Generator().manual_seed(7))
                 for x in (new, old)]
        assert torch.equal(*draws)
    kept = (new > -torch.inf).sum(-1)
    assert (kept >= 1).all() and (kind != 'float32' or not 0 < top_k < 4096 or (kept <= top_k).all())


def test_sampler_images_equal_with_the_official_filter(viar, monkeypatch):
    kw = dict(top_k=20, top_p=0.7, cfg=1.5)
    labels = torch.tensor([0, 3, 4])
    new = autoregressive_infer_cfg(viar, 3, labels, image_seeds=[1, 2, 3], return_idx=True, **kw)
    monkeypatch.setattr(sampler_module, 'top_k_top_p_filter_', official_top_k_top_p_filter_)
    old = autoregressive_infer_cfg(viar, 3, labels, image_seeds=[1, 2, 3], return_idx=True, **kw)
    assert torch.equal(new[0], old[0]) and all(torch.equal(a, b) for a, b in zip(new[1], old[1]))


def test_compiled_trunk_step_gives_the_same_images():
    var = _model()
    step = compiled_trunk_step(backend='eager')   # dynamo's graph capture without inductor: seconds, same kernels
    assert compiled_trunk_step(backend='eager') is step
    plain = _sample(var, [0, 3], [4, 5])
    assert torch.equal(_sample(var, [0, 3], [4, 5], trunk_step=step), plain)
    assert torch.equal(_sample(var, [1], [6], trunk_step=step), _sample(var, [1], [6]))   # other static shapes


def test_the_default_schedule_is_the_checkpoints():
    # A model validated at 2 iterations samples at 2 by default: in the sampler, the official entry point and the CLIs.
    var = _model(use_implicit=True, pre_depth=1, post_depth=1, eval_iters=2)
    K = len(var.patch_nums)
    assert default_schedule(var) == ConstantSchedule(2)
    stats = {}
    img = _sample(var, [0, 1], [1, 2], stats=stats)
    assert stats['iters'] == [2] * K
    assert torch.equal(img, _sample(var, [0, 1], [1, 2], schedule=ConstantSchedule(2)))
    assert not torch.equal(img, _sample(var, [0, 1], [1, 2], schedule=ConstantSchedule(10)))
    official = dict(B=2, label_B=torch.tensor([0, 1]), g_seed=3, top_k=8)
    assert torch.equal(var.autoregressive_infer_cfg(**official),
                       autoregressive_infer_cfg(var, schedule=ConstantSchedule(2), **official))
    parse = sampling_cli.get_parser().parse_args
    for argv, want in (([], ConstantSchedule(2)), (['--iter_left', '5'], LinearSchedule(5, 2)),
                       (['--iter_left', '10', '--iter_right', '10'], LinearSchedule(10, 10)),
                       (['--schedule', 'const:4'], ConstantSchedule(4))):
        args = parse(argv)
        assert schedule_from_args(args, var) == want, argv
        assert ("the checkpoint's own" in describe_schedule(args, want)) == (argv == [])
    assert "default: the checkpoint's own schedule" in ' '.join(sampling_cli.get_parser().format_help().split())
