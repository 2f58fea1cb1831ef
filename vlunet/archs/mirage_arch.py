"""MIRAGE (Ren et al., ICLR 2026): channel-wise functional decomposition and SPD manifold regularisation.

MIRAGE keeps Restormer's U-shaped hierarchy (levels at dim, 2dim, 4dim, 8dim; decoder level 1 and
the refinement at 2dim; patch embedding, pixel-(un)shuffle resampling and channel LayerNorm from
:mod:`vlunet.archs.blocks`) and changes three things.

**The token mixer splits the channels.** The C channels of ``n = LN(x)`` are cut, in order, into
thirds ``[a | g | m]`` of C//3, C//3 and C - 2(C//3) channels, and each third gets its own operator::

    att   = softmax(norm(q) norm(k)^T * t) v          # MDTA on a (1x1 -> 3x3 depthwise -> q, k, v), no projection
    gated = GatedCNN(g)                               # see below
    mlp   = W2 gelu(W1 m) (+ biases)                  # per-pixel MLP
    att'   = att   + alpha_att   * sigmoid(gated + mlp)   # each branch modulated by the other two
    gated' = gated + alpha_gated * sigmoid(att + mlp)
    mlp'   = mlp   + alpha_mlp   * sigmoid(att + gated)
    x      = x + project_out([att' | gated' | mlp'])

``GatedCNN`` (a dynamic gated CNN block on c = C//3 channels, hidden h = int(8/3 * c)), all
convolutions bias-free::

    u        = BatchNorm(g)                           # batch statistics in training, running ones in eval
    p, i, k  = split(gic1(u), (h, h - c, c))
    K_b      = W_k2 gelu(W_k1 mean_hw(k_b))           # per sample b: c depthwise 7x7 kernels from its own k
    y        = gic2(gelu(p / T) * [i | conv7x7(k_b, K_b)])
    GatedCNN = proj_out(g + DropPath_0.1(y))          # proj_out AFTER the residual sum

DropPath (stochastic depth, rate 0.1, hard-coded) drops ``y`` per sample in training: one
``(B, 1, 1, 1)`` Bernoulli(0.9) draw on the global RNG per block call, divided by 0.9 (timm's
``DropPath``, which the published code uses).

**The feed-forward network** is GDFN with an extra GELU after ``project_in``:
``x + project_out(gelu(a) * b)``, ``(a, b) = dwconv(gelu(project_in(LN(x))))``.

**SPD manifold regularisation.** After the latent level ``reduce_dim_level3`` (1x1, 8dim -> 4dim)
gives the reduced latent that feeds both the decoder and this head. The encoder's level-1 output
(``reduce_shallow``: dim -> 12 channels) and the reduced latent (``reduce_latent``: 4dim -> 24) are
each summarised by their channel covariance over the pixels, an SPD matrix::

    S    = (X - mean) (X - mean)^T / (N - 1) + eps I     # X: C x N pixels; eps = float32(1e-5)
    z_s  = normalize(spd_proj_shallow(vec(S_shallow)))  # 144 -> 64
    z_l  = normalize(spd_proj_latent(vec(S_latent)))    # 576 -> 64
    loss = 0.01 * cross_entropy(z_s z_l^T / 0.1, [0, 1, ..., B-1])

an InfoNCE term that pulls each image's shallow and latent statistics together and pushes the
other images of the batch away (one direction: shallow rows against latent columns). Weight 0.01
and temperature 0.1 are fixed in the network, as published. The term does not touch the restored
image; it depends on the whole batch, is exactly 0 for a batch of one, and is NaN when the latent
grid has a single pixel (N - 1 = 0: inputs of at most 8 x 8), all as published.

Published code: ``Amazingren/MIRAGE`` at 926dc83646272a0d99b36f4bff496985ab064795,
``net/mirage_small.py`` (MIRAGE-S, dim 30) and ``net/mirage_tiny.py`` (MIRAGE-T, dim 24), both a class
``MIRAGE``. The two files differ only in their defaults and in the in-channels of ``reduce_shallow`` /
``reduce_latent``, hard-coded there (30/120 and 24/96) and derived here from ``dim`` (dim, 4dim):
one class serves both, and any ``dim`` works. Attribute names, state_dict keys and their order are
the published ones, so the released Lightning checkpoints (keys ``net.<key>``) load strictly.
Facts of the published code kept here: the patch embedding and the resampling convolutions are
always bias-free, ``reduce_shallow``/``reduce_latent``/``spd_proj_*`` always have biases; the
model ``bias`` reaches the attention's qkv/qkv_dwconv/project_out, the MLP, the FFN, the skip
reductions, ``reduce_dim_level3`` and the output convolution; LayerNorm_type 'BiasFree' selects the
bias-free norm and any other string the one with a bias.

Interface (see :class:`MIRAGE`): ``forward(img)`` returns ``(restored, loss_ctr_spd)`` in training
and in eval, as published. The SPD vectors and projections of the last forward are kept, detached,
in ``net.spd_features`` (names ``z_s_raw``, ``z_l_raw``, ``z_s``, ``z_l``), so tests and analyses
read them without a second forward.

Sizes. The published forward needs H and W divisible by 8 (the data pipeline crops every image to
a multiple of 16). Here any H x W is reflect-padded at the bottom/right to a multiple of 8 inside
and the restored image cropped back, like the other archs; multiples of 8 are not padded and give
the published result. The SPD statistics are taken over the padded feature maps: the loss is a
statistic of the features the network actually computed (the padded border is part of what the
encoder saw and of what the latent summarises), there is no published rule for other sizes, and
the loss never changes the restored image. Published training (128 x 128 patches) is unaffected.
"""
import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from basicsr.utils.registry import ARCH_REGISTRY
from vlunet.archs.blocks import (ChannelAttention, Downsample, FeedForward, LayerNorm, OverlapPatchEmbed, Upsample,
                                 _flat, _gelu_grad, channel_attention, crop_to, linear_map, pad_to_multiple,
                                 use_fused)
