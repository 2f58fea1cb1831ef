"""DFPIR (Tian et al., CVPR 2025): degradation-aware feature perturbation for all-in-one restoration.

A Restormer whose three skip connections and latent pass through a Degradation-Guided
Perturbation Block (DGPB, the published ``ch_shuffle_high_text``) steered by the CLIP text
embedding of the task prompt (``text_code``). A DGPB on features x (C channels)::

    order = argsort_descending(linear_layer3(linear_layer1(text_code)))    # a permutation of 2C
    q     = conv_out(conv1x1(x)[:, order])          # channel-wise perturbation: shuffle in 2C
    att   = attn4 * project_out(softmax_top90%(q_dw(q(LN1(q))), kv_dw(kv(LN2(x)))))
    out   = att + GDFN(LN3(att))                    # no residual from x

``softmax_top90%`` is MDTA's transposed attention with, in every row of every head's
C/heads x C/heads score matrix, only the ``int(0.9 * C/heads)`` largest scores kept
(attention-wise perturbation); keys and values come from x, queries from the shuffled features.

As published, only the sort order of the text projection is used: ``linear_layer1`` and
``linear_layer3`` never receive a gradient, and neither does ``text_code``. The order is
``torch.topk`` over all 2C projections (its tie order, as published). The DGPB's ``conv1x1`` and
``conv_out`` always have biases and its attention never has, whatever ``bias`` says (the GDFN
follows ``bias``). Same computation, state_dict keys and key order as the published
``net/model.py`` class ``ChannelShuffle_skip_textguaid``; the Restormer blocks come from
:mod:`vlunet.archs.blocks`.
"""
import torch
from torch import nn

from basicsr.utils.registry import ARCH_REGISTRY
from vlunet.archs import blocks as shared_blocks  # use_fused looked up at call time (tests force the plain path)
from vlunet.archs.blocks import (ChannelAttention, Downsample, FeedForward, LayerNorm, OverlapPatchEmbed, Upsample,
                                 channel_attention, crop_to, from_rows, norm_conv1x1, pad_to_multiple, to_rows,
                                 transformer_blocks)
from vlunet.archs.card import CheckpointFormat, MethodCard, state_dict_of, PublishedResults, ReferenceCode, Variant, register_card
from vlunet.archs.conditioning import CLIP_DIM, TEXT_EMBEDDING
from vlunet.archs.restormer_arch import restormer_kwargs, restormer_layer_norm


def _pointwise_then_depthwise(c_in, c_out, bias):
    """A 1x1 convolution and the 3x3 depthwise convolution applied after it."""
    return (nn.Conv2d(c_in, c_out, kernel_size=1, bias=bias),
            nn.Conv2d(c_out, c_out, kernel_size=3, padding=1, groups=c_out, bias=bias))


class TopKCrossAttention(nn.Module):
    """Transposed attention of queries x_q against keys/values x_kv, each score row restricted to
    its ``int(0.9 * C/heads)`` largest entries, scaled by the learnt ``attn4`` (published
    ``Topm_CrossAttention_Restormer``).

    ``forward(x_q, x_kv, norm_q, norm_kv)``: ``norm_q`` / ``norm_kv`` are the channel LayerNorms
    applied to the inputs first (fused with the 1x1 projections).
    """

    def __init__(self, dim, num_heads, bias):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.kv, self.kv_dwconv = _pointwise_then_depthwise(dim, dim * 2, bias)
        self.q, self.q_dwconv = _pointwise_then_depthwise(dim, dim, bias)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)
        self.attn4 = nn.Parameter(torch.tensor([0.2]))
        self.keep = dim // num_heads * 9 // 10  # = int(C * 9 / 10) for C = dim // num_heads

    def forward(self, x_q, x_kv, norm_q, norm_kv):
        q = self.q_dwconv(norm_conv1x1(norm_q, self.q, x_q))
        k, v = self.kv_dwconv(norm_conv1x1(norm_kv, self.kv, x_kv)).chunk(2, dim=1)
        if not shared_blocks.use_fused(q):  # the published order: scale, then project
            return self.project_out(self.attn4 * channel_attention(q, k, v, self.temperature, self.num_heads,
                                                                   self.keep))
        # attn4 scales the attention output before the projection: it rides on the projection matrix
        weight = self.project_out.weight.flatten(1) * self.attn4
        qv = torch.cat([q, v], 1).contiguous(memory_format=torch.channels_last)
        return ChannelAttention.apply(qv, None, None, k, self.temperature, weight, self.project_out.bias, None,
                                      self.num_heads, 1.0, self.keep)


