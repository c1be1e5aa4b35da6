"""VAR/VIAR transformer: block-causal masking, S-JFB, implicit iterations, cached sampling vs teacher forcing."""
import pytest
import torch

from models import VARConfig, build_var
from models.fixed_point import FixedPointIteration
from models.implicit import implicit_map, sjfb
from models.schedules import ConstantSchedule, ListSchedule
from models.subnet import SubnetSpec
from models.trunk import BlockStage, ImplicitStage, TrunkCaches, run_trunk
from tests.tiny import make_vae, make_var

# Configurations covering the general case (the golden fixture is only one of them).
VARIANTS = [
    dict(),
    dict(shared_aln=True),
    dict(attn_l2_norm=False),
    dict(patch_nums=(1, 2, 4)),
    dict(patch_nums=(1, 2, 3, 5, 6)),
    dict(use_implicit=True, pre_depth=1, post_depth=1),
    dict(use_implicit=True, pre_depth=0, post_depth=2, shared_aln=True),
    dict(use_implicit=True, pre_depth=2, post_depth=0, attn_l2_norm=False, patch_nums=(1, 3)),
]


def _inputs(var, B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, var.num_classes, (B,), generator=g)
    x = torch.randn(B, var.L - 1, var.Cvae, generator=g)
    return label, x


@pytest.mark.parametrize('kw', VARIANTS)
def test_block_causal_mask(kw):
    var = make_var(**kw).eval()
    label, x = _inputs(var)
    iters = (0, 3) if var.use_implicit else None
    with torch.no_grad():
        ref = var(label, x, sjfb_iters=iters)
        for k, (bg, ed) in enumerate(var.begin_ends[:-1]):
            x2 = x.clone()
            x2[:, ed - 1:] += torch.randn_like(x2[:, ed - 1:])  # input rows >= ed-1 feed scales > k
            out = var(label, x2, sjfb_iters=iters)
            assert torch.allclose(out[:, :ed], ref[:, :ed], atol=1e-5), f'scale {k} saw later scales'
            assert not torch.allclose(out[:, ed:], ref[:, ed:], atol=1e-3), 'later scales ignored their input'


@pytest.mark.parametrize('kw', VARIANTS)
def test_cached_greedy_sampling_matches_teacher_forcing(kw):
    # With cfg=0 and top_k=1 the sampler emits argmax tokens; teacher forcing on those tokens must agree
    # (for VIAR with a constant schedule n, teacher forcing with (0, n) iterations).
    var = make_var(**kw).eval()
    vae = make_vae(patch_nums=var.patch_nums).freeze()
    var.attach_vae(vae)
    n = 3
    img, idx = var.autoregressive_infer_cfg(B=3, label_B=torch.tensor([0, 1, 4]), cfg=0.0, top_k=1,
                                            schedule=ConstantSchedule(n), return_idx=True)
    assert img.shape == (3, 3, vae.config.image_size, vae.config.image_size)
    with torch.no_grad():
        logits = var(torch.tensor([0, 1, 4]), vae.quantize.idxBl_to_var_input(idx),
                     sjfb_iters=(0, n) if var.use_implicit else None)
    assert torch.equal(logits.argmax(-1), torch.cat(idx, dim=1))


TRUNKS = [(dict(depth=4), None), (dict(depth=4), SubnetSpec(2, 2)), (dict(depth=4), SubnetSpec(3, 0, 'nested')),
          (dict(use_implicit=True, pre_depth=1, post_depth=1), None),
          (dict(use_implicit=True, pre_depth=0, post_depth=2, shared_aln=True), None)]


