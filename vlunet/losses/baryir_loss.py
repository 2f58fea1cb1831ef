"""``BaryIRLoss``: BaryIR's barycenter training terms and its alternating update of the potentials.

The published trainers (xl-tang3/BaryIR ``trainer_bary.py``, ``trainer_bary_ddp.py`` at af5cb9a)
alternate two updates per batch (x, y) with labels d_i (the degradation type) and sources
k(i) (the potential of the label: the noise levels share one):

1. network update, potentials frozen (no gradient into them, but gradients flow through them into
   the network). With ``(image, s, b, r) = net(x)``, n() the L2 normalisation of the flattened
   C*h*w vector::

       mse_i    = sqrt(mean((s_i - b_i)^2))
       ort_i    = sum_j <n(b_i), n(r_j)>^2                          (every j, i included)
       pos_i    = sum_{j: d_j = d_i} exp(<n(r_i), n(r_j)> / 0.07)   (i included)
       neg_i    = sum_{j: d_j != d_i} exp(<n(r_i), n(r_j)> / 0.07)
       contra_i = -log((pos_i + eps) / (pos_i + neg_i + eps))
       loss     = Sigma * mean|image - y| + (1/B) sum_i Lambda_k(i) (mse_i + w (ort_i + contra_i) - f_k(i)(b_i))

   Sigma 10000; w 0.05, eps 0 (single GPU) or w 0.02, eps 1e-6 (DDP). The L1 part is ``pixel_opt``'s
   (see below); :meth:`BaryIRLoss.forward` returns ``loss_weight`` times the rest.
2. potentials update, network frozen: a second forward of the same batch with the UPDATED network
   gives b', then::

       potential  = (1/B) sum_i Lambda_k(i) f_k(i)(b'_i)                   -> backward, RMSprop step
       constraint = 10 (sum_k Lambda_k f_k(b'_{B-1}))^2  (the LAST sample)  -> backward, RMSprop step

   ``trainer_bary.py`` takes two optimiser steps, evaluating the constraint with the potentials
   already updated by the first (``potential_steps: 2``). ``trainer_bary_ddp.py`` accumulates both
   gradients with the potentials as they were and takes ONE step (``potential_steps: 1``); it also
   averages the potentials' gradients over the processes by hand, while the batch-coupled terms
   (ort, contra, the constraint's last sample) see only each process's own samples. Both happen here
   whenever torch.distributed is initialised (any ``potential_steps``): gradients of the potentials
   are averaged over the processes before each step (heads that a process did not use count with a
   zero gradient, so every process steps the same parameters), and the potentials are broadcast from
   rank 0 before their first use so every process starts from the same ones.

Lambda: the normalised inverse of the per-source sample counts of an epoch (published
``get_num_samples``), option ``source_counts``, or given directly (``lambdas``); uniform if neither.
Sources: the published label -> potential rule is ``label < 3 -> 0, else label - 2`` (its labels are
denoise_15/25/50 0-2, derain 3, dehaze 4, deblur 5, lowlight 6); option ``sources`` gives the
potential of every label of the option file's source list instead. The contrast groups by label (so
the noise levels are negatives of each other although they share a potential), as published.

Option file (see options/train/BaryIR_*.yml)::

    train:
      pixel_opt: {type: L1Loss, loss_weight: 1.0}          # the shared L1
      barycenter_opt:
        type: BaryIRLoss
        loss_weight: !!float 1e-4     # = 1 / Sigma: the published Sigma*L1 + bary, divided by Sigma
        potentials: {type: BaryIRPotentials, num_potentials: 3, channels: 384, size: 128}
        optim: {type: RMSprop, lr: !!float 1e-4}
        sources: [0, 0, 0, 2, 1]      # label -> potential
        source_counts: [46296, 24000, 72135]

How the training model drives it (no method names needed there):

* ``loss(output, gt, label)`` in network_g's loss, ``output`` the forward's
  :class:`~vlunet.archs.card.NetworkOutput` (``aux``: ``source_latent``, ``barycenter_latent``,
  ``residual``), ``label`` the items' labels (B,);
* ``loss.after_network_step(forward, lq, gt, label)`` right after network_g's optimiser step;
  ``forward(lq)`` must run the updated network and return its NetworkOutput. The loss calls it under
  ``torch.no_grad()`` itself (the potentials' update needs no gradient of the network), so the model
  may pass its plain forward. Returns floats to log;
* ``loss.state_dict()`` / ``loss.load_state_dict(state)``: potentials, their optimiser (and
  scheduler, step count), for the training state, so a resume continues the potentials (the
  published resume restarts them; this keeps them).

The potentials' learning rate: the published sets both rates to 1e-4 every epoch and to 1e-5 after
``step`` epochs. Here ``optim.lr`` is the potentials' rate and ``scheduler`` (optional, a
``torch.optim.lr_scheduler`` class and its kwargs, stepped once per :meth:`after_network_step`, i.e.
in iterations) decays it, e.g. ``{type: MultiStepLR, milestones: [<step epochs in iterations>],
gamma: 0.1}``.
"""
import torch
import torch.nn.functional as F
from basicsr.utils.registry import LOSS_REGISTRY
from torch import nn

