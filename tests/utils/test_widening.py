"""Widening a trained VLU-Net from K to K+1 degradation types, by option file."""
import pytest
import torch

import vlunet  # noqa: F401
from basicsr.archs import build_network
from basicsr.models import build_model
from vlunet.utils.widening import count_degradation_types, widen_state_dict

NET = {'type': 'VLUNet', 'de_dim': 3, 'dim': 16, 'num_blocks': [1, 1, 1, 1], 'num_refinement_blocks': 1,
       'heads': [1, 2, 4, 8]}


def _opt(tmp_path, de_dim, weights, widen=None):
    path = {'pretrain_network_g': str(weights), 'strict_load_g': True}
    if widen is not None:
        path['widen_degradation_types'] = widen
    return {'name': 'w', 'model_type': 'VLUNetModel', 'num_gpu': 0, 'dist': False, 'is_train': False, 'rank': 0,
            'world_size': 1, 'network_g': dict(NET, de_dim=de_dim), 'path': path, 'val': {}}


def test_state_dict_widening_keeps_old_components():
    torch.manual_seed(0)
    sd = build_network(dict(NET)).state_dict()
    wide, grown = widen_state_dict(sd, 4)
    assert count_degradation_types(wide) == 4
    assert len(grown) == 8 * 3  # every stage: prompt bank, linear weight, linear bias
    for key in grown:
        old, new = sd[key], wide[key]
        dim = 1 if key.endswith('prompt_param') else 0
        torch.testing.assert_close(new.narrow(dim, 0, 3), old)
        torch.testing.assert_close(new.narrow(dim, 3, 1), old.mean(dim=dim, keepdim=True))
    assert all(torch.equal(sd[k], wide[k]) for k in sd if k not in grown)
    with pytest.raises(ValueError, match='narrow'):
        widen_state_dict(sd, 2)


def test_model_widens_only_when_asked(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / 'k3.pth'
    torch.save({'params': build_network(dict(NET)).state_dict()}, weights)
    with pytest.raises(ValueError) as err:
        build_model(_opt(tmp_path, 4, weights))
    message = str(err.value)
    assert 'trained for 3 degradation types' in message and 'ask for 4' in message
    assert 'widen_degradation_types: true' in message
    model = build_model(_opt(tmp_path, 4, weights, widen=True))
    for name, p in model.net_g.named_parameters():
        if name.endswith('prompt_param'):
            assert p.shape[1] == 4
    with torch.no_grad():
        out = model.net_g(torch.rand(1, 3, 16, 16), torch.randn(1, 512))
    assert torch.isfinite(out).all()
