"""BaryIRLoss against one published training step (BaryIR_A_train.pt: trainer_bary.py = 'nonddp',
trainer_bary_ddp.py = 'ddp', 3- and 5-task labels): every loss term, the network update's gradients,
both potentials updates; its options in the BaryIR option files; and the reader of the published
checkpoints' pickled modules."""
import os
import pickle
import sys
import types

import pytest
import torch
from torch import nn

import vlunet  # noqa: F401
from basicsr.losses import build_loss
from basicsr.utils.options import ordered_yaml
from basicsr.utils.registry import ARCH_REGISTRY
from vlunet.archs.card import NetworkOutput, get_card
from vlunet.losses.baryir_loss import BaryIRLoss
from vlunet.utils.pickled_modules import PickledModuleError, PickledObject, load_pickled_modules, read_pickled

from conftest import REPO, load_fixture

CARD = get_card('BaryIR')
VARIANTS = {'nonddp': dict(ortho_contrast_weight=0.05, contrast_eps=0.0, potential_steps=2),
            'ddp': dict(ortho_contrast_weight=0.02, contrast_eps=1e-6, potential_steps=1)}
STATS = ('sum', 'abs_sum', 'sq_sum')


@pytest.fixture(scope='module')
def fx():
    return load_fixture('BaryIR_A_train.pt')


def _loss(fx, case, variant, lr=1e-4, **kw):
    c = fx['cases'][case]
    loss = BaryIRLoss(potentials={'type': 'BaryIRPotentials', **c['pots_config']}, optim={'type': 'RMSprop', 'lr': lr},
                      source_counts=c['domain_sample_counts'], **VARIANTS[variant], **kw).double()
    loss.potentials.load_state_dict({k: fx['pots_state_dict'][k] for k in c['pots_keys_used']}, strict=True)
    return loss


def _stored_output(fx):
    image, s, b, r = fx['output']
    return NetworkOutput(image, [image], {'source_latent': s, 'barycenter_latent': b, 'residual': r})


def _stats(t):
    return [float(t.sum()), float(t.abs().sum()), float(t.square().sum())]


def _assert_stats(tensor, want, rtol=1e-9, atol=1e-10, what=''):
    torch.testing.assert_close(torch.tensor(_stats(tensor)), torch.tensor([want[k] for k in STATS]), rtol=rtol,
                               atol=atol, msg=lambda m: f'{what}: {m}')


# ------------------------------------------------------------------------------------------------
# the network update's terms, from the stored outputs
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('variant', sorted(VARIANTS))
@pytest.mark.parametrize('case', ['5task', '3task'])
def test_every_restoration_term(fx, case, variant):
    c, ref = fx['cases'][case], fx['cases'][case][variant]['restoration']
    loss = _loss(fx, case, variant)
    torch.testing.assert_close(loss.lambdas, torch.tensor(c['Lambda'], dtype=torch.float64), rtol=0, atol=0)
    assert (ref['ortho_contra_weight'], ref['contra_eps']) == (loss.ortho_contrast_weight, loss.contrast_eps)
    out = _stored_output(fx)
    terms = loss.terms(out, c['de_id'])
    for name, key in (('mse', 'mse_loss'), ('ort', 'ort_loss'), ('contra', 'contra_loss'),
                      ('potential', 'potential_loss'), ('pos', 'pos'), ('neg', 'neg')):
        torch.testing.assert_close(terms[name], ref['per_sample'][key], rtol=1e-13, atol=1e-12, msg=name)
    torch.testing.assert_close(terms['bary_loss'], ref['bary_loss'], rtol=0, atol=1e-12)
    term = loss(out, None, c['de_id'])
    torch.testing.assert_close(term, ref['bary_term'], rtol=0, atol=1e-12)
    l1 = (out.image - fx['inputs']['target']).abs().mean()
    torch.testing.assert_close(l1, ref['l1_loss'], rtol=0, atol=1e-15)
    torch.testing.assert_close(fx['Sigma'] * l1 + term, ref['total'], rtol=0, atol=1e-9)
    # the option files' scale: L1 of weight 1 plus loss_weight 1 / Sigma is the published loss / Sigma
    scaled = _loss(fx, case, variant, loss_weight=1 / fx['Sigma'])(out, None, c['de_id'])
    torch.testing.assert_close(l1 + scaled, ref['total'] / fx['Sigma'], rtol=1e-14, atol=0)