LATENT_KEYS = ('source_latent', 'barycenter_latent', 'residual')


def published_source_of(label):
    """The published label -> potential rule: labels 0, 1, 2 (three noise levels) -> 0, label l -> l - 2."""
    return torch.where(label < 3, torch.zeros_like(label), label - 2)


def inverse_count_weights(counts):
    """Normalised inverse counts, computed as the published trainer does (Python floats)."""
    inverse = [1 / count for count in counts]
    total = sum(inverse)
    return [value / total for value in inverse]


def _distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


@LOSS_REGISTRY.register()
class BaryIRLoss(nn.Module):
    """BaryIR's barycenter, orthogonality and contrastive terms, with its own potentials (module docstring).

    potentials: ``network`` option of the potentials (``{type: BaryIRPotentials, num_potentials: K,
        channels: 384, size: <patch size>}``), built with BasicSR's ``build_network``; without ``size``
        (or ``size: auto``) they are built at first use for the latent of the first batch (size = 8 x its
        height: the training patch), on its device.
    optim: their optimiser, a ``torch.optim`` class and its kwargs (published RMSprop, lr 1e-4).
    scheduler: optional ``torch.optim.lr_scheduler`` class and kwargs for it (stepped per iteration).
    loss_weight: multiplies the returned term (published 1 next to Sigma * L1; 1 / Sigma next to L1).
    ortho_contrast_weight: w (0.05 single GPU, 0.02 DDP). contrast_temperature: 0.07.
    contrast_eps: added to both sides of the contrast ratio (0, DDP 1e-6).
    constraint_weight: 10. potential_steps: 2 (single GPU) or 1 (DDP).
    lambdas: the K source weights; or source_counts: the K per-source sample counts (Lambda = their
        normalised inverses); neither: uniform.
    sources: the potential index of every label (a list); None: the published rule (label < 3 -> 0,
        else label - 2).
    """
    takes_network_output = True  # called as loss(output, gt, label) with the forward's NetworkOutput

    def __init__(self, potentials, optim=None, scheduler=None, loss_weight=1.0, ortho_contrast_weight=0.05,
                 contrast_temperature=0.07, contrast_eps=0.0, constraint_weight=10.0, potential_steps=2, lambdas=None,
                 source_counts=None, sources=None):
        super().__init__()
        if not isinstance(potentials, dict) or 'type' not in potentials or 'num_potentials' not in potentials:
            raise ValueError(f'BaryIRLoss: potentials={potentials!r}; expected a network option such as '
                             '{type: BaryIRPotentials, num_potentials: 3, channels: 384, size: 128}')
        if potential_steps not in (1, 2):
            raise ValueError(f'BaryIRLoss: potential_steps={potential_steps!r}; expected 2 (trainer_bary.py: value '
                             'step, then constraint step) or 1 (trainer_bary_ddp.py: one step for both)')
        self.potentials_opt = dict(potentials)
        self.optim_opt = dict(optim or {'type': 'RMSprop', 'lr': 1e-4})
        self.scheduler_opt = dict(scheduler) if scheduler else None
        for name, opt, home in (('optim', self.optim_opt, torch.optim),
                                ('scheduler', self.scheduler_opt, torch.optim.lr_scheduler)):
            if opt is not None and not isinstance(getattr(home, str(opt.get('type')), None), type):
                raise ValueError(f'BaryIRLoss: {name} type {opt.get("type")!r} is not a class of {home.__name__}')
        self.num_sources = k = int(potentials['num_potentials'])
        if lambdas is not None and source_counts is not None:
            raise ValueError('BaryIRLoss: give lambdas or source_counts, not both')
        if source_counts is not None:
            if len(source_counts) != k or any(c <= 0 for c in source_counts):
                raise ValueError(f'BaryIRLoss: source_counts={list(source_counts)}; expected {k} positive counts '
                                 f'(one per potential)')
            lambdas = inverse_count_weights(source_counts)
        elif lambdas is None:
            lambdas = [1 / k] * k
        if len(lambdas) != k:
            raise ValueError(f'BaryIRLoss: lambdas={list(lambdas)}; expected {k} weights (one per potential)')
        self.register_buffer('lambdas', torch.tensor([float(v) for v in lambdas], dtype=torch.float64, device='cpu'),
                             persistent=False)
        if sources is not None:
            bad = [s for s in sources if not 0 <= int(s) < k]
            if bad:
                raise ValueError(f'BaryIRLoss: sources={list(sources)}: {bad} not a potential index (0..{k - 1})')
            self.register_buffer('label_sources', torch.tensor([int(s) for s in sources], device='cpu'),
                                 persistent=False)
        else:
            self.label_sources = None
        self.loss_weight = float(loss_weight)
        self.ortho_contrast_weight = float(ortho_contrast_weight)
        self.contrast_temperature = float(contrast_temperature)
        self.contrast_eps = float(contrast_eps)
        self.constraint_weight = float(constraint_weight)
        self.potential_steps = int(potential_steps)
        self.potentials = self.optimizer = self.scheduler = None
        self.steps = 0            # potentials updates done (after_network_step calls)
        self._synced = False
        self.last_update = {}     # tensors of the last potentials update, for inspection
        if self.potentials_opt.get('size') not in (None, 'auto'):
            self._build_potentials(dict(self.potentials_opt))

    def _build_potentials(self, opt, device=None, dtype=None):
        """Build the potentials, their optimiser and scheduler (now, or at first use when size is 'auto')."""
        from basicsr.archs import build_network  # here: building a network is not a loss's usual business

        potentials = build_network(opt)
        if device is not None or dtype is not None:
            potentials = potentials.to(device=device, dtype=dtype)
        self.potentials = potentials
        self.potentials_opt = opt
        optim = dict(self.optim_opt)
        self.optimizer = getattr(torch.optim, optim.pop('type'))(self.potentials.parameters(), **optim)
        if self.scheduler_opt is not None:
            scheduler = dict(self.scheduler_opt)
            self.scheduler = getattr(torch.optim.lr_scheduler, scheduler.pop('type'))(self.optimizer, **scheduler)

    def _ready(self, latent):
        """The potentials, built for ``latent``'s size (8 x its height) if the option left size out."""
        if self.potentials is None:
            dtype = latent.dtype if latent.dtype == torch.float64 else torch.float32
            self._build_potentials(dict(self.potentials_opt, size=8 * latent.shape[-2]), latent.device, dtype)
        device = next(self.potentials.parameters()).device
        if device != latent.device:
            if self.optimizer.state:
                raise RuntimeError(f'BaryIRLoss: the potentials are on {device}, the latents on {latent.device}; '
                                   'move the loss with .to(device) before training')
            self.potentials.to(latent.device)  # first use: nothing of the optimiser to move yet
        self._sync_potentials()
        return self.potentials

    # --------------------------------------------------------------------------------------------
    def source_of(self, label):
        """The potential index of every label (LongTensor)."""
        if label is None:
            raise ValueError('BaryIRLoss needs the labels of the batch (the dataset items\' "label")')
        label = torch.as_tensor(label, device=self.lambdas.device).long().view(-1)
        if self.label_sources is None:
            source = published_source_of(label)
        else:
            if bool(((label < 0) | (label >= len(self.label_sources))).any()):
                raise ValueError(f'BaryIRLoss: labels {label.tolist()}; the sources option covers labels '
                                 f'0..{len(self.label_sources) - 1}')
            source = self.label_sources[label]
        if bool(((source < 0) | (source >= self.num_sources)).any()):
            raise ValueError(f'BaryIRLoss: labels {label.tolist()} give potentials {source.tolist()}; there are '
                             f'{self.num_sources} (set the sources option: the potential of each label)')
        return source

    def terms(self, output, label):
        """Per-sample terms of the network update (B,) each: mse, ort, contra, pos, neg, potential, and
        ``bary_loss`` (the weighted sum over the batch, before the division by B)."""
        missing = [k for k in LATENT_KEYS if k not in output.aux]
        if missing:
            raise KeyError(f'BaryIRLoss: the network output has no {missing} (it reports {sorted(output.aux)}); '
                           'train.barycenter_opt is for BaryIR')
        s, b, r = (output.aux[k] for k in LATENT_KEYS)
        if s.dtype in (torch.float16, torch.bfloat16):
            s, b, r = s.float(), b.float(), r.float()
        source = self.source_of(label).to(s.device)
        label = torch.as_tensor(label, device=s.device).long().view(-1)
        self._ready(b)
        weight = self.lambdas.to(device=s.device, dtype=s.dtype)[source]
        with torch.autocast(s.device.type, enabled=False):
            mse = (s - b).flatten(1).square().mean(1).sqrt()
            nb, nr = F.normalize(b.flatten(1), dim=1), F.normalize(r.flatten(1), dim=1)
            ort = (nb @ nr.t()).square().sum(1)
            sim = torch.exp((nr @ nr.t()) / self.contrast_temperature)
            same = label[:, None] == label[None, :]
            pos = torch.where(same, sim, 0).sum(1)
            neg = torch.where(same, 0, sim).sum(1)
            contra = -torch.log((pos + self.contrast_eps) / (pos + neg + self.contrast_eps))
            with _frozen(self.potentials):
                potential = self.potentials.values(b, source)
            per_sample = weight * (mse + self.ortho_contrast_weight * (ort + contra) - potential)
        return dict(mse=mse, ort=ort, contra=contra, pos=pos, neg=neg, potential=potential, weight=weight,
                    bary_loss=per_sample.sum())

    def forward(self, output, gt=None, label=None):
        """``loss_weight * bary_loss / B``: the term added to network_g's loss (``gt`` is not used)."""
        terms = self.terms(output, label)
        return self.loss_weight * terms['bary_loss'] / terms['mse'].shape[0]

    # --------------------------------------------------------------------------------------------
    def after_network_step(self, forward, lq, gt=None, label=None):
        """Update the potentials on the batch re-forwarded through the updated network (module docstring).

        Returns ``{'l_potential': (1/B) sum Lambda f, 'l_constraint': 10 c^2}`` (floats; the constraint
        as evaluated for its step)."""
        with torch.no_grad():
            b = forward(lq).aux['barycenter_latent']
        b = b.detach().float() if b.dtype in (torch.float16, torch.bfloat16) else b.detach()
        self._ready(b)
        source = self.source_of(label).to(b.device)
        lambdas = self.lambdas.to(device=b.device, dtype=b.dtype)
        batch = b.shape[0]
        with torch.autocast(b.device.type, enabled=False):
            self.optimizer.zero_grad(set_to_none=True)
            values = self.potentials.values(b, source)
            potential = (lambdas[source] * values).sum() / batch
            potential.backward()
            if self.potential_steps == 2:
                self._step()
                self.optimizer.zero_grad(set_to_none=True)
            # the published constraint uses the batch's last sample (a leftover loop variable)
            constraint = (lambdas * torch.cat([v.view(1) for v in self.potentials(b[-1])])).sum()
            constraint_loss = self.constraint_weight * constraint.square()
            constraint_loss.backward()
            self._step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.steps += 1
        potential, constraint_loss = potential.detach(), constraint_loss.detach()
        self.last_update = dict(values=values.detach(), potential=potential, constraint=constraint.detach(),
                                constraint_loss=constraint_loss)
        return {'l_potential': potential.item(), 'l_constraint': constraint_loss.item()}

    def _step(self):
        if _distributed():
            for p in self.potentials.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
                p.grad /= torch.distributed.get_world_size()
        self.optimizer.step()

    def _sync_potentials(self):
        """Broadcast the potentials from rank 0 once (each process builds them with its own seed)."""
        if self._synced:
            return
        if _distributed():
            with torch.no_grad():
                for t in list(self.potentials.parameters()) + list(self.potentials.buffers()):
                    torch.distributed.broadcast(t, 0)
        self._synced = True

    # --------------------------------------------------------------------------------------------
    def state_dict(self, *args, **kwargs):
        """``{'potentials_opt', 'potentials', 'optimizer', 'scheduler', 'steps'}``: what a resume needs
        (potentials None before they are built)."""
        if self.potentials is None:
            return {'potentials_opt': None, 'potentials': None, 'optimizer': None, 'scheduler': None, 'steps': 0}
        return {'potentials_opt': dict(self.potentials_opt), 'potentials': self.potentials.state_dict(),
                'optimizer': self.optimizer.state_dict(),
                'scheduler': None if self.scheduler is None else self.scheduler.state_dict(), 'steps': self.steps}

    def load_state_dict(self, state, strict=True):
        keys = {'potentials_opt', 'potentials', 'optimizer', 'scheduler', 'steps'}
        if not isinstance(state, dict) or not keys <= set(state):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f'BaryIRLoss.load_state_dict: expected a dict with keys {sorted(keys)}, got {got}')
        if state['potentials'] is None:
            return None  # saved before the potentials were built: nothing to restore
        if self.potentials is None:  # size 'auto' and not built yet: build them as saved
            first = next(iter(state['potentials'].values()))
            self._build_potentials(dict(state['potentials_opt']), first.device, first.dtype)
        self.potentials.load_state_dict(state['potentials'], strict=strict)
        self.optimizer.load_state_dict(state['optimizer'])
        if self.scheduler is not None and state['scheduler'] is not None:
            self.scheduler.load_state_dict(state['scheduler'])
        self.steps = int(state['steps'])
        self._synced = True  # every process loads the same state
        return None


class _frozen:
    """Within the block the module's parameters do not require gradients (restored afterwards)."""

    def __init__(self, module):
        self.params = list(module.parameters())

    def __enter__(self):
        self.flags = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p, flag in zip(self.params, self.flags):
            p.requires_grad_(flag)
        return False