@pytest.mark.parametrize('kw, subnet', TRUNKS)
def test_one_trunk_teacher_forcing_equals_scale_by_scale_caching(kw, subnet):
    # The same trunk run on all scales under the mask, and one scale at a time with KV caches (as the sampler runs
    # it), gives the same logits: VAR, a VARiant subnet, VIAR at a constant iteration count.
    var = make_var(**kw).eval()
    label, x = _inputs(var)
    n, K = 3, len(var.patch_nums)
    layers = None if subnet is None else subnet.layers_per_scale(var.depth, K)
    caches = TrunkCaches(var.stages, var.patch_nums, [n] * K, adaptive=False, layers_per_scale=layers)
    with torch.no_grad():
        ref = var(label, x, sjfb_iters=(0, n), subnet=subnet)
        cond = var.class_emb(label)
        h = torch.cat((cond.unsqueeze(1) + var.pos_start, var.word_embed(x)), 1) + var.lvl_embed(var.lvl_1L) + \
            var.pos_1LC
        logits = []
        for si, (bg, ed) in enumerate(var.begin_ends):
            h_BlC, calls = run_trunk(var, h[:, bg:ed], var.shared_ada_lin(cond), None, caches, no_grad_iters=n,
                                     layers=None if layers is None else layers[si])
            assert calls == (n if var.use_implicit else 0)
            logits.append(var.get_logits(h_BlC, cond))
    assert torch.allclose(torch.cat(logits, dim=1), ref, atol=1e-5)
    # Every cache was filled exactly to the size the stage description gave it.
    explicit = [c for stage in caches.explicit.values() for c in stage]
    assert explicit and all(c.len == c.max_len for c in explicit)
    assert (caches.implicit is not None) == var.use_implicit


def test_trunk_stages_describe_the_modules():
    viar = make_var(depth=6, use_implicit=True, pre_depth=2, post_depth=1)
    assert viar.stages == (BlockStage('pre_blocks', 2, 0), ImplicitStage(3), BlockStage('post_blocks', 1, 5))
    assert [len(viar.pre_blocks), len(viar.post_blocks)] == [2, 1] and not hasattr(viar, 'blocks')
    assert viar.trunk_blocks == [*viar.pre_blocks, viar.implicit_block, *viar.post_blocks]
    # Drop-path rates follow the nominal layer each block stands for.
    rates = [getattr(b.drop_path, 'drop_prob', 0.0) for b in viar.trunk_blocks]
    nominal = torch.linspace(0, viar.config.drop_path_rate, 6).tolist()
    assert rates == pytest.approx([nominal[0], nominal[1], nominal[3], nominal[5]])
    var = make_var(depth=3)
    assert var.stages == (BlockStage('blocks', 3, 0),) and var.trunk_blocks == list(var.blocks)


def test_viar_zero_vs_n_iterations():
    var = make_var(use_implicit=True, pre_depth=1, post_depth=1).eval()
    label, x = _inputs(var)
    with torch.no_grad():
        zero = var(label, x, sjfb_iters=(0, 0))
        # Zero iterations = the implicit layer is skipped: post-blocks act on the pre-blocks' output directly.
        trunk = build_var(var.config.replace(use_implicit=False, depth=2))
        trunk.load_state_dict({k.replace('pre_blocks.0', 'blocks.0').replace('post_blocks.0', 'blocks.1'): v
                               for k, v in var.state_dict().items() if 'implicit' not in k})
        assert torch.allclose(zero, trunk.eval()(label, x), atol=1e-5)
        three = var(label, x, sjfb_iters=(0, 3))
        split = var(label, x, sjfb_iters=(2, 1))  # same map, same count: the split does not matter forward
        assert not torch.allclose(zero, three, atol=1e-3)
        assert torch.allclose(three, split, atol=1e-5)


def _saved_bytes(var, label, x, iters):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        var(label, x, sjfb_iters=iters).sum()
    return total


def test_sjfb_no_graph_for_no_grad_iterations():
    var = make_var(use_implicit=True, pre_depth=1, post_depth=1).train()
    label, x = _inputs(var)
    one = _saved_bytes(var, label, x, (0, 1))
    assert _saved_bytes(var, label, x, (5, 1)) == one
    assert _saved_bytes(var, label, x, (10, 1)) == one
    assert _saved_bytes(var, label, x, (0, 2)) > one


def test_sjfb_gradients_match_manual_unroll():
    var = make_var(use_implicit=True, pre_depth=1, post_depth=1).eval()
    label, x = _inputs(var)
    loss = var(label, x, sjfb_iters=(3, 2)).logsumexp(-1).mean()
    grads = torch.autograd.grad(loss, list(var.parameters()), allow_unused=True)

    # Manual: 3 detached iterations, 2 recorded, gradient into the pre-blocks only through the injection u.
    cond = var.class_emb(label)
    h = torch.cat((cond.unsqueeze(1) + var.pos_start, var.word_embed(x)), 1) + var.lvl_embed(var.lvl_1L) + var.pos_1LC
    bias = var.attn_bias_for_masking
    u = var.pre_blocks[0](h, cond, bias)
    f = implicit_map(var.implicit_block_projection, var.implicit_block, u, cond, bias)
    z = u.detach()
    with torch.no_grad():
        for it in range(3):
            z = f(z, it)
    for it in range(3, 5):
        z = f(z, it)
    manual = var.get_logits(var.post_blocks[0](z, cond, bias), cond).logsumexp(-1).mean()
    ref = torch.autograd.grad(manual, list(var.parameters()), allow_unused=True)
    for (name, _), a, b in zip(var.named_parameters(), grads, ref):
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.allclose(a, b, atol=1e-6), name
    named = dict(zip([n for n, _ in var.named_parameters()], grads))
    for name in ('pre_blocks.0.attn.mat_qkv.weight', 'implicit_block.ffn.fc1.weight',
                 'implicit_block_projection.0.weight', 'post_blocks.0.ffn.fc2.weight'):
        assert named[name] is not None and named[name].abs().sum() > 0, name