from vlunet.archs.card import (CheckpointFormat, MethodCard, NetworkOutput, PublishedResults, ReferenceCode,
                               TrainingTerm, Variant, count_blocks, expansion_factor, layer_norm_type, lightning_layout,
                               register_card)

GATED_EXPANSION = 8 / 3      # hidden width of the gated CNN block: int(8/3 * c)
DYNAMIC_KERNEL = 7           # per-sample depthwise kernel of the gated CNN block
DROP_PATH = 0.1              # stochastic depth of the gated CNN block's branch (hard-coded in the published code)
SPD_CHANNELS = (12, 24)      # channels of the shallow / latent features whose covariance is taken
SPD_EMBED = 64               # width of z_s, z_l
# eps * I stabilises the covariance; the published identity is float32, so a float64 run adds float32(1e-5)
SPD_EPS = float(torch.tensor(1e-5, dtype=torch.float32))
CONTRASTIVE_WEIGHT = 0.01
CONTRASTIVE_TEMPERATURE = 0.1


# ------------------------------------------------------------------------------------------------
# the three branches of the token mixer


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's ``DropPath`` with ``scale_by_keep``): in training,
    ``x * mask / (1 - drop_prob)`` with ``mask`` a (B, 1, ..., 1) Bernoulli(1 - drop_prob) draw on the
    global RNG (``x.new_empty(...).bernoulli_``, as timm draws it); identity in eval or at rate 0."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        if keep > 0.0:
            mask.div_(keep)
        return x * mask

    def extra_repr(self):
        return f'drop_prob={self.drop_prob}'


def _pointwise(conv, x, dtype=None):
    """A 1x1 ``nn.Conv1d``/``nn.Conv2d`` applied to every pixel of a (B, C, H, W) map (rows of pixels),
    its weights cast to ``dtype`` if given."""
    weight, bias = _flat(conv.weight), conv.bias
    if dtype is not None:
        weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
    return linear_map(x, weight, bias)


def _gelu(x):
    """Exact GELU of a tensor the caller owns: in place when no gradient is recorded through it (inference
    then keeps one full-size map fewer), else out of place."""
    if torch.is_grad_enabled() and x.requires_grad:
        return F.gelu(x)
    return torch.ops.aten.gelu.out(x, out=x)