def test_no_gradient_into_the_potentials_during_the_network_update(fx):
    loss = _loss(fx, '5task', 'nonddp')
    image, s, b, r = (t.clone().requires_grad_() for t in fx['output'])
    loss(NetworkOutput(image, [image], {'source_latent': s, 'barycenter_latent': b, 'residual': r}), None,
         fx['cases']['5task']['de_id']).backward()
    assert all(p.grad is None for p in loss.potentials.parameters())
    assert all(p.requires_grad for p in loss.potentials.parameters())  # unfrozen again afterwards
    assert b.grad.abs().sum() > 0 and s.grad.abs().sum() > 0 and r.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# the potentials update at the stored weights (learning rate 0: the gradients stay to be read)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('case', ['5task', '3task'])
def test_potentials_update_terms_and_gradients(fx, case):
    c = fx['cases'][case]
    ref = c['nonddp']['potentials_at_fixed_weights']
    out = _stored_output(fx)
    two = _loss(fx, case, 'nonddp', lr=0.0)  # value step, then constraint step: the constraint's gradients remain
    log = two.after_network_step(lambda lq: out, fx['inputs']['degraded'], None, c['de_id'])
    torch.testing.assert_close(two.last_update['values'], ref['potential_values'], rtol=0, atol=1e-15)
    torch.testing.assert_close(two.last_update['potential'], ref['potential'], rtol=0, atol=1e-16)
    torch.testing.assert_close(two.last_update['constraint'], ref['constraint'], rtol=0, atol=1e-16)
    assert log == {'l_potential': pytest.approx(float(ref['potential']), abs=1e-16),
                   'l_constraint': pytest.approx(float(ref['constraint_loss']), abs=1e-16)}
    for name, p in two.potentials.named_parameters():
        _assert_stats(p.grad, ref['grad_stats_constraint'][name], what=name)
    one = _loss(fx, case, 'ddp', lr=0.0)  # one step: value and constraint gradients accumulate
    one.after_network_step(lambda lq: out, fx['inputs']['degraded'], None, c['de_id'])
    for name, p in one.potentials.named_parameters():
        value_part = ref['grad_stats_potential'][name]  # None for the heads no sample of the batch uses
        want = (value_part['sum'] if value_part else 0.0) + ref['grad_stats_constraint'][name]['sum']
        assert float(p.grad.sum()) == pytest.approx(want, rel=1e-9, abs=1e-12), name
        if name in ref['grad_small_constraint']:
            small = ref['grad_small_potential'].get(name)
            want = ref['grad_small_constraint'][name] + (0 if small is None else small)
            torch.testing.assert_close(p.grad, want, rtol=1e-10, atol=1e-15)


