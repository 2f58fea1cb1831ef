"""vlunet's model base class: any torch optimizer, the warm-up + cosine scheduler following the
training length, BasicSR's own schedulers kept (checkpoint saving: tests/test_resume.py, tests/utils/test_atomic_and_image_io.py)."""
import math

import pytest
import torch

import vlunet  # noqa: F401
from vlunet.models.base_model import VLUNetBaseModel
from vlunet.models.lr_scheduler import LinearWarmupCosineLR


def test_any_torch_optimizer_and_warmup_cosine():
    model = VLUNetBaseModel.__new__(VLUNetBaseModel)
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
    model = VLUNetBaseModel.__new__(VLUNetBaseModel)
    model.optimizers = [torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)]
    model.schedulers = []
    model.opt = {'train': {'total_iter': 40, 'scheduler': {'type': 'LinearWarmupCosineLR', 'warmup_iter': 4}}}
    model.setup_schedulers()
    assert model.schedulers[0].total_iter == 40
    model.opt['train']['scheduler'] = {'type': 'MultiStepLR', 'milestones': [5], 'gamma': 0.5}
    model.setup_schedulers()  # BasicSR's own schedulers still work
    assert type(model.schedulers[1]).__name__ == 'MultiStepRestartLR'