def _linear(linear, x):
    """``linear`` applied to x, its weights cast to x's dtype."""
    return F.linear(x, linear.weight.to(x.dtype), linear.bias.to(x.dtype))


def per_sample_depthwise(x, kernels, per_sample=True):
    """Depthwise convolution of each sample of x (B, c, H, W) with its own kernels (B, c, 1, k, k), 'same'
    padding. ``per_sample``: one convolution per sample on the (channels_last) map, faster on CPU; else,
    as published, one grouped convolution of B*c groups with the batch folded into the channels (one
    kernel launch, for GPUs). Both compute the same sums."""
    b, c, h, w = x.shape
    pad = kernels.shape[-1] // 2
    if per_sample:
        return torch.cat([F.conv2d(x[j:j + 1], kernels[j], padding=pad, groups=c) for j in range(b)])
    out = F.conv2d(x.reshape(1, b * c, h, w), kernels.reshape(b * c, 1, *kernels.shape[-2:]), padding=pad,
                   groups=b * c)
    return out.reshape(b, c, h, w)


class GeluGate(torch.autograd.Function):
    """``gelu(a) * b`` keeping only a and b for the backward pass, which recomputes gelu(a): one
    hidden-width map fewer than autograd saves for ``F.gelu(a) * b``, with the same results."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return F.gelu(a) * b

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad_a = _gelu_grad((grad * b).to(a.dtype), a) if ctx.needs_input_grad[0] else None
        grad_b = (grad * F.gelu(a)).to(b.dtype) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def _gelu_gate(a, b):
    """``gelu(a) * b``: through :class:`GeluGate` where a gradient is recorded, else in place in a."""
    if use_fused(a) and torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return GeluGate.apply(a, b)
    return _gelu(a) * b


class GatedCNNBlock(nn.Module):
    """The gated branch (published ``GatedCNNBlock`` with its hard-coded settings: expansion 8/3,
    dynamic 7x7 kernels on all c channels, BatchNorm, GELU, DropPath 0.1); see the module docstring."""

    def __init__(self, dim, drop_path=DROP_PATH):
        super().__init__()
        hidden = int(GATED_EXPANSION * dim)
        self.hidden, self.channels, self.kernel_size = hidden, dim, DYNAMIC_KERNEL
        self.temperature = nn.Parameter(torch.ones(1))
        self.norm = nn.BatchNorm2d(dim)
        self.gic1 = nn.Conv2d(dim, hidden * 2, kernel_size=1, bias=False)
        # kernel_generator.1 / .3 are the published keys (0: global average pool, 2: GELU)
        self.kernel_generator = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, dim, kernel_size=1, bias=False), nn.GELU(),
            nn.Conv2d(dim, dim * DYNAMIC_KERNEL ** 2, kernel_size=1, bias=False))
        self.gic2 = nn.Conv2d(hidden, dim, kernel_size=1, bias=False)
        self.drop_path = DropPath(drop_path)
        self.proj_out = nn.Conv2d(dim, dim, kernel_size=1, bias=False)

    def dynamic_conv(self, k):
        """Each sample's k (B, c, H, W) convolved with its own c depthwise kernels (from its mean)."""
        b, c = k.shape[:2]
        _, first, act, second = self.kernel_generator  # (pool, conv, GELU, conv)
        code = act(F.linear(k.mean((2, 3)), _flat(first.weight)))  # the pool and 1x1 convs on (B, c) vectors
        kernels = F.linear(code, _flat(second.weight)).reshape(b, c, 1, self.kernel_size, self.kernel_size)
        return per_sample_depthwise(k, kernels, per_sample=k.device.type == 'cpu')

    def forward(self, x):
        hidden, c = self.hidden, self.channels
        p, i, k = torch.split(_pointwise(self.gic1, self.norm(x)), (hidden, hidden - c, c), dim=1)
        # the temperature in p's dtype: under autocast the gate stays in the autocast dtype (a float32
        # scalar would promote two hidden-width maps, saved for the backward pass, to float32)
        y = _pointwise(self.gic2, _gelu_gate(p / self.temperature.to(p.dtype), torch.cat([i, self.dynamic_conv(k)], 1)))
        return _pointwise(self.proj_out, x + self.drop_path(y))


