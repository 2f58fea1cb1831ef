"""VLUNet's hierarchy table and the handles on its degradation-type parameters (parity, keys, the
no-CLIP path, odd sizes, stage recording and checkpointing are in test_archs_vlunet.py)."""
import pytest
import torch

import vlunet  # noqa: F401
from basicsr.utils.registry import ARCH_REGISTRY
from vlunet.archs.vlunet_arch import HIERARCHY, level_moves

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
