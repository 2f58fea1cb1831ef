"""MoCE-IR (Zamfir et al., CVPR 2025): a U-Net whose decoder mixes complexity experts.

The encoder, latent and refinement stages are Restormer blocks (MDTA + GDFN, shared from
:mod:`vlunet.archs.blocks`). A bottleneck *frequency embedding* (high-pass depthwise conv, GELU,
spatial mean, MLP) steers the decoder. Every decoder block is::

    n        = LN(x)
    s        = MDTA(proj0(n))                       # shared branch, no residual
    a        = adapter(proj1(n), freq_emb, s)       # mixture of complexity experts
    x        = x + project(attn(q(a), k(s)) v(s))   # cross-attention, 7x7 dwconv on k/v
    x        = x + GDFN(LN(x))

The adapter routes with ``gates = topk(softmax(W_g mean(a) + W_f freq_emb + noise))`` and runs
the selected low-rank experts: ``e_i(a, s) = a + up(fft_attention_i(down(a)) * silu(gate(s)))``,
expert ``i`` working at rank ``r_i`` on ``4 * 2**i``-pixel patches (a per-patch circular
correlation of q and k computed with real FFTs, then LayerNorm, times v). Its output goes through
``proj_out``. Training adds the load-balancing loss of the router (importance + load, optionally
weighted by the experts' parameter counts, the ``complexity`` buffers).

Attribute names, constructor arguments and defaults are the published ones
(``src/net/moce_ir.py``), so option values and the published checkpoints carry over.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from basicsr.utils.registry import ARCH_REGISTRY
from vlunet.archs.blocks import (LN_EPS, Attention, ChannelCrossAttention, Downsample, FeedForward, LayerNorm,
                                 OverlapPatchEmbed, Upsample, crop_to, pad_to_multiple)
from vlunet.archs.card import (LIGHTNING, MethodCard, NetworkOutput, PublishedResults, ReferenceCode, TrainingTerm, Variant,
                               count_blocks, expansion_factor, register_card)

# The two released models (the repository's ``src/options.py``; ``levels = len(num_blocks)``); all
# other constructor arguments keep the class defaults.
RELEASED_CONFIGS = {
    'MoCE-IR-S': dict(dim=32, levels=4, num_blocks=[4, 6, 6, 8], num_dec_blocks=[2, 4, 4], num_refinement_blocks=4,
                      heads=[1, 2, 4, 8], rank=2, num_experts=4, topk=1, stage_depth=[1, 1, 1], rank_type='spread',
                      depth_type='constant', with_complexity=False, complexity_scale='max'),
}
RELEASED_CONFIGS['MoCE-IR'] = dict(RELEASED_CONFIGS['MoCE-IR-S'], dim=48)


# ------------------------------------------------------------------------------------------------
# experts


def _patches(t, size):
    """(B, C, H, W) float32 -> (B, C, H', W', size, size) view of zero-padded, non-overlapping patches."""
    b, c, h, w = t.shape
    t = F.pad(t, (0, -w % size, 0, -h % size))
    return t.view(b, c, t.shape[2] // size, size, t.shape[3] // size, size).permute(0, 1, 2, 4, 3, 5)


def _unpatch(t, h, w):
    """Inverse of :func:`_patches`: (B, C, H', W', p, p) -> (B, C, h, w)."""
    b, c, nh, nw, p, _ = t.shape
    return t.permute(0, 1, 2, 4, 3, 5).reshape(b, c, nh * p, nw * p)[:, :, :h, :w]


class FFTAttention(nn.Module):
    """Attention in the Fourier domain: ``proj_out(LN(irfft2(rfft2(q) * rfft2(k))) * v)`` per patch.

    q = 3x3 dwconv(1x1(x)), (k, v) = 7x7 dwconv(1x1(x)); the product of the spectra of each
    ``patch_size`` square patch of q and k (zero padding at the bottom/right) is their circular
    convolution. As published, the FFTs and the normalisation of their result (a WithBias
    LayerNorm's mean/variance) run in float32 whatever the model's dtype; the affine weights,
    ``* v`` and the projection are in the model's dtype. ``kernel_size`` is accepted and unused,
    as published.
    """

    def __init__(self, dim, patch_size, kernel_size=None):
        super().__init__()
        self.patch_size = patch_size
        self.q = nn.Conv2d(dim, dim, kernel_size=1, bias=False)
        self.q_dwconv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.kv = nn.Conv2d(dim, dim * 2, kernel_size=1, bias=False)
        self.kv_dwconv = nn.Conv2d(dim * 2, dim * 2, kernel_size=7, padding=3, groups=dim * 2)
        self.norm = LayerNorm(dim, 'WithBias')
        self.proj_out = nn.Conv2d(dim, dim, kernel_size=1)

    def forward(self, x):
        q = self.q_dwconv(self.q(x))
        k, v = self.kv_dwconv(self.kv(x)).chunk(2, dim=1)
        if torch.is_grad_enabled() and torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64:
            # under autocast the float32 section would save five float32 maps for the backward pass;
            # it keeps its inputs (in the autocast dtype) and is recomputed, the same way, in the backward
            return checkpoint(self.correlate, q, k, v, use_reentrant=False)
        return self.correlate(q, k, v)

    def correlate(self, q, k, v):
        """``proj_out(LN(irfft2(rfft2(q) * rfft2(k))) * v)`` for the patches of q, k (B, C, H, W)."""
        b, c, h, w = q.shape
        # float32 in the published (NCHW) layout: the FFT and reduction rounding is then the published one
        q, k = (_patches(t.to(torch.float32, memory_format=torch.contiguous_format), self.patch_size) for t in (q, k))
        corr = torch.fft.irfft2(torch.fft.rfft2(q) * torch.fft.rfft2(k), s=(self.patch_size, self.patch_size))
        rows = _unpatch(corr, h, w).permute(0, 2, 3, 1).reshape(b, h * w, c)
        mean = rows.mean(-1, keepdim=True)
        var = rows.var(-1, keepdim=True, unbiased=False)
        normed = (rows - mean) / torch.sqrt(var + LN_EPS) * self.norm.body.weight + self.norm.body.bias
        return self.proj_out(normed.reshape(b, h, w, c).permute(0, 3, 1, 2) * v)


EXPERT_LAYERS = {'FFTAttention': FFTAttention}


class LowRankExpert(nn.Module):
    """``x + proj2(body(proj0(x)) * silu(proj1(shared)))`` at ``rank`` channels (published ``ModExpert``).

    ``depth``: the published expert repeats its computation ``depth`` times on the same input and
    keeps the last result, i.e. the output is one application; it is computed once here. A depth
    below 1 fails when the expert is run, as published.
    """

    def __init__(self, dim, rank, func, depth, patch_size, kernel_size):
        super().__init__()
        self.depth = depth
        self.proj = nn.ModuleList([nn.Conv2d(dim, rank, kernel_size=1, bias=False),
                                   nn.Conv2d(dim, rank, kernel_size=1, bias=False),
                                   nn.Conv2d(rank, dim, kernel_size=1, bias=False)])
        self.body = func(rank, kernel_size=kernel_size, patch_size=patch_size)

    def forward(self, x, shared):
        if self.depth < 1:
            raise ValueError(f'MoCEIR: an expert of depth {self.depth} has no output (the published code fails too)')
        return self.proj[2](self.body(self.proj[0](x)) * F.silu(self.proj[1](shared))) + x


def expert_depths(depth_type, stage_depth, n):
    """Depth of each of ``n`` experts for the published ``depth_type`` ('lin', 'double', 'exp', 'fact',
    an int, 'constant')."""
    if depth_type == 'lin':
        return [stage_depth + i for i in range(n)]
    if depth_type == 'double':
        return [stage_depth + 2 * i for i in range(n)]
    if depth_type == 'exp':
        return [2 ** i for i in range(n)]
    if depth_type == 'fact':
        return [math.factorial(i + 1) for i in range(n)]
    if isinstance(depth_type, int):
        return [depth_type] * n
    if depth_type == 'constant':
        return [stage_depth] * n
    raise NotImplementedError(f'MoCEIR: depth_type {depth_type!r}')


def expert_ranks(rank_type, rank, dim, n):
    """Rank of each of ``n`` experts at width ``dim`` for the published ``rank_type`` ('constant', 'lin',
    'double', 'exp', 'fact', 'spread')."""
    if rank_type == 'constant':
        return [rank] * n
    if rank_type == 'lin':
        return [rank + i for i in range(n)]
    if rank_type == 'double':
        return [rank + 2 * i for i in range(n)]
    if rank_type == 'exp':
        return [rank ** (i + 1) for i in range(n)]
    if rank_type == 'fact':
        return [math.factorial(rank + i) for i in range(n)]
    if rank_type == 'spread':  # dim/2**(n-1), ..., dim/2, dim
        return [dim // 2 ** i for i in range(n)][::-1]
    raise NotImplementedError(f'MoCEIR: rank_type {rank_type!r}')


# ------------------------------------------------------------------------------------------------
# routing


class Router(nn.Module):
    """Noisy top-k gate over the experts (published ``RoutingFunction``).

    ``logits = gate(mean(x)) + freq_gate(freq_emb)``; Gaussian noise of std ``1 / num_experts``
    (``torch.randn_like(logits)``, the global RNG) is added, then softmax and top-k. ``forward``
    returns ``(gates (B, E), top_k_indices, top_k_values, aux_loss)``; ``aux_loss`` is 0 in eval,
    else ``(cv^2(importance) + cv^2(load)) / 2`` (importance weighted by ``complexity`` when
    ``use_complexity_bias``). ``eval_noise=False`` (not the published behaviour) draws no noise in
    eval mode. The last routing is kept in ``last_routing`` (detached: ``randn`` (the unscaled draw
    or None), ``logits``, ``top_k_indices``, ``top_k_values``).
    """

    def __init__(self, dim, freq_dim, num_experts, k, complexity, use_complexity_bias=True,
                 complexity_scale='max', eval_noise=True):
        super().__init__()
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(dim, num_experts, bias=False))
        self.freq_gate = nn.Linear(freq_dim, num_experts, bias=False)
        if complexity_scale == 'min':
            complexity = complexity / complexity.min()
        elif complexity_scale == 'max':
            complexity = complexity / complexity.max()
        self.register_buffer('complexity', complexity)
        self.k = k
        self.tau = 1
        self.num_experts = num_experts
        self.noise_std = 1.0 / num_experts
        self.use_complexity_bias = use_complexity_bias
        self.eval_noise = eval_noise
        self.last_routing = None

    def forward(self, x, freq_emb):
        logits = self.gate(x) + self.freq_gate(freq_emb)
        randn = torch.randn_like(logits) if self.training or self.eval_noise else None
        noisy = logits if randn is None else logits + randn * self.noise_std
        top_k_values, top_k_indices = torch.topk(noisy.softmax(dim=-1), self.k, dim=-1)
        aux_loss = 0
        if self.training:
            aux_loss = 0.5 * self._importance_loss(logits.softmax(dim=-1)) + 0.5 * self._load_loss(logits, noisy)
        gates = torch.zeros_like(logits).scatter_(1, top_k_indices, top_k_values)
        self.last_routing = {'randn': None if randn is None else randn.detach(), 'logits': logits.detach(),
                             'top_k_indices': top_k_indices, 'top_k_values': top_k_values.detach()}
        return gates, top_k_indices, top_k_values, aux_loss

    @staticmethod
    def _cv_squared(values):
        return (values.std() / (values.mean() + 1e-8)) ** 2

    def _importance_loss(self, probs):
        importance = probs.sum(dim=0)
        if self.use_complexity_bias:
            importance = importance * (self.complexity * self.tau)
        return self._cv_squared(importance)

    def _load_loss(self, logits, noisy):
        """cv^2 over experts of the mean probability that fresh noise keeps each expert in the top k."""
        kth = torch.topk(noisy, self.k, dim=-1).indices[:, -1:]
        threshold = noisy.gather(1, kth)
        z = (threshold - logits) / self.noise_std
        win = 1.0 - 0.5 * (1 + torch.erf(z / math.sqrt(2)))  # 1 - Phi(z)
        return self._cv_squared(win.mean(dim=0))


class ExpertMixture(nn.Module):
    """The decoder's adapter (published ``AdapterLayer``): router, experts, ``proj_out``.

    Expert ``i`` of ``num_experts``: rank from ``rank_type`` (e.g. 'spread': dim/8, dim/4, dim/2,
    dim for 4 experts), depth from ``depth_type``/``stage_depth``, patch size ``4 * 2**i``.

    How the selected experts are combined:

    * training, or ``per_sample_eval=True``: per sample, the sum of its top-k experts, each weighted
      by its gate (every expert sees only the samples routed to it);
    * eval with ``per_sample_eval=False`` (published): batch of 1 as above; with a batch B > 1 and
      top-1 routing, the expert chosen by EACH sample is run on the whole batch and sample b gets
      ``gate_b * sum_j expert_{choice_j}(x)[b]`` (an expert chosen by two samples counts twice).
      B > 1 with top-k > 1 fails in the published code; it raises a ValueError here.
    """

    def __init__(self, dim, rank, num_experts=4, top_k=2, expert_layer=FFTAttention, stage_depth=1, depth_type='lin',
                 rank_type='constant', freq_dim=128, with_complexity=False, complexity_scale='min',
                 eval_routing_noise=True, per_sample_eval=False):
        super().__init__()
        self.loss = None
        self.top_k = top_k
        self.num_experts = num_experts
        self.per_sample_eval = per_sample_eval
        depths = expert_depths(depth_type, stage_depth, num_experts)
        ranks = expert_ranks(rank_type, rank, dim, num_experts)
        # each expert sits alone in a container (published keys experts.<i>.0.*)
        self.experts = nn.ModuleList([
            nn.ModuleList([LowRankExpert(dim, ranks[i], expert_layer, depths[i], 2 ** (i + 2), 3 + 2 * i)])
            for i in range(num_experts)])
        self.proj_out = nn.Conv2d(dim, dim, kernel_size=1, bias=False)
        complexity = torch.tensor([sum(p.numel() for p in expert.parameters()) for expert in self.experts])
        self.routing = Router(dim, freq_dim, num_experts, top_k, complexity, use_complexity_bias=with_complexity,
                              complexity_scale=complexity_scale, eval_noise=eval_routing_noise)

    def expert(self, i):
        return self.experts[i][0]

    def forward(self, x, freq_emb, shared):
        gates, top_k_indices, top_k_values, self.loss = self.routing(x, freq_emb)
        if torch.compiler.is_exporting() and not self.training:  # one image: either eval routing
            out = self._exported(x, shared, top_k_indices, top_k_values)
        elif self.training or self.per_sample_eval:
            out = self._per_sample(x, shared, gates)
        else:
            out = self._batch_wide(x, shared, top_k_indices, top_k_values)
        return self.proj_out(out)

    def _per_sample(self, x, shared, gates):
        out = x.new_zeros(x.shape)
        for i in range(self.num_experts):
            rows = torch.nonzero(gates[:, i] > 0).squeeze(1)
            if rows.numel():
                y = self.expert(i)(x[rows], shared[rows]) * gates[rows, i].view(-1, 1, 1, 1)
                out = out.index_add(0, rows, y)
        return out

    def _batch_wide(self, x, shared, top_k_indices, top_k_values):
        if x.shape[0] == 1:
            chosen = top_k_indices[0].tolist()
        elif self.top_k == 1:
            chosen = top_k_indices[:, 0].tolist()
        else:
            raise ValueError('MoCEIR: in eval mode the published routing cannot combine a batch > 1 with topk > 1; '
                             'use per_sample_eval_routing=True')
        outputs = {i: self.expert(i)(x, shared) for i in sorted(set(chosen))}
        weights = top_k_values.view(*top_k_values.shape, 1, 1, 1)  # (B, k) over a batch of 1, else (B, 1)
        out = 0
        for j, i in enumerate(chosen):
            out = out + weights[:, j if x.shape[0] == 1 else 0] * outputs[i]
        return out

    def _exported(self, x, shared, top_k_indices, top_k_values):
        """The batch-of-1 eval routing as a graph (torch.export, ONNX): every expert sits in a conditional
        (``torch.cond``, ONNX ``If``) that runs it only when the router chose it, so a graph runs the
        chosen experts alone, as the published code does; the others add exact zeros."""
        if x.shape[0] != 1:
            raise ValueError(f'MoCEIR: an exported graph takes one image at a time, not a batch of {x.shape[0]}')
        gates = torch.zeros(1, self.num_experts, dtype=top_k_values.dtype, device=x.device)
        gates = gates.scatter(1, top_k_indices, top_k_values)
        out = torch.zeros_like(x)
        for i in range(self.num_experts):
            expert = self.expert(i)
            # both branches contiguous: a conditional's branches must agree on their memory layout
            ran = torch.cond(gates[0, i] > 0, lambda a, s: expert(a, s).contiguous(),
                             lambda a, s: torch.zeros_like(a).contiguous(), (x, shared))
            out = out + ran * gates[:, i].reshape(1, 1, 1, 1)
        return out


# ------------------------------------------------------------------------------------------------
# blocks


class EncoderBlock(nn.Module):
    """x + MDTA(LN(x)), then x + GDFN(LN(x)) (published names ``norms``, ``mixer``, ``ffn``)."""

    def __init__(self, dim, num_heads, ffn_expansion_factor, bias, LayerNorm_type):
        super().__init__()
        self.norms = nn.ModuleList([LayerNorm(dim, LayerNorm_type), LayerNorm(dim, LayerNorm_type)])
        self.mixer = Attention(dim, num_heads, bias)
        self.ffn = FeedForward(dim, ffn_expansion_factor, bias)

    def forward(self, x):
        x = self.mixer(x, residual=x, norm=self.norms[0])
        return self.ffn(x, residual=x, norm=self.norms[1])


class DecoderBlock(nn.Module):
    """Shared MDTA branch, expert mixture, cross-attention between them, GDFN (see the module
    docstring). ``forward(x, freq_emb)`` returns ``(x, adapter balance loss)``."""

    def __init__(self, dim, num_heads, ffn_expansion_factor, bias, LayerNorm_type, **adapter_kwargs):
        super().__init__()
        self.norms = nn.ModuleList([LayerNorm(dim, LayerNorm_type), LayerNorm(dim, LayerNorm_type)])
        self.proj = nn.ModuleList([nn.Conv2d(dim, dim, kernel_size=1), nn.Conv2d(dim, dim, kernel_size=1)])
        self.shared = Attention(dim, num_heads, bias)
        self.mixer = ChannelCrossAttention(dim, num_heads, bias, kv_kernel_size=7)
        self.ffn = FeedForward(dim, ffn_expansion_factor, bias)
        self.adapter = ExpertMixture(dim, **adapter_kwargs)

    def forward(self, x, freq_emb):
        normed = self.norms[0](x)
        shared = self.shared(self.proj[0](normed))
        adapted = self.adapter(self.proj[1](normed), freq_emb, shared)
        x = self.mixer(adapted, shared, residual=x)
        return self.ffn(x, residual=x, norm=self.norms[1]), self.adapter.loss


class EncoderGroup(nn.Module):
    """``layers``: a stack of :class:`EncoderBlock` (published ``EncoderResidualGroup``)."""

    def __init__(self, num_blocks, *block_args):
        super().__init__()
        self.layers = nn.ModuleList([EncoderBlock(*block_args) for _ in range(num_blocks)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class DecoderGroup(nn.Module):
    """``layers``: a stack of :class:`DecoderBlock`; ``loss`` is the sum of their balance losses."""

    def __init__(self, num_blocks, *block_args, **adapter_kwargs):
        super().__init__()
        self.loss = None
        self.layers = nn.ModuleList([DecoderBlock(*block_args, **adapter_kwargs) for _ in range(num_blocks)])

    def forward(self, x, freq_emb):
        self.loss = 0
        for layer in self.layers:
            x, loss = layer(x, freq_emb)
            self.loss += loss
        return x


class HighPassConv2d(nn.Module):
    """Depthwise 3x3 convolution initialised to the Laplacian (8 in the centre, -1 around).

    The published code means to freeze it but does not (``requires_grad_`` is assigned, not
    called): the kernel is a trained parameter there, and here.
    """

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, kernel_size=3, padding=1, bias=False, groups=c)
        laplacian = torch.full((c, 1, 3, 3), -1.0)
        laplacian[:, :, 1, 1] = 8.0
        with torch.no_grad():
            self.conv.weight.copy_(laplacian)

    def forward(self, x):
        return self.conv(x)


class FrequencyEmbedding(nn.Module):
    """``mlp(mean_hw(gelu(highpass(x))))``: a (B, C) code of the bottleneck's high frequencies."""

    def __init__(self, dim):
        super().__init__()
        self.high_conv = nn.Sequential(HighPassConv2d(dim), nn.GELU())
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        return self.mlp(self.high_conv(x).mean(dim=(-2, -1)))


# ------------------------------------------------------------------------------------------------
# network


@ARCH_REGISTRY.register()
class MoCEIR(nn.Module):
    """MoCE-IR with the published constructor arguments, defaults and state_dict keys.

    Released models (``src/options.py``; also :data:`RELEASED_CONFIGS`), both with every other
    argument at its default (inp/out_channels 3, ffn_expansion_factor 2, LayerNorm_type 'WithBias',
    bias False, expert_layer FFTAttention):

    * "MoCE-IR-S": ``dim=32, levels=4, num_blocks=[4, 6, 6, 8], num_dec_blocks=[2, 4, 4],
      num_refinement_blocks=4, heads=[1, 2, 4, 8], rank=2, num_experts=4, topk=1,
      stage_depth=[1, 1, 1], rank_type='spread', depth_type='constant', with_complexity=False,
      complexity_scale='max'`` (11,477,752 parameters);
    * "MoCE-IR": the same with ``dim=48`` (25,353,796 parameters).

    The class defaults (dim 32, num_blocks [1, 1, 1, 3], heads [1, 1, 1, 1], rank_type 'constant',
    depth_type 'lin', ...) are the published class defaults, not a released model. As published:
    encoder/latent/refinement blocks always have biases (``bias`` reaches the decoder blocks, the
    skip fusions and the output convolution), the refinement runs at ``dim``, the latent takes
    ``num_blocks[-1]``/``heads[-1]``, decoder level i (deepest first) takes
    ``num_dec_blocks[::-1][i]``, ``heads[::-1][i + 1]`` and ``stage_depth[i]``, and ``rank`` is the
    expert rank for rank_type 'constant'/'lin'/... ('spread' derives ranks from the width).
    ``expert_layer`` is the expert class (or its name, 'FFTAttention').

    ``forward(x, labels=None)``: x (B, C, H, W) of any size (reflect-padded to a multiple of
    ``2 ** (levels - 1)``, 8 for 4 levels, inside and cropped back); ``labels`` (the published
    training passes degradation ids) is accepted and ignored.

    Balance loss: after every forward, ``total_loss`` holds the routers' auxiliary loss averaged
    over the decoder blocks (``sum / sum(num_dec_blocks)``): a differentiable scalar tensor in
    training mode, 0.0 in eval. The published training minimises
    ``L1 + balance_loss_weight * net.total_loss`` (balance_loss_weight 0.01), optionally plus an
    FFT loss.

    Routing oddities of the published code, kept by default, with corrections as options:

    * ``eval_routing_noise=True``: the routers add Gaussian noise to their logits in eval mode too
      (``torch.randn_like`` on the global RNG, one (B, num_experts) draw per decoder block, in
      execution order), so eval outputs depend on the RNG state (seed before the forward to
      reproduce one). ``False``: no noise in eval, deterministic outputs.
    * ``per_sample_eval_routing=False``: in eval with a batch > 1, the expert chosen by any
      sample runs on the whole batch and the results are summed (see :class:`ExpertMixture`), so a
      sample's output depends on the rest of the batch. ``True``: eval routes each sample to its
      own experts, as training does (the result of a sample equals its result at batch size 1).
    """
    condition = None  # forward(img): see vlunet.archs.conditioning

    def __init__(self, inp_channels=3, out_channels=3, dim=32, levels=4, heads=(1, 1, 1, 1), num_blocks=(1, 1, 1, 3),
                 num_dec_blocks=(1, 1, 1), ffn_expansion_factor=2, num_refinement_blocks=1, LayerNorm_type='WithBias',
                 bias=False, rank=2, num_experts=4, depth_type='lin', stage_depth=(3, 2, 1), rank_type='constant',
                 topk=1, expert_layer=FFTAttention, with_complexity=False, complexity_scale='max',
                 eval_routing_noise=True, per_sample_eval_routing=False):
        super().__init__()
        if isinstance(expert_layer, str):
            expert_layer = EXPERT_LAYERS[expert_layer]
        self.levels = levels
        self.num_blocks = list(num_blocks)
        self.num_dec_blocks = list(num_dec_blocks)
        self.num_refinement_blocks = num_refinement_blocks
        dims = [dim * 2 ** i for i in range(levels)]

        def encoder(n, width, n_heads):
            return EncoderGroup(n, width, n_heads, ffn_expansion_factor, True, LayerNorm_type)

        self.patch_embed = OverlapPatchEmbed(inp_channels, dim, bias=False)
        self.freq_embed = FrequencyEmbedding(dims[-1])
        self.enc = nn.ModuleList([nn.ModuleList([encoder(self.num_blocks[i], dims[i], heads[i]), Downsample(dims[i])])
                                  for i in range(levels - 1)])
        self.latent = encoder(self.num_blocks[-1], dims[-1], heads[-1])
        up_dims, up_heads, up_blocks = dims[::-1], list(heads)[::-1], self.num_dec_blocks[::-1]
        adapter = dict(rank=rank, num_experts=num_experts, top_k=topk, expert_layer=expert_layer,
                       depth_type=depth_type, rank_type=rank_type, freq_dim=dims[-1], with_complexity=with_complexity,
                       complexity_scale=complexity_scale, eval_routing_noise=eval_routing_noise,
                       per_sample_eval=per_sample_eval_routing)
        self.dec = nn.ModuleList([nn.ModuleList([
            Upsample(up_dims[i]),
            nn.Conv2d(up_dims[i], up_dims[i + 1], kernel_size=1, bias=bias),
            DecoderGroup(up_blocks[i], up_dims[i + 1], up_heads[i + 1], ffn_expansion_factor, bias, LayerNorm_type,
                         stage_depth=stage_depth[i], **adapter),
        ]) for i in range(levels - 1)])
        self.refinement = encoder(num_refinement_blocks, dim, heads[0])
        self.output = nn.Conv2d(dim, out_channels, kernel_size=3, padding=1, bias=bias)
        self.total_loss = None

    def for_export(self):
        """Make eval deterministic for an exported graph; returns what changed (None when nothing did).

        An ONNX graph cannot reproduce the published eval's draw from PyTorch's global RNG, so the
        routers route without it (``eval_routing_noise=False``): the graph, and the PyTorch network it
        is checked against, pick each block's experts from the noise-free logits."""
        routers = [m for m in self.modules() if isinstance(m, Router) and m.eval_noise]
        for router in routers:
            router.eval_noise = False
        if not routers:
            return None
        return (f'MoCEIR: routing without the evaluation noise (eval_routing_noise=False) in {len(routers)} routers: '
                'the published eval adds Gaussian noise of std 1/num_experts to the routing logits, drawn from '
                "PyTorch's random number generator, which a graph cannot reproduce")

    def forward(self, x, labels=None):
        padded, size = pad_to_multiple(x, 2 ** (self.levels - 1))  # levels - 1 halvings
        # features run in channels_last (see vlunet.archs.blocks); the result is an ordinary NCHW tensor
        return crop_to(self._forward(padded.contiguous(memory_format=torch.channels_last)), size).contiguous()

    def _forward(self, img):
        feats = self.patch_embed(img)
        skips = []
        for block, downsample in self.enc:
            feats = block(feats)
            skips.append(feats)
            feats = downsample(feats)
        feats = self.latent(feats)
        freq_emb = self.freq_embed(feats)
        total_loss = 0
        for upsample, fusion, block in self.dec:
            feats = block(fusion(torch.cat([upsample(feats), skips.pop()], 1)), freq_emb)
            total_loss += block.loss
        self.total_loss = total_loss / sum(self.num_dec_blocks)
        return self.output(self.refinement(feats)) + img


# ------------------------------------------------------------------------------------------------
# the method card
# ------------------------------------------------------------------------------------------------
def _read_output(net, output):
    """The image, and the routers' balance loss of this forward (the network keeps it in ``total_loss``)."""
    balance = getattr(net, 'total_loss', None)
    return NetworkOutput(output, [output], {} if balance is None else {'balance': balance})


def _kwargs_from_state_dict(params):
    """MoCEIR kwargs from shapes. Not in the weights: topk, depth_type/stage_depth (they change no
    shape nor, as published, any output), with_complexity, and rank when rank_type is 'spread'.
    complexity_scale is read from the ``complexity`` buffer values when they are there."""
    stem = params['patch_embed.proj.weight']
    dim, levels = stem.shape[0], count_blocks(params, 'enc.') + 1
    enc = [f'enc.{i}.0.layers.' for i in range(levels - 1)] + ['latent.layers.']
    dec = [f'dec.{i}.2.layers.' for i in range(levels - 1)]  # deepest first: width dim * 2**(levels - 2 - i)
    kwargs = dict(inp_channels=stem.shape[1], out_channels=params['output.weight'].shape[0], dim=dim, levels=levels,
                  num_blocks=[count_blocks(params, p) for p in enc],
                  num_dec_blocks=[count_blocks(params, p) for p in dec][::-1],
                  num_refinement_blocks=count_blocks(params, 'refinement.layers.'), bias='output.bias' in params)
    heads = []  # heads[j]: encoder level j, else the decoder level of that width, else (j = 0) the refinement
    for j in range(levels):
        where = [enc[j] + '0.mixer.temperature'] + [dec[levels - 2 - j] + '0.shared.temperature'] * (j < levels - 1)
        where += ['refinement.layers.0.mixer.temperature'] * (j == 0)
        # a level without blocks has no heads to read (nor to use): continue the released doubling
        heads.append(next((params[k].shape[0] for k in where if k in params), 2 * heads[-1] if heads else 1))
    kwargs['heads'] = heads
    ffn = [params[k].shape for k in params if k.endswith('.ffn.project_out.weight')]
    factor = expansion_factor([s[0] for s in ffn], [s[1] for s in ffn], default=2)
    if factor is not None:
        kwargs['ffn_expansion_factor'] = factor
    norm = next((k for k in params if k.endswith('.norms.0.body.weight')), None)
    if norm is not None:
        kwargs['LayerNorm_type'] = 'WithBias' if norm[:-len('weight')] + 'bias' in params else 'BiasFree'
    adapters = [(dim * 2 ** (levels - 2 - i), f'{dec[i]}0.adapter.') for i in range(levels - 1)
                if f'{dec[i]}0.adapter.experts.0.0.proj.0.weight' in params]
    if adapters:
        n = kwargs['num_experts'] = count_blocks(params, adapters[0][1] + 'experts.')
        seen = [(width, [params[f'{a}experts.{e}.0.proj.0.weight'].shape[0] for e in range(n)])
                for width, a in adapters]
        for rank_type in ('spread', 'constant', 'lin', 'double', 'exp', 'fact'):
            rank = next((r for r in (range(1, 13) if rank_type == 'fact' else [seen[0][1][0]])
                         if all(expert_ranks(rank_type, r, w, n) == ranks for w, ranks in seen)), None)
            if rank is not None:
                kwargs.update(rank_type=rank_type, **({} if rank_type == 'spread' else {'rank': rank}))
                break
        complexity = params.get(adapters[0][1] + 'routing.complexity')
        if complexity is not None and complexity.device.type != 'meta':  # parameter counts / max or / min
            if not complexity.is_floating_point():
                kwargs['complexity_scale'] = None  # neither: the raw counts
            elif float(complexity.max()) == 1 or float(complexity.min()) == 1:
                kwargs['complexity_scale'] = 'max' if float(complexity.max()) == 1 else 'min'
    return kwargs


def _published_args(kwargs):
    ours = ('eval_routing_noise', 'per_sample_eval_routing')  # our corrections: not in the published class
    return (), {k: v for k, v in kwargs.items() if k not in ours}


def _table(setting, variant, values, average, table):
    keys = (('SOTS_outdoor', 'Rain100L', 'CBSD68_sigma15', 'CBSD68_sigma25', 'CBSD68_sigma50') if setting == 'NHR'
            else ('SOTS_outdoor', 'Rain100L', 'CBSD68_sigma25', 'GoPro', 'LOL'))
    return PublishedResults(setting, variant, dict(zip(keys, values)), source=f'MoCE-IR (CVPR 2025) {table}',
                            average=average)


CARD = register_card(MethodCard(
    name='MoCE-IR', arch='MoCEIR',
    paper='Zamfir et al., "Complexity Experts are Task-Discriminative Learners for Any Image Restoration", CVPR 2025',
    code='eduardzamfir/MoCE-IR @ a1a6e7480bf0537dba8e7a776854820cda85f5df (src/net/moce_ir.py)',
    variants=(Variant('MoCE-IR-S', 'MoCEIR_S', RELEASED_CONFIGS['MoCE-IR-S'], params=11_477_752,
                      listing='keys_MoCEIR_S.tsv'),
              Variant('MoCE-IR', 'MoCEIR', RELEASED_CONFIGS['MoCE-IR'], params=25_353_796, listing='keys_MoCEIR.tsv')),
    tiny=dict(dim=8, num_blocks=[1, 1, 1, 1], num_dec_blocks=[1, 1, 1], num_refinement_blocks=1, heads=[1, 2, 4, 8]),
    read_output=_read_output,
    signature=('patch_embed.proj.weight', 'freq_embed.high_conv.0.conv.weight', 'enc.0.1.body.0.weight'),
    kwargs_from_state_dict=_kwargs_from_state_dict,
    checkpoint_formats=(LIGHTNING,),
    training_terms=(TrainingTerm('balance_opt', 'BalanceLoss', {'loss_weight': 0.01},
                                 "0.01 x the routers' load-balancing loss (src/train.py; --balance_loss_weight)"),),
    recipe={'epochs': '120 (src/options.py --epochs); shared 200',
            'schedule': 'LinearWarmupCosineAnnealingLR(warmup_epochs=15, max_epochs=150) per epoch: training stops '
                        "at epoch 120 of the cosine's 150",
            'batch/GPUs': '8 per GPU x 4 GPUs, Lightning DDP: effective 32 like the shared 4 x 8',
            'losses': 'L1 + 0.01 x balance loss; the README passes --loss_type FFT but src/train.py tests "fft" '
                      '(lower case), so the FFT term is never added',
            'the same': 'AdamW lr 2e-4, patch 128, denoising x3 per sigma, Rain100L x120'},
    results=(
        _table('NHR', 'MoCE-IR-S', ((30.94, 0.979), (38.22, 0.983), (34.08, 0.933), (31.42, 0.888), (28.16, 0.798)),
               (32.57, 0.916), 'Table 1'),
        _table('NHR', 'MoCE-IR', ((31.34, 0.979), (38.57, 0.984), (34.11, 0.932), (31.45, 0.888), (28.18, 0.800)),
               (32.73, 0.917), 'Table 1'),
        _table('NHRBL', 'MoCE-IR-S', ((31.33, 0.978), (37.21, 0.978), (31.25, 0.884), (28.90, 0.877), (21.68, 0.851)),
               (30.08, 0.913), 'Table 2'),
        _table('NHRBL', 'MoCE-IR', ((30.48, 0.974), (38.04, 0.982), (31.34, 0.887), (30.05, 0.899), (23.00, 0.852)),
               (30.58, 0.919), 'Table 2'),
        # the tables as printed are also the repository figures assets/results_aio_3.png and results_aio_5.png at a1a6e74
        PublishedResults('NHR', 'MoCE-IR', {'SOTS_outdoor': (31.34, 0.979), 'Rain100L': (38.57, 0.984),
                                            'CBSD68_sigma15': (34.11, 0.932), 'CBSD68_sigma25': (31.45, 0.888),
                                            'CBSD68_sigma50': (28.18, 0.800)},
                         source='BaryIR (TPAMI 2026) Table 1, three degradations (repository figure figs/5Dquant.png '
                                'at af5cb9a): as MoCE-IR prints it', average=(32.73, 0.917),
                         quoted_in='BaryIR (TPAMI 2026)'),
        PublishedResults('NHRBL', 'MoCE-IR', {'SOTS_outdoor': (30.48, 0.974), 'Rain100L': (38.04, 0.982),
                                              'CBSD68_sigma25': (31.34, 0.887), 'GoPro': (30.05, 0.899),
                                              'LOL': (23.00, 0.852)},
                         source='BaryIR (TPAMI 2026) Table 2, five degradations (repository figure figs/5Dquant.png '
                                "at af5cb9a): MoCE-IR's per-task values with the average printed as 30.25",
                         average=(30.25, 0.919), quoted_in='BaryIR (TPAMI 2026)'),
        # CDD-11: only the average could be sourced, and only second hand (per-type values are in the paper's table)
        PublishedResults('CDD11', 'MoCE-IR-S', {},
                         source='MoCE-IR paper (Zamfir et al., CVPR 2025, arXiv 2411.18466), CDD-11 table, as stated in '
                                "this project's issue 22; not read in any source here (the repository at a1a6e74 "
                                'prints no CDD-11 numbers); per-type values not printed anywhere read here',
                         average=(29.05, 0.881), measurement={'ssim': 'float_gaussian'}),
    ),
    reference=ReferenceCode('MoCEIR', kwargs=_published_args, stubs=('fvcore', 'fvcore.nn'), seed_forward=True),
))