class DegradationGuidedPerturbation(nn.Module):
    """DGPB (published ``ch_shuffle_high_text``): text-ordered channel shuffle in 2C channels, top-k
    masked cross-attention with the unshuffled features, GDFN (see the module docstring).

    ``forward(x, text_code)``: x (B, C, H, W); text_code (B, lin_ch) or (1, lin_ch) (one order for
    the whole batch, which the published indexing broadcasts).
    """

    def __init__(self, ch_dim, num_heads, LayerNorm_type, ffn_expansion_factor, bias, lin_ch=CLIP_DIM):
        super().__init__()
        self.linear_layer1 = nn.Linear(lin_ch, lin_ch)
        self.linear_layer3 = nn.Linear(lin_ch, 2 * ch_dim)
        self.conv1x1 = nn.Conv2d(ch_dim, 2 * ch_dim, kernel_size=1)
        self.conv_out = nn.Conv2d(2 * ch_dim, ch_dim, kernel_size=1)
        self.norm1 = LayerNorm(ch_dim, LayerNorm_type)
        self.norm2 = LayerNorm(ch_dim, LayerNorm_type)
        self.norm3 = LayerNorm(ch_dim, LayerNorm_type)
        self.select_attn = TopKCrossAttention(ch_dim, num_heads, bias=False)
        self.ffn = FeedForward(ch_dim, ffn_expansion_factor, bias)

    @torch.no_grad()
    def channel_order(self, text_code):
        """(B, 2C) channel permutation: the text projection's entries, largest first. No gradient
        reaches the projection (only the order is used, as published)."""
        code = self.linear_layer3(self.linear_layer1(text_code.to(self.linear_layer1.weight.dtype)))
        return torch.topk(code, k=code.shape[-1]).indices

    def shuffled(self, x, order):
        """``conv_out(conv1x1(x)[:, order])``: 2C channels shuffled per image, projected back to C."""
        if not shared_blocks.use_fused(x):  # the published formulation
            expanded = self.conv1x1(x)
            batch = torch.arange(x.shape[0], device=order.device).unsqueeze(1)
            return self.conv_out(expanded[batch, order])
        # One C x C map per image: conv_out's column j meets expanded channel order[j], so the
        # composition is W_in^T W_out^T[inverse] on pixel rows (plus the shuffled conv1x1 bias).
        b, c, h, w = x.shape
        out_rows = self.conv_out.weight.flatten(1).t()[torch.argsort(order, dim=-1)]  # (B or 1, 2C, C)
        matrix = (self.conv1x1.weight.flatten(1).t() @ out_rows).expand(b, c, c)
        shift = (self.conv1x1.bias @ out_rows + self.conv_out.bias).unsqueeze(1).expand(b, 1, c)
        return from_rows(torch.baddbmm(shift, to_rows(x).view(b, h * w, c), matrix), b, h, w)

    def forward(self, x, text_code):
        att = self.select_attn(self.shuffled(x, self.channel_order(text_code)), x, self.norm1, self.norm2)
        return self.ffn(att, residual=att, norm=self.norm3)


# (transformer stage, its perturbation block) per resolution level, 1/2**depth, C = dim * 2**depth;
# between two levels the features go through down{depth+1}_{depth+2}
ENCODER = (('encoder_level1', 'encoder_shuffle_channel1'), ('encoder_level2', 'encoder_shuffle_channel2'),
           ('encoder_level3', 'encoder_shuffle_channel3'), ('latent', 'latent_shuffle_channel'))