def test_model_holds_no_random_or_last_call_state():
    # The S-JFB counts are an argument: same inputs and counts, same outputs, and a forward changes no state.
    var = make_var(use_implicit=True, pre_depth=1, post_depth=1, cond_drop_rate=0.0, drop_path_rate=0.0).train()
    label, x = _inputs(var)
    state = {k: v.clone() for k, v in var.state_dict().items()}
    attrs = dict(vars(var))
    torch.manual_seed(0)
    a = var(label, x, sjfb_iters=(2, 1))
    torch.manual_seed(1)  # the global RNG does not matter without dropout
    b = var(label, x, sjfb_iters=(2, 1))
    assert torch.equal(a, b)
    assert not torch.allclose(a, var(label, x, sjfb_iters=(0, 1)), atol=1e-4)
    assert vars(var).keys() == attrs.keys() and all(vars(var)[k] is v for k, v in attrs.items())
    assert all(torch.equal(v, state[k]) for k, v in var.state_dict().items())
    for name in ('iter_rng', 'seed_implicit_iters', 'draw_implicit_iters', 'last_implicit_iters'):
        assert not hasattr(var, name), name
    # Without counts the forward is the deterministic validation forward, in either mode.
    with torch.no_grad():
        ref = var(label, x, sjfb_iters=(0, var.config.eval_iters))
        assert torch.equal(var(label, x), ref) and torch.equal(var.eval()(label, x), ref)


def test_sjfb_function_edge_cases():
    f = lambda z, it: 0.5 * z + 1  # noqa: E731  contraction with fixed point 2
    z0 = torch.zeros(3, requires_grad=True)
    assert sjfb(f, z0, 0, 0) is z0
    assert torch.allclose(sjfb(f, z0, 40, 1), torch.full((3,), 2.0))
    with pytest.raises(ValueError):
        sjfb(f, z0, -1, 1)
    trace = []
    FixedPointIteration().solve(f, torch.zeros(3) + 1, 50, tol=1e-3, trace=trace)
    assert len(trace) < 50 and trace[-1]['residual'] < 1e-3  # adaptive stop
    assert all(a['residual'] > b['residual'] for a, b in zip(trace, trace[1:]))


def test_class_dropout_only_in_training():
    var = make_var(cond_drop_rate=1.0)
    label, x = _inputs(var)
    null = torch.full_like(label, var.num_classes)
    var.eval()
    with torch.no_grad():
        assert not torch.allclose(var(label, x), var(null, x))
        var.train()
        torch.manual_seed(0)
        assert torch.allclose(var(label, x), var(null, x), atol=1e-6)  # every label dropped


def test_bf16_autocast_forward_runs():
    var = make_var(use_implicit=True, pre_depth=1, post_depth=1).eval()
    label, x = _inputs(var)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        logits = var(label, x, sjfb_iters=(0, 2))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    with torch.no_grad():
        ref = var(label, x, sjfb_iters=(0, 2))
    assert (logits - ref).abs().max() < 0.1


def test_non_constant_schedules_and_trace():
    var = make_var(use_implicit=True, pre_depth=1, post_depth=1).eval()
    var.attach_vae(make_vae(patch_nums=var.patch_nums).freeze())
    trace = {}
    for sched in (ListSchedule((4, 3, 0, 1)), ListSchedule((0, 1, 2, 5))):
        trace.clear()
        img = var.autoregressive_infer_cfg(B=2, label_B=1, cfg=1.5, top_k=3, g_seed=0, schedule=sched, trace=trace)
        assert torch.isfinite(img).all()
        assert [len(trace[si]) for si in range(4)] == list(sched.iters)
    a = var.autoregressive_infer_cfg(B=2, label_B=None, g_seed=7, top_k=5, top_p=0.9)
    b = var.autoregressive_infer_cfg(B=2, label_B=None, g_seed=7, top_k=5, top_p=0.9)
    assert torch.equal(a, b)  # same seed, same images
    smooth = var.autoregressive_infer_cfg(B=2, label_B=2, g_seed=7, top_k=5, more_smooth=True)
    assert smooth.shape == a.shape


