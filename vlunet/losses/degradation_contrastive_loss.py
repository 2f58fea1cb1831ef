"""``DegradationContrastiveLoss``: image-to-prompt cross-entropy used to fine-tune DegradationCLIP."""
import math

import torch
from basicsr.utils.registry import LOSS_REGISTRY
from torch import nn
from torch.nn import functional as F


@LOSS_REGISTRY.register()
class DegradationContrastiveLoss(nn.Module):
    """Cross-entropy of the image-text logits against the degradation label.

    ``logits = s * image_features @ text_features.T`` with ``s = 1 / temperature``; the loss is
    ``loss_weight * cross_entropy(logits, labels)``. The defaults (no normalisation, temperature 1)
    are the published recipe.

    Args:
        loss_weight (float): scale of the loss.
        normalize (bool): L2-normalise both feature sets first (cosine similarities, as in CLIP).
        temperature (float): divides the logits (initial value when learnable).
        learnable_temperature (bool): learn ``logit_scale = log(1 / temperature)`` (clamped to at most
            log(100), as CLIP does); the model must then optimise this loss's parameters too.
        reduction (str): 'mean' | 'sum' | 'none'.
    """

    def __init__(self, loss_weight=1.0, normalize=False, temperature=1.0, learnable_temperature=False,
                 reduction='mean'):
        super().__init__()
        if reduction not in ('mean', 'sum', 'none'):
            raise ValueError(f'DegradationContrastiveLoss: reduction must be mean, sum or none, got {reduction!r}')
        if not temperature > 0:
            raise ValueError(f'DegradationContrastiveLoss: temperature must be > 0, got {temperature!r}')
        self.loss_weight = loss_weight
        self.normalize = bool(normalize)
        self.reduction = reduction
        self.scaled = bool(learnable_temperature) or temperature != 1.0  # temperature 1: logits unscaled, exactly
        scale = torch.tensor(math.log(1.0 / temperature))
        if learnable_temperature:
            self.logit_scale = nn.Parameter(scale)
        else:
            self.register_buffer('logit_scale', scale)

    def logits(self, image_features, text_features):
        """(B, K) similarities of B image features (B, D) with K text features (K, D)."""
        if image_features.dim() != 2 or text_features.dim() != 2 or image_features.shape[1] != text_features.shape[1]:
            raise ValueError('DegradationContrastiveLoss: expected image_features (B, D) and text_features (K, D), '
                             f'got {tuple(image_features.shape)} and {tuple(text_features.shape)}')
        if self.normalize:
            image_features = F.normalize(image_features, dim=-1)
            text_features = F.normalize(text_features, dim=-1)
        logits = image_features @ text_features.t()
        if self.scaled:
            logits = logits * self.logit_scale.clamp(max=math.log(100)).exp()
        return logits

    def forward(self, image_features, text_features, labels):
        """Loss of image features (B, D) vs. prompt features (K, D) for labels (B,) in [0, K)."""
        logits = self.logits(image_features, text_features)
        labels = torch.as_tensor(labels, device=logits.device).long().view(-1)
        if labels.numel() != logits.shape[0]:
            raise ValueError(f'DegradationContrastiveLoss: {logits.shape[0]} image features but {labels.numel()} labels')
        if labels.numel() and (labels.min() < 0 or labels.max() >= logits.shape[1]):
            raise ValueError(f'DegradationContrastiveLoss: labels must lie in [0, {logits.shape[1]}) (one per text '
                             f'prompt), got {labels.tolist()}')
        return self.loss_weight * F.cross_entropy(logits, labels, reduction=self.reduction)
