"""Widen a trained VLU-Net from K to K' > K degradation types, on its state_dict.

Every degradation-guided gradient step (D-GDM) of VLU-Net holds a prompt bank with one component
per degradation type (``*.gradient_descent.prompt_param``, shape (1, K, C, S, S)) and a projection
from the CLIP embedding to the K mixing weights (``*.gradient_descent.linear``, (K, 512) + (K,)).
Widening keeps the K trained components and appends new ones initialised as the MEAN of the
existing components (prompt and projection row alike): a new type starts as "the average
degradation" and its logit starts at the average logit, so the network still runs sensibly and
the new component is then trained to specialise.
"""
import torch

PROMPT_SUFFIX = 'gradient_descent.prompt_param'
LINEAR_SUFFIXES = ('gradient_descent.linear.weight', 'gradient_descent.linear.bias')


def count_degradation_types(state_dict):
    """K of a VLU-Net state_dict (None if it has no D-GDM prompt banks)."""
    sizes = {v.shape[1] for k, v in state_dict.items() if k.endswith(PROMPT_SUFFIX)}
    if not sizes:
        return None
    if len(sizes) != 1:
        raise ValueError(f'inconsistent prompt banks: component counts {sorted(sizes)}')
    return sizes.pop()


def widen_state_dict(state_dict, new_types):
    """Return a copy of ``state_dict`` with every prompt bank and projection grown to ``new_types``.

    Returns ``(widened, grown_keys)``.
    """
    old = count_degradation_types(state_dict)
    if old is None:
        raise ValueError('the checkpoint has no D-GDM prompt banks (not a VLU-Net state_dict)')
    if new_types < old:
        raise ValueError(f'cannot narrow a model from {old} to {new_types} degradation types')
    out, grown = type(state_dict)(), []
    for key, value in state_dict.items():
        if key.endswith(PROMPT_SUFFIX):
            extra = value.mean(dim=1, keepdim=True).expand(-1, new_types - old, *value.shape[2:])
            value = torch.cat([value, extra], dim=1)
            grown.append(key)
        elif key.endswith(LINEAR_SUFFIXES):
            extra = value.mean(dim=0, keepdim=True).expand(new_types - old, *value.shape[1:])
            value = torch.cat([value, extra], dim=0)
            grown.append(key)
        out[key] = value.clone() if key in grown else value
    return out, grown
