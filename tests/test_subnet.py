"""VARiant run-time depth switching: layer selection, exactness, cost, and the progressive phase schedule."""
import pytest
import torch

from models.sampler import autoregressive_infer_cfg
from models.subnet import SubnetSpec, equidistant_subnet, nested_subnet, subnet_probability
from tests.tiny import make_vae, make_var

HAND = {  # floor(i * 29 / (d - 1)), worked out by hand
    16: (0, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29),
    8: (0, 4, 8, 12, 16, 20, 24, 29),
    4: (0, 9, 19, 29),
    2: (0, 29),
}


@pytest.mark.parametrize('d', sorted(HAND))
def test_equidistant_d30(d):
    assert equidistant_subnet(30, d) == HAND[d]


def test_nesting_finding():
    # The paper calls the sets nested; with its formula at D = 30 they are not.
    assert not set(equidistant_subnet(30, 8)) <= set(equidistant_subnet(30, 16))
    assert not set(equidistant_subnet(30, 2 * 2)) <= set(equidistant_subnet(30, 8))
    assert set(equidistant_subnet(30, 4)) <= set(equidistant_subnet(30, 16))
    chain = [nested_subnet(30, d) for d in (2, 4, 8, 16)]
    assert [len(c) for c in chain] == [2, 4, 8, 16]
    assert all(set(a) <= set(b) for a, b in zip(chain, chain[1:]))
    assert all(c[0] == 0 and c[-1] == 29 for c in chain)
    assert nested_subnet(30, 16) == equidistant_subnet(30, 16)
    with pytest.raises(ValueError):
        equidistant_subnet(30, 1)


def _var():
    var = make_var(depth=6, embed_dim=64, num_heads=2).eval()
    return var.attach_vae(make_vae(patch_nums=var.patch_nums).freeze())


def _inputs(var):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 5, (2,), generator=g), torch.randn(2, var.L - 1, var.Cvae, generator=g)


def test_full_depth_and_full_bridge_are_plain_var():
    var = _var()
    label, x = _inputs(var)
    with torch.no_grad():
        ref = var(label, x)
        assert torch.equal(var(label, x, subnet=SubnetSpec(depth=6, bridge=1)), ref)
        assert torch.equal(var(label, x, subnet=SubnetSpec(depth=2, bridge=4)), ref)  # bridge = K scales
        sub = var(label, x, subnet=SubnetSpec(depth=2, bridge=2))
    bridge_L = var.bridge_tokens(2)
    assert torch.allclose(sub[:, :bridge_L], ref[:, :bridge_L], atol=1e-6)
    assert not torch.allclose(sub[:, bridge_L:], ref[:, bridge_L:], atol=1e-3)
    kw = dict(B=2, label_B=torch.tensor([1, 2]), image_seeds=[3, 4], top_k=8)
    plain = autoregressive_infer_cfg(var, **kw)
    assert torch.equal(autoregressive_infer_cfg(var, **kw, subnet=SubnetSpec(6, 0)), plain)
    assert torch.equal(autoregressive_infer_cfg(var, **kw, subnet=SubnetSpec(3, 4)), plain)


@pytest.mark.parametrize('spec', [SubnetSpec(3, 2), SubnetSpec(2, 1), SubnetSpec(4, 0, 'nested')])
def test_cached_subnet_sampling_matches_teacher_forcing(spec):
    var = _var()
    _, idx = autoregressive_infer_cfg(var, 3, torch.tensor([0, 1, 4]), cfg=0.0, top_k=1, subnet=spec,
                                      return_idx=True)
    with torch.no_grad():
        logits = var(torch.tensor([0, 1, 4]), var.vae.quantize.idxBl_to_var_input(idx), subnet=spec)
    assert torch.equal(logits.argmax(-1), torch.cat(idx, dim=1))


def test_switching_depth_changes_cost_without_reloading():
    var = _var()
    calls = []
    handles = [b.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[1])) for b in var.blocks]
    costs = {}
    for spec in (None, SubnetSpec(4, 2), SubnetSpec(2, 2), None):
        calls.clear()
        stats = {}
        autoregressive_infer_cfg(var, 2, 1, image_seeds=[0, 1], top_k=8, subnet=spec, stats=stats)
        costs[spec] = (len(calls), sum(calls), stats['kv_bytes'], tuple(stats['layers']))
    for h in handles:
        h.remove()
    full, d4, d2 = costs[None], costs[SubnetSpec(4, 2)], costs[SubnetSpec(2, 2)]
    assert full[3] == (6, 6, 6, 6) and d4[3] == (6, 6, 4, 4) and d2[3] == (6, 6, 2, 2)
    assert full[0] == 24 and d4[0] == 6 + 6 + 4 + 4 and d2[0] == 6 + 6 + 2 + 2  # blocks run per scale
    assert full[1] > d4[1] > d2[1] and full[2] > d4[2] > d2[2]  # tokens processed and KV bytes shrink


def test_subnet_rejected_for_viar():
    viar = make_var(use_implicit=True, pre_depth=1, post_depth=1)
    with pytest.raises(ValueError, match='explicit VAR'):
        viar(torch.zeros(1, dtype=torch.long), torch.zeros(1, viar.L - 1, viar.Cvae), subnet=SubnetSpec(2, 1))


def test_phase_schedule_boundaries():
    E1, E2 = 5, 20
    assert subnet_probability(0, E1, E2) == 0.2
    assert subnet_probability(E1, E1, E2) == 0.2
    assert subnet_probability(E1 + 7.5, E1, E2) == pytest.approx(0.6)
    assert subnet_probability(E2, E1, E2) == pytest.approx(1.0)
    assert subnet_probability(E2 + 1, E1, E2) == 1.0
    assert subnet_probability(3, 0, 0) == 1.0
    with pytest.raises(ValueError):
        subnet_probability(1, 5, 2)


def test_subnet_flags_are_defined_once_for_sampling_and_training():
    """sampling.py, gen_img.py and train.py share the --bridge / --subnet_selection flags and the default bridge."""
    from types import SimpleNamespace
    from generation import gen_img_cli, sampling_cli
    from training import train_cli
    from utils.cli import UserError
    from utils.subnet_flags import DEFAULT_BRIDGE, bridge_from_args

    def action(parser, flag):
        return next(a for a in parser._actions if flag in a.option_strings)

    parsers = [sampling_cli.get_parser(), gen_img_cli.get_parser(), train_cli.get_parser()]
    for flag in ('--bridge', '--subnet_selection'):
        first = action(parsers[0], flag)
        for parser in parsers[1:]:
            other = action(parser, flag)
            assert (other.help, other.default, other.type, other.choices) == \
                   (first.help, first.default, first.type, first.choices), flag
    assert bridge_from_args(SimpleNamespace(bridge=None), 10) == DEFAULT_BRIDGE
    assert bridge_from_args(SimpleNamespace(bridge=None), 4) == 3      # capped: the last scale runs the subnet
    assert bridge_from_args(SimpleNamespace(bridge=0), 4) == 0
    with pytest.raises(UserError, match='--bridge must lie in'):
        bridge_from_args(SimpleNamespace(bridge=4), 4)