# decoder levels, deepest first: up{depth+2}_{depth+1}, concatenation with the perturbed skip,
# reduce_chan_level{depth+1} (none at level 1, which runs at 2 * dim), decoder_level{depth+1}
DECODER = (2, 1, 0)


@ARCH_REGISTRY.register()
class DFPIR(nn.Module):
    """DFPIR with the published constructor arguments (class ``ChannelShuffle_skip_textguaid``).
    ``device`` and ``dual_pixel_task`` are accepted and, as published, unused.

    ``forward(inp_img, text_code)``: ``inp_img`` (B, C, H, W) of any size (reflect-padded to a
    multiple of 8 inside and cropped back); ``text_code`` the (B, 512) CLIP ViT-B/32 text embedding
    (``encode_text``, not normalised) of each image's task prompt, or (1, 512) for the whole batch.
    """
    condition = TEXT_EMBEDDING  # forward(img, CLIP text embedding): see vlunet.archs.conditioning

    def __init__(self, inp_channels=3, out_channels=3, dim=48, num_blocks=(4, 6, 6, 8), num_refinement_blocks=4,
                 heads=(1, 2, 4, 8), ffn_expansion_factor=2.66, bias=False, LayerNorm_type='WithBias',
                 device='cuda:1', dual_pixel_task=False):
        super().__init__()

        def blocks(n, width, n_heads):
            return transformer_blocks(n, width, n_heads, ffn_expansion_factor, bias, LayerNorm_type)

        def perturbation(width, n_heads):
            return DegradationGuidedPerturbation(width, n_heads, LayerNorm_type, ffn_expansion_factor, bias)

        # modules are created in the published order, so state_dict keys come out in that order
        self.patch_embed = OverlapPatchEmbed(inp_channels, dim)
        for depth, (stage, perturbed) in enumerate(ENCODER):
            width = dim * 2 ** depth
            setattr(self, stage, blocks(num_blocks[depth], width, heads[depth]))
            setattr(self, perturbed, perturbation(width, heads[depth]))
            if depth < len(ENCODER) - 1:
                setattr(self, f'down{depth + 1}_{depth + 2}', Downsample(width))
        for depth in DECODER:
            width = dim * 2 ** depth
            setattr(self, f'up{depth + 2}_{depth + 1}', Upsample(width * 2))
            if depth:
                setattr(self, f'reduce_chan_level{depth + 1}', nn.Conv2d(width * 2, width, kernel_size=1, bias=bias))
            setattr(self, f'decoder_level{depth + 1}', blocks(num_blocks[depth], max(width, dim * 2), heads[depth]))
        self.refinement = blocks(num_refinement_blocks, dim * 2, heads[0])
        self.output = nn.Conv2d(dim * 2, out_channels, kernel_size=3, padding=1, bias=bias)

    def forward(self, inp_img, text_code):
        batch = inp_img.shape[0]
        if (not isinstance(text_code, torch.Tensor) or text_code.dim() != 2 or text_code.shape[1] != CLIP_DIM
                or text_code.shape[0] not in (1, batch)):
            got = tuple(text_code.shape) if isinstance(text_code, torch.Tensor) else type(text_code).__name__
            raise ValueError(f'DFPIR: text_code must be the (B, {CLIP_DIM}) CLIP text embedding with B = {batch} '
                             f'(or (1, {CLIP_DIM}) for the whole batch), got {got}')
        padded, size = pad_to_multiple(inp_img, 8)
        # features run in channels_last (see vlunet.archs.blocks); the result is an ordinary NCHW tensor
        return crop_to(self._forward(padded.contiguous(memory_format=torch.channels_last), text_code),
                       size).contiguous()

    def _forward(self, img, text):
        x, perturbed = self.patch_embed(img), []
        for depth, (stage, perturbation) in enumerate(ENCODER):
            if depth:
                x = getattr(self, f'down{depth}_{depth + 1}')(x)
            x = getattr(self, stage)(x)
            perturbed.append(getattr(self, perturbation)(x, text))
        x = perturbed.pop()  # the perturbed latent; the perturbed encoder outputs are the skips
        for depth in DECODER:
            x = torch.cat([getattr(self, f'up{depth + 2}_{depth + 1}')(x), perturbed.pop()], 1)
            if depth:
                x = getattr(self, f'reduce_chan_level{depth + 1}')(x)
            x = getattr(self, f'decoder_level{depth + 1}')(x)
        return self.output(self.refinement(x)) + img


