"""Restormer beyond the conformance suite: the dual-pixel variant."""
import torch

import vlunet  # noqa: F401
from basicsr.utils.registry import ARCH_REGISTRY



def test_restormer_dual_pixel_variant_builds_and_runs():
    net = ARCH_REGISTRY.get('Restormer')(inp_channels=6, dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1,
                                          dual_pixel_task=True)
    assert 'skip_conv.weight' in net.state_dict()
    assert net(torch.rand(1, 6, 16, 16)).shape == (1, 3, 16, 16)
