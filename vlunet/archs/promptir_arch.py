"""PromptIR (Potlapalli et al., NeurIPS 2023): Restormer with prompt blocks in the decoder.

Same computation and state_dict keys as the published ``net/model.py``; the Restormer blocks
come from :mod:`vlunet.archs.blocks`. As published, the prompt widths (64/128/320) and the
concatenation widths are fixed numbers that only fit ``dim=48``, and ``decoder=True`` is the
configuration that was trained (``decoder=False`` fails in the published forward as well).
"""
import torch
import torch.nn.functional as F
from torch import nn

from basicsr.utils.registry import ARCH_REGISTRY
from vlunet.archs.blocks import (Downsample, OverlapPatchEmbed, TransformerBlock, Upsample, crop_to, pad_to_multiple,
                                 transformer_blocks)
from vlunet.archs.card import LIGHTNING, MethodCard, PublishedResults, ReferenceCode, Variant, register_card
from vlunet.archs.restormer_arch import restormer_kwargs, restormer_layer_norm


class PromptGenBlock(nn.Module):
    """Prompt = conv3x3(resize(sum_k w_k P_k)), w = softmax(linear(global average of x))."""

    def __init__(self, prompt_dim=128, prompt_len=5, prompt_size=96, lin_dim=192):
        super().__init__()
        self.prompt_param = nn.Parameter(torch.rand(1, prompt_len, prompt_dim, prompt_size, prompt_size))
        self.linear_layer = nn.Linear(lin_dim, prompt_len)
        self.conv3x3 = nn.Conv2d(prompt_dim, prompt_dim, kernel_size=3, padding=1, bias=False)

    def forward(self, x):
        weights = F.softmax(self.linear_layer(x.mean(dim=(-2, -1))), dim=1)
        prompt = torch.einsum('bk,kchw->bchw', weights, self.prompt_param[0])
        prompt = F.interpolate(prompt.contiguous(memory_format=torch.channels_last), size=x.shape[-2:],
                               mode='bilinear', align_corners=False)
        return self.conv3x3(prompt)


