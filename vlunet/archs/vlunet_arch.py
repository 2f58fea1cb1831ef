"""VLU-Net (Zeng et al., CVPR 2025): vision-language gradient-descent-driven deep unfolding.

Algorithm 1 of the paper, as this module computes it. ``y`` is the degraded image, ``e`` its
CLIP embedding (the ``degradation`` argument), ``x`` the estimate, one unfolding stage per level
of a U-shaped hierarchy (levels 1-2-3-4-3-2-1, then refinement)::

    x, y = embed(image), embed_i(image)                  # features and the observation branch
    for stage in stages:                                  # encoder_level1 ... refinement
        w      = softmax(linear(e))                       # which degradation: weights of K types
        prompt = resize(sum_k w_k P_k, size(x))           # the level's prompt bank P, mixed
        x      = x - r * phiT(phi(x, prompt) - y)         # gradient step (D-GDM)
        x      = transformer_blocks(x)                    # proximal step (PMM)
        (down/up-sample x and y, merge skips between levels)
    restored = conv(x) + image

``phi`` is a cross-attention whose keys come from the prompt, ``phiT`` a self-attention (MDTA),
both 2-headed and bias-free. Attribute names are the published ones (``encoder_level1``,
``down1_2``, ``latent``, ``reduce_chan_level3``, ``gradient_descent``, ``denoiser``, ...) so the
published checkpoints load strictly.
"""
import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from basicsr.utils.registry import ARCH_REGISTRY
from vlunet.archs.blocks import (Attention, Downsample, OverlapPatchEmbed, ProjectedAttention, Upsample, crop_to,
                                 pad_to_multiple, transformer_blocks)
from vlunet.archs.card import CheckpointFormat, MethodCard, lightning_layout, PublishedResults, ReferenceCode, Variant, register_card
from vlunet.archs.conditioning import CLIP_DIM, DEGRADATION_EMBEDDING
from vlunet.archs.restormer_arch import restormer_kwargs


class CrossAttention(ProjectedAttention):
    """phi: transposed attention of the features (queries, values) against a prompt (keys).

    ``forward(x, prompt, residual=None, scale=None, beta=1.0)``: ``beta * residual + scale * phi(x,
    prompt)`` (see :class:`~vlunet.archs.blocks.Attention`).
    """

    def __init__(self, dim, num_heads, bias, prompt_dim):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qv = nn.Conv2d(dim, dim * 2, kernel_size=1, bias=bias)
        self.qv_dwconv = nn.Conv2d(dim * 2, dim * 2, kernel_size=3, padding=1, groups=dim * 2, bias=bias)
        self.k = nn.Conv2d(prompt_dim, dim, kernel_size=1, bias=bias)
        self.k_dwconv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)

    def forward(self, x, prompt, residual=None, scale=None, beta=1.0):
        return self.attend(self.qv(x), self.qv_dwconv, self.k_dwconv(self.k(prompt)), residual, scale, beta)


