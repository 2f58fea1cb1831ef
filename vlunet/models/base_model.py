"""``VLUNetBaseModel``: what every model of vlunet adds to BasicSR's ``BaseModel``.

This is vlunet's own behaviour (not a compatibility fix, see :mod:`vlunet.compat`), shared by
``VLUNetModel`` and ``CLIPAdapterModel``:

* crash-safe checkpoints: every network of an iteration, then its training state (the "iteration
  complete" mark that ``--auto_resume`` looks for), through the one atomic writer
  (:func:`vlunet.utils.atomic.save_with_retries`: the complete new file or none, retried, then an
  error naming the file); a model adds entries to the state with ``training_state_extras()`` and
  reads them back in ``resume_training``;
* any ``torch.optim`` optimizer by name (``optim_g: {type: AdamW, ...}``), where BasicSR 1.4.2 knows Adam;
* the ``LinearWarmupCosineLR`` scheduler (:mod:`vlunet.models.lr_scheduler`), following
  ``train.total_iter`` unless told otherwise, and announcing on resume how a changed length is followed.
"""
import os

import torch
from basicsr.models.base_model import BaseModel
from basicsr.utils import get_root_logger
from basicsr.utils.dist_util import master_only

from vlunet.utils.atomic import save_with_retries


class VLUNetBaseModel(BaseModel):
    """BaseModel with vlunet's checkpoints, optimizers and schedulers (see the module docstring)."""

    # ------------------------------------------------------------------ checkpoints
    @master_only
    def save_network(self, net, net_label, current_iter, param_key='params'):
        label = 'latest' if current_iter == -1 else current_iter
        save_path = os.path.join(self.opt['path']['models'], f'{net_label}_{label}.pth')
        nets = net if isinstance(net, list) else [net]
        keys = param_key if isinstance(param_key, list) else [param_key]
        if len(nets) != len(keys):
            raise ValueError(f'save_network: {len(nets)} networks but {len(keys)} param keys')
        save_dict = {}
        for net_, key in zip(nets, keys):
            state_dict = self.get_bare_model(net_).state_dict()
            save_dict[key] = {(k[len('module.'):] if k.startswith('module.') else k): v.cpu()
                              for k, v in state_dict.items()}
        save_with_retries(save_dict, save_path, 'network')

    @master_only
    def save_training_state(self, epoch, current_iter):
        if current_iter == -1:
            return
        state = {'epoch': epoch, 'iter': current_iter, 'optimizers': [o.state_dict() for o in self.optimizers],
                 'schedulers': [s.state_dict() for s in self.schedulers]}
        extras = getattr(self, 'training_state_extras', None)
        if callable(extras):
            state.update(extras())
        save_with_retries(state, os.path.join(self.opt['path']['training_states'], f'{current_iter}.state'),
                          'training state')

    # ------------------------------------------------------------------ optimizers and schedulers
    def get_optimizer(self, optim_type, params, lr, **kwargs):
        optimizer_cls = getattr(torch.optim, optim_type, None)
        if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
            raise NotImplementedError(f'optimizer {optim_type!r} is not a torch.optim optimizer '
                                      '(expected e.g. Adam, AdamW, SGD)')
        return optimizer_cls(params, lr, **kwargs)

    def setup_schedulers(self):
        scheduler_opt = self.opt['train']['scheduler']
        if scheduler_opt.get('type') != 'LinearWarmupCosineLR':
            return super().setup_schedulers()
        from vlunet.models.lr_scheduler import LinearWarmupCosineLR
        kwargs = {k: v for k, v in scheduler_opt.items() if k != 'type'}
        total = int(self.opt['train']['total_iter'])
        kwargs.setdefault('total_iter', total)
        if int(kwargs['total_iter']) < total and not float(kwargs.get('eta_min', 0)) > 0:
            raise ValueError(
                f'train.scheduler.total_iter ({kwargs["total_iter"]}) is smaller than train.total_iter ({total}): '
                f'iterations {kwargs["total_iter"]}..{total} would train at lr eta_min = 0. Remove '
                'scheduler.total_iter (it then follows train.total_iter) or make the two equal.')
        for optimizer in self.optimizers:
            self.schedulers.append(LinearWarmupCosineLR(optimizer, **kwargs))

    def resume_training(self, resume_state):
        super().resume_training(resume_state)
        for scheduler in self.schedulers:
            message = scheduler.describe_resume() if hasattr(scheduler, 'describe_resume') else None
            if message:
                get_root_logger().warning(message)
