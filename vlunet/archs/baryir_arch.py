"""BaryIR (Tang et al., TPAMI 2026): all-in-one restoration in a learnt Wasserstein barycenter space.

The released network (``BaryNet`` in the published ``model_bary.py``, "BaryIR_Restormer" in the
paper's tables) is a Restormer-style U-Net (MDTA + GDFN blocks from :mod:`vlunet.archs.blocks`)
whose bottleneck splits the degraded image's latent into a degradation-agnostic part and a
degradation-specific residual, and whose decoder runs a second branch on that residual::

    e1, e2, e3 = encoder levels 1-3 (dim, 2 dim, 4 dim channels at H, H/2, H/4)
    s = LN(latent(down3_4(e3)))           # source latent, 8 dim channels at H/8
    b = LN(barylatent(s))                 # barycenter latent: the SAME LayerNorm module LN
    r = s - b                             # residual (degradation-specific) embedding
    x = reduce_noise_level3(noise_level3(cat[b, r]))        # main branch, 16 dim -> 4 dim
    q = resreduce_noise_level3(r)                           # residual branch
    for level 3, 2:                                         # (and level 1 without the residual blocks)
        u = resup(q)                                        # upsampled residual
        x = decoder(reduce_chan(cat[up(x), e + 0.8 u]))     # the residual joins the skip, factor 0.8
        q = resdecoder(resreduce_chan(u))
        x = reduce_noise(noise_level(x)); q = resreduce_noise(q)
    image = output(refinement(decoder_level1(cat[up2_1(x), e1 + 0.8 resup2_1(q)]))) + input

The forward returns ``(image, s, b, r)``: training pulls ``b`` of every degradation source to the
barycenter of the sources (Kantorovich potentials :class:`BaryIRPotentials`, one per source,
trained adversarially) and keeps ``r`` orthogonal to ``b`` and clustered by degradation
(:class:`vlunet.losses.baryir_loss.BaryIRLoss`). Testing uses the image only.

Facts of the published code kept here (attribute names, constructor arguments and state_dict order
are the published ones, so published weights load strictly):

* ``dim`` must be 48: the published widths of ``noise_level3`` (``4 dim + 576``),
  ``reduce_chan_level3`` (``2 dim + 192``) and ``resreduce_noise_level3`` (``4 dim + 192``) are
  numbers that fit dim 48 only; here they are written as multiples of dim and other dims are refused;
* ``decoder`` must be True (with False the published forward raises NameError): it is the default
  here, False is refused;
* ``noise_level1/2/3`` all use ``heads[2]``; ``decoder_level1`` and ``refinement`` run at 2 dim
  with ``heads[0]``; the 3x3 convs of patch embedding and resampling never have a bias;
* ``chnl_reduce1-3`` and ``reduce_noise_channel_1-3`` (PromptIR's prompt widths) are constructed
  but never used (215,296 parameters without gradient), kept so the keys match.

The published forward needs H and W divisible by 8; here any size is reflect-padded to a multiple of
8 inside and the image is cropped back (sizes divisible by 8 are not padded: the published result).
The latents are those of the PADDED image, (B, 8 dim, ceil(H/8), ceil(W/8)): the bottom/right
rows and columns of latent pixels then also see the reflected border. Training patches (128, a
multiple of 8) are never padded.
"""
import torch
from torch import nn

from basicsr.utils.registry import ARCH_REGISTRY
from vlunet.archs.blocks import (Downsample, LayerNorm, OverlapPatchEmbed, TransformerBlock, Upsample, crop_to,
                                 pad_to_multiple, transformer_blocks)
from vlunet.archs.card import (CheckpointFormat, ExtraNetwork, MethodCard, NetworkOutput, PublishedResults,
                               ReferenceCode, TrainingTerm, Variant, count_blocks, expansion_factor, layer_norm_type,
                               register_card)

DIM = 48           # the only width the published hard-coded channel counts fit
RESIDUAL_SKIP = 0.8  # weight of the upsampled residual embedding added to the encoder skips
OUTPUT_NAMES = ('image', 'source_latent', 'barycenter_latent', 'residual')