class DecomposedAttention(nn.Module):
    """MIRAGE's token mixer (published ``Attention``): MDTA on the first third of the channels, the
    gated CNN on the second, a per-pixel MLP on the rest, cross-modulated and projected (see the
    module docstring). ``heads`` must divide C // 3.

    ``forward(x, residual=None)``: x is the normalised input; ``residual`` is added to the result.
    """

    def __init__(self, dim, num_heads, bias):
        super().__init__()
        self.num_heads = num_heads
        self.dim_attn = self.dim_gated = dim // 3
        self.dim_mlp = dim - 2 * (dim // 3)
        a, m = self.dim_attn, self.dim_mlp
        if a == 0 or a % num_heads:
            raise ValueError(f'MIRAGE: {num_heads} heads must divide the attention third ({dim} // 3 = {a} channels) '
                             f'of a {dim}-channel block')
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(a, a * 3, kernel_size=1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(a * 3, a * 3, kernel_size=3, padding=1, groups=a * 3, bias=bias)
        self.gatedcnn = GatedCNNBlock(self.dim_gated)
        self.mlp = nn.Sequential(nn.Conv1d(m, m * 2, kernel_size=1, bias=bias), nn.GELU(),
                                 nn.Conv1d(m * 2, m, kernel_size=1, bias=bias))
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)
        self.alpha_att = nn.Parameter(torch.ones(1))
        self.alpha_gated = nn.Parameter(torch.ones(1))
        self.alpha_mlp = nn.Parameter(torch.ones(1))

    def attend(self, x):
        """MDTA's channel attention of the first third, without an output projection."""
        qkv = _pointwise(self.qkv, x)
        if not use_fused(qkv):
            q, k, v = self.qkv_dwconv(qkv).chunk(3, dim=1)
            return channel_attention(q, k, v, self.temperature, self.num_heads)
        # the fused attention with an identity projection: keeps only qkv, recomputes the depthwise conv
        eye = torch.eye(self.dim_attn, dtype=qkv.dtype, device=qkv.device)
        return ChannelAttention.apply(qkv, self.qkv_dwconv.weight, self.qkv_dwconv.bias, None, self.temperature, eye,
                                      None, None, self.num_heads, 1.0)

    def forward(self, x, residual=None):
        a, g = self.dim_attn, self.dim_gated
        att = self.attend(x[:, :a])
        gated = self.gatedcnn(x[:, a:a + g])
        mlp = _pointwise(self.mlp[2], _gelu(_pointwise(self.mlp[0], x[:, a + g:])))
        fused = torch.cat([att + self.alpha_att * torch.sigmoid(gated + mlp),
                           gated + self.alpha_gated * torch.sigmoid(att + mlp),
                           mlp + self.alpha_mlp * torch.sigmoid(att + gated)], 1)
        out = _pointwise(self.project_out, fused)
        return out if residual is None else residual + out


class GeluFeedForward(FeedForward):
    """MIRAGE's FFN: GDFN with a GELU between ``project_in`` and the depthwise conv,
    ``project_out(gelu(a) * b)`` with ``(a, b) = dwconv(gelu(project_in(x)))`` (same keys as GDFN).

    ``forward(x, residual=None, norm=None)`` is :class:`~vlunet.archs.blocks.FeedForward`'s with this
    GELU as its ``activate_input`` (the fused path pads the hidden channels: gelu(0) = 0 keeps them zero).
    """

    def activate_input(self, x):
        return _gelu(x)  # a fresh tensor: in place when no gradient is recorded through it


class TransformerBlock(nn.Module):
    """x + DecomposedAttention(LN(x)), then x + GeluFeedForward(LN(x))."""

    def __init__(self, dim, num_heads, ffn_expansion_factor, bias, LayerNorm_type):
        super().__init__()
        self.norm1 = LayerNorm(dim, LayerNorm_type)
        self.attn = DecomposedAttention(dim, num_heads, bias)
        self.norm2 = LayerNorm(dim, LayerNorm_type)
        self.ffn = GeluFeedForward(dim, ffn_expansion_factor, bias)

    def forward(self, x):
        x = self.attn(self.norm1(x), residual=x)
        return self.ffn(x, residual=x, norm=self.norm2)


def transformer_blocks(num_blocks, dim, num_heads, ffn_expansion_factor, bias, LayerNorm_type):
    return nn.Sequential(*[
        TransformerBlock(dim, num_heads, ffn_expansion_factor, bias, LayerNorm_type) for _ in range(num_blocks)
    ])


# ------------------------------------------------------------------------------------------------
# SPD manifold regularisation


def spd_vector(feat):
    """(B, C, H, W) -> (B, C*C): the channel covariance over the H*W pixels (unbiased, mean-centred)
    plus ``SPD_EPS`` on the diagonal, flattened row by row."""
    b, c = feat.shape[:2]
    rows = feat.permute(0, 2, 3, 1).reshape(b, -1, c)  # (B, N, C) pixel rows
    centred = rows - rows.mean(1, keepdim=True)
    cov = centred.transpose(1, 2) @ centred / (rows.shape[1] - 1)
    cov = cov + SPD_EPS * torch.eye(c, dtype=cov.dtype, device=cov.device)  # not in place: exportable graphs
    return cov.reshape(b, c * c)


def spd_contrastive_loss(z_s, z_l, temperature=CONTRASTIVE_TEMPERATURE):
    """InfoNCE of the shallow codes (rows) against the latent ones (columns): image b's pair is (b, b).
    The codes are normalised again (a no-op up to rounding), as published."""
    logits = F.normalize(z_s, dim=1) @ F.normalize(z_l, dim=1).t() / temperature
    return F.cross_entropy(logits, torch.arange(z_s.shape[0], device=z_s.device))


# ------------------------------------------------------------------------------------------------
# network


@ARCH_REGISTRY.register()
class MIRAGE(nn.Module):
    """MIRAGE with the published constructor arguments, state_dict keys and key order.

    Defaults are MIRAGE-S (``net/mirage_small.py``: dim 30, 9,678,983 parameters); MIRAGE-T
    (``net/mirage_tiny.py``) is ``dim=24, num_refinement_blocks=2`` (6,207,412). Every published
    training and test script builds one of them with its defaults. ``out_channels`` must equal
    ``inp_channels`` (global residual) and every ``heads`` entry must divide a third of its level's
    width (``heads[0]`` also a third of 2dim: decoder level 1 and the refinement).

    ``forward(inp_img)`` -> ``(restored, loss_ctr_spd)``: the restored image (B, out, H, W) of any
    H x W (reflect-padded to a multiple of 8 inside and cropped back) and the weighted SPD
    contrastive loss (a scalar; 0.01 x InfoNCE, see the module docstring), in training and in eval.
    After a forward, ``spd_features`` holds the detached SPD vectors and codes of the batch:
    ``z_s_raw`` (B, 144), ``z_l_raw`` (B, 576), ``z_s``, ``z_l`` (B, 64).

    Training mode differs from eval, as published: the gated CNN blocks' BatchNorm uses (and
    updates the running statistics with) the batch statistics, so an image's result depends on
    the rest of its batch, and DropPath drops their gated branch per sample at rate 0.1 (draws on
    the global RNG, one per block call in execution order).
    """
    condition = None  # forward(img): see vlunet.archs.conditioning

    def __init__(self, inp_channels=3, out_channels=3, dim=30, num_blocks=(3, 5, 5, 7), num_refinement_blocks=3,
                 heads=(1, 2, 4, 8), ffn_expansion_factor=2, bias=False, LayerNorm_type='WithBias'):
        super().__init__()
        if out_channels != inp_channels:
            raise ValueError(f'MIRAGE: out_channels ({out_channels}) must equal inp_channels ({inp_channels}): '
                             'the input image is added to the output')

        def blocks(n, width, n_heads):
            return transformer_blocks(n, width, n_heads, ffn_expansion_factor, bias, LayerNorm_type)

        self.patch_embed = OverlapPatchEmbed(inp_channels, dim)
        self.encoder_level1 = blocks(num_blocks[0], dim, heads[0])
        self.down1_2 = Downsample(dim)
        self.encoder_level2 = blocks(num_blocks[1], dim * 2, heads[1])
        self.down2_3 = Downsample(dim * 2)
        self.encoder_level3 = blocks(num_blocks[2], dim * 4, heads[2])
        self.down3_4 = Downsample(dim * 4)
        self.latent = blocks(num_blocks[3], dim * 8, heads[3])
        self.up4_3 = Upsample(dim * 4)  # from the reduced latent (4dim) to 2dim
        self.reduce_chan_level3 = nn.Conv2d(dim * 6, dim * 4, kernel_size=1, bias=bias)
        self.reduce_dim_level3 = nn.Conv2d(dim * 8, dim * 4, kernel_size=1, bias=bias)
        self.decoder_level3 = blocks(num_blocks[2], dim * 4, heads[2])
        self.up3_2 = Upsample(dim * 4)
        self.reduce_chan_level2 = nn.Conv2d(dim * 4, dim * 2, kernel_size=1, bias=bias)
        self.decoder_level2 = blocks(num_blocks[1], dim * 2, heads[1])
        self.up2_1 = Upsample(dim * 2)  # no channel reduction at level 1
        self.decoder_level1 = blocks(num_blocks[0], dim * 2, heads[0])
        self.refinement = blocks(num_refinement_blocks, dim * 2, heads[0])
        self.output = nn.Conv2d(dim * 2, out_channels, kernel_size=3, padding=1, bias=bias)
        shallow, latent = SPD_CHANNELS
        # published: Conv2d(30, 12) / Conv2d(120, 24) (small), Conv2d(24, 12) / Conv2d(96, 24) (tiny)
        self.reduce_shallow = nn.Conv2d(dim, shallow, kernel_size=1)
        self.reduce_latent = nn.Conv2d(dim * 4, latent, kernel_size=1)
        self.spd_proj_shallow = nn.Linear(shallow * shallow, SPD_EMBED)
        self.spd_proj_latent = nn.Linear(latent * latent, SPD_EMBED)
        self.spd_features = None

    def forward(self, inp_img):
        padded, size = pad_to_multiple(inp_img, 8)
        # features run in channels_last (see vlunet.archs.blocks); the result is an ordinary NCHW tensor
        restored, loss = self._forward(padded.contiguous(memory_format=torch.channels_last))
        return crop_to(restored, size).contiguous(), loss

    def _forward(self, img):
        e1 = self.encoder_level1(self.patch_embed(img))
        e2 = self.encoder_level2(self.down1_2(e1))
        e3 = self.encoder_level3(self.down2_3(e2))
        latent = self.reduce_dim_level3(self.latent(self.down3_4(e3)))
        x = self.decoder_level3(self.reduce_chan_level3(torch.cat([self.up4_3(latent), e3], 1)))
        x = self.decoder_level2(self.reduce_chan_level2(torch.cat([self.up3_2(x), e2], 1)))
        x = self.refinement(self.decoder_level1(torch.cat([self.up2_1(x), e1], 1)))
        return self.output(x) + img, self.spd_loss(e1, latent)

    def spd_loss(self, shallow, latent):
        """The weighted SPD contrastive loss of the level-1 encoder features and the reduced latent;
        keeps the (detached) vectors and codes in ``spd_features``. The head runs in at least float32,
        outside autocast (a covariance in 16-bit floats loses its small eigenvalues); a float32 or
        float64 network computes it in its own precision, as published."""
        dtype = torch.promote_types(shallow.dtype, torch.float32)
        device = shallow.device.type
        no_autocast = (torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device)
                       else contextlib.nullcontext())
        with no_autocast:
            z_s_raw = spd_vector(_pointwise(self.reduce_shallow, shallow.to(dtype), dtype))
            z_l_raw = spd_vector(_pointwise(self.reduce_latent, latent.to(dtype), dtype))
            z_s = F.normalize(_linear(self.spd_proj_shallow, z_s_raw), dim=1)
            z_l = F.normalize(_linear(self.spd_proj_latent, z_l_raw), dim=1)
            loss = CONTRASTIVE_WEIGHT * spd_contrastive_loss(z_s, z_l)
        self.spd_features = {'z_s_raw': z_s_raw.detach(), 'z_l_raw': z_l_raw.detach(), 'z_s': z_s.detach(),
                             'z_l': z_l.detach()}
        return loss


