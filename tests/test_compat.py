"""Each fix in vlunet/compat.py, tested against the symptom it names."""
import collections
import math
import os

import pytest
import torch
import yaml

import vlunet  # noqa: F401  (applies the fixes)
from vlunet import compat
from vlunet.models.lr_scheduler import LinearWarmupCosineLR


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


def test_any_torch_optimizer_and_warmup_cosine():
    from basicsr.models.base_model import BaseModel
    model = BaseModel.__new__(BaseModel)
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(model.get_optimizer('AdamW', params, 1e-3, weight_decay=0.01), torch.optim.AdamW)
    assert isinstance(model.get_optimizer('Adam', params, 1e-3), torch.optim.Adam)
    with pytest.raises(NotImplementedError, match='Bogus'):
        model.get_optimizer('Bogus', params, 1e-3)

    opt = torch.optim.AdamW(params, lr=1.0)
    sched = LinearWarmupCosineLR(opt, warmup_iter=10, total_iter=110, eta_min=0.0)
    lrs = []
    for _ in range(120):
        lrs.append(opt.param_groups[0]['lr'])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and math.isclose(lrs[5], 0.5) and math.isclose(lrs[10], 1.0)
    assert math.isclose(lrs[60], 0.5, abs_tol=1e-9)  # half-way through the cosine
    assert lrs[110] == pytest.approx(0.0, abs=1e-12) and lrs[119] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_scheduler_option_defaults_to_training_length():
    from basicsr.models.base_model import BaseModel
    model = BaseModel.__new__(BaseModel)
    model.optimizers = [torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)]
    model.schedulers = []
    model.opt = {'train': {'total_iter': 40, 'scheduler': {'type': 'LinearWarmupCosineLR', 'warmup_iter': 4}}}
    model.setup_schedulers()
    assert model.schedulers[0].total_iter == 40
    model.opt['train']['scheduler'] = {'type': 'MultiStepLR', 'milestones': [5], 'gamma': 0.5}
    model.setup_schedulers()  # BasicSR's own schedulers still work
    assert type(model.schedulers[1]).__name__ == 'MultiStepRestartLR'


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


def test_flags_under_path_are_not_made_into_folders(tmp_path):
    from basicsr.utils import make_exp_dirs
    root = tmp_path / 'exp'
    opt = {'is_train': True, 'path': {'experiments_root': str(root), 'models': str(root / 'models'),
                                      'widen_degradation_types': True, 'pretrain_network_g': None}}
    make_exp_dirs(opt)  # raised TypeError on the boolean before the fix
    assert (root / 'models').is_dir()
    assert opt['path']['widen_degradation_types'] is True  # the caller's options are untouched