@ARCH_REGISTRY.register()
class BaryIR(nn.Module):
    """BaryIR's restoration network (the published ``BaryNet``), same constructor arguments.

    ``forward(inp_img) -> (image, source_latent, barycenter_latent, residual)``: the restored image
    (B, C, H, W), not clamped, and the three bottleneck embeddings (B, 8 dim, ceil(H/8), ceil(W/8)),
    ``residual = source_latent - barycenter_latent``. Any H x W (see the module docstring).
    """

    def __init__(self, inp_channels=3, out_channels=3, dim=DIM, num_blocks=(4, 6, 6, 8), num_refinement_blocks=4,
                 heads=(1, 2, 4, 8), ffn_expansion_factor=2.66, bias=False, LayerNorm_type='WithBias', decoder=True):
        super().__init__()
        if dim != DIM:
            raise ValueError(f'BaryIR: dim={dim}; the published BaryNet hard-codes channel counts that fit dim={DIM} '
                             'only (noise_level3 takes 4*dim + 576 channels, which must equal 16*dim)')
        if not decoder:
            raise ValueError('BaryIR: decoder=False; the published BaryNet defines its decoder input only when '
                             'decoder=True (its forward raises NameError otherwise); the trainers pass decoder=True')

        def blocks(n, width, n_heads):
            return transformer_blocks(n, width, n_heads, ffn_expansion_factor, bias, LayerNorm_type)

        def block(width, n_heads):
            return TransformerBlock(width, n_heads, ffn_expansion_factor, bias, LayerNorm_type)

        def conv1x1(c_in, c_out):
            return nn.Conv2d(c_in, c_out, kernel_size=1, bias=bias)

        self.decoder = decoder
        self.patch_embed = OverlapPatchEmbed(inp_channels, dim)
        # never used: PromptIR's prompt-fusion convs, constructed by the published class (kept for the keys)
        self.chnl_reduce1 = conv1x1(64, 64)
        self.chnl_reduce2 = conv1x1(128, 128)
        self.chnl_reduce3 = conv1x1(320, 256)
        self.reduce_noise_channel_1 = conv1x1(dim + 64, dim)
        self.encoder_level1 = blocks(num_blocks[0], dim, heads[0])
        self.down1_2 = Downsample(dim)
        self.reduce_noise_channel_2 = conv1x1(dim * 2 + 128, dim * 2)  # unused
        self.encoder_level2 = blocks(num_blocks[1], dim * 2, heads[1])
        self.down2_3 = Downsample(dim * 2)
        self.reduce_noise_channel_3 = conv1x1(dim * 4 + 256, dim * 4)  # unused
        self.encoder_level3 = blocks(num_blocks[2], dim * 4, heads[2])
        self.down3_4 = Downsample(dim * 4)
        # the bottleneck: source latent, barycenter map, one LayerNorm for both
        self.latent = blocks(num_blocks[3], dim * 8, heads[3])
        self.barylatent = blocks(num_blocks[3], dim * 8, heads[3])
        self.LN = LayerNorm(dim * 8, LayerNorm_type)
        # decoder level 3 (main branch, then the residual branch)
        self.up4_3 = Upsample(dim * 4)
        self.reduce_chan_level3 = conv1x1(dim * 6, dim * 4)      # published: 2 dim + 192 input channels
        self.noise_level3 = block(dim * 16, heads[2])            # published: 4 dim + 576 channels
        self.reduce_noise_level3 = conv1x1(dim * 16, dim * 4)
        self.decoder_level3 = blocks(num_blocks[2], dim * 4, heads[2])
        self.resup4_3 = Upsample(dim * 8)
        self.resreduce_chan_level3 = conv1x1(dim * 4, dim * 4)
        self.resreduce_noise_level3 = conv1x1(dim * 8, dim * 8)  # published: 4 dim + 192 input channels
        self.resdecoder_level3 = blocks(num_blocks[2], dim * 4, heads[2])
        # decoder level 2
        self.up3_2 = Upsample(dim * 4)
        self.reduce_chan_level2 = conv1x1(dim * 4, dim * 2)
        self.noise_level2 = block(dim * 4, heads[2])
        self.reduce_noise_level2 = conv1x1(dim * 4, dim * 4)
        self.decoder_level2 = blocks(num_blocks[1], dim * 2, heads[1])
        self.resup3_2 = Upsample(dim * 4)
        self.resreduce_chan_level2 = conv1x1(dim * 2, dim * 2)
        self.resreduce_noise_level2 = conv1x1(dim * 4, dim * 4)
        self.resdecoder_level2 = blocks(num_blocks[1], dim * 2, heads[1])
        # decoder level 1 (no channel reduction) and refinement
        self.up2_1 = Upsample(dim * 2)
        self.resup2_1 = Upsample(dim * 2)
        self.noise_level1 = block(dim * 2, heads[2])             # heads[2], as published
        self.reduce_noise_level1 = conv1x1(dim * 2, dim * 2)
        self.resreduce_noise_level1 = conv1x1(dim * 2, dim * 2)
        self.decoder_level1 = blocks(num_blocks[0], dim * 2, heads[0])
        self.refinement = blocks(num_refinement_blocks, dim * 2, heads[0])
        self.output = nn.Conv2d(dim * 2, out_channels, kernel_size=3, padding=1, bias=bias)

    def forward(self, inp_img):
        padded, size = pad_to_multiple(inp_img, 8)
        # features run in channels_last (see vlunet.archs.blocks); the results are ordinary NCHW tensors
        image, *latents = self._forward(padded.contiguous(memory_format=torch.channels_last))
        return (crop_to(image, size).contiguous(), *(t.contiguous() for t in latents))

    def _forward(self, img):
        e1 = self.encoder_level1(self.patch_embed(img))
        e2 = self.encoder_level2(self.down1_2(e1))
        e3 = self.encoder_level3(self.down2_3(e2))
        source = self.LN(self.latent(self.down3_4(e3)))
        bary = self.LN(self.barylatent(source))
        residual = source - bary

        x = self.reduce_noise_level3(self.noise_level3(torch.cat([bary, residual], 1)))
        res = self.resreduce_noise_level3(residual)
        # levels 3 and 2: merge, decode both branches, then the level's extra block and 1x1 convs
        for lvl, skip in ((3, e3), (2, e2)):
            up = getattr(self, f'resup{lvl + 1}_{lvl}')(res)
            merged = torch.cat([getattr(self, f'up{lvl + 1}_{lvl}')(x), skip + RESIDUAL_SKIP * up], 1)
            x = getattr(self, f'decoder_level{lvl}')(getattr(self, f'reduce_chan_level{lvl}')(merged))
            res = getattr(self, f'resdecoder_level{lvl}')(getattr(self, f'resreduce_chan_level{lvl}')(up))
            x = getattr(self, f'reduce_noise_level{lvl - 1}')(getattr(self, f'noise_level{lvl - 1}')(x))
            res = getattr(self, f'resreduce_noise_level{lvl - 1}')(res)
        x = torch.cat([self.up2_1(x), e1 + RESIDUAL_SKIP * self.resup2_1(res)], 1)
        x = self.refinement(self.decoder_level1(x))
        return self.output(x) + img, source, bary, residual


