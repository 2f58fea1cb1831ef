"""BaryIR beyond the conformance suite: the four published outputs as the card names them, the
potentials (fixture, listings, per-sample evaluation), the latents of a padded input, the published
constraints on dim/decoder, and what recognition must not claim."""
import pytest
import torch
import torch.nn.functional as F

import vlunet  # noqa: F401
from basicsr.utils.registry import ARCH_REGISTRY
from vlunet.archs.baryir_arch import OUTPUT_NAMES
from vlunet.archs.card import get_card, identify, identify_all

from conftest import listing_state_dict, load_fixture, read_listing, state_dict_listing

CARD = get_card('BaryIR')


@pytest.fixture(scope='module')
def a2():
    fx = load_fixture('BaryIR_A2.pt')
    net = ARCH_REGISTRY.get('BaryIR')(**fx['config']).double().eval()
    net.load_state_dict(fx['state_dict'], strict=True)
    return fx, net


def test_card_names_the_four_published_outputs(a2):
    fx, net = a2
    assert fx['output_names'] == ['restored', 'source_latent', 'bary_latent', 'res_bary']
    assert OUTPUT_NAMES == ('image', 'source_latent', 'barycenter_latent', 'residual')
    with torch.no_grad():
        out = CARD.read_output(net, net(*fx['inputs'].values()))
    got = [out.image, out.aux['source_latent'], out.aux['barycenter_latent'], out.aux['residual']]
    for value, want in zip(got, fx['output']):
        torch.testing.assert_close(value, want, rtol=0, atol=1e-9)
    assert out.supervised[0] is out.image and len(out.supervised) == 1
    assert torch.equal(out.aux['residual'], out.aux['source_latent'] - out.aux['barycenter_latent'])


def test_padded_input_latents_are_those_of_the_reflected_image(a2):
    _, net = a2
    x = torch.rand(2, 3, 21, 35, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        image, *latents = net(x)
        ref_image, *ref_latents = net(F.pad(x, (0, 5, 0, 3), mode='reflect'))
    assert image.shape == x.shape and image.is_contiguous()
    torch.testing.assert_close(image, ref_image[..., :21, :35], rtol=0, atol=0)
    for got, want in zip(latents, ref_latents):  # ceil(21/8) x ceil(35/8) = 3 x 5 latent pixels, not cropped
        assert got.shape == (2, 384, 3, 5) and got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_published_constraints_dim_48_and_decoder():
    with pytest.raises(ValueError, match='dim=48'):
        ARCH_REGISTRY.get('BaryIR')(dim=32)
    with pytest.raises(ValueError, match='decoder=True'):
        ARCH_REGISTRY.get('BaryIR')(decoder=False)


def test_potentials_fixture_and_per_sample_values():
    fx = load_fixture('BaryIR_Potentials_A1.pt')
    pots = ARCH_REGISTRY.get('BaryIRPotentials')(**fx['config']).double()
    pots.load_state_dict(fx['state_dict'], strict=True)
    assert list(pots.state_dict()) == list(fx['state_dict'])
    x = fx['inputs']['input']
    with torch.no_grad():
        out = pots(x)
        assert len(out) == len(fx['output']) == 3
        for got, want in zip(out, fx['output']):
            assert got.shape == (1, 1)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
        torch.testing.assert_close(pots(x, torch.tensor(2)), fx['output'][2], rtol=0, atol=1e-9)
        # a batch, each sample through its own head, equals the published one-latent calls
        batch = torch.stack([x, 0.5 * x, x.flip(-1), -x])
        heads = [2, 0, 2, 1]
        values = pots.values(batch, heads)
        expected = torch.cat([pots(batch[i], k).view(1) for i, k in enumerate(heads)])
        torch.testing.assert_close(values, expected, rtol=0, atol=1e-15)
        with pytest.raises(ValueError, match='out of range'):
            pots.values(batch, [0, 1, 2, 3])
        with pytest.raises(ValueError, match='features'):
            pots.values(torch.zeros(1, 32, 20, 20, dtype=torch.float64), [0])


def test_potentials_every_head_gets_its_gradient():
    pots = ARCH_REGISTRY.get('BaryIRPotentials')(3, channels=8, size=32)
    latents = torch.rand(4, 8, 4, 4, requires_grad=True)
    pots.values(latents, [1, 1, 2, 1]).sum().backward()
    assert all(p.grad is None for p in pots.potentials[0].parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pots.potentials[1:].parameters())
    assert (latents.grad.flatten(1).abs().sum(1) > 0).all()


def test_potentials_full_size_listings_counts_and_init():
    listing = read_listing('keys_BaryIR_Potentials.tsv')
    counts = {(5, 128): 50_634_885, (3, 128): 30_380_931, (5, 144): 118_929_765}
    for (k, size), params in counts.items():
        with torch.device('meta'):
            pots = ARCH_REGISTRY.get('BaryIRPotentials')(k, channels=384, size=size)
        assert sum(p.numel() for p in pots.parameters()) == params
        if size == 128:
            assert state_dict_listing(pots) == listing[:7 * k]
    torch.manual_seed(0)
    pots = ARCH_REGISTRY.get('BaryIRPotentials')(2, channels=64, size=128)
    conv = torch.cat([h[0].weight.flatten() for h in pots.potentials])  # redrawn from N(0, 0.02)
    assert abs(conv.std().item() - 0.02) < 1e-3 and abs(conv.mean().item()) < 1e-3
    with pytest.raises(ValueError, match='size >= 16'):
        ARCH_REGISTRY.get('BaryIRPotentials')(2, channels=64, size=8)


def test_recognition_claims_barynet_only():
    # the potentials are not a restoration method
    assert identify(listing_state_dict('keys_BaryIR_Potentials.tsv')) is None
    found = identify_all(listing_state_dict('keys_BaryIR.tsv'))
    assert [r.card.name for r in found if r.exact] == ['BaryIR']
    for name in ('BaryIR_A1.pt', 'BaryIR_A2.pt'):  # every constructor argument is read back from the shapes
        fx = load_fixture(name)
        found = identify(fx['state_dict'])
        assert found.card is CARD and found.exact
        assert {k: found.kwargs[k] for k in fx['config']} == fx['config']
