"""Learning-rate schedulers (as BasicSR keeps its own in ``basicsr/models/lr_scheduler.py``).

``LinearWarmupCosineLR`` is the schedule of VLU-Net, PromptIR, AdaIR, MoCE-IR and DFPIR (15
warm-up epochs, then cosine), in iterations so that it plugs into BasicSR's per-iteration
``scheduler.step()``. ``vlunet.compat`` lets every model's ``setup_schedulers`` build it by name.
"""
import math

import torch


class LinearWarmupCosineLR(torch.optim.lr_scheduler.LRScheduler):
    """Linear warm-up from ``warmup_start_lr`` to the base lr over ``warmup_iter`` iterations, then
    cosine decay to ``eta_min`` at ``total_iter`` (and ``eta_min`` afterwards). Option file::

        scheduler: {type: LinearWarmupCosineLR, warmup_iter: 4500, eta_min: 0}   # total_iter: train.total_iter

    Without ``total_iter`` the scheduler ends with training (``train.total_iter``), so
    ``--force_yml train:total_iter=N`` changes the whole schedule.

    Resuming follows the lengths of the options, not those stored in the training state: with a
    larger ``train.total_iter`` the warm-up is kept and the cosine is re-spread to the new end (a
    message says so), so the added iterations never run at ``eta_min`` unannounced.
    """

    def __init__(self, optimizer, warmup_iter, total_iter, warmup_start_lr=0.0, eta_min=0.0, last_epoch=-1):
        if warmup_iter < 0 or total_iter <= 0:
            raise ValueError(f'scheduler: need warmup_iter >= 0 and total_iter > 0, got {warmup_iter}, {total_iter}')
        self.warmup_iter = int(warmup_iter)
        self.total_iter = int(total_iter)
        self.warmup_start_lr = float(warmup_start_lr)
        self.eta_min = float(eta_min)
        self.resumed_from = None  # (warmup_iter, total_iter) of a loaded state that differed from ours
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr, it):
        if it < self.warmup_iter:
            return self.warmup_start_lr + (base_lr - self.warmup_start_lr) * it / self.warmup_iter
        progress = min(1.0, (it - self.warmup_iter) / max(1, self.total_iter - self.warmup_iter))
        return self.eta_min + (base_lr - self.eta_min) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def get_lr(self):
        return [self.lr_at(base_lr, self.last_epoch) for base_lr in self.base_lrs]

    def load_state_dict(self, state_dict):
        """Restore the position (``last_epoch``) and base lrs; keep this scheduler's lengths."""
        lengths = (self.warmup_iter, self.total_iter, self.eta_min, self.warmup_start_lr)
        saved = tuple(state_dict.get(k, v) for k, v in zip(('warmup_iter', 'total_iter', 'eta_min',
                                                             'warmup_start_lr'), lengths))
        super().load_state_dict(state_dict)
        self.warmup_iter, self.total_iter, self.eta_min, self.warmup_start_lr = lengths
        if saved != lengths:
            self.resumed_from = saved
        # the lr the optimizer uses from now on follows the (possibly new) schedule
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group['lr'] = lr
        self._last_lr = [group['lr'] for group in self.optimizer.param_groups]

    def describe_resume(self):
        """A message when the loaded state had other lengths than the options (else None)."""
        if self.resumed_from is None:
            return None
        warmup, total, eta_min, _ = self.resumed_from
        return (f'LinearWarmupCosineLR: the training state was saved with warmup_iter={warmup}, total_iter={total}, '
                f'eta_min={eta_min}; following the options instead (warmup_iter={self.warmup_iter}, '
                f'total_iter={self.total_iter}, eta_min={self.eta_min}): the cosine now ends at iteration '
                f'{self.total_iter}; lr at iteration {self.last_epoch} is {self.get_lr()[0]:.3g}.')
