"""Each fix in vlunet/compat.py, tested against the symptom it names."""
import collections
import os

import pytest
import torch
import yaml

import vlunet  # noqa: F401  (applies the fixes)
from vlunet import compat


def test_basicsr_imports_on_this_torchvision():
    import basicsr  # noqa: F401
    from basicsr.data.degradations import rgb_to_grayscale  # the import that used to fail
    assert rgb_to_grayscale(torch.rand(3, 4, 4)).shape == (1, 4, 4)


def test_option_yaml_is_parsed_safely(tmp_path):
    from basicsr.utils.options import ordered_yaml
    marker = tmp_path / 'pwned'
    text = f'name: x\nevil: !!python/object/apply:os.system ["touch {marker}"]\n'
    with pytest.raises(yaml.constructor.ConstructorError, match='python/object/apply'):
        yaml.load(text, Loader=ordered_yaml()[0])
    assert not marker.exists()
    data = yaml.load('b: 1\na: {c: [1, 2]}\nd: &x {e: 1}\nf: {<<: *x, g: 2}\n', Loader=ordered_yaml()[0])
    assert list(data) == ['b', 'a', 'd', 'f'] and isinstance(data, collections.OrderedDict)
    assert data['f'] == {'e': 1, 'g': 2}


def test_local_rank_spellings():
    assert compat._normalise_local_rank_argv(['-opt', 'x', '--local-rank=3']) == ['-opt', 'x', '--local_rank=3']
    assert compat._normalise_local_rank_argv(['--local-rank', '1']) == ['--local_rank', '1']
    assert compat._normalise_local_rank_argv(['--local_rank', '1']) == ['--local_rank', '1']


def test_training_state_with_counter_loads_weights_only(tmp_path):
    from basicsr.models.lr_scheduler import MultiStepRestartLR
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    sched = MultiStepRestartLR(opt, milestones=[2, 4])
    path = tmp_path / '2.state'
    torch.save({'epoch': 0, 'iter': 2, 'optimizers': [opt.state_dict()], 'schedulers': [sched.state_dict()]}, path)
    state = compat.load_training_state(str(path))
    assert state['iter'] == 2 and state['schedulers'][0]['milestones'] == collections.Counter([2, 4])


def test_lmdb_opened_twice_in_one_process(tmp_path, demo_images):
    from basicsr.utils import FileClient
    from basicsr.utils.lmdb_util import make_lmdb_from_imgs
    names = sorted(os.listdir(demo_images))[:2]
    lmdb_path = str(tmp_path / 'clean.lmdb')
    make_lmdb_from_imgs(str(demo_images), lmdb_path, names, [os.path.splitext(n)[0] for n in names])
    key = os.path.splitext(names[0])[0]
    first = FileClient('lmdb', db_paths=[lmdb_path], client_keys=['gt'])
    second = FileClient('lmdb', db_paths=[lmdb_path], client_keys=['gt'])  # raised before the fix
    assert first.get(key, 'gt') == second.get(key, 'gt') is not None


def test_ddp_wrapper_on_cpu_gets_no_device_ids(monkeypatch):
    from basicsr.models.base_model import BaseModel
    import torch.nn.parallel as parallel
    seen = {}

    class FakeDDP(torch.nn.Module):
        def __init__(self, net, device_ids=None, find_unused_parameters=False):
            super().__init__()
            seen.update(device_ids=device_ids, find_unused=find_unused_parameters)

    monkeypatch.setattr(parallel, 'DistributedDataParallel', FakeDDP)
    model = BaseModel.__new__(BaseModel)
    model.device = torch.device('cpu')
    model.opt = {'dist': True, 'num_gpu': 0, 'find_unused_parameters': True}
    model.model_to_device(torch.nn.Linear(1, 1))
    assert seen == {'device_ids': None, 'find_unused': True}