# ------------------------------------------------------------------------------------------------
# the method card
# ------------------------------------------------------------------------------------------------
RELEASED_CONFIGS = {  # what every published script builds: MIRAGE() from mirage_small.py / mirage_tiny.py
    'MIRAGE-S': dict(dim=30, num_blocks=[3, 5, 5, 7], num_refinement_blocks=3, heads=[1, 2, 4, 8],
                     ffn_expansion_factor=2, bias=False, LayerNorm_type='WithBias'),
}
RELEASED_CONFIGS['MIRAGE-T'] = dict(RELEASED_CONFIGS['MIRAGE-S'], dim=24, num_refinement_blocks=2)
_LEVELS = ('encoder_level1', 'encoder_level2', 'encoder_level3', 'latent')
_DECODERS = ('decoder_level1', 'decoder_level2', 'decoder_level3', None)


def _read_output(net, output):
    """``(restored, loss_ctr_spd)`` -> the image, and the weighted SPD contrastive loss as 'spd_contrastive'."""
    image, loss = output
    return NetworkOutput(image, [image], {'spd_contrastive': loss})


def _kwargs_from_state_dict(params):
    """MIRAGE kwargs from shapes: dim, block counts, heads (temperature sizes; a level without blocks
    keeps the released doubling), FFN factor, bias, LayerNorm type."""
    stem = params['patch_embed.proj.weight']
    dim = stem.shape[0]
    num_blocks = [count_blocks(params, f'{level}.') for level in _LEVELS]
    heads = []
    for j, (enc, dec) in enumerate(zip(_LEVELS, _DECODERS)):
        where = [f'{name}.0.attn.temperature' for name in (enc, dec, 'refinement' if j == 0 else None) if name]
        heads.append(next((params[k].shape[0] for k in where if k in params), 2 * heads[-1] if heads else 1))
    kwargs = dict(inp_channels=stem.shape[1], out_channels=params['output.weight'].shape[0], dim=dim,
                  num_blocks=num_blocks, num_refinement_blocks=count_blocks(params, 'refinement.'), heads=heads,
                  bias='output.bias' in params)
    ffn = [(params[k].shape[0], params[k].shape[1]) for k in params if k.endswith('.ffn.project_out.weight')]
    factor = expansion_factor([d for d, _ in ffn], [h for _, h in ffn], default=2)
    if factor is not None:
        kwargs['ffn_expansion_factor'] = factor
    norm = next((k for k in params if k.endswith('.norm1.body.weight')), None)
    if norm is not None:
        kwargs['LayerNorm_type'] = layer_norm_type(params, norm)
    return kwargs


