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
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from basicsr.utils.registry import ARCH_REGISTRY
from vlunet.archs.blocks import (Attention, Downsample, OverlapPatchEmbed, ProjectedAttention, Upsample, crop_to,
                                 pad_to_multiple, transformer_blocks)

CLIP_DIM = 512


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


@ARCH_REGISTRY.register()
class VLUNet(nn.Module):
    """VLU-Net. Constructor arguments are the published ones (``de_dim`` = number of degradation
    types = prompt-bank components; ``decoder`` and ``LayerNorm_type`` are accepted and, as
    published, unused). ``use_checkpoint`` recomputes the proximal steps in the backward pass
    (activation checkpointing: much less training memory, same results).

    ``forward(inp_img, degradation, return_stages=False)``: ``inp_img`` (B, 3, H, W) of any size
    (reflect-padded to a multiple of 8 inside and cropped back), ``degradation`` the (B, 512) CLIP
    embedding or None. With ``return_stages`` also returns, per unfolding stage in execution order,
    ``{'stage', 'weights' (B, K), 'after_gradient', 'after_proximal'}`` (feature maps; their
    channel mean is a grey-level picture of the intermediate restoration).
    """

    # the U-shaped hierarchy: (stage name, stage index of its prompt size, width multiplier, level)
    STAGES = (('encoder_level1', 1, 1, 0), ('encoder_level2', 2, 2, 1), ('encoder_level3', 3, 4, 2),
              ('latent', 4, 8, 3), ('decoder_level3', 3, 4, 2), ('decoder_level2', 2, 2, 1),
              ('decoder_level1', 1, 2, 0), ('refinement', 1, 2, None))

    def __init__(self, de_dim=7, inp_channels=3, out_channels=3, dim=48, num_blocks=(4, 6, 6, 8),
                 num_refinement_blocks=4, heads=(1, 2, 4, 8), ffn_expansion_factor=2.66, bias=False,
                 LayerNorm_type='WithBias', decoder=False, use_checkpoint=False):
        super().__init__()

        def stage(name):
            _, index, mult, level = next(s for s in self.STAGES if s[0] == name)
            blocks = num_refinement_blocks if level is None else num_blocks[level]
            return UnfoldingStage(de_dim, index, blocks, dim * mult, heads[level or 0], ffn_expansion_factor,
                                  use_checkpoint)

        # modules are created in the published order, so state_dict keys come out in that order
        self.patch_embed = OverlapPatchEmbed(inp_channels, dim)
        self.patch_embed_i = OverlapPatchEmbed(inp_channels, dim)  # embeds the observation y
        self.decoder = decoder
        self.encoder_level1 = stage('encoder_level1')
        self.down1_2, self.down1_2_i = Downsample(dim), Downsample(dim)  # down1_2_i: never used, as published
        self.encoder_level2 = stage('encoder_level2')
        self.down2_3, self.down2_3_i = Downsample(dim * 2), Downsample(dim * 2)
        self.encoder_level3 = stage('encoder_level3')
        self.down3_4, self.down3_4_i = Downsample(dim * 4), Downsample(dim * 4)
        self.latent = stage('latent')
        self.up4_3, self.up4_3_i = Upsample(dim * 8), Upsample(dim * 8)
        self.reduce_chan_level3 = nn.Conv2d(dim * 8, dim * 4, kernel_size=1, bias=bias)
        self.reduce_chan_level3_img = nn.Conv2d(dim * 8, dim * 4, kernel_size=1, bias=bias)
        self.decoder_level3 = stage('decoder_level3')
        self.up3_2, self.up3_2_i = Upsample(dim * 4), Upsample(dim * 4)
        self.reduce_chan_level2 = nn.Conv2d(dim * 4, dim * 2, kernel_size=1, bias=bias)
        self.reduce_chan_level2_img = nn.Conv2d(dim * 4, dim * 2, kernel_size=1, bias=bias)
        self.decoder_level2 = stage('decoder_level2')
        self.up2_1, self.up2_1_i = Upsample(dim * 2), Upsample(dim * 2)  # no channel reduction at level 1
        self.decoder_level1 = stage('decoder_level1')
        self.refinement = stage('refinement')
        self.output = nn.Conv2d(dim * 2, out_channels, kernel_size=3, padding=1, bias=bias)

    def forward(self, inp_img, degradation=None, return_stages=False):
        padded, size = pad_to_multiple(inp_img, 8)
        record = [] if return_stages else None
        # features run in channels_last (see vlunet.archs.blocks); the result is an ordinary NCHW tensor
        out = crop_to(self._unfold(padded.contiguous(memory_format=torch.channels_last), degradation, record),
                      size).contiguous()
        return (out, record) if return_stages else out

    def _unfold(self, img, e, record):

        def run(name, x, y):
            return getattr(self, name)(x, y, e, record, name)

        x1, y1 = self.patch_embed(img), self.patch_embed_i(img)
        x1 = run('encoder_level1', x1, y1)
        # as published, the observation branch also goes through down1_2 (not down1_2_i)
        y2 = self.down1_2(y1)
        x2 = run('encoder_level2', self.down1_2(x1), y2)
        y3 = self.down2_3_i(y2)
        x3 = run('encoder_level3', self.down2_3(x2), y3)
        y4 = self.down3_4_i(y3)
        x4 = run('latent', self.down3_4(x3), y4)

        y = self.reduce_chan_level3_img(torch.cat([self.up4_3_i(y4), y3], 1))
        x = run('decoder_level3', self.reduce_chan_level3(torch.cat([self.up4_3(x4), x3], 1)), y)
        y = self.reduce_chan_level2_img(torch.cat([self.up3_2_i(y), y2], 1))
        x = run('decoder_level2', self.reduce_chan_level2(torch.cat([self.up3_2(x), x2], 1)), y)
        y = torch.cat([self.up2_1_i(y), y1], 1)
        x = run('decoder_level1', torch.cat([self.up2_1(x), x1], 1), y)
        x = run('refinement', x, y)
        return self.output(x) + img
