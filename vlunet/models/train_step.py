"""One optimizer step, the same for every vlunet model (``VLUNetModel``, ``CLIPAdapterModel``).

Option keys (under ``train:``)::

    accumulate_grad_batches: 1   # micro-batches per optimizer step: the data loader yields
                                 # batch_size_per_gpu x N samples per iteration, split here into N
    amp: false                   # bf16 | fp16 | false: autocast for the forward and the losses
                                 # (fp16 adds a gradient scaler, saved in the training state)
    grad_clip_norm: ~            # clip the gradient norm of each optimizer's parameters (after
                                 # unscaling under fp16); a Restormer option file's
                                 # ``use_grad_clip: true`` means 0.01, as in its fork
    nonfinite_loss: error        # error: stop at once, naming the iteration and the loss term,
                                 # before any weight is updated | skip: skip that optimizer step

An iteration is one optimizer step over ``batch_size_per_gpu x world_size x N`` samples, so the
scheduler, EMA, logging, ``total_iter``, checkpoints and resume all count optimizer steps. Each
micro-batch's loss is weighted by its share of the batch, so the gradient is the one of the whole
batch (mean-reduced losses). Under DDP, gradients are synchronised once per optimizer step (the
other micro-batches run in ``no_sync``), and trainable tensors outside the DDP-wrapped network
(CLIP adapters trained alongside, a learnable loss temperature) are averaged across ranks here.
"""
import contextlib
import math
from collections import OrderedDict

import torch
from torch import distributed as dist

AMP_DTYPES = {'bf16': torch.bfloat16, 'bfloat16': torch.bfloat16, 'fp16': torch.float16, 'float16': torch.float16}
NONFINITE_POLICIES = ('error', 'skip')


def parse_amp(value, key):
    """``train.amp`` / ``val.amp`` -> torch dtype, or None for full precision."""
    if value in (None, False, 'false', 'False', 'fp32', 'float32', 'no', 'off'):
        return None
    if isinstance(value, str) and value.lower() in AMP_DTYPES:
        return AMP_DTYPES[value.lower()]
    raise ValueError(f'{key}: {value!r} is not a precision; expected bf16, fp16 or false')


def autocast(device, dtype):
    """``torch.autocast`` for ``dtype`` on ``device`` (a no-op for None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_from_rank0(tensors):
    """Make ``tensors`` (parameters, buffers) identical on every rank: rank 0's values."""
    if _distributed():
        with torch.no_grad():
            for t in tensors:
                dist.broadcast(t.data, src=0)


def average_gradients(params):
    """All-reduce (mean) the gradients of ``params`` across ranks (tensors outside DDP)."""
    if not _distributed():
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def _any_rank(flag, device):
    """True if ``flag`` is True on any rank (every rank must take the same branch)."""
    if not _distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def split_batch(tensors, parts):
    """Split every tensor of the list along dim 0 into ``parts`` micro-batches (sizes differ by at
    most one); returns ``[(weight, [chunk, ...]), ...]`` with weight = chunk size / batch size."""
    size = tensors[0].shape[0]
    if parts > size:
        raise ValueError(f'train.accumulate_grad_batches ({parts}) is larger than the batch ({size} samples)')
    chunks = [torch.tensor_split(t, parts) if torch.is_tensor(t) else [None] * parts for t in tensors]
    return [(c[0].shape[0] / size, list(c)) for c in zip(*chunks)]


class NonFiniteLossError(FloatingPointError):
    """A loss term is NaN or infinite (the message names the iteration and the term)."""