# ------------------------------------------------------------------------------------------------
# the published alternating step: network update (RMSprop), then the potentials' own update(s)
# ------------------------------------------------------------------------------------------------
def test_published_alternating_step(fx):
    """One forward; gradients of L1 and of each case's barycenter term; then each case's published
    sequence from the stored weights (5-task single GPU, 3-task DDP)."""
    net = ARCH_REGISTRY.get('BaryIR')(**fx['config']).double()
    net.load_state_dict(fx['state_dict'], strict=True)
    params = dict(net.named_parameters())
    x, y = fx['inputs']['degraded'], fx['inputs']['target']
    out = CARD.read_output(net, net(x))
    for got, want in zip([out.image, *out.aux.values()], fx['output']):
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=1e-12)
    plan = (('5task', 'nonddp'), ('3task', 'ddp'))
    losses = {key: _loss(fx, *key) for key in plan}
    bary_terms = [losses[key](out, y, fx['cases'][key[0]]['de_id']) for key in plan]
    grad_l1 = torch.autograd.grad((out.image - y).abs().mean(), list(params.values()), retain_graph=True,
                                  allow_unused=True)
    all_totals = {}
    for (case, variant), term in zip(plan, bary_terms):
        ref = fx['cases'][case][variant]
        grads = torch.autograd.grad(term, list(params.values()), retain_graph=True, allow_unused=True)
        totals = all_totals[(case, variant)] = {}
        for (name, _), g, g1 in zip(params.items(), grads, grad_l1):
            want = ref['restoration']['grad_stats_bary_only'][name]  # None where the latents do not reach
            want_total = ref['restoration']['grad_stats_total'][name]
            if want_total is None:  # the six never-used convs
                assert g is None and g1 is None, name
                continue
            assert (g is None) == (want is None), name
            total = fx['Sigma'] * g1 + g if g is not None else fx['Sigma'] * g1
            if want is not None:
                _assert_stats(g, want, what=f'{case} {variant} bary-only {name}')
            _assert_stats(total, want_total, what=f'{case} {variant} total {name}')
            totals[name] = total
        for name, small in ref['restoration']['grad_small_total'].items():
            torch.testing.assert_close(totals[name], small, rtol=1e-9, atol=1e-12)
    del out, bary_terms, grad_l1
    for case, variant in plan:  # each case's published sequence, from the stored weights
        ref, totals = fx['cases'][case][variant], all_totals[(case, variant)]
        with torch.no_grad():
            net.load_state_dict(fx['state_dict'])
        optimizer = torch.optim.RMSprop(net.parameters(), lr=ref['published_sequence']['restoration_lr'])
        for name, p in params.items():
            p.grad = totals.get(name)
        optimizer.step()
        seq = ref['published_sequence']
        second = {}

        def forward(lq):
            second['output'] = CARD.read_output(net, net(lq))
            return second['output']

        loss = losses[(case, variant)]
        assert loss.optimizer.param_groups[0]['lr'] == seq['potentials_lr']
        log = loss.after_network_step(forward, x, y, fx['cases'][case]['de_id'])
        assert not second['output'].aux['barycenter_latent'].requires_grad  # run under no_grad
        _assert_stats(second['output'].aux['barycenter_latent'], seq['second_forward_bary_latent_stats'],
                      what='second forward')
        done = loss.last_update
        torch.testing.assert_close(done['values'], seq['potential_values'], rtol=0, atol=1e-10)
        if 'potential' in seq:
            torch.testing.assert_close(done['potential'], seq['potential'], rtol=0, atol=1e-10)
        torch.testing.assert_close(done['constraint'], seq['constraint'], rtol=0, atol=1e-10)
        assert log['l_constraint'] == pytest.approx(float(seq['constraint_loss']), rel=1e-9, abs=1e-10)
        for name, p in loss.potentials.named_parameters():
            _assert_stats(p.detach(), seq['pots_after_step_stats'][name], what=f'{case} {variant} pots {name}')
        for name, p in params.items():
            _assert_stats(p.detach(), seq['barynet_after_step_stats'][name], what=f'{case} {variant} net {name}')


# ------------------------------------------------------------------------------------------------
# options, state, errors
# ------------------------------------------------------------------------------------------------
# the potential each training source feeds in the published code (denoise 0, derain 1, dehaze 2, deblur 3, lowlight 4)
PUBLISHED_POTENTIAL = {'noise15': 0, 'noise25': 0, 'noise50': 0, 'rain': 1, 'haze': 2, 'blur': 3, 'lowlight': 4}
# items per epoch of one repeat of each shared training set (the option files' headers)
ITEMS = {'noise15': 5144, 'noise25': 5144, 'noise50': 5144, 'rain': 200, 'haze': 72135, 'blur': 2103, 'lowlight': 485}


@pytest.mark.parametrize('setting,k', [('NHR', 3), ('NHRBL', 5)])
def test_option_files_map_our_labels_to_the_published_potentials(setting, k):
    with open(os.path.join(REPO, 'options', 'train', f'BaryIR_{setting}.yml')) as f:
        opt = __import__('yaml').load(f, Loader=ordered_yaml()[0])
    term = opt['train'][CARD.training_terms[0].key]
    # 'auto': built at first use for the first batch's latent (8 x its side: the training patch)
    assert term['potentials']['size'] == 'auto'
    term = dict(term, potentials=dict(term['potentials'], size=opt['datasets']['train']['gt_size']))
    with torch.device('meta'):
        loss = build_loss(term)
    assert loss.num_sources == k and loss.potentials.num_potentials == k
    sources = opt['datasets']['train']['sources']
    counts = [0] * k
    for src in sources:
        assert int(loss.source_of([src['label']])) == PUBLISHED_POTENTIAL[src['name']], src['name']
        counts[PUBLISHED_POTENTIAL[src['name']]] += ITEMS[src['name']] * src.get('repeat', 1)
    assert term['source_counts'] == counts
    assert opt['network_g'] == CARD.network_opt(decoder=True, inp_channels=3, out_channels=3, dim=48,
                                                num_blocks=[4, 6, 6, 8], num_refinement_blocks=4, heads=[1, 2, 4, 8],
                                                ffn_expansion_factor=2.66, bias=False, LayerNorm_type='WithBias')


