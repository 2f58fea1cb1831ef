"""``FFTLoss``: L1 distance of the 2-D Fourier spectra (MoCE-IR's optional auxiliary loss)."""
import torch
from basicsr.utils.registry import LOSS_REGISTRY
from torch import nn
from torch.nn import functional as F


@LOSS_REGISTRY.register()
class FFTLoss(nn.Module):
    """``loss_weight * L1(rfft2(pred), rfft2(target))`` over the real and imaginary parts, as MoCE-IR
    trains with ``--loss_type fft --fft_loss_weight W`` (``src/utils/loss_utils.py``). BasicSR has no
    frequency loss. Option file: ``train: {fft_opt: {type: FFTLoss, loss_weight: 1.0}}``.

    Args:
        loss_weight (float): scale of the loss.
        reduction (str): 'mean' | 'sum' | 'none', over the stacked (real, imaginary) spectra.
    """

    def __init__(self, loss_weight=1.0, reduction='mean'):
        super().__init__()
        if reduction not in ('mean', 'sum', 'none'):
            raise ValueError(f'FFTLoss: reduction must be mean, sum or none, got {reduction!r}')
        self.loss_weight = loss_weight
        self.reduction = reduction

    def forward(self, pred, target):
        if pred.shape != target.shape:
            raise ValueError(f'FFTLoss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ')
        spectra = [torch.view_as_real(torch.fft.rfft2(x.float() if x.dtype in (torch.float16, torch.bfloat16)
                                                       else x)) for x in (pred, target)]
        return self.loss_weight * F.l1_loss(spectra[0], spectra[1], reduction=self.reduction)
