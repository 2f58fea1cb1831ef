"""MoCEIR beyond the conformance suite: the published routing records (noise, logits, experts, gates)
of the fixtures, its balance loss, the corrected routing options, other rank schedules recognised."""
import inspect

import pytest
import torch

import vlunet  # noqa: F401
from basicsr.utils.registry import ARCH_REGISTRY
from vlunet.archs.moceir_arch import FFTAttention
from vlunet.archs.card import guess_arch

from conftest import load_fixture

MoCEIR = ARCH_REGISTRY.get('MoCEIR')
ALL_FIXTURES = ['MoCEIR_S_reduced.pt', 'MoCEIR_reduced.pt']
BATCH_FIXTURE = 'MoCEIR_reduced.pt'  # x (2, 3, 16, 24): the published batch-wide eval routing


def _net(fx, **options):
    net = MoCEIR(**fx['config'], **options).double().eval()
    net.load_state_dict(fx['state_dict'], strict=True)
    return net


def _forward(net, x, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        return net(x)


@pytest.mark.parametrize('name', ALL_FIXTURES)
def test_published_fixture_float64(name):
    fx = load_fixture(name)
    net = _net(fx)
    out = _forward(net, fx['inputs']['x'], fx['forward_seed'])
    torch.testing.assert_close(out, fx['output'], rtol=0, atol=1e-9)
    torch.testing.assert_close(torch.as_tensor(net.total_loss, dtype=torch.float64), fx['extra_outputs']['total_loss'],
                               rtol=0, atol=0)
    for key, record in fx['routing'].items():  # per decoder block, in execution order
        mine = net.get_submodule(key).last_routing
        torch.testing.assert_close(mine['randn'], record['randn'], rtol=0, atol=0)  # same draws from the global RNG
        torch.testing.assert_close(mine['logits'], record['logits'], rtol=0, atol=1e-12)
        assert torch.equal(mine['top_k_indices'], record['top_k_indices'])
        torch.testing.assert_close(mine['top_k_values'], record['top_k_values'], rtol=0, atol=1e-12)


def test_constructor_names_and_defaults_are_the_published_ones():
    published = dict(inp_channels=3, out_channels=3, dim=32, levels=4, heads=[1, 1, 1, 1], num_blocks=[1, 1, 1, 3],
                     num_dec_blocks=[1, 1, 1], ffn_expansion_factor=2, num_refinement_blocks=1,
                     LayerNorm_type='WithBias', bias=False, rank=2, num_experts=4, depth_type='lin',
                     stage_depth=[3, 2, 1], rank_type='constant', topk=1, expert_layer=FFTAttention,
                     with_complexity=False, complexity_scale='max')
    params = inspect.signature(MoCEIR).parameters
    assert list(params)[:len(published)] == list(published)
    defaults = {k: list(v.default) if isinstance(v.default, tuple) else v.default for k, v in params.items()}
    assert {k: defaults[k] for k in published} == published
    # the corrections are opt-in: the defaults reproduce the published routing
    assert defaults['eval_routing_noise'] is True and defaults['per_sample_eval_routing'] is False
    with torch.device('meta'):
        by_name = MoCEIR(expert_layer='FFTAttention').state_dict()
        by_class = MoCEIR().state_dict()
    assert [(k, v.shape) for k, v in by_name.items()] == [(k, v.shape) for k, v in by_class.items()]


def test_training_balance_loss_is_differentiable_and_unselected_experts_get_no_gradient():
    fx = load_fixture('MoCEIR_S_reduced.pt')
    net = _net(fx).train()
    x = torch.rand(3, 3, 16, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    out = net(x)
    loss = net.total_loss
    assert torch.is_tensor(loss) and loss.requires_grad and torch.isfinite(loss) and loss > 0
    (torch.nn.functional.l1_loss(out, x) + 0.01 * loss).backward()  # the published training objective
    for name, mixture in net.named_modules():
        if not name.endswith('.adapter'):
            continue
        assert torch.isfinite(mixture.routing.gate[2].weight.grad).all()
        chosen = set(mixture.routing.last_routing['top_k_indices'].flatten().tolist())
        for i in range(mixture.num_experts):
            grads = [p.grad for p in mixture.expert(i).parameters()]
            assert all(g is not None for g in grads) if i in chosen else all(g is None for g in grads)
    net.eval()
    _forward(net, x, 0)
    assert net.total_loss == 0


@pytest.mark.parametrize('options', [{}, dict(bias=True, LayerNorm_type='BiasFree', topk=2)])
def test_training_grads_match_plain_autograd(options):
    """The fused shared blocks (and the cross-attention on them) against the plain formulation."""
    import vlunet.archs.blocks as blocks
    torch.manual_seed(0)
    net = MoCEIR(dim=8, heads=[1, 2, 4, 8], num_blocks=[1, 1, 1, 1], num_dec_blocks=[1, 1, 1], rank_type='spread',
                 **options).double().train()
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)

    def run():
        torch.manual_seed(1)
        out = net(x)
        loss = torch.nn.functional.l1_loss(out, x) + net.total_loss
        return out, torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)

    out, grads = run()
    fused, blocks.use_fused = blocks.use_fused, lambda t: False
    try:
        ref, ref_grads = run()
    finally:
        blocks.use_fused = fused
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for (name, _), a, b in zip(net.named_parameters(), grads, ref_grads):
        assert (a is None) == (b is None), name
        if b is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)