def test_state_dict_round_trip_and_lazy_size(fx):
    c = fx['cases']['3task']
    b = fx['output'][2]
    out = _stored_output(fx)
    lazy = BaryIRLoss(potentials={'type': 'BaryIRPotentials', 'num_potentials': 3, 'channels': 384},
                      scheduler={'type': 'MultiStepLR', 'milestones': [1], 'gamma': 0.1}).double()
    assert lazy.potentials is None and lazy.state_dict()['potentials'] is None
    lazy.after_network_step(lambda lq: out, None, None, c['de_id'])  # built for 3 x 3 latents: size 24
    assert lazy.potentials_opt['size'] == 24 and lazy.potentials.num_features == 384
    assert lazy.optimizer.param_groups[0]['lr'] == pytest.approx(1e-5) and lazy.steps == 1
    state = pickle.loads(pickle.dumps(lazy.state_dict()))
    again = BaryIRLoss(potentials={'type': 'BaryIRPotentials', 'num_potentials': 3, 'channels': 384},
                       scheduler={'type': 'MultiStepLR', 'milestones': [1], 'gamma': 0.1})
    again.load_state_dict(state)  # builds the potentials as saved, then loads them
    assert again.steps == 1 and again.optimizer.param_groups[0]['lr'] == pytest.approx(1e-5)
    for (n, p), q in zip(lazy.potentials.named_parameters(), again.potentials.parameters()):
        assert torch.equal(p, q), n
        assert torch.equal(lazy.optimizer.state[p]['square_avg'], again.optimizer.state[q]['square_avg']), n
    lazy.after_network_step(lambda lq: out, None, None, c['de_id'])
    again.after_network_step(lambda lq: out, None, None, c['de_id'])
    assert all(torch.equal(p, q) for p, q in zip(lazy.potentials.parameters(), again.potentials.parameters()))
    assert b is fx['output'][2]


def test_clear_errors(fx):
    loss = _loss(fx, '3task', 'nonddp')
    out = _stored_output(fx)
    with pytest.raises(ValueError, match='give potentials'):
        loss(out, None, torch.tensor([0, 5, 1, 1]))  # label 5 -> potential 3 of 3
    with pytest.raises(ValueError, match='needs the labels'):
        loss(out, None, None)
    with pytest.raises(KeyError, match='barycenter_latent'):
        loss(NetworkOutput(out.image, [out.image], {}), None, [0, 0, 0, 0])
    with pytest.raises(ValueError, match='potential_steps'):
        BaryIRLoss(potentials={'type': 'BaryIRPotentials', 'num_potentials': 3}, potential_steps=3)
    with pytest.raises(ValueError, match='source_counts'):
        BaryIRLoss(potentials={'type': 'BaryIRPotentials', 'num_potentials': 3}, source_counts=[1, 2])
    with pytest.raises(ValueError, match='not a potential index'):
        BaryIRLoss(potentials={'type': 'BaryIRPotentials', 'num_potentials': 3}, sources=[0, 3])
    mapped = BaryIRLoss(potentials={'type': 'BaryIRPotentials', 'num_potentials': 3}, sources=[0, 0, 0, 2, 1])
    assert mapped.source_of([0, 1, 2, 3, 4]).tolist() == [0, 0, 0, 2, 1]
    with pytest.raises(ValueError, match='covers labels 0..4'):
        mapped.source_of([5])