class GradientStep(nn.Module):
    """D-GDM: ``x - r * phiT(phi(x, prompt) - y)`` with a prompt chosen by the CLIP embedding.

    The level's prompt bank ``prompt_param`` holds one (C_p, S, S) component per degradation
    type (C_p = ``int(dim // 10 * stage)``, S = ``96 // stage``). ``linear`` maps the CLIP
    embedding to the K mixing weights (softmax). Without an embedding (``degradation=None``) the
    weights are uniform: the prompt is the mean component, i.e. "some degradation, type unknown"
    (the published code has no working path for this case).
    """

    def __init__(self, de_dim, dim, stage, degradation_dim=CLIP_DIM):
        super().__init__()
        prompt_dim = int(dim // 10 * stage)
        self.de_dim = de_dim
        self.phi = CrossAttention(dim, 2, False, prompt_dim)
        self.phit = Attention(dim, 2, False)
        self.r = nn.Parameter(torch.ones(1))
        self.linear = nn.Linear(degradation_dim, de_dim)
        self.prompt_param = nn.Parameter(torch.rand(1, de_dim, prompt_dim, 96 // stage, 96 // stage))

    def type_weights(self, degradation, batch):
        """(B, K) softmax weights of the degradation types (uniform without an embedding)."""
        if degradation is None:
            return self.prompt_param.new_full((batch, self.de_dim), 1.0 / self.de_dim)
        if degradation.dim() != 2 or degradation.shape[0] != batch:
            raise ValueError(f'VLUNet: degradation must be (B, {self.linear.in_features}) with B = {batch}, '
                             f'got {tuple(degradation.shape)}')
        return F.softmax(self.linear(degradation), dim=1)

    def forward(self, x, y, degradation):
        weights = self.type_weights(degradation, x.shape[0])
        # mixing before resizing equals resizing each component (bilinear resize is linear)
        prompt = torch.einsum('bk,kchw->bchw', weights.to(self.prompt_param.dtype), self.prompt_param[0])
        prompt = F.interpolate(prompt.contiguous(memory_format=torch.channels_last), size=x.shape[-2:],
                               mode='bilinear', align_corners=False)
        # phi(x, prompt) - y, then x - r * phiT(.): residuals and the step size ride on the output projections
        return self.phit(self.phi(x, prompt, residual=y, beta=-1.0), residual=x, scale=-self.r), weights


class UnfoldingStage(nn.Module):
    """One stage of Algorithm 1: gradient step (``gradient_descent``), then proximal step (``denoiser``)."""

    def __init__(self, de_dim, stage, num_blocks, dim, num_heads, ffn_expansion_factor, use_checkpoint=False):
        super().__init__()
        self.gradient_descent = GradientStep(de_dim, dim, stage)
        # the published stages always use bias-free convolutions and WithBias LayerNorm here
        self.denoiser = ProximalStep(num_blocks, dim, num_heads, ffn_expansion_factor)
        self.use_checkpoint = use_checkpoint

    def forward(self, x, y, degradation, record=None, name=''):
        x, weights = self.gradient_descent(x, y, degradation)
        after_gradient = x
        if self.use_checkpoint and torch.is_grad_enabled():
            x = checkpoint(self.denoiser, x, use_reentrant=False)
        else:
            x = self.denoiser(x)
        if record is not None:
            record.append({'stage': name, 'weights': weights, 'after_gradient': after_gradient, 'after_proximal': x})
        return x


class ProximalStep(nn.Module):
    """PMM: a stack of Restormer transformer blocks (MDTA + gated-dconv FFN)."""

    def __init__(self, num_blocks, dim, num_heads, ffn_expansion_factor):
        super().__init__()
        self.blocks = transformer_blocks(num_blocks, dim, num_heads, ffn_expansion_factor, False, 'WithBias')

    def forward(self, x):
        return self.blocks(x)


class Level(NamedTuple):
    """One unfolding stage of the U-shaped hierarchy (a row of :data:`HIERARCHY`)."""
    name: str   # published attribute name of the stage
    depth: int  # resolution 1/2**depth; picks heads[depth], num_blocks[depth] and the prompt stage depth + 1
    width: int  # channels, in multiples of ``dim``


# Algorithm 1's stages in execution order. Between two rows the features (and the observation
# branch) move one level: down (``down{a}_{b}``, ``down{a}_{b}_i``) or up (``up{a}_{b}``,
# ``up{a}_{b}_i``, then the skip of that level is concatenated and, except at level 1, reduced by
# ``reduce_chan_level{b}`` / ``reduce_chan_level{b}_img``).
HIERARCHY = (
    Level('encoder_level1', 0, 1),
    Level('encoder_level2', 1, 2),
    Level('encoder_level3', 2, 4),
    Level('latent', 3, 8),
    Level('decoder_level3', 2, 4),
    Level('decoder_level2', 1, 2),
    Level('decoder_level1', 0, 2),  # skip concatenated, not reduced: twice the width of encoder_level1
    Level('refinement', 0, 2),  # num_refinement_blocks
)


def level_moves():
    """Per row of :data:`HIERARCHY`: (level, previous level, move into it: 'down', 'up' or None, module name)."""
    prev = None
    for level in HIERARCHY:
        move = name = None
        if prev is not None and level.depth != prev.depth:
            move = 'down' if level.depth > prev.depth else 'up'
            name = f'{move}{prev.depth + 1}_{level.depth + 1}'
        yield level, prev, move, name
        prev = level


def _check_vlunet_args(de_dim, dim, num_blocks, heads):
    """Reject constructor arguments the published network cannot be built from, naming the argument."""
    if isinstance(de_dim, bool) or not isinstance(de_dim, numbers.Integral) or de_dim < 1:
        raise ValueError(f'VLUNet: de_dim (number of degradation types) must be a positive integer, got {de_dim!r}')
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 10:
        raise ValueError(f'VLUNet: dim must be an integer >= 10, got {dim!r} (the first gradient step has '
                         f'int(dim // 10) prompt channels, which would be 0; the published model uses dim=48)')
    levels = 1 + max(level.depth for level in HIERARCHY)
    for name, value in (('num_blocks', num_blocks), ('heads', heads)):
        if len(value) != levels:
            raise ValueError(f'VLUNet: {name} must list one value per resolution level ({levels}), got {list(value)!r}')
    for level in HIERARCHY:
        width = dim * level.width
        if width % heads[level.depth]:
            raise ValueError(f'VLUNet: {level.name} has {width} channels (dim={dim} x {level.width}), not divisible '
                             f'by its heads[{level.depth}]={heads[level.depth]}')


@ARCH_REGISTRY.register()
class VLUNet(nn.Module):
    """VLU-Net with the published constructor arguments: ``de_dim`` (number of degradation types =
    components of every prompt bank) first and required; ``bias`` reaches only the skip reductions
    and the output convolution, as published; ``decoder`` and ``LayerNorm_type`` are accepted and,
    as published, unused (the stages always use bias-free, WithBias-LayerNorm blocks).
    ``use_checkpoint`` recomputes the proximal steps in the backward pass (activation
    checkpointing: less training memory, same results and state_dict keys).

    ``forward(inp_img, degradation=None, return_stages=False)``: ``inp_img`` (B, C, H, W) of any
    size (reflect-padded to a multiple of 8 inside and cropped back), ``degradation`` the (B, 512)
    CLIP embedding, or None (uniform degradation weights, see :class:`GradientStep`). With
    ``return_stages`` it returns ``(restored, stages)``: per unfolding stage in execution order a
    dict ``{'stage': name, 'weights': (B, K) softmax weights of the degradation types,
    'after_gradient': features after the gradient step, 'after_proximal': features after the
    proximal step}`` (feature maps (B, C_l, H_l, W_l) at the stage's resolution, padded size; their
    channel mean, contrast-stretched, is a grey-level picture of the intermediate restoration).
    Recording costs nothing: the tensors are the ones the forward computes anyway.

    The degradation-type parameters (grow with K) are ``<stage>.gradient_descent.prompt_param``
    (1, K, C_p, S, S) and ``<stage>.gradient_descent.linear`` (K x 512); :meth:`gradient_steps`
    lists them.
    """
    condition = DEGRADATION_EMBEDDING  # forward(img, CLIP image embedding): see vlunet.archs.conditioning

    def __init__(self, de_dim, inp_channels=3, out_channels=3, dim=48, num_blocks=(4, 6, 6, 8),
                 num_refinement_blocks=4, heads=(1, 2, 4, 8), ffn_expansion_factor=2.66, bias=False,
                 LayerNorm_type='WithBias', decoder=False, use_checkpoint=False):
        super().__init__()
        _check_vlunet_args(de_dim, dim, num_blocks, heads)
        self.patch_embed = OverlapPatchEmbed(inp_channels, dim)
        self.patch_embed_i = OverlapPatchEmbed(inp_channels, dim)  # embeds the observation y
        self.decoder = decoder
        # modules are created in the published order, so state_dict keys come out in that order
        for level, prev, move, name in level_moves():
            if move == 'down':
                # two of each; down1_2_i is never used (as published: y also goes through down1_2)
                setattr(self, name, Downsample(dim * prev.width))
                setattr(self, name + '_i', Downsample(dim * prev.width))
            elif move == 'up':
                setattr(self, name, Upsample(dim * prev.width))
                setattr(self, name + '_i', Upsample(dim * prev.width))
                if level.depth > 0:
                    merged = dim * (prev.width // 2 + HIERARCHY[level.depth].width)  # upsampled + skip
                    setattr(self, f'reduce_chan_level{level.depth + 1}',
                            nn.Conv2d(merged, dim * level.width, kernel_size=1, bias=bias))
                    setattr(self, f'reduce_chan_level{level.depth + 1}_img',
                            nn.Conv2d(merged, dim * level.width, kernel_size=1, bias=bias))
            blocks = num_refinement_blocks if level.name == 'refinement' else num_blocks[level.depth]
            setattr(self, level.name, UnfoldingStage(de_dim, level.depth + 1, blocks, dim * level.width,
                                                     heads[level.depth], ffn_expansion_factor, use_checkpoint))
        self.output = nn.Conv2d(dim * HIERARCHY[-1].width, out_channels, kernel_size=3, padding=1, bias=bias)

    def gradient_steps(self):
        """``[(stage name, its GradientStep)]`` in execution order: the D-GDMs whose ``prompt_param``
        and ``linear`` have one component / output per degradation type."""
        return [(level.name, getattr(self, level.name).gradient_descent) for level in HIERARCHY]

    def forward(self, inp_img, degradation=None, return_stages=False):
        padded, size = pad_to_multiple(inp_img, 8)
        record = [] if return_stages else None
        # features run in channels_last (see vlunet.archs.blocks); the result is an ordinary NCHW tensor
        out = crop_to(self._unfold(padded.contiguous(memory_format=torch.channels_last), degradation, record),
                      size).contiguous()
        return (out, record) if return_stages else out

    def _unfold(self, img, e, record):
        """Algorithm 1 on an image whose sides are multiples of 8."""
        x, y = self.patch_embed(img), self.patch_embed_i(img)  # estimate and observation, as features
        skips = []  # (x, y) of every encoder level, for the decoder level of the same depth
        for level, _, move, name in level_moves():
            if move == 'down':
                skips.append((x, y))
                # as published, the observation branch goes through down1_2 as well (not down1_2_i)
                down_y = getattr(self, name if name == 'down1_2' else name + '_i')
                x, y = getattr(self, name)(x), down_y(y)
            elif move == 'up':
                skip_x, skip_y = skips.pop()
                x = torch.cat([getattr(self, name)(x), skip_x], 1)
                y = torch.cat([getattr(self, name + '_i')(y), skip_y], 1)
                if level.depth > 0:
                    x = getattr(self, f'reduce_chan_level{level.depth + 1}')(x)
                    y = getattr(self, f'reduce_chan_level{level.depth + 1}_img')(y)
            x = getattr(self, level.name)(x, y, e, record, level.name)  # gradient step, then proximal step
        return self.output(x) + img


# ------------------------------------------------------------------------------------------------
# the method card
# ------------------------------------------------------------------------------------------------
def _kwargs_from_state_dict(params):
    # the stages' blocks ignore the model's LayerNorm_type (not visible in the keys); ``bias`` shows in the output conv
    return dict(de_dim=params['encoder_level1.gradient_descent.prompt_param'].shape[1],
                **restormer_kwargs(params, '{}.denoiser.blocks.', bias_key='output.bias'))


def _published_args(kwargs):
    kwargs = {k: v for k, v in kwargs.items() if k != 'use_checkpoint'}  # ours: activation checkpointing
    return (kwargs.pop('de_dim'),), kwargs


_SOURCE = 'VLU-Net {}-task table (repository figure figures/{}task.png at 8c2f7a7)'
CARD = register_card(MethodCard(
    name='VLU-Net', arch='VLUNet',
    paper='Zeng et al., "Vision-Language Gradient Descent-driven All-in-One Deep Unfolding Networks", CVPR 2025',
    code='xianggkl/VLU-Net @ 8c2f7a7543762cce5ed45736d0c6787c92a1f5e6 (net/Final.py)',
    variants=(Variant('VLU-Net', 'VLUNet', {'de_dim': 5}, params=34_364_852, listing='keys_VLUNet_de5.tsv',
                      settings=('NHR',)),
              Variant('VLU-Net-7', 'VLUNet', {'de_dim': 7}, params=35_353_028, listing='keys_VLUNet_de7.tsv',
                      settings=('NHRBL',))),
    tiny=dict(de_dim=3, dim=10, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 2, 4, 8]),
    condition=DEGRADATION_EMBEDDING, records_stages=True,
    signature=('patch_embed_i.proj.weight', 'encoder_level1.gradient_descent.prompt_param'),
    kwargs_from_state_dict=_kwargs_from_state_dict,
    checkpoint_formats=(CheckpointFormat("Lightning .ckpt: {'state_dict': {'net.<key>': ..., 'model_degradation.<CLIP>': "
                                         "...}} (the CLIP adapters go to --clip-out; the published clip_tuned.pth "
                                         "{'learnable_params': ...} is network_clip.load_path)", lightning_layout),),
    recipe={'note': 'the shared recipe of every setting is VLU-Net\'s: patch 128, AdamW lr 2e-4, batch 4 per GPU '
                    'on 8 GPUs, 200 epochs, 15 warm-up epochs then cosine; the CLIP adapters are trained first'},
    results=(
        PublishedResults('NHR', 'VLU-Net', {'SOTS_outdoor': (30.71, 0.980), 'Rain100L': (38.93, 0.984),
                                            'CBSD68_sigma15': (34.13, 0.935), 'CBSD68_sigma25': (31.48, 0.892),
                                            'CBSD68_sigma50': (28.23, 0.804)},
                         source=_SOURCE.format('three', 3), average=(32.70, 0.919)),
        PublishedResults('NHRBL', 'VLU-Net-7', {'SOTS_outdoor': (30.84, 0.980), 'Rain100L': (38.54, 0.982),
                                                'CBSD68_sigma25': (31.43, 0.891), 'GoPro': (27.46, 0.840),
                                                'LOL': (22.29, 0.833)},
                         source=_SOURCE.format('five', 5), average=(30.11, 0.905)),
    ),
    reference=ReferenceCode('VLUNet', kwargs=_published_args),
))
