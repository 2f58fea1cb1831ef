"""Restormer (Zamir et al., CVPR 2022): a U-shaped transformer of MDTA + GDFN blocks.

Same computation and state_dict keys as the published ``basicsr/models/archs/restormer_arch.py``;
the blocks come from :mod:`vlunet.archs.blocks` (shared with PromptIR and VLU-Net).
"""
import torch
from torch import nn

from basicsr.utils.registry import ARCH_REGISTRY
from vlunet.archs.blocks import Downsample, OverlapPatchEmbed, Upsample, crop_to, pad_to_multiple, transformer_blocks
from vlunet.archs.card import (CheckpointFormat, MethodCard, params_layout, PublishedResults, ReferenceCode, Variant,
                               count_blocks, expansion_factor, layer_norm_type, register_card)


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


# ------------------------------------------------------------------------------------------------
# reading Restormer-family kwargs from a state_dict (also used by PromptIR, VLU-Net, AdaIR, DFPIR)
# ------------------------------------------------------------------------------------------------
LEVELS = ('encoder_level1', 'encoder_level2', 'encoder_level3', 'latent')


def restormer_kwargs(params, blocks='{}.', bias_key=None):
    """Constructor kwargs of a Restormer-family state_dict; ``blocks`` formats the key prefix of a
    level's transformer blocks from the level name (block i is ``<prefix><i>.``); ``bias_key`` is the
    key whose presence means ``bias=True`` (default: the first attention's qkv bias)."""
    first = {level: f'{blocks.format(level)}0.' for level in LEVELS}
    stem = params['patch_embed.proj.weight']
    dim = stem.shape[0]
    kwargs = dict(inp_channels=stem.shape[1], out_channels=params['output.weight'].shape[0], dim=dim,
                  num_blocks=[count_blocks(params, blocks.format(level)) for level in LEVELS],
                  num_refinement_blocks=count_blocks(params, blocks.format('refinement')),
                  heads=[params[first[level] + 'attn.temperature'].shape[0] for level in LEVELS])
    hiddens = [params[first[level] + 'ffn.project_out.weight'].shape[1] for level in LEVELS]
    factor = expansion_factor([dim, dim * 2, dim * 4, dim * 8], hiddens)
    if factor is not None:
        kwargs['ffn_expansion_factor'] = factor
    kwargs['bias'] = (bias_key or first['encoder_level1'] + 'attn.qkv.bias') in params
    return kwargs


def restormer_layer_norm(params):
    """The LayerNorm type of a Restormer-family state_dict (its first block's first norm)."""
    return layer_norm_type(params, 'encoder_level1.0.norm1.body.weight')


def _kwargs_from_state_dict(params):
    return dict(restormer_kwargs(params), LayerNorm_type=restormer_layer_norm(params),
                dual_pixel_task='skip_conv.weight' in params)


