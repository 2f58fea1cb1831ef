"""AdaIR (Cui et al., ICLR 2025): all-in-one restoration by frequency mining and modulation.

AdaIR is Restormer (:class:`~vlunet.archs.restormer_arch.Restormer`, same levels, same keys) with
an adaptive frequency learning block (AFLB) applied to the features ``y`` after the latent level
(``fre1``, 8*dim channels, 1/8 resolution), decoder level 3 (``fre2``, 4*dim, 1/4) and decoder
level 2 (``fre3``, 2*dim, 1/2). Each AFLB looks at the input image again::

    f         = conv1(bilinear_resize(image, size(y)))          # image features at y's resolution
    low, high = |low band of f|, |f - low band of f|            # frequency mining (FFT band split)
    high      = cross(high, y)                                  # queries: a band; keys/values: y
    low       = cross(low, y)
    agg       = proj(low * spatial_gate(high) + high * channel_gate(low))   # frequency modulation
    y         = para1 * cross(y, agg) + para2 * y

The low band (see :func:`low_band_mask`) is a window of (2a) x (2b) frequencies around DC whose
half-widths come from a predicted rate: ``a = trunc((H // 128) * r_h)``, ``b = trunc((W // 128) *
r_w)``, ``(r_h, r_w) = sigmoid(rate_conv(mean of f))``. So the band is empty (low = 0, high = |f|)
unless the block works at 128 px or more in both directions, and in practice at 256 or more with a
rate >= 0.5. The rate reaches the output only through that integer truncation: ``rate_conv`` gets
no gradient, as published. Facts of the published ``net/model.py`` kept here:

* the block attribute ``channel_cross_l`` attends from the HIGH band and ``channel_cross_h`` from
  the low one (the names are swapped with respect to what they process);
* every AFLB uses ``heads[2]`` and three input channels (``in_dim=3``: the RGB image);
* ``conv`` and ``score_gen`` are constructed but never used (kept so checkpoints load strictly);
* ``decoder=True`` is the published default and the trained configuration; ``decoder=False``
  drops the AFLBs and is then exactly Restormer;
* ``forward`` takes a ``noise_emb`` argument that it ignores.

The published forward needs H and W divisible by 8; here any size is reflect-padded to a multiple
of 8 and cropped back (sizes divisible by 8 are not padded, so they give the published result).
"""
import torch
import torch.nn.functional as F
from torch import nn

from basicsr.utils.registry import ARCH_REGISTRY
from vlunet.archs.blocks import ChannelCrossAttention  # the published Chanel_Cross_Attention
from vlunet.archs.card import LIGHTNING, MethodCard, PublishedResults, ReferenceCode, Variant, register_card
from vlunet.archs.restormer_arch import Restormer, restormer_kwargs, restormer_layer_norm

BAND_UNIT = 128  # the low band's half-width along an axis is at most size // BAND_UNIT frequencies


