"""Restormer-family building blocks, shared by Restormer, PromptIR and VLU-Net.

Every block works on (B, C, H, W) feature maps. Parameter names follow the published models
(``body.weight`` of a LayerNorm, ``qkv``/``qkv_dwconv``/``project_out``/``temperature`` of MDTA,
``project_in``/``dwconv``/``project_out`` of GDFN, ...) so published checkpoints load strictly.
"""
import torch
import torch.nn.functional as F
from torch import nn

from vlunet.utils.tiling import crop_to, pad_to_multiple  # noqa: F401  (re-exported for the archs)

LN_EPS = 1e-5


class _NormParams(nn.Module):
    """Holds the affine parameters of a channel LayerNorm (``weight``, and ``bias`` if any)."""

    def __init__(self, dim, with_bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if with_bias else None


class LayerNorm(nn.Module):
    """LayerNorm over the channels of every pixel of a (B, C, H, W) map (Restormer's LayerNorm).

    ``LayerNorm_type`` 'WithBias': ``(x - mean) / sqrt(var + 1e-5) * w + b``; 'BiasFree':
    ``x / sqrt(var + 1e-5) * w`` (the variance is still taken around the mean). Computed in place
    on the 4-D map, without rearranged copies.
    """

    def __init__(self, dim, LayerNorm_type='WithBias'):
        super().__init__()
        self.with_bias = LayerNorm_type != 'BiasFree'
        self.body = _NormParams(dim, self.with_bias)

    def forward(self, x):
        var, mean = torch.var_mean(x, dim=1, keepdim=True, unbiased=False)
        scale = torch.rsqrt(var + LN_EPS)
        weight = self.body.weight.view(1, -1, 1, 1)
        if self.with_bias:
            return torch.addcmul(self.body.bias.view(1, -1, 1, 1), (x - mean) * scale, weight)
        return x * scale * weight


def channel_attention(q, k, v, temperature, heads):
    """Transposed (channel) attention of MDTA: softmax(norm(q) norm(k)^T * t) v, per head.

    q, v: (B, C, H, W); k: (B, C, H', W'). Attention maps are C/heads x C/heads, so the cost is
    linear in the number of pixels.
    """
    b, c, h, w = q.shape
    q = F.normalize(q.reshape(b, heads, c // heads, h * w), dim=-1)
    k = F.normalize(k.reshape(b, heads, c // heads, -1), dim=-1)
    v = v.reshape(b, heads, c // heads, h * w)
    attn = (q @ k.transpose(-2, -1)) * temperature
    return (attn.softmax(dim=-1) @ v).reshape(b, c, h, w)


class Attention(nn.Module):
    """MDTA: multi-Dconv-head transposed self-attention (Restormer)."""

    def __init__(self, dim, num_heads, bias):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, kernel_size=1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, kernel_size=3, padding=1, groups=dim * 3, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)

    def forward(self, x):
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        return self.project_out(channel_attention(q, k, v, self.temperature, self.num_heads))


class FeedForward(nn.Module):
    """GDFN: gated-Dconv feed-forward network, ``project_out(gelu(a) * b)`` with (a, b) = dwconv(project_in(x))."""

    def __init__(self, dim, ffn_expansion_factor, bias):
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        self.project_in = nn.Conv2d(dim, hidden * 2, kernel_size=1, bias=bias)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, kernel_size=3, padding=1, groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, kernel_size=1, bias=bias)

    def forward(self, x):
        a, b = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(a) * b)


class TransformerBlock(nn.Module):
    """x + MDTA(LN(x)), then x + GDFN(LN(x))."""

    def __init__(self, dim, num_heads, ffn_expansion_factor, bias, LayerNorm_type):
        super().__init__()
        self.norm1 = LayerNorm(dim, LayerNorm_type)
        self.attn = Attention(dim, num_heads, bias)
        self.norm2 = LayerNorm(dim, LayerNorm_type)
        self.ffn = FeedForward(dim, ffn_expansion_factor, bias)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


def transformer_blocks(num_blocks, dim, num_heads, ffn_expansion_factor, bias, LayerNorm_type):
    return nn.Sequential(*[
        TransformerBlock(dim, num_heads, ffn_expansion_factor, bias, LayerNorm_type) for _ in range(num_blocks)
    ])


class OverlapPatchEmbed(nn.Module):
    """3x3 convolution from image channels to features."""

    def __init__(self, in_c=3, embed_dim=48, bias=False):
        super().__init__()
        self.proj = nn.Conv2d(in_c, embed_dim, kernel_size=3, padding=1, bias=bias)

    def forward(self, x):
        return self.proj(x)


class Downsample(nn.Module):
    """Halve H and W, double C: conv to C/2 channels, then PixelUnshuffle(2)."""

    def __init__(self, n_feat):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))

    def forward(self, x):
        return self.body(x)


class Upsample(nn.Module):
    """Double H and W, halve C: conv to 2C channels, then PixelShuffle(2)."""

    def __init__(self, n_feat):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat * 2, 3, padding=1, bias=False), nn.PixelShuffle(2))

    def forward(self, x):
        return self.body(x)