_QUOTED_5 = 'quoted alike in the VLU-Net, AdaIR, MoCE-IR (Table 2) and DFPIR five-task tables'
CARD = register_card(MethodCard(
    name='Restormer', arch='Restormer',
    paper='Zamir et al., "Restormer: Efficient Transformer for High-Resolution Image Restoration", CVPR 2022',
    code='swz30/Restormer @ df766d5521afd21cce56e24159f300b30ebf3fb0 (basicsr/models/archs/restormer_arch.py)',
    reference=ReferenceCode('Restormer'),
    variants=(Variant('Restormer', 'Restormer', {}, params=26_126_644, listing='keys_Restormer.tsv'),),
    tiny=dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 1, 1, 1]),
    signature=('patch_embed.proj.weight', 'encoder_level1.0.attn.qkv.weight'),
    kwargs_from_state_dict=_kwargs_from_state_dict,
    checkpoint_formats=(CheckpointFormat("Restormer .pth: {'params': state_dict} (BasicSR layout)", params_layout),),
    recipe={'note': 'not trained all-in-one by its authors; the all-in-one numbers are other papers\' retrainings'},
    results=(
        PublishedResults('NHR', 'Restormer', {'SOTS_outdoor': (30.43, 0.975), 'Rain100L': (36.55, 0.975),
                                              'CBSD68_sigma15': (33.84, 0.931), 'CBSD68_sigma25': (31.18, 0.885),
                                              'CBSD68_sigma50': (27.90, 0.790)},
                         source="DFPIR's three-task table (repository figure fig/3D.jpg)", average=(31.98, 0.911),
                         quoted_in='DFPIR (CVPR 2025)'),
        PublishedResults('NHRBL', 'Restormer', {'SOTS_outdoor': (24.09, 0.927), 'Rain100L': (34.81, 0.962),
                                                'CBSD68_sigma25': (31.49, 0.884), 'GoPro': (27.22, 0.829),
                                                'LOL': (20.41, 0.806)},
                         source=_QUOTED_5, average=(27.60, 0.881), quoted_in='VLU-Net, AdaIR, MoCE-IR, DFPIR'),
        # other papers quote its all-in-one retrainings differently (each read in the repository figure named)
        PublishedResults('NHR', 'Restormer', {'SOTS_outdoor': (29.92, 0.970), 'Rain100L': (35.64, 0.971),
                                              'CBSD68_sigma15': (33.81, 0.932), 'CBSD68_sigma25': (31.00, 0.880),
                                              'CBSD68_sigma50': (27.85, 0.792)},
                         source='BaryIR (TPAMI 2026) Table 1, three degradations (repository figure figs/5Dquant.png '
                                'at af5cb9a)',
                         average=(31.62, 0.909), quoted_in='BaryIR (TPAMI 2026)'),
        PublishedResults('NHR', 'Restormer', {'SOTS_outdoor': (27.78, 0.958), 'Rain100L': (33.78, 0.958),
                                              'CBSD68_sigma15': (33.72, 0.930), 'CBSD68_sigma25': (30.67, 0.865),
                                              'CBSD68_sigma50': (27.63, 0.792)},
                         source="VLU-Net's three-task table (repository figure figures/3task.png at 8c2f7a7), listed "
                                "under 'One-by-one (end-to-end)'",
                         average=(30.75, 0.901), quoted_in='VLU-Net (CVPR 2025)'),
        PublishedResults('NHRBL', 'Restormer', {'SOTS_outdoor': (24.09, 0.927), 'Rain100L': (34.81, 0.971),
                                                'CBSD68_sigma25': (30.78, 0.876), 'GoPro': (27.22, 0.829),
                                                'LOL': (20.41, 0.806)},
                         source='BaryIR (TPAMI 2026) Table 2, five degradations (repository figure figs/5Dquant.png '
                                'at af5cb9a): Rain100L SSIM and sigma 25 differ from the other four tables',
                         average=(27.46, 0.881), quoted_in='BaryIR (TPAMI 2026)'),
        PublishedResults('CDD11', 'Restormer',
                         {'CDD11_low': (26.29, 0.8165), 'CDD11_haze': (28.35, 0.9813), 'CDD11_rain': (33.10, 0.9576),
                          'CDD11_snow': (33.43, 0.9675), 'CDD11_low_haze': (24.80, 0.8034),
                          'CDD11_low_rain': (25.28, 0.7864), 'CDD11_low_snow': (24.99, 0.7746),
                          'CDD11_haze_rain': (26.80, 0.9431), 'CDD11_haze_snow': (26.15, 0.9475),
                          'CDD11_low_haze_rain': (23.90, 0.7693), 'CDD11_low_haze_snow': (23.82, 0.7638)},
                         source="OneRestore's CDD-11 results: gy65896/OneRestore @ 23a2e6af066864dca013aeed7f6c6f5958aa"
                                '7259, img_file/metrics_CDD-11_psnr_ssim.xlsx (sheets PSNR, SSIM; row 05_Restormer; '
                                'per-type means over the 200 test images, rounded to 2/4 decimals); average as printed '
                                "in its README table (img_file/metric.png); OneRestore's retraining on CDD-11 (recipe "
                                'not published), measured by img_file/cal_psnr_ssim.py on the results saved as 8-bit PNG',
                         average=(26.99, 0.8646), quoted_in='OneRestore (ECCV 2024)',
                         measurement={'psnr': 'uint8', 'ssim': 'uint8_uniform7'}),
    ),
))