# ------------------------------------------------------------------------------------------------
# the method card
# ------------------------------------------------------------------------------------------------
def _kwargs_from_state_dict(params):
    # ``device`` and ``dual_pixel_task`` change nothing in the published network: not in the weights
    return dict(restormer_kwargs(params), LayerNorm_type=restormer_layer_norm(params))


def _layout(net):
    """What the published training saves for its best model (train_3D_DFPIR.py)."""
    return {'epoch': 1, 'state_dict': state_dict_of(net), 'optimizer': {}, 'scheduler': {}}


_SOURCE = "DFPIR's {}-task table (repository figure fig/{}D.jpg at b9ba223)"
CARD = register_card(MethodCard(
    name='DFPIR', arch='DFPIR',
    paper='Tian et al., "Degradation-Aware Feature Perturbation for All-in-One Image Restoration", CVPR 2025',
    code='TxpHome/DFPIR @ b9ba223d655d2c174507c83527ba3958dfb90f7d (net/model.py, class ChannelShuffle_skip_textguaid)',
    variants=(Variant('DFPIR', 'DFPIR', {}, params=31_104_761, listing='keys_DFPIR.tsv'),),
    tiny=dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 1, 1, 1]),
    condition=TEXT_EMBEDDING,
    signature=('patch_embed.proj.weight', 'latent_shuffle_channel.linear_layer3.weight'),
    kwargs_from_state_dict=_kwargs_from_state_dict,
    checkpoint_formats=(CheckpointFormat("DFPIR .pth.tar: {'epoch', 'state_dict', 'optimizer', 'scheduler'} (the files "
                                         'written for evaluations that were not the best so far are empty)', _layout),),
    task_prompts={'noise15': 'Gaussian noise with a standard deviation of 15',
                  'noise25': 'Gaussian noise with a standard deviation of 25',
                  'noise50': 'Gaussian noise with a standard deviation of 50',
                  'rain': 'Rain degradation with rain lines', 'haze': 'Hazy degradation with normal haze',
                  'blur': 'Blur degradation with motion blur', 'lowlight': 'Lowlight degradation'},
    recipe={'epochs': '500; shared 200', 'batch/GPUs': '5 on one GPU (no DDP): effective 5; shared 32',
            'optimizer': 'Adam lr 1e-4, no weight decay; shared AdamW lr 2e-4',
            'schedule': 'CosineAnnealingLR(T_max=500) per epoch, no warm-up',
            'checkpoint': 'the best average PSNR on the test sets (evaluated every 2000 iterations and every epoch)',
            'prompt': "frozen OpenAI CLIP ViT-B/32 text tower on every batch for each image's task prompt",
            'seed': '0; shared 42', 'the same': 'data repeats, patch 128, L1 loss only'},
    results=(
        PublishedResults('NHR', 'DFPIR', {'SOTS_outdoor': (31.87, 0.980), 'Rain100L': (38.65, 0.982),
                                          'CBSD68_sigma15': (34.14, 0.935), 'CBSD68_sigma25': (31.47, 0.893),
                                          'CBSD68_sigma50': (28.25, 0.806)},
                         source=_SOURCE.format('three', 3), average=(32.88, 0.919)),
        PublishedResults('NHRBL', 'DFPIR', {'SOTS_outdoor': (31.64, 0.979), 'Rain100L': (37.62, 0.978),
                                            'CBSD68_sigma25': (31.29, 0.889), 'GoPro': (28.82, 0.873),
                                            'LOL': (23.82, 0.843)},
                         source=_SOURCE.format('five', 5), average=(30.64, 0.913)),
    ),
    reference=ReferenceCode('ChannelShuffle_skip_textguaid', kwargs=lambda kw: ((), dict(kw, device='cpu')),
                            stubs=('clip',)),
))