@ARCH_REGISTRY.register()
class PromptIR(nn.Module):
    """PromptIR with the published constructor arguments. Any H x W (reflect-padded to a multiple
    of 8 inside and cropped back)."""

    def __init__(self, inp_channels=3, out_channels=3, dim=48, num_blocks=(4, 6, 6, 8), num_refinement_blocks=4,
                 heads=(1, 2, 4, 8), ffn_expansion_factor=2.66, bias=False, LayerNorm_type='WithBias', decoder=False):
        super().__init__()

        def blocks(n, width, n_heads):
            return transformer_blocks(n, width, n_heads, ffn_expansion_factor, bias, LayerNorm_type)

        def block(width):  # the prompt-interaction blocks all use heads[2], as published
            return TransformerBlock(width, heads[2], ffn_expansion_factor, bias, LayerNorm_type)

        self.patch_embed = OverlapPatchEmbed(inp_channels, dim)
        self.decoder = decoder
        if decoder:
            self.prompt1 = PromptGenBlock(prompt_dim=64, prompt_len=5, prompt_size=64, lin_dim=96)
            self.prompt2 = PromptGenBlock(prompt_dim=128, prompt_len=5, prompt_size=32, lin_dim=192)
            self.prompt3 = PromptGenBlock(prompt_dim=320, prompt_len=5, prompt_size=16, lin_dim=384)
        # constructed but never used by the published forward; kept so checkpoints load strictly
        self.chnl_reduce1 = nn.Conv2d(64, 64, kernel_size=1, bias=bias)
        self.chnl_reduce2 = nn.Conv2d(128, 128, kernel_size=1, bias=bias)
        self.chnl_reduce3 = nn.Conv2d(320, 256, kernel_size=1, bias=bias)
        self.reduce_noise_channel_1 = nn.Conv2d(dim + 64, dim, kernel_size=1, bias=bias)  # unused, as published
        self.encoder_level1 = blocks(num_blocks[0], dim, heads[0])
        self.down1_2 = Downsample(dim)
        self.reduce_noise_channel_2 = nn.Conv2d(dim * 2 + 128, dim * 2, kernel_size=1, bias=bias)  # unused
        self.encoder_level2 = blocks(num_blocks[1], dim * 2, heads[1])
        self.down2_3 = Downsample(dim * 2)
        self.reduce_noise_channel_3 = nn.Conv2d(dim * 4 + 256, dim * 4, kernel_size=1, bias=bias)  # unused
        self.encoder_level3 = blocks(num_blocks[2], dim * 4, heads[2])
        self.down3_4 = Downsample(dim * 4)
        self.latent = blocks(num_blocks[3], dim * 8, heads[3])
        self.up4_3 = Upsample(dim * 4)
        self.reduce_chan_level3 = nn.Conv2d(dim * 2 + 192, dim * 4, kernel_size=1, bias=bias)
        self.noise_level3 = block(dim * 4 + 512)
        self.reduce_noise_level3 = nn.Conv2d(dim * 4 + 512, dim * 4, kernel_size=1, bias=bias)
        self.decoder_level3 = blocks(num_blocks[2], dim * 4, heads[2])
        self.up3_2 = Upsample(dim * 4)
        self.reduce_chan_level2 = nn.Conv2d(dim * 4, dim * 2, kernel_size=1, bias=bias)
        self.noise_level2 = block(dim * 2 + 224)
        self.reduce_noise_level2 = nn.Conv2d(dim * 2 + 224, dim * 4, kernel_size=1, bias=bias)
        self.decoder_level2 = blocks(num_blocks[1], dim * 2, heads[1])
        self.up2_1 = Upsample(dim * 2)
        self.noise_level1 = block(dim * 2 + 64)
        self.reduce_noise_level1 = nn.Conv2d(dim * 2 + 64, dim * 2, kernel_size=1, bias=bias)
        self.decoder_level1 = blocks(num_blocks[0], dim * 2, heads[0])
        self.refinement = blocks(num_refinement_blocks, dim * 2, heads[0])
        self.output = nn.Conv2d(dim * 2, out_channels, kernel_size=3, padding=1, bias=bias)

    def forward(self, inp_img):
        padded, size = pad_to_multiple(inp_img, 8)
        # features run in channels_last (see vlunet.archs.blocks); the result is an ordinary NCHW tensor
        return crop_to(self._forward(padded.contiguous(memory_format=torch.channels_last)), size).contiguous()

    def _prompted(self, x, prompt, block, reduce):
        """Decoder prompt interaction: concat the generated prompt, a transformer block, 1x1 conv."""
        return reduce(block(torch.cat([x, prompt(x)], 1)))

    def _forward(self, img):
        e1 = self.encoder_level1(self.patch_embed(img))
        e2 = self.encoder_level2(self.down1_2(e1))
        e3 = self.encoder_level3(self.down2_3(e2))
        x = self.latent(self.down3_4(e3))
        if self.decoder:
            x = self._prompted(x, self.prompt3, self.noise_level3, self.reduce_noise_level3)
        x = self.decoder_level3(self.reduce_chan_level3(torch.cat([self.up4_3(x), e3], 1)))
        if self.decoder:
            x = self._prompted(x, self.prompt2, self.noise_level2, self.reduce_noise_level2)
        x = self.decoder_level2(self.reduce_chan_level2(torch.cat([self.up3_2(x), e2], 1)))
        if self.decoder:
            x = self._prompted(x, self.prompt1, self.noise_level1, self.reduce_noise_level1)
        x = self.refinement(self.decoder_level1(torch.cat([self.up2_1(x), e1], 1)))
        return self.output(x) + img


def _kwargs_from_state_dict(params):
    return dict(restormer_kwargs(params), LayerNorm_type=restormer_layer_norm(params),
                decoder='prompt1.prompt_param' in params)