def test_meta_forward_counts_without_memory():
    var = build_var(VARConfig(depth=2, use_implicit=True, pre_depth=1, post_depth=1), 'meta')
    label = torch.zeros(2, dtype=torch.long, device='meta')
    x = torch.zeros(2, var.L - 1, var.Cvae, device='meta')
    out = var(label, x, sjfb_iters=(1, 1))
    assert out.is_meta and out.shape == (2, var.L, var.V)


def test_config_fields_saved_under_older_names_still_load():
    old = make_var(use_implicit=True, pre_depth=1, post_depth=1).config.to_dict()
    for new_name, old_name, value in (('no_grad_iters_range', 'implicit_no_grad_iters', [1, 2]),
                                      ('grad_iters_range', 'implicit_grad_iters', [2, 4]),
                                      ('eval_iters', 'implicit_eval_iters', 7)):
        del old[new_name]
        old[old_name] = value
    cfg = VARConfig.from_dict(old)
    assert (cfg.no_grad_iters_range, cfg.grad_iters_range, cfg.eval_iters) == ((1, 2), (2, 4), 7)
    assert VARConfig.current_names(old) == cfg.to_dict()


def test_config_recovered_for_all_variants():
    for kw in VARIANTS:
        var = make_var(**kw)
        heads = {} if var.config.attn_l2_norm else {'num_heads': var.num_heads}  # not stored in the weights
        cfg = VARConfig.from_state_dict(var.state_dict(), **heads)
        for field, value in var.config.to_dict().items():
            if field in ('embed_dim', 'num_heads', 'patch_nums', 'use_implicit', 'shared_aln', 'attn_l2_norm',
                         'num_classes', 'vocab_size', 'Cvae') or (var.use_implicit and field.endswith('_depth')):
                assert cfg.to_dict()[field] == value, (kw, field)
        build_var(cfg).load_state_dict(var.state_dict(), strict=True)


def test_attention_training_path_matches_explicit_softmax():
    """models.blocks.attention takes the explicit path when differentiated on a CPU: outputs and gradients equal a
    hand-written masked softmax(q k^T) v, with and without gradients, for a block-causal mask with -inf entries."""
    from models.blocks import attention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.zeros(7, 7, dtype=torch.float64)
    mask[:3, 3:] = float('-inf')
    scale = 0.3

    def explicit(q, k, v):
        return torch.softmax((q @ k.transpose(-1, -2)) * scale + mask, dim=-1) @ v

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, mask, 0.0, scale)
    out.square().sum().backward()
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = explicit(*ref_leaves)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, scale=scale))
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad)
    with torch.no_grad():
        torch.testing.assert_close(attention(q, k, v, mask, 0.0, scale), ref.detach())


def test_mlp_act_exact_gelu_is_a_config_choice():
    """mlp_act='gelu' puts the exact GELU in every FFN and in the fusion MLP: same weights and keys, outputs within the
    two functions' 5e-4 gap; the default and a released (bare) state dict's config keep the official tanh form."""
    tanh = make_var(use_implicit=True, pre_depth=1, post_depth=1).eval()
    exact = build_var(tanh.config.replace(mlp_act='gelu')).eval()
    exact.load_state_dict(tanh.state_dict(), strict=True)

    def approximations(var):
        return [m.approximate for m in var.modules() if isinstance(m, torch.nn.GELU)]
    assert len(approximations(exact)) == 4 and set(approximations(exact)) == {'none'}  # 3 FFNs, the fusion MLP
    assert set(approximations(tanh)) == {'tanh'}
    label, x = _inputs(tanh)
    with torch.no_grad():
        gap = (tanh(label, x) - exact(label, x)).abs().max().item()
    assert 0 < gap < 1e-2
    assert VARConfig.from_state_dict(tanh.state_dict()).mlp_act == 'gelu_tanh'
    with pytest.raises(ValueError, match='mlp_act must be one of gelu_tanh, gelu'):
        VARConfig(mlp_act='relu')