class TrainStep:
    """Runs one optimizer step (see the module docstring). Build once per model with its ``train``
    options and device; call :meth:`run` from ``optimize_parameters``."""

    def __init__(self, train_opt, device, logger=None):
        self.device = device
        self.logger = logger
        self.accumulate = int(train_opt.get('accumulate_grad_batches') or 1)
        if self.accumulate < 1:
            raise ValueError(f'train.accumulate_grad_batches: expected an integer >= 1, got '
                             f'{train_opt.get("accumulate_grad_batches")!r}')
        self.amp_dtype = parse_amp(train_opt.get('amp', False), 'train.amp')
        if self.amp_dtype is not None and device.type == 'cuda' and self.amp_dtype == torch.bfloat16 \
                and not torch.cuda.is_bf16_supported():
            raise ValueError('train.amp: bf16 is not supported by this GPU; use fp16 or false')
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        clip = train_opt.get('grad_clip_norm')
        if clip is None and train_opt.get('use_grad_clip'):
            clip = 0.01  # Restormer's fork: use_grad_clip clips the gradient norm at 0.01
        self.grad_clip_norm = float(clip) if clip else None
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            raise ValueError(f'train.grad_clip_norm: expected a positive number, got {clip!r}')
        self.nonfinite = train_opt.get('nonfinite_loss', 'error')
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f'train.nonfinite_loss: expected one of {NONFINITE_POLICIES}, got {self.nonfinite!r}')
        self.skipped = 0
        self.last_grad_norms = []

    # ---------------------------------------------------------------- the step
    def run(self, tensors, compute, optimizers, ddp_nets=(), extra_params=(), current_iter=0):
        """One optimizer step over the batch ``tensors`` (a list of tensors split along dim 0).

        ``compute(chunks)`` -> ``OrderedDict`` of weighted loss terms (scalars) for one micro-batch;
        it runs under autocast. Returns ``(log, stepped)``: the batch's loss terms (detached,
        weighted means over the micro-batches) and whether the optimizers stepped.
        """
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        micro = split_batch(tensors, self.accumulate)
        log = OrderedDict()
        for index, (weight, chunks) in enumerate(micro):
            last = index == len(micro) - 1
            with contextlib.ExitStack() as stack:
                if not last:
                    for net in ddp_nets:
                        if hasattr(net, 'no_sync'):
                            stack.enter_context(net.no_sync())
                with autocast(self.device, self.amp_dtype):
                    losses = compute(chunks)
                total = sum(losses.values())
                bad_terms = [name for name, value in losses.items() if not torch.isfinite(value.detach()).all()]
                if _any_rank(bool(bad_terms), self.device):
                    return self._nonfinite(losses, bad_terms, current_iter, optimizers), False
                self.scaler.scale(total * weight).backward()
            for name, value in losses.items():
                value = value.detach()
                value = value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
                log[name] = log.get(name, 0.0) + value * weight
        average_gradients(extra_params)
        self.last_grad_norms = []
        for optimizer in optimizers:
            if self.grad_clip_norm is not None:
                self.scaler.unscale_(optimizer)
                params = [p for group in optimizer.param_groups for p in group['params'] if p.grad is not None]
                self.last_grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip_norm)))
            self.scaler.step(optimizer)
        self.scaler.update()
        return log, True

    def _nonfinite(self, losses, bad_terms, current_iter, optimizers):
        values = ', '.join(f'{name} = {float(losses[name].detach().float())}' for name in bad_terms) or \
            'a loss term on another rank'
        if self.nonfinite == 'error':
            raise NonFiniteLossError(
                f'iteration {current_iter}: non-finite loss ({values}). Stopped before updating any weight, so the '
                'saved checkpoints are the last good ones. Resume with --auto_resume after lowering the learning '
                'rate, enabling train.grad_clip_norm or changing train.amp; or set train.nonfinite_loss: skip to '
                'skip such steps.')
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        if self.logger is not None:
            self.logger.warning(f'iteration {current_iter}: non-finite loss ({values}); optimizer step skipped '
                                f'(train.nonfinite_loss: skip; {self.skipped} skipped so far)')
        return OrderedDict((name, torch.tensor(math.nan, device=self.device)) for name in losses)

    # ---------------------------------------------------------------- resume
    def state_dict(self):
        """What the training state keeps of this step (the fp16 gradient scaler)."""
        return {'grad_scaler': self.scaler.state_dict(), 'skipped_steps': self.skipped} \
            if self.scaler.is_enabled() else {'skipped_steps': self.skipped}

    def load_state_dict(self, state):
        if self.scaler.is_enabled() and state.get('grad_scaler'):
            self.scaler.load_state_dict(state['grad_scaler'])
        self.skipped = int(state.get('skipped_steps', 0))

    def describe(self, batch_per_gpu, world_size):
        """One log line: the effective batch and the precision."""
        effective = batch_per_gpu * world_size * self.accumulate
        precision = {None: 'fp32', torch.bfloat16: 'bf16 autocast',
                     torch.float16: 'fp16 autocast + gradient scaler'}[self.amp_dtype]
        clip = f', gradient norm clipped at {self.grad_clip_norm:g}' if self.grad_clip_norm else ''
        return (f'Effective batch: {batch_per_gpu} per GPU x {world_size} GPU(s) x {self.accumulate} accumulation = '
                f'{effective} samples per optimizer step; {precision}{clip}; non-finite loss: {self.nonfinite}')
