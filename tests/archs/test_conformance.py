"""The conformance suite: every registered method, read from its card.

For every method card (vlunet/archs/card.py) and every parity fixture in tests/fixtures: the
published outputs in float64 at 1e-9, the published full-size key listings and parameter counts,
any input size, recognition of its checkpoints, conversion of each published layout, and one
training step through VLUNetModel with the method's own training terms. A new method (its arch file
with its card, its fixture and listing) is tested here without new test code.
"""
import functools
import glob
import os

import pytest
import torch
import torch.nn.functional as F

import vlunet  # noqa: F401
from basicsr.models import build_model
from vlunet.archs.card import example_inputs, get_card, identify, list_methods, list_variants, state_dict_of
from vlunet.archs.conditioning import TEXT_EMBEDDING
from vlunet.convert import convert

from conftest import FIXTURES, load_fixture, read_listing, state_dict_listing

CARDS = list_methods()
LISTED = [(card, v) for card, v in list_variants() if v.listing]
FORMATS = [(card, fmt) for card in CARDS for fmt in card.checkpoint_formats if fmt.layout is not None]


def _ids(pairs):
    return [f'{card.arch}-{getattr(x, "name", None) or i}' for i, (card, x) in enumerate(pairs)]


@functools.lru_cache(maxsize=None)
def _fixture(name):
    return load_fixture(name)


def _card_of_fixture(fx):
    try:
        return get_card(fx['arch'])
    except KeyError:
        return None  # a network that is not a method (e.g. a training-only auxiliary network)


def _parity_fixtures():
    names = []
    for path in sorted(glob.glob(os.path.join(FIXTURES, '*.pt'))):
        fx = _fixture(os.path.basename(path))
        # training-step fixtures ('targets') are checked by the method's own tests
        if isinstance(fx, dict) and 'state_dict' in fx and 'targets' not in fx and _card_of_fixture(fx) is not None:
            names.append(os.path.basename(path))
    return names


def _tiny(card, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    net = card.arch_class(**card.tiny).to(dtype).eval()
    with torch.no_grad():  # constants at init (norm weights, temperatures...) made non-trivial
        for p in net.parameters():
            p.add_(torch.rand_like(p) * 0.1 - 0.05)
    return net


def _run(card, net, *inputs, seed=1):
    torch.manual_seed(seed)  # random routing (MoCE-IR): the same draws for every forward compared
    return card.read_output(net, net(*inputs))


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name', _parity_fixtures())
def test_published_fixture_float64(name):
    fx = _fixture(name)
    card = _card_of_fixture(fx)
    net = card.arch_class(**fx['config']).double().eval()
    net.load_state_dict(fx['state_dict'], strict=True)
    assert list(net.state_dict()) == list(fx['state_dict']), 'key order differs from the published one'
    if 'forward_seed' in fx:
        torch.manual_seed(fx['forward_seed'])
    with torch.no_grad():
        raw = net(*fx['inputs'].values())
    expected = fx['output']
    if isinstance(expected, (list, tuple)):  # every published output, in the published order
        assert len(raw) == len(expected)
        for got, want in zip(raw, expected):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
        return
    output = card.read_output(net, raw)
    torch.testing.assert_close(output.image, expected, rtol=0, atol=1e-9)
    for key, want in (fx.get('extra_outputs') or {}).items():  # those the card names alike
        if key in output.aux:
            torch.testing.assert_close(output.aux[key].to(want.dtype), want, rtol=0, atol=1e-9)


@pytest.mark.parametrize('card,variant', LISTED, ids=_ids(LISTED))
def test_full_size_keys_shapes_order_and_count(card, variant):
    with torch.device('meta'):
        net = card.arch_class(**variant.kwargs)
    assert state_dict_listing(net) == read_listing(variant.listing)
    if variant.params is not None:
        assert sum(p.numel() for p in net.parameters()) == variant.params


@pytest.mark.parametrize('card,variant', LISTED, ids=_ids(LISTED))
def test_full_size_listing_is_recognised(card, variant):
    with torch.device('meta'):
        params = card.arch_class(**variant.kwargs).state_dict()
    found = identify(params)
    assert found is not None and found.card is card and found.exact


@pytest.mark.parametrize('card', CARDS, ids=[c.arch for c in CARDS])
def test_card_is_complete(card):
    assert card.name and card.paper and card.code and card.variants and card.tiny and card.signature
    assert card.kwargs_from_state_dict is not None and card.checkpoint_formats
    for results in card.results:
        card.variant(results.variant)  # names a variant of the card
        assert (results.tasks or results.average) and results.source
    for term in card.training_terms:
        assert term.key.endswith('_opt')


@pytest.mark.parametrize('card', CARDS, ids=[c.arch for c in CARDS])
def test_any_input_size_and_recognition_of_the_tiny_network(card):
    net = _tiny(card)
    g = torch.Generator().manual_seed(3)
    x, *extra = example_inputs(card, 2, 21, 35, dtype=torch.float64, generator=g)
    with torch.no_grad():
        out = _run(card, net, x, *extra).image
        padded = F.pad(x, (0, 5, 0, 3), mode='reflect')  # what the network does inside: reflect to 24 x 40
        reference = _run(card, net, padded, *extra).image[..., :21, :35]
    assert out.shape == x.shape and out.is_contiguous()
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-12)
    found = identify(net.state_dict())
    assert found.card is card and found.exact
    rebuilt = card.arch_class(**found.kwargs).double().eval()
    rebuilt.load_state_dict(net.state_dict(), strict=True)