CARD = register_card(MethodCard(
    name='MIRAGE', arch='MIRAGE',
    paper='Ren et al., "Efficient Degradation-agnostic Image Restoration via Channel-Wise Functional Decomposition '
          'and Manifold Regularization", ICLR 2026 (arXiv 2505.18679)',
    code='Amazingren/MIRAGE @ 926dc83646272a0d99b36f4bff496985ab064795 (net/mirage_small.py, net/mirage_tiny.py; '
         'MIT licence)',
    variants=(Variant('MIRAGE-S', 'MIRAGE_S', RELEASED_CONFIGS['MIRAGE-S'], params=9_678_983,
                      listing='keys_MIRAGE_S.tsv'),
              Variant('MIRAGE-T', 'MIRAGE_T', RELEASED_CONFIGS['MIRAGE-T'], params=6_207_412,
                      listing='keys_MIRAGE_T.tsv')),
    # thirds of 2, 4, 8, 16 channels (and 4 at 2dim): every head count divides its third
    tiny=dict(dim=6, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 2, 4, 8]),
    condition=None,
    read_output=_read_output,
    # keys only MIRAGE has: the SPD head and the reduced latent
    signature=('patch_embed.proj.weight', 'reduce_dim_level3.weight', 'spd_proj_shallow.weight',
               'spd_proj_latent.weight'),
    kwargs_from_state_dict=_kwargs_from_state_dict,
    checkpoint_formats=(CheckpointFormat(
        "Lightning .ckpt: {'state_dict': {'net.<key>': ...}, ...} (train_ckpt/<setting>/<name>.ckpt, e.g. "
        "3deg_small/3Deg_small.ckpt; by their sizes full training checkpoints with the AdamW state; no "
        "hyper-parameters saved)", lightning_layout),),
    training_terms=(
        TrainingTerm('fft_opt', 'FFTLoss', published={'loss_weight': 0.1},
                     what='0.1 x L1 of the rfft2 spectra, real and imaginary parts (train_*.py, '
                          'utils/loss_utils.py FFTLoss; --fft_loss_weight 0.1)'),
        TrainingTerm('contrastive_opt', 'NetworkLoss', published={'name': 'spd_contrastive', 'loss_weight': 1.0},
                     what="the network's SPD contrastive term, added as returned (its weight 0.01 and temperature "
                          '0.1 are inside the network): total = L1 + FFT + loss_ctr_spd'),
    ),
    recipe={
        'epochs': '130 (3-task, train_3deg_*.sh) / 150 (5-task, train_5deg_*.sh); shared 200',
        'schedule': 'LinearWarmupCosineAnnealingLR(warmup_epochs=15, max_epochs=150) stepped once per epoch '
                    '(train_*.py, hard-coded, also for the 130-epoch run, which stops at about 1.2e-5); the first '
                    'epoch runs at lr 0; shared: 15 warm-up epochs of 200, cosine to 0',
        'batch/GPUs': '32 on 1 GPU (NUM_GPUS=1, BATCH_SIZE=32, Lightning): effective 32 like the shared 4 x 8, but '
                      'the BatchNorm statistics and the contrastive negatives come from the per-GPU batch '
                      '(32 published, batch_size_per_gpu here)',
        'optimizer': 'AdamW lr 2e-4 hard-coded (--lr ignored), torch defaults (betas 0.9/0.999, eps 1e-8, weight '
                     'decay 0.01): the same as shared',
        'losses': 'L1 + 0.1 x FFT L1 + the network\'s SPD contrastive term (0.01 x InfoNCE, temperature 0.1)',
        'augmentation': 'one of the 7 non-identity flips/rotations per patch (random.randint(1, 7)); shared: '
                        'random hflip and rotation, identity included',
        'data': 'denoising x3 per sigma, Rain100L x120, SOTS-outdoor list x1 as shared; 5-task: GoPro x5 and LOL '
                'x20 per epoch (shared x1); patch 128 as shared',
    },
    # No per-task numbers recorded: the repository README has no results table and the per-task PSNR/SSIM
    # are printed only in the paper's tables, which could not be read here; the teaser figure's bars
    # (assets/teaser.png) are too small to read reliably (about 32.9 dB 3-task / 30.7 dB 5-task averages).
    results=(
        PublishedResults('CDD11', 'MIRAGE-S', {},
                         source='MIRAGE paper (Ren et al., ICLR 2026, arXiv 2505.18679), CDD-11 average, as stated in '
                                "this project's issue 22; not read in any source here (Amazingren/MIRAGE @ 926dc83 "
                                "prints no numbers; its teaser figure's bar reads about 29.3 dB / 0.887); per-type "
                                'values not printed anywhere read here',
                         average=(29.33, 0.887), measurement={'ssim': 'float_uniform7'}),
    ),
    # the small file for dim 30, the tiny file for dim 24 (each hard-codes its SPD reducer widths); they need einops
    # and timm (DropPath). DropPath draws on the global RNG in training: both implementations get the same draws
    reference=ReferenceCode('MIRAGE', stubs=('fvcore', 'fvcore.nn'), seed_forward=True),
))
