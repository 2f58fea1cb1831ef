"""Building blocks of DGUNet and DGUNet+ (Mou et al., CVPR 2022).

DGUNet unfolds proximal gradient descent for ``min_x ||phi(x) - y||^2 / 2 + prior(x)``:
every stage takes one gradient step with learned operators ``phi`` and ``phi^T`` (small
residual CNNs, :class:`GradientOperator`) and then applies a learned proximal operator,
a U-Net (:class:`UNetEncoder` + :class:`UNetDecoder`). Stages exchange features through a
supervised attention module (:class:`SAM`), a subspace-projection merge
(:class:`SubspaceMerge`) and cross-stage feature fusion inside the encoder.

Attribute names mirror the published code so that its checkpoints load strictly.
This module is a leaf: it imports torch only.
"""
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

GRADIENT_HIDDEN = 64  # hidden width of every phi / phi^T network (fixed in the published code)
SUBSPACE_DIM = 16  # number of basis vectors in SubspaceMerge (fixed in the published code)
UNET_DEPTH = 4  # encoder levels of the proximal U-Net (fixed in the published code)


def conv(in_channels: int, out_channels: int, kernel_size: int, bias: bool = False, stride: int = 1) -> nn.Conv2d:
    """'Same'-padded 2-D convolution (odd kernel sizes)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, stride=stride, bias=bias)


# ----------------------------------------------------------------------------------------
# Gradient step
# ----------------------------------------------------------------------------------------
class GradientOperator(nn.Module):
    """Learned degradation operator ``phi`` (or its transpose ``phi^T``) on images.

    Computes ``x + conv(act(conv(x)))`` with a 3x3 conv to 64 channels, the PReLU ``act``
    and a 3x3 conv back (both convs with bias). ``act`` is passed in because the published
    model shares one PReLU among all its operators (see the model classes).
    """

    def __init__(self, channels: int, act: nn.Module, kernel_size: int = 3):
        super().__init__()
        self.body = nn.Sequential(
            conv(channels, GRADIENT_HIDDEN, kernel_size, bias=True),
            act,
            conv(GRADIENT_HIDDEN, channels, kernel_size, bias=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + x


def gradient_step(z: torch.Tensor, y: torch.Tensor, phi: nn.Module, phit: nn.Module, r: torch.Tensor) -> torch.Tensor:
    """One gradient-descent step on ``||phi(z) - y||^2 / 2``: ``z - r * phi^T(phi(z) - y)``."""
    return z - r * phit(phi(z) - y)


# ----------------------------------------------------------------------------------------
# Shallow features and inter-stage modules
# ----------------------------------------------------------------------------------------
class CALayer(nn.Module):
    """Channel attention: ``x * sigmoid(conv(relu(conv(global_avg_pool(x)))))``."""

    def __init__(self, channels: int, reduction: int, bias: bool):
        super().__init__()
        self.conv_du = nn.Sequential(
            nn.Conv2d(channels, channels // reduction, 1, bias=bias),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // reduction, channels, 1, bias=bias),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.conv_du(F.adaptive_avg_pool2d(x, 1))


class CAB(nn.Module):
    """Channel attention block: ``x + CA(conv(act(conv(x))))``."""

    def __init__(self, n_feat: int, kernel_size: int, reduction: int, bias: bool, act: nn.Module):
        super().__init__()
        self.CA = CALayer(n_feat, reduction, bias)
        self.body = nn.Sequential(
            conv(n_feat, n_feat, kernel_size, bias=bias),
            act,
            conv(n_feat, n_feat, kernel_size, bias=bias),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.CA(self.body(x)) + x


def shallow_feature(in_c: int, n_feat: int, kernel_size: int, reduction: int, bias: bool,
                    act: nn.Module) -> nn.Sequential:
    """Image -> features: a conv followed by one CAB (``shallow_featK`` in the published code)."""
    return nn.Sequential(conv(in_c, n_feat, kernel_size, bias=bias), CAB(n_feat, kernel_size, reduction, bias, act))


class SAM(nn.Module):
    """Supervised attention module: from decoder features ``x`` and the stage input image
    ``x_img`` returns ``(x + conv1(x), x_img + conv2(x))``, the features handed to the next
    stage and this stage's restored image."""

    def __init__(self, n_feat: int, out_c: int, kernel_size: int, bias: bool):
        super().__init__()
        self.conv1 = conv(n_feat, n_feat, kernel_size, bias=bias)
        self.conv2 = conv(n_feat, out_c, kernel_size, bias=bias)

    def forward(self, x: torch.Tensor, x_img: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return x + self.conv1(x), self.conv2(x) + x_img


class SubspaceMerge(nn.Module):
    """Merges new features ``x`` with the previous stage's features ``bridge`` (``mergeblock``).

    A conv on ``[x, bridge]`` predicts ``SUBSPACE_DIM`` basis maps; each is L1-normalised over
    the pixels (``V``, shape B x K x HW). ``bridge`` is projected onto their span,
    ``V^T (V V^T)^-1 V bridge``, and the result is ``x + conv([x, projected bridge])``.
    """

    def __init__(self, n_feat: int, kernel_size: int = 3, bias: bool = True, subspace_dim: int = SUBSPACE_DIM):
        super().__init__()
        self.num_subspace = subspace_dim
        self.conv_block = conv(n_feat * 2, n_feat, kernel_size, bias=bias)
        self.subnet = conv(n_feat * 2, subspace_dim, kernel_size, bias=bias)

    def forward(self, x: torch.Tensor, bridge: torch.Tensor) -> torch.Tensor:
        b, c, h, w = bridge.shape
        basis = self.subnet(torch.cat([x, bridge], 1)).reshape(b, self.num_subspace, h * w)
        basis = basis / (1e-6 + basis.abs().sum(dim=2, keepdim=True))  # V: B x K x HW
        basis_t = basis.transpose(1, 2)  # V^T: B x HW x K
        coeff = torch.inverse(basis @ basis_t) @ basis  # (V V^T)^-1 V: B x K x HW
        coords = coeff @ bridge.reshape(b, c, h * w).transpose(1, 2)  # B x K x C
        projected = (basis_t @ coords).transpose(1, 2).reshape(b, c, h, w)
        return self.conv_block(torch.cat([x, projected], 1)) + x


# ----------------------------------------------------------------------------------------
# Proximal step: the U-Net
# ----------------------------------------------------------------------------------------
class UNetConvBlock(nn.Module):
    """Two 3x3 convs with LeakyReLU(0.2) plus a 1x1 identity path.

    ``use_hin``: an affine InstanceNorm on the first half of the channels after the first
    conv (half-instance normalisation). ``use_csff`` (downsampling blocks only): cross-stage
    feature fusion with the previous stage's encoder/decoder features ``enc``/``dec``,
    ``out + out * sigmoid(phi(s)) + gamma(s)`` with ``s = leaky_relu(csff_enc(enc) +
    csff_dec(dec), 0.1)``. ``downsample``: a 4x4 stride-2 conv; then returns
    ``(downsampled, full resolution)``, otherwise the full-resolution output only.
    """

    def __init__(self, in_size: int, out_size: int, downsample: bool, relu_slope: float = 0.2,
                 use_csff: bool = False, use_hin: bool = False):
        super().__init__()
        self.identity = nn.Conv2d(in_size, out_size, 1)
        self.conv_1 = nn.Conv2d(in_size, out_size, 3, padding=1)
        self.relu_1 = nn.LeakyReLU(relu_slope)
        self.conv_2 = nn.Conv2d(out_size, out_size, 3, padding=1)
        self.relu_2 = nn.LeakyReLU(relu_slope)
        self.use_csff = downsample and use_csff
        if self.use_csff:
            self.csff_enc = nn.Conv2d(out_size, out_size, 3, padding=1)
            self.csff_dec = nn.Conv2d(in_size, out_size, 3, padding=1)
            self.phi = nn.Conv2d(out_size, out_size, 3, padding=1)
            self.gamma = nn.Conv2d(out_size, out_size, 3, padding=1)
        self.use_hin = use_hin
        if use_hin:
            if out_size % 2:
                raise ValueError(f'UNetConvBlock: half-instance normalisation needs an even width, got {out_size}')
            self.norm = nn.InstanceNorm2d(out_size // 2, affine=True)
        self.downsample = nn.Conv2d(out_size, out_size, 4, stride=2, padding=1, bias=False) if downsample else None

    def forward(self, x: torch.Tensor, enc: Optional[torch.Tensor] = None, dec: Optional[torch.Tensor] = None):
        out = self.conv_1(x)
        if self.use_hin:
            normed, kept = torch.chunk(out, 2, dim=1)
            out = torch.cat([self.norm(normed), kept], dim=1)
        out = self.relu_2(self.conv_2(self.relu_1(out)))
        out = out + self.identity(x)
        if enc is not None and dec is not None:
            if not self.use_csff:
                raise RuntimeError('UNetConvBlock: cross-stage features given to a block built without use_csff')
            skip = F.leaky_relu(self.csff_enc(enc) + self.csff_dec(dec), 0.1)
            out = out * torch.sigmoid(self.phi(skip)) + self.gamma(skip) + out
        if self.downsample is None:
            return out
        return self.downsample(out), out


class UNetEncoder(nn.Module):
    """``depth`` UNetConvBlocks with HIN; widths ``n_feat + scale * i``; all but the last downsample.

    ``forward(x, enc, dec)`` returns ``(skips, bottom)``: the full-resolution outputs of the
    downsampling blocks (finest first) and the coarsest features. With ``csff``, ``enc`` and
    ``dec`` are the previous stage's encoder skips and decoder outputs, fused level by level.
    """

    def __init__(self, n_feat: int, scale_unetfeats: int, csff: bool, depth: int = UNET_DEPTH):
        super().__init__()
        widths = [n_feat + scale_unetfeats * i for i in range(depth)]
        self.body = nn.ModuleList(
            UNetConvBlock(widths[i], widths[i + 1], downsample=True, use_csff=csff, use_hin=True)
            for i in range(depth - 1))
        self.body.append(UNetConvBlock(widths[-1], widths[-1], downsample=False, use_csff=csff, use_hin=True))

    def forward(self, x: torch.Tensor, enc: Optional[List[torch.Tensor]] = None,
                dec: Optional[List[torch.Tensor]] = None) -> Tuple[List[torch.Tensor], torch.Tensor]:
        fuse = enc is not None and dec is not None
        skips = []
        for i, block in enumerate(self.body[:-1]):
            x, skip = block(x, enc[i], dec[-i - 1]) if fuse else block(x)
            skips.append(skip)
        return skips, self.body[-1](x)


class UNetUpBlock(nn.Module):
    """2x transposed-conv upsampling, concatenation with the bridge, one UNetConvBlock."""

    def __init__(self, in_size: int, out_size: int, relu_slope: float = 0.2):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_size, out_size, kernel_size=2, stride=2)
        self.conv_block = UNetConvBlock(out_size * 2, out_size, downsample=False, relu_slope=relu_slope)

    def forward(self, x: torch.Tensor, bridge: torch.Tensor) -> torch.Tensor:
        return self.conv_block(torch.cat([self.up(x), bridge], 1))


class UNetDecoder(nn.Module):
    """Mirror of :class:`UNetEncoder`: each level upsamples and merges ``skip_conv(skip)``.

    ``forward(bottom, skips)`` returns the output of every level, coarsest first (the last
    one has ``n_feat`` channels at full resolution).
    """

    def __init__(self, n_feat: int, scale_unetfeats: int, depth: int = UNET_DEPTH):
        super().__init__()
        widths = [n_feat + scale_unetfeats * i for i in range(depth)]
        self.body = nn.ModuleList(UNetUpBlock(widths[i], widths[i - 1]) for i in range(depth - 1, 0, -1))
        self.skip_conv = nn.ModuleList(
            nn.Conv2d(widths[i], widths[i - 1], 3, padding=1) for i in range(depth - 1, 0, -1))

    def forward(self, x: torch.Tensor, skips: List[torch.Tensor]) -> List[torch.Tensor]:
        outs = []
        for i, (up, skip_conv) in enumerate(zip(self.body, self.skip_conv)):
            x = up(x, skip_conv(skips[-i - 1]))
            outs.append(x)
        return outs


def check_unet_widths(n_feat: int, scale_unetfeats: int, name: str) -> None:
    """Half-instance normalisation splits channels in two: every encoder width must be even."""
    odd = [n_feat + scale_unetfeats * i for i in range(1, UNET_DEPTH) if (n_feat + scale_unetfeats * i) % 2]
    if odd:
        raise ValueError(f'{name}: n_feat={n_feat}, scale_unetfeats={scale_unetfeats} give odd U-Net widths {odd}; '
                         'half-instance normalisation needs n_feat + k * scale_unetfeats even for k = 1, 2, 3')


# ----------------------------------------------------------------------------------------
# One unfolding stage
# ----------------------------------------------------------------------------------------
class StageState(NamedTuple):
    """What a stage hands to the next: SAM features, restored image, encoder skips, decoder outputs."""
    feats: torch.Tensor
    image: torch.Tensor
    enc: List[torch.Tensor]
    dec: List[torch.Tensor]


def unfolding_stage(y: torch.Tensor, prev: Optional[StageState], phi: nn.Module, phit: nn.Module, r: torch.Tensor,
                    shallow: nn.Module, encoder: UNetEncoder, decoder: UNetDecoder, sam: SAM,
                    merge: Optional[nn.Module] = None) -> StageState:
    """One DGUNet stage: gradient step from the previous estimate (``y`` itself for the first
    stage), then the proximal U-Net, fed with the previous stage's features (SubspaceMerge
    and cross-stage fusion) unless this is the first stage (``prev is None``)."""
    z = y if prev is None else prev.image
    x = gradient_step(z, y, phi, phit, r)
    feat = shallow(x)
    if prev is None:
        skips, bottom = encoder(feat)
    else:
        skips, bottom = encoder(merge(feat, prev.feats), prev.enc, prev.dec)
    dec = decoder(bottom, skips)
    feats, image = sam(dec[-1], x)
    return StageState(feats, image, skips, dec)


# ----------------------------------------------------------------------------------------
# Any input size
# ----------------------------------------------------------------------------------------
