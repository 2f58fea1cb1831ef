"""MIRAGE beyond the generic conformance suite: the contrastive outputs (SPD vectors, codes, loss) of
the published forward, the published training step (DropPath draws, BatchNorm batch statistics and
running-stat updates, every loss term, gradients), train/eval behaviour, and sizes."""
import pytest
import torch
import torch.nn.functional as F

import vlunet  # noqa: F401
from basicsr.losses import build_loss
from basicsr.utils.registry import ARCH_REGISTRY
from vlunet.archs.mirage_arch import CARD, DropPath, per_sample_depthwise

from conftest import load_fixture

MIRAGE = ARCH_REGISTRY.get('MIRAGE')
EXTRA = ('z_s_raw', 'z_l_raw', 'z_s', 'z_l')


def _net(fx, mode='eval'):
    net = MIRAGE(**fx['config']).double()
    net.load_state_dict(fx['state_dict'], strict=True)
    return net.train(mode == 'train')


def _tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return MIRAGE(**{**CARD.tiny, **overrides}).double()


def _rand(*shape, seed=0):
    return torch.rand(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize('name', ['MIRAGE_S_A1.pt', 'MIRAGE_T_A1.pt'])
def test_contrastive_outputs_are_the_published_ones(name):
    fx = load_fixture(name)
    net = _net(fx)
    with torch.no_grad():
        out, loss = net(*fx['inputs'].values())
    torch.testing.assert_close(out, fx['output'], rtol=0, atol=1e-9)
    torch.testing.assert_close(loss, fx['extra_outputs']['loss_ctr_spd'], rtol=0, atol=1e-12)
    for key in EXTRA:  # the loss alone moves by as little as 1e-11 for wrong features: compare the codes
        torch.testing.assert_close(net.spd_features[key], fx['extra_outputs'][key], rtol=0, atol=1e-9)
    assert CARD.read_output(net, (out, loss)).aux['spd_contrastive'] is loss


def _terms(out, ctr, target):
    """The published training loss from the card's training terms (L1 + FFTLoss + NetworkLoss)."""
    output = CARD.read_output(None, (out, ctr))
    terms = {'l1': F.l1_loss(out, target)}
    for term, key in zip(CARD.training_terms, ('fft', 'ctr_spd')):
        loss = build_loss({'type': term.loss, **term.published})
        terms[key] = loss(output, target, None) if getattr(loss, 'takes_network_output', False) else loss(out, target)
    terms['total'] = terms['l1'] + terms['fft'] + terms['ctr_spd']
    return terms


def _drop_path_masks(net):
    """Record, per DropPath call, the per-sample factor it applied (output / input)."""
    masks = {}

    def hook(module, args, out):
        inp, out = args[0].flatten(1), out.flatten(1)
        where = inp.abs().argmax(1, keepdim=True)  # a nonzero input element of each sample
        masks[module.name] = (out.gather(1, where) / inp.gather(1, where)).squeeze(1)

    handles = []
    for name, module in net.named_modules():
        if isinstance(module, DropPath):
            module.name = name
            handles.append(module.register_forward_hook(hook))
    return masks, handles


def test_published_training_step():
    fx = load_fixture('MIRAGE_S_A_train.pt')
    (x, ), (target, ) = fx['inputs'].values(), fx['targets'].values()
    net = _net(fx, 'train')
    masks, handles = _drop_path_masks(net)
    torch.manual_seed(fx['forward_seed'])  # DropPath draws on the global RNG, one (B, 1, 1, 1) draw per block call
    out, ctr = net(x)
    for handle in handles:
        handle.remove()
    assert list(masks) == fx['droppath_modules']
    for name, expected in zip(fx['droppath_modules'], fx['droppath_masks']):  # 0 or 1/0.9 per sample
        torch.testing.assert_close(masks[name], expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(out, fx['output'], rtol=0, atol=1e-9)
    terms = _terms(out, ctr, target)
    for key, value in fx['loss_terms'].items():
        torch.testing.assert_close(terms[key], value, rtol=0, atol=1e-9)
    terms['total'].backward()
    state = net.state_dict()
    for key, value in fx['bn_running_after'].items():  # batch statistics moved the running ones (momentum 0.1)
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-12)
        if key.endswith('running_mean'):
            assert not torch.equal(value, fx['state_dict'][key])
    grads = {name: p.grad.square().sum() for name, p in net.named_parameters()}
    assert list(grads) == list(fx['grad_sq_norms'])
    for name, value in fx['grad_sq_norms'].items():
        torch.testing.assert_close(grads[name], torch.as_tensor(value, dtype=torch.float64), rtol=1e-8, atol=1e-15,
                                   msg=name)


@pytest.mark.parametrize('variant', ['eval', 'train_no_droppath'])
def test_published_step_without_randomness(variant):
    fx = load_fixture('MIRAGE_S_A_train.pt')
    (x, ), (target, ) = fx['inputs'].values(), fx['targets'].values()
    net = _net(fx, 'eval' if variant == 'eval' else 'train')
    for module in net.modules():
        if isinstance(module, DropPath):
            module.drop_prob = 0.0
    before = torch.get_rng_state()
    with torch.no_grad():
        out, ctr = net(x)
    assert torch.equal(torch.get_rng_state(), before)  # nothing drawn
    torch.testing.assert_close(out, fx[f'{variant}_output'], rtol=0, atol=1e-9)
    terms = _terms(out, ctr, target)
    for key, value in fx[f'{variant}_loss_terms'].items():
        torch.testing.assert_close(terms[key], value, rtol=0, atol=1e-9)


def test_drop_path_is_timm_stochastic_depth():
    drop = DropPath(0.1)
    x = _rand(5, 2, 3, 3) + 1
    torch.manual_seed(3)
    y = drop(x)
    torch.manual_seed(3)
    expected = torch.empty(5, 1, 1, 1, dtype=torch.float64).bernoulli_(0.9) / 0.9
    torch.testing.assert_close(y, x * expected, rtol=0, atol=0)
    assert torch.equal(drop.eval()(x), x)


def test_train_mode_batch_statistics_and_eval_independence():
    net = _tiny()
    x = _rand(3, 3, 16, 24)
    with torch.no_grad():
        alone = net.eval()(x[:1])[0]
        together = net(x)[0][:1]
        torch.testing.assert_close(together, alone, rtol=0, atol=1e-12)  # eval: per-sample images
        stats = {k: v.clone() for k, v in net.state_dict().items() if 'running' in k}
        for m in net.modules():
            if isinstance(m, DropPath):
                m.drop_prob = 0.0
        net.train()
        assert (net(x)[0][:1] - net(x[:1])[0]).abs().max() > 1e-6  # train: BatchNorm statistics of the batch
    after = {k: v for k, v in net.state_dict().items() if 'running' in k}
    assert all(not torch.equal(after[k], stats[k]) for k in stats)  # running stats updated in training only
    tracked = [v for k, v in net.state_dict().items() if k.endswith('num_batches_tracked')]
    assert tracked and all(int(v) == 2 for v in tracked)


def test_drop_path_draws_make_training_random():
    net = _tiny().train()
    x = _rand(4, 3, 16, 16)
    outs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        with torch.no_grad():
            outs.append(net(x)[0])
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_loss_is_zero_for_one_image_and_couples_the_batch():
    net = _tiny().eval()
    with torch.no_grad():
        assert net(_rand(1, 3, 16, 24))[1].item() == 0.0  # cross-entropy of a single logit
        x = _rand(3, 3, 16, 24)
        loss = net(x)[1]
        z_s, z_l = net.spd_features['z_s'], net.spd_features['z_l']
    assert loss > 0 and not z_s.requires_grad
    # 0.01 x InfoNCE of shallow rows against latent columns at temperature 0.1
    expected = 0.01 * F.cross_entropy(z_s @ z_l.t() / 0.1, torch.arange(3))
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-14)