@ARCH_REGISTRY.register()
class BaryIRPotentials(nn.Module):
    """BaryIR's Kantorovich potentials (the published ``Potentials``): one scalar function per source.

    ``num_potentials`` independent heads ``potentials[k]``, each::

        Conv2d(C, C, 4, stride 4, padding 1, groups 4, no bias) -> LeakyReLU(0.2) -> Flatten
        -> Linear(F, F // 4) -> Linear(F // 4, 64) -> LeakyReLU(0.2) -> Linear(64, 1)

    (no activation between the first two Linear layers, as published), ``F = C c^2`` with
    ``c = ((size // 8) + 2 - 4) // 4 + 1`` the conv's output side on a ``size / 8`` latent
    (``size``: the training patch; c = 4 for 128). Init: PyTorch defaults, then every conv weight
    redrawn from N(0, 0.02) after all heads are built, in module order (as published).

    ``forward(input, idx=None)``: ``input`` ONE latent (C, h, w), as published (or a batch
    (B, C, h, w), an extension); an int ``idx`` gives head idx's value(s) (1, 1) (or (B, 1)),
    None a list of every head's. :meth:`values` evaluates a batch, each sample with its own head.
    """

    def __init__(self, num_potentials, channels=384, size=128):
        super().__init__()
        side = (size // 8 + 2 - 4) // 4 + 1
        if side < 1 or channels % 4:
            raise ValueError(f'BaryIRPotentials: channels={channels}, size={size}: needs channels divisible by 4 '
                             f'(4 conv groups) and size >= 16 (a {size // 8}-pixel latent gives a conv output of '
                             f'{side} pixels)')
        self.num_potentials = num_potentials
        self.input_channels = channels
        self.num_features = channels * side * side
        self.potentials = nn.ModuleList([self._head(channels, self.num_features) for _ in range(num_potentials)])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0.0, 0.02)

    @staticmethod
    def _head(channels, features):
        return nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=4, stride=4, padding=1, groups=4, bias=False),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
            nn.Linear(features, int(features / 4)),
            nn.Linear(int(features / 4), 64),
            nn.LeakyReLU(0.2),
            nn.Linear(64, 1),
        )

    def forward(self, input, idx=None):
        x = input.unsqueeze(0) if input.dim() == 3 else input
        if idx is not None:
            return self.potentials[int(idx)](x)
        return [head(x) for head in self.potentials]

    def values(self, latents, heads):
        """(B,) values ``f_{heads[i]}(latents[i])``: ``latents`` (B, C, h, w), ``heads`` (B,) int indices."""
        heads = torch.as_tensor(heads, device=latents.device).long().view(-1)
        if heads.numel() != latents.shape[0]:
            raise ValueError(f'BaryIRPotentials.values: {latents.shape[0]} latents but {heads.numel()} head indices')
        bad = (heads < 0) | (heads >= self.num_potentials)
        if bool(bad.any()):
            raise ValueError(f'BaryIRPotentials.values: head index {heads[bad].tolist()} out of range: there are '
                             f'{self.num_potentials} potentials')
        h, w = latents.shape[-2:]
        features = latents.shape[1] * ((h - 2) // 4 + 1) * ((w - 2) // 4 + 1)
        if latents.shape[1] != self.input_channels or features != self.num_features:
            raise ValueError(f'BaryIRPotentials.values: latents of {latents.shape[1]} x {h} x {w} give {features} '
                             f'features; these potentials take {self.input_channels} channels and '
                             f'{self.num_features} features (built for latents of the training patch / 8)')
        order, parts = [], []
        for k in heads.unique().tolist():  # each head once, on the samples of its source
            where = (heads == k).nonzero().view(-1)
            order.append(where)
            parts.append(self.potentials[k](latents[where]).view(-1))
        return torch.cat(parts)[torch.cat(order).argsort()]


# ------------------------------------------------------------------------------------------------
# the method card
# ------------------------------------------------------------------------------------------------
def read_output(net, output) -> NetworkOutput:
    """``(image, s, b, r)`` -> the image (supervised by the pixel loss) and the three latents as aux."""
    image, source, bary, residual = output
    return NetworkOutput(image, [image], aux={'source_latent': source, 'barycenter_latent': bary,
                                              'residual': residual})


def _first_heads(params, prefixes, default):
    for prefix in prefixes:
        key = f'{prefix}.attn.temperature'
        if key in params:
            return params[key].shape[0]
    return default


def _kwargs_from_state_dict(params):
    """Constructor kwargs from the shapes; works with empty block stacks (num_blocks 0) too."""
    levels = ('encoder_level1', 'encoder_level2', 'encoder_level3', 'latent')
    num_blocks = [count_blocks(params, f'{level}.') for level in levels]
    heads = [_first_heads(params, ('encoder_level1.0', 'decoder_level1.0', 'refinement.0'), 1),
             _first_heads(params, ('encoder_level2.0', 'decoder_level2.0', 'resdecoder_level2.0'), 2),
             params['noise_level3.attn.temperature'].shape[0],
             _first_heads(params, ('latent.0', 'barylatent.0'), 8)]
    # GDFN hidden widths of the always-present noise blocks (96, 192, 768 channels) give the factor
    widths = [DIM * 2, DIM * 4, DIM * 16]
    hiddens = [params[f'noise_level{i}.ffn.project_out.weight'].shape[1] for i in (1, 2, 3)]
    kwargs = dict(inp_channels=params['patch_embed.proj.weight'].shape[1],
                  out_channels=params['output.weight'].shape[0], dim=params['patch_embed.proj.weight'].shape[0],
                  num_blocks=num_blocks, num_refinement_blocks=count_blocks(params, 'refinement.'), heads=heads,
                  bias='output.bias' in params, LayerNorm_type=layer_norm_type(params, 'LN.body.weight'),
                  decoder=True)
    factor = expansion_factor(widths, hiddens)
    if factor is not None:
        kwargs['ffn_expansion_factor'] = factor
    return kwargs


_TABLES = 'BaryIR paper Tables 1 and 2 = repository figure figs/5Dquant.png at af5cb9a, row BaryIR_Restormer'
# how tester_bary.py measures (baryir_facts.md section 9): crop to a multiple of 8, PSNR/SSIM of the saved 8-bit PNGs
_MEASURED = {'psnr': 'uint8', 'ssim': 'uint8_uniform7', 'crop': 'bottom/right crop to a multiple of 8'}
# train.barycenter_opt of the published 3-task recipe (trainer_bary.py), as loss options next to an L1 of weight 1
PUBLISHED_TERM = {
    'loss_weight': 1e-4, 'ortho_contrast_weight': 0.05, 'contrast_temperature': 0.07, 'contrast_eps': 0.0,
    'constraint_weight': 10.0, 'potential_steps': 2,
    'potentials': {'type': 'BaryIRPotentials', 'num_potentials': 3, 'channels': 384},  # size: the patch (128)
    'optim': {'type': 'RMSprop', 'lr': 1e-4},
    'source_counts': [77160, 72000, 72135],  # denoise x5 per sigma, Rain100L x360, RESIDE OTS
}


def published_layout(net):
    """What trainer_bary*.py ``torch.save`` for a network: the whole modules. The potentials here are small
    (size 16; the published ones follow the training patch, 128 or 144)."""
    return {'epoch': 1, 'BaryIR': net, 'Pots': BaryIRPotentials(3, channels=net.LN.body.weight.shape[0], size=16)}


CARD = register_card(MethodCard(
    name='BaryIR', arch='BaryIR',
    paper='Tang et al., "Learning Continuous Wasserstein Barycenter Space for Generalized All-in-One Image '
          'Restoration", TPAMI 2026 (arXiv 2602.23169)',
    code='xl-tang3/BaryIR @ af5cb9ac57d142874f08f267523f122fd927b86d (model_bary.py, classes BaryNet and Potentials; '
         'trainer_bary.py, trainer_bary_ddp.py)',
    variants=(Variant('BaryIR', 'BaryIR', {'decoder': True}, params=53_765_070, listing='keys_BaryIR.tsv'),),
    # dim is fixed at 48 by the published widths: the smallest network keeps the barycenter map (one block in
    # latent and barylatent) and empties the other stacks (17.2M parameters, mostly the 768-channel noise_level3
    # block and the residual branch's 384-channel upsampling; about 0.6 s for a float32 1x3x32x32 forward + backward
    # on one CPU thread)
    tiny=dict(dim=48, num_blocks=[0, 0, 0, 1], num_refinement_blocks=0, heads=[1, 1, 1, 1], decoder=True),
    condition=None,
    read_output=read_output,
    # keys only BaryNet has: the barycenter map, its shared LayerNorm and the residual branch
    signature=('patch_embed.proj.weight', 'LN.body.weight', 'noise_level3.attn.temperature',
               'resup4_3.body.0.weight'),
    kwargs_from_state_dict=_kwargs_from_state_dict,
    checkpoint_formats=(CheckpointFormat(
        "trainer .pth/.pt: torch.save({'epoch': int, 'BaryIR': <the pickled BaryNet module>, 'Pots': <the pickled "
        "Potentials module>}): whole modules, not state_dicts (DDP saves .module: no 'module.' prefix); read without "
        "the authors' classes by vlunet.utils.pickled_modules.load_pickled_modules -> {'epoch': int, 'BaryIR': "
        "state_dict (keys_BaryIR.tsv), 'Pots': the potentials' state_dict}", published_layout, pickled=True),),
    training_terms=(
        TrainingTerm('barycenter_opt', 'BaryIRLoss', published=PUBLISHED_TERM,
                     what='multisource Wasserstein barycenter term RMS(s - b) - f_k(b), orthogonality of b and the '
                          'residuals, supervised contrast of the residuals by label (trainer_bary.py: w 0.05, two '
                          'potential steps; trainer_bary_ddp.py: w 0.02, contrast eps 1e-6, one step); loss_weight '
                          '1e-4 = 1 / Sigma next to the L1 loss of weight 1 (published: Sigma 10000 on L1, 1 here); '
                          'the potentials\' size is the training patch (published 128), here taken from the first '
                          'batch; Lambda from the published 3-task sample counts; updates its own potentials after '
                          'each network step (vlunet/losses/baryir_loss.py)'),
    ),
    extra_networks=(ExtraNetwork('potentials', 'BaryIRPotentials',
                                 what="the per-source Kantorovich potentials, built and trained inside "
                                      "train.barycenter_opt (its 'potentials' option; state in the loss's "
                                      "state_dict); the published checkpoints' 'Pots' entry"),),
    recipe={
        'optimizer': 'RMSprop (torch defaults) for the network and the potentials; both lrs set every epoch e to '
                     'lr_e / 2, lr_e = 2e-4 * 0.1 ** ((e - 1) // step): 1e-4, then 1e-5 after `step` epochs',
        'schedule': '3-task: 56 epochs, step 50; 5-task: 57 epochs, step 31 (single GPU) or 61, step 35 (DDP); every '
                    'published command resumes from an earlier checkpoint (network only; potentials and optimisers '
                    'fresh), so the complete schedule is not in the repository',
        'batch/GPUs': '3 per GPU on 1 GPU (trainer_bary.py); DDP 2 x 3 (README) or 3 x 3 at patch 144 (train.sh)',
        'loss': 'Sigma * L1 + (1/B) sum_i Lambda_k(i) [RMS(s_i - b_i) + w (ort_i + contra_i) - f_k(i)(b_i)], '
                'Sigma 10000, w 0.05 (single GPU) / 0.02 and contrast eps 1e-6 (DDP); potentials: value step on the '
                're-forwarded batch then 10 (sum_k Lambda_k f_k(b_last))^2, two RMSprop steps (DDP: one)',
        'data': 'patch 128; denoising x5 per sigma (3-task) / x15 (sigma 25 only, 5-task), Rain100L x360, RESIDE OTS '
                'x1, GoPro x35, LOL x150; one of 7 non-identity flips/rotations',
        'resume-only': 'python trainer_bary.py --backbone=BaryNet --Sigma=10000 --sigma=1 --type all --batchSize 3 '
                       '--patch_size 128 --nEpochs 56 --step 50 --num_sources 3 --resume '
                       'checkpoint/model_allBaryNet128__56_1.0.pt (3-task); 5-task: --nEpochs 57 --step 31 '
                       '--num_sources 5 --de_type derain dehaze lowlight denoise_25 deblur; DDP: torchrun '
                       'trainer_bary_ddp.py ... --nEpochs 61 --step 35',
        'precision': 'fp32, no warm-up, no clipping, no EMA, a random seed per run',
    },
    results=(
        PublishedResults('NHR', 'BaryIR', {'SOTS_outdoor': (31.40, 0.980), 'Rain100L': (39.02, 0.985),
                                           'CBSD68_sigma15': (34.16, 0.935), 'CBSD68_sigma25': (31.54, 0.892),
                                           'CBSD68_sigma50': (28.25, 0.802)},
                         source=_TABLES + ' (three degradations)', average=(32.86, 0.919),
                         measurement=_MEASURED),
        PublishedResults('NHRBL', 'BaryIR', {'SOTS_outdoor': (31.20, 0.979), 'Rain100L': (38.10, 0.982),
                                             'CBSD68_sigma25': (31.43, 0.891), 'GoPro': (29.51, 0.889),
                                             'LOL': (23.37, 0.854)},
                         source=_TABLES + ' (five degradations)', average=(30.72, 0.919), measurement=_MEASURED),
    ),
    aliases=('BaryNet',),  # the published class name (the fixtures' 'arch')
    reference=ReferenceCode('BaryNet', kwargs=lambda kw: ((), dict(kw, decoder=True)),
                            stubs=('torchvision', 'torchvision.utils')),
))
