"""Restormer and PromptIR: exactly the published models (float64 fixtures, key lists), any size."""

import pytest
import torch

import vlunet  # noqa: F401
from basicsr.utils.registry import ARCH_REGISTRY

from conftest import load_fixture, read_listing, state_dict_listing



@pytest.mark.parametrize('name', ['PromptIR_decoder.pt', 'Restormer_withbias.pt', 'Restormer_biasfree.pt'])
def test_published_fixture_float64(name):
    fx = load_fixture(name)
    net = ARCH_REGISTRY.get(fx['arch'])(**fx['config']).double().eval()
    net.load_state_dict(fx['state_dict'], strict=True)
    with torch.no_grad():
        out = net(*fx['inputs'].values())
    torch.testing.assert_close(out, fx['output'], rtol=0, atol=1e-9)


@pytest.mark.parametrize('arch, kwargs, listing, params', [
    ('PromptIR', {'decoder': True}, 'keys_PromptIR_decoder.tsv', 35_592_263),
    ('Restormer', {}, 'keys_Restormer.tsv', 26_126_644),
])
def test_full_size_keys_shapes_and_count(arch, kwargs, listing, params):
    with torch.device('meta'):
        net = ARCH_REGISTRY.get(arch)(**kwargs)
    assert state_dict_listing(net) == read_listing(listing)
    assert sum(p.numel() for p in net.parameters()) == params


@pytest.mark.parametrize('name', ['PromptIR_decoder.pt', 'Restormer_biasfree.pt'])
def test_any_size(name):
    fx = load_fixture(name)
    net = ARCH_REGISTRY.get(fx['arch'])(**fx['config']).double().eval()
    net.load_state_dict(fx['state_dict'])
    x = torch.rand(1, 3, 21, 35, dtype=torch.float64)
    with torch.no_grad():
        out = net(x)
        padded = torch.nn.functional.pad(x, (0, 5, 0, 3), mode='reflect')
        torch.testing.assert_close(out, net(padded)[..., :21, :35], rtol=0, atol=0)


def test_restormer_dual_pixel_variant_builds_and_runs():
    net = ARCH_REGISTRY.get('Restormer')(inp_channels=6, dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1,
                                          dual_pixel_task=True)
    assert 'skip_conv.weight' in net.state_dict()
    assert net(torch.rand(1, 6, 16, 16)).shape == (1, 3, 16, 16)
