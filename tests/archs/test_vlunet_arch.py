"""VLUNet beyond the conformance suite: the published constructor and hierarchy, the handles on its
degradation-type parameters, the no-CLIP path, stage recording, activation checkpointing."""

import pytest
import torch

import vlunet  # noqa: F401
from basicsr.utils.registry import ARCH_REGISTRY
from vlunet.archs.vlunet_arch import HIERARCHY, level_moves

TINY = dict(de_dim=3, dim=16, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 2, 4, 8])


def test_constructor_defaults_are_the_published_ones():
    import inspect
    sig = inspect.signature(ARCH_REGISTRY.get('VLUNet'))
    names = list(sig.parameters)
    assert names[:11] == ['de_dim', 'inp_channels', 'out_channels', 'dim', 'num_blocks', 'num_refinement_blocks',
                          'heads', 'ffn_expansion_factor', 'bias', 'LayerNorm_type', 'decoder']
    defaults = {k: v.default for k, v in sig.parameters.items()}
    assert defaults['dim'] == 48 and list(defaults['num_blocks']) == [4, 6, 6, 8]
    assert defaults['num_refinement_blocks'] == 4 and list(defaults['heads']) == [1, 2, 4, 8]
    assert defaults['ffn_expansion_factor'] == 2.66 and defaults['bias'] is False
    assert defaults['LayerNorm_type'] == 'WithBias' and defaults['decoder'] is False


def test_no_clip_vector_uses_the_mean_prompt():
    torch.manual_seed(0)
    net = ARCH_REGISTRY.get('VLUNet')(**TINY).double().eval()
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        out = net(x, None)
        # zeroing `linear` makes softmax uniform: the same as no embedding
        for m in net.modules():
            if type(m).__name__ == 'GradientStep':
                m.linear.weight.zero_()
                m.linear.bias.zero_()
        uniform = net(x, torch.randn(2, 512, dtype=torch.float64))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, uniform, rtol=0, atol=1e-12)


def test_stage_recording_is_free_on_the_default_path():
    torch.manual_seed(0)
    net = ARCH_REGISTRY.get('VLUNet')(**TINY).eval()
    x, e = torch.rand(2, 3, 24, 16), torch.randn(2, 512)
    with torch.no_grad():
        plain = net(x, e)
        out, stages = net(x, e, return_stages=True)
    assert torch.equal(plain, out)
    assert [s['stage'] for s in stages] == ['encoder_level1', 'encoder_level2', 'encoder_level3', 'latent',
                                            'decoder_level3', 'decoder_level2', 'decoder_level1', 'refinement']
    for s in stages:
        assert s['weights'].shape == (2, 3)
        torch.testing.assert_close(s['weights'].sum(1), torch.ones(2))
        assert s['after_gradient'].shape == s['after_proximal'].shape
    assert stages[3]['after_proximal'].shape[-2:] == (3, 2)  # latent at 1/8 resolution


def test_wrong_embedding_shape_is_named():
    net = ARCH_REGISTRY.get('VLUNet')(**TINY)
    with pytest.raises(ValueError, match=r'degradation must be \(B, 512\)'):
        net(torch.rand(2, 3, 16, 16), torch.randn(512))


def test_activation_checkpointing_same_outputs_and_grads():
    torch.manual_seed(0)
    ref = ARCH_REGISTRY.get('VLUNet')(**TINY).double()
    ckp = ARCH_REGISTRY.get('VLUNet')(**TINY, use_checkpoint=True).double()
    ckp.load_state_dict(ref.state_dict())
    assert list(ref.state_dict()) == list(ckp.state_dict())
    x, e = torch.rand(2, 3, 16, 16, dtype=torch.float64), torch.randn(2, 512, dtype=torch.float64)
    ref(x, e).square().mean().backward()
    ckp(x, e).square().mean().backward()
    for (name, a), b in zip(ref.named_parameters(), ckp.parameters()):
        if a.grad is None:
            assert b.grad is None, name
        else:
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12, msg=name)


def test_bf16_autocast_runs():
    net = ARCH_REGISTRY.get('VLUNet')(**TINY).eval()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out = net(torch.rand(1, 3, 16, 16), torch.randn(1, 512))
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out.float()).all()


@pytest.mark.parametrize('change, message', [
    (dict(dim=8), r'dim must be an integer >= 10, got 8'),
    (dict(de_dim=0), r'de_dim .* positive integer, got 0'),
    (dict(heads=[1, 2, 4]), r'heads must list one value per resolution level \(4\)'),
    (dict(dim=10, heads=[1, 3, 4, 8]), r'encoder_level2 has 20 channels .* heads\[1\]=3'),
])
def test_unbuildable_constructor_arguments_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        ARCH_REGISTRY.get('VLUNet')(**{**TINY, **change})


STAGE_ORDER = ['encoder_level1', 'encoder_level2', 'encoder_level3', 'latent', 'decoder_level3', 'decoder_level2',
               'decoder_level1', 'refinement']


def test_de_dim_is_required_as_published():
    with pytest.raises(TypeError, match='de_dim'):
        ARCH_REGISTRY.get('VLUNet')()


def test_hierarchy_moves_are_the_published_modules():
    moves = [(level.name, move, name) for level, _, move, name in level_moves()]
    assert moves == [('encoder_level1', None, None), ('encoder_level2', 'down', 'down1_2'),
                     ('encoder_level3', 'down', 'down2_3'), ('latent', 'down', 'down3_4'),
                     ('decoder_level3', 'up', 'up4_3'), ('decoder_level2', 'up', 'up3_2'),
                     ('decoder_level1', 'up', 'up2_1'), ('refinement', None, None)]
    assert [level.width for level in HIERARCHY] == [1, 2, 4, 8, 4, 2, 2, 2]


@pytest.mark.parametrize('de_dim', [5, 7])
def test_gradient_steps_expose_the_degradation_type_parameters(de_dim):
    with torch.device('meta'):
        net = ARCH_REGISTRY.get('VLUNet')(de_dim)
    steps = net.gradient_steps()
    assert [name for name, _ in steps] == STAGE_ORDER
    # (1, K, int(width // 10 * stage), 96 // stage, 96 // stage) with dim=48: the published sizes
    expected = {'encoder_level1': (4, 96), 'encoder_level2': (18, 48), 'encoder_level3': (57, 32),
                'latent': (152, 24), 'decoder_level3': (57, 32), 'decoder_level2': (18, 48),
                'decoder_level1': (9, 96), 'refinement': (9, 96)}
    for name, step in steps:
        channels, side = expected[name]
        assert tuple(step.prompt_param.shape) == (1, de_dim, channels, side, side), name
        assert tuple(step.linear.weight.shape) == (de_dim, 512) and tuple(step.linear.bias.shape) == (de_dim, )
        assert step is getattr(net, name).gradient_descent