CARD = register_card(MethodCard(
    name='PromptIR', arch='PromptIR',
    paper='Potlapalli et al., "PromptIR: Prompting for All-in-One Image Restoration", NeurIPS 2023',
    code='va1shn9v/PromptIR @ 106159ab809101f2e25b6714195cd6fa9a938d36 (net/model.py)',
    variants=(Variant('PromptIR', 'PromptIR', {'decoder': True}, params=35_592_263,
                      listing='keys_PromptIR_decoder.tsv'),),
    # the prompt widths are fixed numbers that fit dim 48 only: the tiny network keeps dim 48
    tiny=dict(dim=48, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 2, 4, 8], decoder=True),
    signature=('patch_embed.proj.weight', 'prompt1.prompt_param', 'noise_level1.attn.qkv.weight'),
    kwargs_from_state_dict=_kwargs_from_state_dict,
    checkpoint_formats=(LIGHTNING,),
    recipe={'epochs': '120 (options.py --epochs); shared 200',
            'schedule': 'LinearWarmupCosineAnnealingLR(warmup_epochs=15, max_epochs=150) stepped per epoch '
                        '(train.py:46): training stops at epoch 120 of the cosine\'s 150',
            'batch/GPUs': '8 per GPU x 4 GPUs (options.py --batch_size, --num_gpus): effective 32 like the shared 4 x 8',
            'the same': 'AdamW lr 2e-4 (train.py:45), patch 128, L1 loss'},
    results=(
        PublishedResults('NHR', 'PromptIR', {'SOTS_outdoor': (30.58, 0.974), 'Rain100L': (36.37, 0.972),
                                             'CBSD68_sigma15': (33.98, 0.933), 'CBSD68_sigma25': (31.31, 0.888),
                                             'CBSD68_sigma50': (28.06, 0.799)},
                         source='PromptIR Table 1 (three tasks; repository figure prompt-ir-results.png at 106159a), '
                                'quoted alike in the VLU-Net, AdaIR, MoCE-IR and DFPIR tables', average=(32.06, 0.913)),
        # PromptIR's own repository shows the three-task table only: its five-task numbers are other papers'
        # retrainings, and they disagree (average 29.15 in VLU-Net's table, 29.72 in BaryIR's)
        PublishedResults('NHRBL', 'PromptIR', {'SOTS_outdoor': (26.54, 0.949), 'Rain100L': (36.37, 0.970),
                                               'CBSD68_sigma25': (31.47, 0.886), 'GoPro': (28.71, 0.881),
                                               'LOL': (22.68, 0.832)},
                         source="VLU-Net's five-task table (repository figure figures/5task.png)",
                         average=(29.15, 0.904), quoted_in='VLU-Net (CVPR 2025)'),
        PublishedResults('NHR', 'PromptIR', {'SOTS_outdoor': (30.58, 0.974), 'Rain100L': (36.37, 0.972),
                                             'CBSD68_sigma15': (33.97, 0.933), 'CBSD68_sigma25': (31.29, 0.888),
                                             'CBSD68_sigma50': (28.06, 0.798)},
                         source='BaryIR (TPAMI 2026) Table 1, three degradations (repository figure figs/5Dquant.png '
                                'at af5cb9a)', average=(32.05, 0.913), quoted_in='BaryIR (TPAMI 2026)'),
        PublishedResults('NHRBL', 'PromptIR', {'SOTS_outdoor': (30.41, 0.972), 'Rain100L': (36.17, 0.970),
                                               'CBSD68_sigma25': (31.20, 0.885), 'GoPro': (27.93, 0.851),
                                               'LOL': (22.89, 0.829)},
                         source='BaryIR (TPAMI 2026) Table 2, five degradations (repository figure figs/5Dquant.png '
                                'at af5cb9a)', average=(29.72, 0.901), quoted_in='BaryIR (TPAMI 2026)'),
        PublishedResults('CDD11', 'PromptIR',
                         {'CDD11_low': (26.32, 0.8054), 'CDD11_haze': (26.10, 0.9686), 'CDD11_rain': (31.56, 0.9463),
                          'CDD11_snow': (31.53, 0.9595), 'CDD11_low_haze': (24.49, 0.7888),
                          'CDD11_low_rain': (25.05, 0.7712), 'CDD11_low_snow': (24.51, 0.7610),
                          'CDD11_haze_rain': (24.54, 0.9237), 'CDD11_haze_snow': (23.70, 0.9254),
                          'CDD11_low_haze_rain': (23.74, 0.7523), 'CDD11_low_haze_snow': (23.33, 0.7468)},
                         source="OneRestore's CDD-11 results: gy65896/OneRestore @ 23a2e6af066864dca013aeed7f6c6f5958aa"
                                '7259, img_file/metrics_CDD-11_psnr_ssim.xlsx (sheets PSNR, SSIM; row 14_PromptIR; '
                                'per-type means over the 200 test images, rounded to 2/4 decimals); average as printed '
                                "in its README table (img_file/metric.png, which lists 38.45M parameters where the "
                                "published network counts 35.59M); OneRestore's retraining on CDD-11 (recipe not "
                                'published), measured by img_file/cal_psnr_ssim.py on the results saved as 8-bit PNG',
                         average=(25.90, 0.8499), quoted_in='OneRestore (ECCV 2024)',
                         measurement={'psnr': 'uint8', 'ssim': 'uint8_uniform7'}),
    ),
    reference=ReferenceCode('PromptIR', kwargs=lambda kw: ((), dict(kw))),
))