def low_band_halfwidths(rate, height, width):
    """Per-image half-widths (a, b) of the low band: ``trunc((size // 128) * rate)``, as int tensors.

    ``rate``: (B, 2) rates in (0, 1), column 0 for the rows (height), column 1 for the columns.
    """
    return (height // BAND_UNIT * rate[:, 0]).int(), (width // BAND_UNIT * rate[:, 1]).int()


def _axis_band(half, size):
    """(B, size) bool: FFT index k of an axis of ``size`` is one of the frequencies -half .. half-1."""
    k = torch.arange(size, device=half.device)
    half = half[:, None]
    return (k < half) | (k >= size - half)


def low_band_mask(half_h, half_w, height, width, dtype=torch.float32):
    """(B, 1, H, W) 0/1 mask of the low band on an unshifted ``fft2`` spectrum.

    It keeps the frequencies -a .. a-1 of the rows and -b .. b-1 of the columns (a, b = ``half_h``,
    ``half_w`` per image). The published code takes the window [H//2 - a, H//2 + a) x [W//2 - b,
    W//2 + b) of the spectrum rolled by (H//2, W//2) so that DC sits at (H//2, W//2), which is the
    same set. Empty where a or b is 0.
    """
    rows, cols = _axis_band(half_h, height), _axis_band(half_w, width)
    return (rows[:, None, :, None] & cols[:, None, None, :]).to(dtype)


def split_bands(feat, mask):
    """(high, low) magnitudes of ``feat`` (B, C, H, W) for a low-band ``mask`` (B, 1, H, W) or None (empty).

    ``low = |ifft2(fft2(feat) * mask)|`` and ``high = |ifft2(fft2(feat) * (1 - mask))|``, the latter
    computed as ``|feat - ifft2(fft2(feat) * mask)|`` (the FFT is linear); an empty band gives
    ``(|feat|, 0)`` without transforming anything.
    """
    if mask is None:
        return feat.abs(), torch.zeros_like(feat)
    low = torch.fft.ifft2(torch.fft.fft2(feat, norm='forward') * mask, norm='forward')
    return (feat - low).abs(), low.abs()


class SpatialGate(nn.Module):
    """Per-pixel weight sigmoid(conv7x7([max over channels, mean over channels])) (the H-L unit)."""

    def __init__(self):
        super().__init__()
        self.spatial = nn.Conv2d(2, 1, kernel_size=7, padding=3, bias=False)

    def forward(self, x):
        stats = torch.cat([torch.max(x, 1, keepdim=True).values, x.mean(1, keepdim=True)], 1)
        return torch.sigmoid(self.spatial(stats))


class ChannelGate(nn.Module):
    """Per-channel weight sigmoid(mlp(global average) + mlp(global max)), mlp with dim // 16 hidden
    channels (the L-H unit)."""

    def __init__(self, dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(dim, dim // 16, 1, bias=False), nn.ReLU(),
                                 nn.Conv2d(dim // 16, dim, 1, bias=False))

    def forward(self, x):
        return torch.sigmoid(self.mlp(F.adaptive_avg_pool2d(x, 1)) + self.mlp(F.adaptive_max_pool2d(x, 1)))


class FrequencyModulation(nn.Module):
    """FMoM: each band is reweighted by a gate computed from the other one, then summed and projected:
    ``proj(low * spatial_gate(high) + high * channel_gate(low))`` (the published ``FreRefine``)."""

    def __init__(self, dim):
        super().__init__()
        self.SpatialGate = SpatialGate()
        self.ChannelGate = ChannelGate(dim)
        self.proj = nn.Conv2d(dim, dim, kernel_size=1)

    def forward(self, low, high):
        return self.proj(low * self.SpatialGate(high) + high * self.ChannelGate(low))


class FrequencyLearningBlock(nn.Module):
    """AFLB (the published ``FreModule``): frequency mining of the image, modulation of the features y.

    ``forward(img, y)``: img (B, in_dim, H0, W0), y (B, dim, H, W) -> (B, dim, H, W); see the module
    docstring for the computation.
    """

    def __init__(self, dim, num_heads, bias, in_dim=3):
        super().__init__()
        self.para1 = nn.Parameter(torch.zeros(dim, 1, 1))  # weight of the attended branch (starts at 0)
        self.para2 = nn.Parameter(torch.ones(dim, 1, 1))   # weight of the identity
        self.conv = nn.Conv2d(in_dim, dim, kernel_size=3, padding=1, bias=False)  # unused, as published
        self.conv1 = nn.Conv2d(in_dim, dim, kernel_size=3, padding=1, bias=False)
        self.score_gen = nn.Conv2d(2, 2, 7, padding=3)  # unused, as published
        self.channel_cross_l = ChannelCrossAttention(dim, num_heads, bias)  # attends from the high band
        self.channel_cross_h = ChannelCrossAttention(dim, num_heads, bias)  # attends from the low band
        self.channel_cross_agg = ChannelCrossAttention(dim, num_heads, bias)
        self.frequency_refine = FrequencyModulation(dim)
        self.rate_conv = nn.Sequential(nn.Conv2d(dim, dim // 8, 1, bias=False), nn.GELU(),
                                       nn.Conv2d(dim // 8, 2, 1, bias=False))

    def band_mask(self, feat):
        """The low-band mask of ``feat`` (see :func:`low_band_mask`), or None where it is empty for every image."""
        b, _, h, w = feat.shape
        if h < BAND_UNIT or w < BAND_UNIT:  # size // 128 == 0: no frequency is kept, whatever the rate
            return None
        rate = self.rate_conv(F.adaptive_avg_pool2d(feat, 1)).sigmoid().reshape(b, 2)
        half_h, half_w = low_band_halfwidths(rate, h, w)
        mask = low_band_mask(half_h, half_w, h, w, feat.dtype)
        if feat.device.type != 'meta' and not torch.compiler.is_compiling() and not bool(mask.any()):
            return None
        return mask

    def forward(self, img, y):
        feat = self.conv1(F.interpolate(img, size=y.shape[-2:], mode='bilinear', align_corners=False))
        high, low = split_bands(feat, self.band_mask(feat))
        high = self.channel_cross_l(high, y)
        low = self.channel_cross_h(low, y)
        agg = self.frequency_refine(low, high)
        return self.channel_cross_agg(y, agg) * self.para1 + y * self.para2


@ARCH_REGISTRY.register()
class AdaIR(Restormer):
    """AdaIR with the published constructor arguments, state_dict keys and key order.

    Any H x W (reflect-padded to a multiple of 8 inside and cropped back). With ``decoder=True``
    (the default) dim must be at least 8 (the channel gate of ``fre3`` has 2 * dim // 16 channels).
    """

    # the frequency blocks: (name, level depth); width dim * 2**depth, after the latent / decoder levels 3, 2
    FREQUENCY_BLOCKS = (('fre1', 3), ('fre2', 2), ('fre3', 1))

    def __init__(self, inp_channels=3, out_channels=3, dim=48, num_blocks=(4, 6, 6, 8), num_refinement_blocks=4,
                 heads=(1, 2, 4, 8), ffn_expansion_factor=2.66, bias=False, LayerNorm_type='WithBias', decoder=True):
        if decoder and dim * 2 // 16 < 1:
            raise ValueError(f'AdaIR: dim={dim} gives fre3 a channel gate of {dim * 2 // 16} channels; '
                             'decoder=True needs dim >= 8')
        super().__init__(inp_channels=inp_channels, out_channels=out_channels, dim=dim, num_blocks=num_blocks,
                         num_refinement_blocks=num_refinement_blocks, heads=heads,
                         ffn_expansion_factor=ffn_expansion_factor, bias=bias, LayerNorm_type=LayerNorm_type)
        self.decoder = decoder
        if decoder:
            for name, depth in self.FREQUENCY_BLOCKS:
                self.add_module(name, FrequencyLearningBlock(dim * 2**depth, heads[2], bias))
            # published state_dict order: patch_embed, fre1, fre2, fre3, then the Restormer levels
            first = ('patch_embed',) + tuple(name for name, _ in self.FREQUENCY_BLOCKS)
            for name in [n for n in self._modules if n not in first]:
                self._modules[name] = self._modules.pop(name)

    def forward(self, inp_img, noise_emb=None):
        """``noise_emb`` is accepted and ignored, as published."""
        return super().forward(inp_img)

    def _modulate(self, name, img, y):
        return getattr(self, name)(img, y) if self.decoder else y

    def _forward(self, img):
        e1 = self.encoder_level1(self.patch_embed(img))
        e2 = self.encoder_level2(self.down1_2(e1))
        e3 = self.encoder_level3(self.down2_3(e2))
        x = self._modulate('fre1', img, self.latent(self.down3_4(e3)))
        x = self.decoder_level3(self.reduce_chan_level3(torch.cat([self.up4_3(x), e3], 1)))
        x = self._modulate('fre2', img, x)
        x = self.decoder_level2(self.reduce_chan_level2(torch.cat([self.up3_2(x), e2], 1)))
        x = self._modulate('fre3', img, x)
        x = self.refinement(self.decoder_level1(torch.cat([self.up2_1(x), e1], 1)))
        return self.output(x) + img


# ------------------------------------------------------------------------------------------------
# the method card
# ------------------------------------------------------------------------------------------------
def _kwargs_from_state_dict(params):
    # decoder=False is Restormer's keys exactly: a state_dict with the frequency blocks is decoder=True
    return dict(restormer_kwargs(params), LayerNorm_type=restormer_layer_norm(params), decoder=True)


_SOURCE = "AdaIR's {}-task table (repository figure figs/adair{}d.PNG at ccb8b98)"
CARD = register_card(MethodCard(
    name='AdaIR', arch='AdaIR',
    paper='Cui et al., "AdaIR: Adaptive All-in-One Image Restoration via Frequency Mining and Modulation", ICLR 2025',
    code='c-yn/AdaIR @ ccb8b98e49614e07badd0641e5163fa7635c2f02 (net/model.py)',
    variants=(Variant('AdaIR', 'AdaIR', {'decoder': True}, params=28_784_824, listing='keys_AdaIR.tsv'),),
    tiny=dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 2, 2, 4], decoder=True),
    signature=('patch_embed.proj.weight', 'fre1.conv1.weight', 'fre3.rate_conv.0.weight'),
    kwargs_from_state_dict=_kwargs_from_state_dict,
    checkpoint_formats=(LIGHTNING,),
    recipe={'epochs': '150 (options.py --epochs); shared 200',
            'schedule': 'LinearWarmupCosineAnnealingLR(warmup_epochs=15, max_epochs=180) stepped per epoch: '
                        'training stops at epoch 150 of the cosine\'s 180, still at about 1.7e-5',
            'batch/GPUs': '8 per GPU x 4 GPUs, Lightning DDP: effective 32 like the shared 4 x 8',
            'the same': 'AdamW lr 2e-4, patch 128, L1 loss, denoising x3 per sigma, Rain100L x120, RESIDE OTS'},
    results=(
        PublishedResults('NHR', 'AdaIR', {'SOTS_outdoor': (31.06, 0.980), 'Rain100L': (38.64, 0.983),
                                          'CBSD68_sigma15': (34.12, 0.935), 'CBSD68_sigma25': (31.45, 0.892),
                                          'CBSD68_sigma50': (28.19, 0.802)},
                         source=_SOURCE.format('three', 3), average=(32.69, 0.918)),
        PublishedResults('NHRBL', 'AdaIR', {'SOTS_outdoor': (30.53, 0.978), 'Rain100L': (38.02, 0.981),
                                            'CBSD68_sigma25': (31.35, 0.889), 'GoPro': (28.12, 0.858),
                                            'LOL': (23.00, 0.845)},
                         source=_SOURCE.format('five', 5), average=(30.20, 0.910)),
        PublishedResults('NHR', 'AdaIR', {'SOTS_outdoor': (31.06, 0.980), 'Rain100L': (38.64, 0.983),
                                          'CBSD68_sigma15': (34.12, 0.935), 'CBSD68_sigma25': (31.45, 0.892),
                                          'CBSD68_sigma50': (28.19, 0.802)},
                         source='BaryIR (TPAMI 2026) Table 1, three degradations (repository figure figs/5Dquant.png '
                                'at af5cb9a): as AdaIR prints it', average=(32.69, 0.918),
                         quoted_in='BaryIR (TPAMI 2026)'),
        PublishedResults('NHRBL', 'AdaIR', {'SOTS_outdoor': (30.54, 0.978), 'Rain100L': (38.02, 0.981),
                                            'CBSD68_sigma25': (31.35, 0.889), 'GoPro': (28.12, 0.858),
                                            'LOL': (23.00, 0.845)},
                         source='BaryIR (TPAMI 2026) Table 2, five degradations (repository figure figs/5Dquant.png '
                                'at af5cb9a): SOTS 30.54 where AdaIR prints 30.53', average=(30.20, 0.910),
                         quoted_in='BaryIR (TPAMI 2026)'),
    ),
    reference=ReferenceCode('AdaIR'),
))