def test_any_size_pads_and_the_loss_sees_the_padded_features():
    net = _tiny().eval()
    x = _rand(2, 3, 13, 21)
    padded = F.pad(x, (0, 3, 0, 3), mode='reflect')  # bottom/right reflect padding to 16 x 24
    with torch.no_grad():
        out, loss = net(x)
        out_padded, loss_padded = net(padded)
    assert out.shape == x.shape and out.is_contiguous()
    torch.testing.assert_close(out, out_padded[..., :13, :21], rtol=0, atol=1e-12)
    torch.testing.assert_close(loss, loss_padded, rtol=0, atol=1e-14)
    with torch.no_grad():  # a latent grid of one pixel: N - 1 = 0 in the covariance, NaN loss as published
        tiny_out, tiny_loss = net(_rand(2, 3, 8, 7))
    assert torch.isfinite(tiny_out).all() and torch.isnan(tiny_loss)


def test_spd_head_runs_in_float32_under_autocast():
    net = _tiny().float().train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out, loss = net(_rand(2, 3, 16, 16).float())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert net.spd_features['z_s'].dtype == torch.float32
    (out.float().mean() + loss).backward()


def test_invalid_configurations_are_refused():
    with pytest.raises(ValueError, match='heads must divide the attention third'):
        MIRAGE(dim=30, heads=[3, 2, 4, 8])  # 3 heads do not divide the 10-channel third at level 1
    with pytest.raises(ValueError, match='of a 16-channel block'):
        MIRAGE(dim=8, heads=[2, 1, 1, 1])  # 2 heads divide the level-1 third (2) but not the 2dim one (5)
    with pytest.raises(ValueError, match='out_channels'):
        MIRAGE(out_channels=1)


def test_per_sample_depthwise_paths_agree():
    x = _rand(3, 4, 9, 11).contiguous(memory_format=torch.channels_last)
    kernels = _rand(3, 4, 1, 7, 7, seed=1) - 0.5
    loop = per_sample_depthwise(x, kernels, per_sample=True)
    grouped = per_sample_depthwise(x, kernels, per_sample=False)  # the published grouped convolution (GPU path)
    torch.testing.assert_close(loop, grouped, rtol=0, atol=1e-13)
    for j in range(3):  # sample j with its own kernels only
        torch.testing.assert_close(loop[j:j + 1], F.conv2d(x[j:j + 1], kernels[j], padding=3, groups=4), rtol=0,
                                   atol=1e-13)


def test_gelu_gate_keeps_two_maps_and_has_autograd_s_gradients():
    from vlunet.archs.mirage_arch import GeluGate
    a, b = (torch.randn(2, 5, 6, 7, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(GeluGate.apply, (a, b))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = GeluGate.apply(a, b)
    assert len(saved) == 2 and all(s is a or s is b for s in saved)
    ga, gb = torch.autograd.grad(out.sum(), (a, b))
    ra, rb = torch.autograd.grad((torch.nn.functional.gelu(a) * b).sum(), (a, b))
    assert torch.equal(ga, ra) and torch.equal(gb, rb)
