"""bench.train_step: the attention path it compares against computes the same step, and a quick run reports every
variant."""
import json

import torch

import models.blocks
from bench import train_step
from models import VARConfig, build_var
from training.ar_trainer import token_losses
from utils.cli import run


def _loss_and_grads(var, attention: str):
    g = torch.Generator().manual_seed(0)
    label = torch.randint(var.num_classes, (3,), generator=g)
    x = torch.randn(3, var.L - var.first_l, var.Cvae, generator=g)
    gt = torch.randint(var.V, (3, var.L), generator=g)
    var.zero_grad(set_to_none=True)
    with train_step.attention_path(attention):
        loss = token_losses(var(label, x, sjfb_iters=(1, 2)), gt).mean()
        loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in var.named_parameters() if p.grad is not None}


def test_both_attention_paths_train_the_same_step():
    torch.manual_seed(0)
    var = build_var(VARConfig(depth=3, embed_dim=32, num_heads=2, num_classes=4, patch_nums=(1, 2, 3), vocab_size=16,
                              Cvae=8, use_implicit=True, pre_depth=1, post_depth=1, cond_drop_rate=0.0, drop_path_rate=0.0))
    loss_a, grads_a = _loss_and_grads(var, 'sdpa-math')
    loss_b, grads_b = _loss_and_grads(var, 'written-out')
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for k in grads_a:   # float32: the two paths round differently
        torch.testing.assert_close(grads_a[k], grads_b[k], rtol=1e-4, atol=1e-6, msg=k)
    assert models.blocks.attention is not train_step.sdpa_math_attention   # restored after the block


def test_quick_run_reports_every_variant(tmp_path):
    assert run(train_step.main, train_step.get_parser(), ['--quick', '--warmup', '0', '--out_dir', str(tmp_path)]) == 0
    rows = json.loads((tmp_path / 'train_step_cpu_quick.json').read_text())['rows']
    variants = [('sdpa-math', 'gelu_tanh'), ('written-out', 'gelu_tanh'), ('written-out', 'gelu')]
    assert [(r['preset'], r['attention'], r['mlp_act']) for r in rows] == \
        [(p, a, act) for p in ('viar-demo', 'var-demo') for a, act in variants]
    assert all(r['step_ms_median'] > 0 and r['images_per_s'] > 0 for r in rows)
    assert rows[0]['speedup'] == 1.0 and rows[3]['speedup'] == 1.0   # each preset against its own first row
    markdown = (tmp_path / 'train_step_cpu_quick.md').read_text()
    assert markdown.count('| viar-demo |') == 3 and markdown.count('| var-demo |') == 3
