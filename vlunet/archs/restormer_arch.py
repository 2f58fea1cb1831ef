"""Restormer (Zamir et al., CVPR 2022): a U-shaped transformer of MDTA + GDFN blocks.

Same computation and state_dict keys as the published ``basicsr/models/archs/restormer_arch.py``;
the blocks come from :mod:`vlunet.archs.blocks` (shared with PromptIR and VLU-Net).
"""
import torch
from torch import nn

from basicsr.utils.registry import ARCH_REGISTRY
from vlunet.archs.blocks import Downsample, OverlapPatchEmbed, Upsample, crop_to, pad_to_multiple, transformer_blocks


@ARCH_REGISTRY.register()
class Restormer(nn.Module):
    """Restormer with the published constructor arguments. Any H x W (reflect-padded to a
    multiple of 8 inside and cropped back)."""

    def __init__(self, inp_channels=3, out_channels=3, dim=48, num_blocks=(4, 6, 6, 8), num_refinement_blocks=4,
                 heads=(1, 2, 4, 8), ffn_expansion_factor=2.66, bias=False, LayerNorm_type='WithBias',
                 dual_pixel_task=False):
        super().__init__()

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
        self.up4_3 = Upsample(dim * 8)
        self.reduce_chan_level3 = nn.Conv2d(dim * 8, dim * 4, kernel_size=1, bias=bias)
        self.decoder_level3 = blocks(num_blocks[2], dim * 4, heads[2])
        self.up3_2 = Upsample(dim * 4)
        self.reduce_chan_level2 = nn.Conv2d(dim * 4, dim * 2, kernel_size=1, bias=bias)
        self.decoder_level2 = blocks(num_blocks[1], dim * 2, heads[1])
        self.up2_1 = Upsample(dim * 2)  # no channel reduction at level 1
        self.decoder_level1 = blocks(num_blocks[0], dim * 2, heads[0])
        self.refinement = blocks(num_refinement_blocks, dim * 2, heads[0])
        self.dual_pixel_task = dual_pixel_task
        if dual_pixel_task:
            self.skip_conv = nn.Conv2d(dim, dim * 2, kernel_size=1, bias=bias)
        self.output = nn.Conv2d(dim * 2, out_channels, kernel_size=3, padding=1, bias=bias)

    def forward(self, inp_img):
        padded, size = pad_to_multiple(inp_img, 8)
        # features run in channels_last (see vlunet.archs.blocks); the result is an ordinary NCHW tensor
        return crop_to(self._forward(padded.contiguous(memory_format=torch.channels_last)), size).contiguous()

    def _forward(self, img):
        embedded = self.patch_embed(img)
        e1 = self.encoder_level1(embedded)
        e2 = self.encoder_level2(self.down1_2(e1))
        e3 = self.encoder_level3(self.down2_3(e2))
        x = self.latent(self.down3_4(e3))
        x = self.decoder_level3(self.reduce_chan_level3(torch.cat([self.up4_3(x), e3], 1)))
        x = self.decoder_level2(self.reduce_chan_level2(torch.cat([self.up3_2(x), e2], 1)))
        x = self.refinement(self.decoder_level1(torch.cat([self.up2_1(x), e1], 1)))
        if self.dual_pixel_task:  # defocus deblurring from dual-pixel pairs: no global residual
            return self.output(x + self.skip_conv(embedded))
        return self.output(x) + img