# ------------------------------------------------------------------------------------------------
# the published checkpoint layout: pickled modules, read without their classes
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def authors_module():
    """A module of classes that exists only while the file is written (the reader must not need it)."""
    mod = types.ModuleType('authors_model_only_in_this_test')

    class BaryNet(ARCH_REGISTRY.get('BaryIR')):
        pass

    class Potentials(nn.Module):
        def __init__(self):
            super().__init__()
            self.potentials = nn.ModuleList([nn.Sequential(nn.Conv2d(8, 8, 4, 4, 1, groups=4, bias=False),
                                                           nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(8, 2))])
            self.register_buffer('seen', torch.arange(3))
            self.register_buffer('scratch', torch.ones(2), persistent=False)
            self.activation = torch.relu  # a function reference: pickled by name, never called

        def __reduce_ex__(self, protocol):  # what a hostile file could do: call os.system on load
            reduced = list(super().__reduce_ex__(protocol))
            return (os.system, ('touch /tmp/vlunet_pickled_modules_hostile',)) if self.scratch[0] == 2 \
                else tuple(reduced)

    for cls in (BaryNet, Potentials):
        cls.__module__, cls.__qualname__ = mod.__name__, cls.__name__
        setattr(mod, cls.__name__, cls)
    sys.modules[mod.__name__] = mod
    yield mod
    sys.modules.pop(mod.__name__, None)


@pytest.mark.filterwarnings("ignore:Couldn't retrieve source code")  # torch.save's old format, writing
@pytest.mark.parametrize('zipped', [True, False])
def test_published_checkpoint_modules_read_without_their_classes(tmp_path, authors_module, zipped):
    torch.manual_seed(0)
    net = authors_module.BaryNet(**CARD.tiny)
    pots = authors_module.Potentials()
    expected = {'BaryIR': net.state_dict(), 'Pots': pots.state_dict()}
    path = tmp_path / 'model_allBaryNet128__56_1.0.pth'
    torch.save({'epoch': 56, 'BaryIR': net, 'Pots': pots}, path, _use_new_zipfile_serialization=zipped)
    sys.modules.pop(authors_module.__name__)  # the authors' classes are gone
    with pytest.raises(ModuleNotFoundError):
        torch.load(path, weights_only=False)
    entries = load_pickled_modules(str(path))
    assert list(entries) == ['epoch', 'BaryIR', 'Pots'] and entries['epoch'] == 56
    for key, want in expected.items():
        assert list(entries[key]) == list(want), key  # same keys, same order (non-persistent buffer left out)
        assert all(torch.equal(entries[key][k], v) and not entries[key][k].requires_grad for k, v in want.items())
    again = ARCH_REGISTRY.get('BaryIR')(**CARD.tiny)
    again.load_state_dict(entries['BaryIR'], strict=True)
    raw = read_pickled(str(path))
    assert isinstance(raw['BaryIR'], PickledObject) and raw['BaryIR'].pickled_class.endswith('.BaryNet')


def test_card_layout_and_hostile_pickles(tmp_path, authors_module):
    fmt = CARD.checkpoint_formats[0]
    assert fmt.pickled
    net = ARCH_REGISTRY.get('BaryIR')(**CARD.tiny)
    path = tmp_path / 'layout.pt'
    torch.save(fmt.layout(net), path)
    entries = load_pickled_modules(str(path))
    assert set(entries) == {'epoch', 'BaryIR', 'Pots'}
    assert all(torch.equal(entries['BaryIR'][k], v) for k, v in net.state_dict().items())
    assert list(entries['Pots']) == [f'potentials.{h}.{i}.{p}' for h in range(3) for i, p in
                                     ((0, 'weight'), (3, 'weight'), (3, 'bias'), (4, 'weight'), (4, 'bias'),
                                      (6, 'weight'), (6, 'bias'))]
    marker = '/tmp/vlunet_pickled_modules_hostile'
    if os.path.exists(marker):
        os.remove(marker)
    hostile = authors_module.Potentials()
    hostile.scratch.fill_(2)
    torch.save({'epoch': 1, 'Pots': hostile}, tmp_path / 'hostile.pt')
    found = load_pickled_modules(str(tmp_path / 'hostile.pt'))['Pots']
    assert not os.path.exists(marker)
    assert isinstance(found, PickledObject) and found.args == ('touch /tmp/vlunet_pickled_modules_hostile',)
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(PickledModuleError, match='junk.pt'):
        load_pickled_modules(str(tmp_path / 'junk.pt'))
    with pytest.raises(PickledModuleError, match='no such file'):
        load_pickled_modules(str(tmp_path / 'missing.pt'))