@pytest.mark.parametrize('card,fmt', FORMATS, ids=[f'{c.arch}-{i}' for i, (c, _) in enumerate(FORMATS)])
def test_published_layout_converts_and_reproduces_the_outputs(tmp_path, card, fmt):
    net = _tiny(card, dtype=torch.float32)
    src, dst = tmp_path / 'published.ckpt', tmp_path / 'converted.pth'
    torch.save(fmt.layout(net), src)
    arch, kwargs = convert(str(src), str(dst), log=lambda *_: None)  # pickled modules too: read without their code
    assert arch == card.arch
    params = torch.load(dst, weights_only=True)['params']
    again = card.arch_class(**{**card.tiny, **kwargs}).eval()  # what the weights cannot tell (DGUNet's depth)
    again.load_state_dict(params, strict=True)
    inputs = example_inputs(card, 1, 16, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(_run(card, again, *inputs).image, _run(card, net, *inputs).image, rtol=0, atol=0)
    assert all(torch.equal(v, state_dict_of(net)[k]) for k, v in params.items())


def _training_options(card, tmp_path):
    train = {'ema_decay': 0, 'optim_g': {'type': 'AdamW', 'lr': 1e-3}, 'total_iter': 10,
             'scheduler': {'type': 'LinearWarmupCosineLR', 'warmup_iter': 0},
             'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0}}
    for term in card.training_terms:  # the method's own terms, with the published options
        train[term.key] = {'type': term.loss, **dict(term.published)}
    opt = {'name': 'step', 'model_type': 'VLUNetModel', 'num_gpu': 0, 'dist': False, 'is_train': True, 'rank': 0,
           'world_size': 1, 'network_g': card.tiny_opt(), 'train': train, 'val': {},
           'path': {'pretrain_network_g': None, 'strict_load_g': True, 'results_root': str(tmp_path)}}
    if card.condition == TEXT_EMBEDDING:  # text codes of the tiny CLIP config (no weights to download)
        opt['text_embedding'] = {'clip_model': 'vlunet-tiny', 'pretrained': None, 'mode': 'oracle',
                                 'prompts': ['image with noise', 'image with rain']}
    return opt


@pytest.mark.parametrize('card', CARDS, ids=[c.arch for c in CARDS])
def test_one_training_step_with_the_methods_own_terms(card, tmp_path):
    torch.manual_seed(0)
    model = build_model(_training_options(card, tmp_path))
    before = {k: v.clone() for k, v in model.net_g.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    model.feed_data({'lq': torch.rand(2, 3, 32, 32, generator=g), 'gt': torch.rand(2, 3, 32, 32, generator=g),
                     'label': torch.tensor([0, 1])})
    model.optimize_parameters(1)
    log = model.get_current_log()
    expected = {'l_pix'} | {f'l_{term.key[:-len("_opt")]}' for term in card.training_terms}
    assert expected <= set(log), log
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in log.values())
    assert model.output.shape == (2, 3, 32, 32)
    assert any(not torch.equal(before[k], v) for k, v in model.net_g.state_dict().items())


def test_every_name_of_every_card_resolves_to_it():
    from vlunet.archs.card import find_variant
    for card, variant in list_variants():
        for name in filter(None, (variant.name, variant.options)):
            found, v = find_variant(name)
            assert found is card, (name, found.name)
            assert v.name == variant.name or v.options == variant.options
        assert get_card(card.name) is card and get_card(card.arch) is card


def _terms_with_networks(card):
    from basicsr.utils.registry import LOSS_REGISTRY
    return [t for t in card.training_terms if callable(getattr(LOSS_REGISTRY.get(t.loss), 'after_network_step', None))]


OWN_NETWORKS = [card for card in CARDS if _terms_with_networks(card)]


def _tensors(state, prefix=''):
    """The floating-point tensors of a nested state (dicts and lists), by path."""
    if isinstance(state, torch.Tensor):
        return {prefix: state} if state.is_floating_point() else {}
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    found = {}
    for key, value in items:
        found.update(_tensors(value, f'{prefix}/{key}'))
    return found


@pytest.mark.parametrize('card', OWN_NETWORKS, ids=[c.arch for c in OWN_NETWORKS])
def test_terms_with_networks_of_their_own_are_updated_saved_and_resumed(card, tmp_path):
    import copy
    torch.manual_seed(0)
    model = build_model(_training_options(card, tmp_path))
    g = torch.Generator().manual_seed(1)
    batch = {'lq': torch.rand(2, 3, 32, 32, generator=g), 'gt': torch.rand(2, 3, 32, 32, generator=g),
             'label': torch.tensor([0, 1])}
    model.feed_data(batch)
    model.optimize_parameters(1)
    names = [t.key[:-len('_opt')] for t in _terms_with_networks(card)]
    assert set(model.training_state_extras()['loss_terms']) == set(names)
    before = {n: _tensors(copy.deepcopy(model.loss_terms[n].state_dict())) for n in names}
    model.feed_data(batch)
    model.optimize_parameters(2)
    for n in names:  # the term's own networks moved in the second step
        after = _tensors(model.loss_terms[n].state_dict())
        assert before[n] and any(not torch.equal(v, after[k]) for k, v in before[n].items()), n
    again = build_model(_training_options(card, tmp_path))
    again.resume_training({'optimizers': [o.state_dict() for o in model.optimizers],
                           'schedulers': [s.state_dict() for s in model.schedulers],
                           **model.training_state_extras()})
    for n in names:
        want, got = _tensors(model.loss_terms[n].state_dict()), _tensors(again.loss_terms[n].state_dict())
        assert want.keys() == got.keys() and all(torch.equal(v, got[k]) for k, v in want.items()), n