def test_any_size_is_padded_and_cropped():
    net = _net(load_fixture('MoCEIR_S_reduced.pt'))
    x = torch.rand(1, 3, 21, 35, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = _forward(net, x, 7)
    assert out.shape == x.shape and out.is_contiguous()
    padded = torch.nn.functional.pad(x, (0, 5, 0, 3), mode='reflect')
    torch.testing.assert_close(out, _forward(net, padded, 7)[..., :21, :35], rtol=0, atol=0)


def test_eval_batch_routing_published_and_per_sample():
    fx = load_fixture(BATCH_FIXTURE)
    x = fx['inputs']['x']
    # published (default): experts chosen by any sample run on the whole batch -- the fixture records it
    published = _forward(_net(fx), x, fx['forward_seed'])
    torch.testing.assert_close(published, fx['output'], rtol=0, atol=1e-9)

    # per-sample routing with the same noise: what the training-mode routing computes
    per_sample = _net(fx, per_sample_eval_routing=True)
    routed = _forward(per_sample, x, fx['forward_seed'])
    assert (routed - published).abs().max() > 1e-8  # (the fixture's experts are weak: ~1e-7 at the output)
    torch.testing.assert_close(routed, _forward(per_sample.train(), x, fx['forward_seed']), rtol=0, atol=1e-12)

    # fully corrected: no noise in eval, so deterministic, no RNG drawn, each sample on its own
    corrected = _net(fx, per_sample_eval_routing=True, eval_routing_noise=False)
    state = torch.get_rng_state()
    first = _forward(corrected, x)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(_forward(corrected, x), first, rtol=0, atol=0)
    alone = torch.cat([_forward(corrected, x[i:i + 1]) for i in range(x.shape[0])])
    torch.testing.assert_close(first, alone, rtol=0, atol=1e-12)
    assert (first - published).abs().max() > 1e-8


def test_published_eval_routing_with_topk_2():
    fx = load_fixture('MoCEIR_S_reduced.pt')
    config = dict(fx['config'], topk=2)
    net = MoCEIR(**config).double().eval()
    net.load_state_dict(fx['state_dict'])
    x = torch.rand(2, 3, 8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    single = _forward(net, x[:1], 0)  # batch 1: the sum of the two selected experts, weighted
    assert torch.isfinite(single).all()
    with pytest.raises(ValueError, match='per_sample_eval_routing'):  # the published code fails here too
        _forward(net, x, 0)
    net = MoCEIR(**config, per_sample_eval_routing=True).double().eval()
    net.load_state_dict(fx['state_dict'])
    torch.testing.assert_close(_forward(net, x[:1], 0), single, rtol=0, atol=1e-12)
    assert _forward(net, x, 0).shape == x.shape


def test_other_rank_schedules_are_guessed():
    config = dict(dim=8, heads=[1, 2, 2, 4], num_blocks=[1, 1, 1, 1], num_dec_blocks=[1, 1, 1], rank=3,
                  rank_type='lin', LayerNorm_type='BiasFree', bias=True, ffn_expansion_factor=2.66,
                  complexity_scale='min', num_experts=3)
    with torch.device('meta'):
        meta = MoCEIR(**config).state_dict()
    arch, kwargs = guess_arch(meta)
    assert arch == 'MoCEIR' and {k: kwargs[k] for k in config if k != 'complexity_scale'} == \
        {k: v for k, v in config.items() if k != 'complexity_scale'}
    assert guess_arch(MoCEIR(**config).state_dict())[1]['complexity_scale'] == 'min'
