"""DGUNet and DGUNet+ (Mou, Wang, Zhang: "Deep Generalized Unfolding Networks for Image
Restoration", CVPR 2022), functionally identical to the published Deraining/DGUNet.py and
Deraining/DGUNet_plus.py (the Deblurring/Denoising files differ only by their defaults:
DGUNet n_feat=80, scale_unetfeats=48, scale_orsnetfeats=32; DGUNet+ deblurring 96/48/32,
denoising 80/40/32).

Both unfold proximal gradient descent into stages (DGUNet+: 7; DGUNet: depth + 2). Stage k:

    x_k = z_{k-1} - r_k * phi_k^T(phi_k(z_{k-1}) - y)         gradient step (z_0 = y)
    z_k = U-Net_k(shallow_k(x_k), features of stage k-1)       proximal step, z_k = SAM image

The last stage replaces the U-Net by a single conv on its features plus the input image.
``forward(img)`` returns the seven (DGUNet: ``depth + 2``) stage images, final first.
"""
import warnings

import torch
from torch import nn

from basicsr.utils.registry import ARCH_REGISTRY
from vlunet.archs.card import (CheckpointFormat, MethodCard, data_parallel_layout, PublishedResults, ReferenceCode, Variant,
                               register_card, stage_list_output)
from vlunet.utils.tiling import crop_to, pad_to_multiple
from vlunet.archs.dgunet_blocks import (SAM, GradientOperator, SubspaceMerge, UNetDecoder, UNetEncoder,
                                        check_unet_widths, conv, gradient_step, shallow_feature,
                                        unfolding_stage)

SIZE_MULTIPLE = 8  # three stride-2 levels in the U-Net


def _check_channels(name, in_c, out_c):
    # The gradient step subtracts the input image from phi(x): input and output share one space.
    if in_c != out_c:
        raise ValueError(f'{name}: in_c ({in_c}) and out_c ({out_c}) must be equal; the unfolding '
                         'compares every stage estimate with the input image')


def _step_size() -> nn.Parameter:
    return nn.Parameter(torch.tensor([0.5]))


class _UnfoldingNet(nn.Module):
    """Shared by DGUNet and DGUNetPlus: any-size forward and a check on shared parameters."""

    def __init__(self):
        super().__init__()
        self._register_load_state_dict_pre_hook(self._check_shared_entries)

    def forward(self, img):
        """Stage images, final first, each of the input's size (reflect-padded inside to a
        multiple of 8, then cropped back; untouched when already a multiple)."""
        # the InstanceNorm of the deepest U-Net level needs more than one pixel: at least 16 px
        padded, size = pad_to_multiple(img, SIZE_MULTIPLE, minimum=2 * SIZE_MULTIPLE)
        images = self.unfold(padded)
        return images if padded is img else [image.contiguous() for image in crop_to(images, size)]

    def _check_shared_entries(self, state_dict, prefix, *args):
        # Load hook: several keys naming one shared PReLU must agree, or only the last survives.
        groups = {}
        for name, param in self.named_parameters(remove_duplicate=False):
            groups.setdefault(id(param), []).append(name)
        for names in (names for names in groups.values() if len(names) > 1):
            values = [state_dict[prefix + n] for n in names if prefix + n in state_dict]
            if any(v.shape != values[0].shape or not torch.equal(v, values[0]) for v in values[1:]):
                warnings.warn(f'{type(self).__name__}: state_dict entries {[prefix + n for n in names]} name one '
                              'shared PReLU here but hold different values; only the last one is kept')


class DGUNetStage(nn.Module):
    """The weight-tied middle stage of DGUNet (``basic`` in the published model): gradient
    step with ``phi_1``/``phit_1``/``r1``, then the proximal U-Net with cross-stage inputs."""

    def __init__(self, in_c, n_feat, scale_unetfeats, kernel_size, reduction, bias, gdm_act):
        super().__init__()
        act = nn.PReLU()  # this stage's own PReLU (its CAB), separate from the model's
        self.phi_1 = GradientOperator(in_c, gdm_act)
        self.phit_1 = GradientOperator(in_c, gdm_act)
        self.shallow_feat2 = shallow_feature(in_c, n_feat, kernel_size, reduction, bias, act)
        self.stage2_encoder = UNetEncoder(n_feat, scale_unetfeats, csff=True)
        self.stage2_decoder = UNetDecoder(n_feat, scale_unetfeats)
        self.sam23 = SAM(n_feat, in_c, kernel_size=1, bias=bias)
        self.r1 = _step_size()
        # Constructed but never used by the published model; kept so its checkpoints load strictly.
        self.concat12 = conv(n_feat * 2, n_feat, kernel_size, bias=bias)
        self.merge12 = SubspaceMerge(n_feat)

    def forward(self, y, prev):
        return unfolding_stage(y, prev, self.phi_1, self.phit_1, self.r1, self.shallow_feat2,
                               self.stage2_encoder, self.stage2_decoder, self.sam23, self.merge12)


@ARCH_REGISTRY.register()
class DGUNet(_UnfoldingNet):
    """DGUNet (published Deraining/DGUNet.py): first stage, ``depth`` applications of ONE
    weight-tied middle stage (``basic``), and a last stage; returns ``depth + 2`` images,
    final first.

    Args:
        in_c, out_c: image channels (must be equal; the published code hard-codes 3 and
            ignores these arguments, so 3 gives the published model).
        n_feat: feature width of the shallow features / finest U-Net level.
        scale_unetfeats: width increment per U-Net level (widths n_feat + k * scale_unetfeats).
        scale_orsnetfeats: extra width of the last stage's fusion conv (``concat67``).
        num_cab: unused (accepted like the published constructor).
        kernel_size, reduction, bias: conv size, channel-attention reduction and conv bias of
            the shallow-feature CABs, SAMs and last-stage convs.
        depth: number of middle-stage iterations.

    Shared PReLUs. In the published code every phi/phi^T network uses the same PReLU, created
    once as a Python default argument (so it is even shared between separately constructed
    models, a bug), and ``shallow_feat1``/``shallow_feat7`` share one PReLU. Here these are
    shared *within one instance* and never across instances: one PReLU for all six phi/phi^T
    networks (``phi_0``, ``phit_0``, ``phi_6``, ``phit_6``, ``basic.phi_1``, ``basic.phit_1``)
    and one for ``shallow_feat1``/``shallow_feat7``. Every aliased key still appears in the
    state_dict (same keys and shapes as the published model), the parameter count equals the
    published one (3,661,912 at the Deraining defaults) and gradients are pooled as in
    published training. Loading a state_dict whose aliased entries disagree warns; the last
    one loaded wins.
    """

    def __init__(self, in_c=3, out_c=3, n_feat=40, scale_unetfeats=20, scale_orsnetfeats=16, num_cab=8,
                 kernel_size=3, reduction=4, bias=False, depth=5):
        super().__init__()
        _check_channels('DGUNet', in_c, out_c)
        check_unet_widths(n_feat, scale_unetfeats, 'DGUNet')
        if depth < 0:
            raise ValueError(f'DGUNet: depth must be >= 0, got {depth}')
        self.depth = depth
        act = nn.PReLU()  # shared by shallow_feat1 and shallow_feat7
        gdm_act = nn.PReLU()  # shared by every phi / phi^T network
        # Parameters first, then modules, in the published registration order (state_dict order).
        self.r0 = _step_size()
        self.r6 = _step_size()
        self.basic = DGUNetStage(in_c, n_feat, scale_unetfeats, kernel_size, reduction, bias, gdm_act)
        self.shallow_feat1 = shallow_feature(in_c, n_feat, kernel_size, reduction, bias, act)
        self.shallow_feat7 = shallow_feature(in_c, n_feat, kernel_size, reduction, bias, act)
        self.stage1_encoder = UNetEncoder(n_feat, scale_unetfeats, csff=False)
        self.stage1_decoder = UNetDecoder(n_feat, scale_unetfeats)
        self.sam12 = SAM(n_feat, in_c, kernel_size=1, bias=bias)
        self.phi_0 = GradientOperator(in_c, gdm_act)
        self.phit_0 = GradientOperator(in_c, gdm_act)
        self.phi_6 = GradientOperator(in_c, gdm_act)
        self.phit_6 = GradientOperator(in_c, gdm_act)
        self.concat67 = conv(n_feat * 2, n_feat + scale_orsnetfeats, kernel_size, bias=bias)
        self.tail = conv(n_feat + scale_orsnetfeats, out_c, kernel_size, bias=bias)

    def unfold(self, y):
        """All stage images for an input whose H and W are multiples of 8, final first."""
        state = unfolding_stage(y, None, self.phi_0, self.phit_0, self.r0, self.shallow_feat1,
                                self.stage1_encoder, self.stage1_decoder, self.sam12)
        images = [state.image]
        for _ in range(self.depth):
            state = self.basic(y, state)
            images.append(state.image)
        # Last stage: gradient step, then one fusion conv with the previous features.
        x = gradient_step(state.image, y, self.phi_6, self.phit_6, self.r6)
        feat = self.concat67(torch.cat([self.shallow_feat7(x), state.feats], 1))
        images.append(self.tail(feat) + y)
        return images[::-1]


@ARCH_REGISTRY.register()
class DGUNetPlus(_UnfoldingNet):
    """DGUNet+ (published Deraining/DGUNet_plus.py, class also named DGUNet there): seven
    stages with separate weights; returns 7 images, final first.

    Args are those of :class:`DGUNet`; here ``scale_orsnetfeats`` and ``num_cab`` are unused,
    and ``depth`` is accepted like the published constructor but ignored (always 5 middle
    stages; a different value warns).

    Shared PReLUs, as in the published model but within one instance only: one PReLU for all
    fourteen phi/phi^T networks (``phi_0`` ... ``phit_6``; published: a default argument shared
    by every model in the process) and one for the seven ``shallow_featK`` CABs. Keys and
    shapes equal the published state_dict; the parameter count equals the published one
    (12,176,107 at the Deraining defaults).
    """

    NUM_STAGES = 7

    def __init__(self, in_c=3, out_c=3, n_feat=40, scale_unetfeats=20, scale_orsnetfeats=16, num_cab=8,
                 kernel_size=3, reduction=4, bias=False, depth=5):
        super().__init__()
        _check_channels('DGUNetPlus', in_c, out_c)
        check_unet_widths(n_feat, scale_unetfeats, 'DGUNetPlus')
        if depth != 5:
            warnings.warn(f'DGUNetPlus: depth={depth} is ignored (the published DGUNet+ always has 7 stages)')
        act = nn.PReLU()  # shared by the seven shallow_featK CABs
        gdm_act = nn.PReLU()  # shared by every phi / phi^T network
        stages = range(self.NUM_STAGES)
        # Registration order of the published model (state_dict order).
        for k in stages:
            setattr(self, f'r{k}', _step_size())
        for k in stages:
            setattr(self, f'shallow_feat{k + 1}', shallow_feature(in_c, n_feat, kernel_size, reduction, bias, act))
        for k in stages:
            setattr(self, f'phi_{k}', GradientOperator(in_c, gdm_act))
            setattr(self, f'phit_{k}', GradientOperator(in_c, gdm_act))
        for k in range(1, self.NUM_STAGES):
            setattr(self, f'stage{k}_encoder', UNetEncoder(n_feat, scale_unetfeats, csff=k > 1))
            setattr(self, f'stage{k}_decoder', UNetDecoder(n_feat, scale_unetfeats))
        for k in range(1, self.NUM_STAGES):
            setattr(self, f'sam{k}{k + 1}', SAM(n_feat, in_c, kernel_size=1, bias=bias))
            setattr(self, f'merge{k}{k + 1}', SubspaceMerge(n_feat))
        self.tail = conv(n_feat, out_c, kernel_size, bias=bias)

    def unfold(self, y):
        """All stage images for an input whose H and W are multiples of 8, final first."""
        state, images = None, []
        for k in range(1, self.NUM_STAGES):  # stages 1..6: gradient step + U-Net
            state = unfolding_stage(
                y, state, getattr(self, f'phi_{k - 1}'), getattr(self, f'phit_{k - 1}'), getattr(self, f'r{k - 1}'),
                getattr(self, f'shallow_feat{k}'), getattr(self, f'stage{k}_encoder'),
                getattr(self, f'stage{k}_decoder'), getattr(self, f'sam{k}{k + 1}'),
                getattr(self, f'merge{k - 1}{k}', None))
            images.append(state.image)
        # Stage 7: gradient step, merge with the stage-6 features, one conv plus the input.
        x = gradient_step(state.image, y, self.phi_6, self.phit_6, self.r6)
        images.append(self.tail(self.merge67(self.shallow_feat7(x), state.feats)) + y)
        return images[::-1]



# ------------------------------------------------------------------------------------------------
# the method cards
# ------------------------------------------------------------------------------------------------
def _common_kwargs(params):
    first = params['shallow_feat1.0.weight']
    n_feat = first.shape[0]
    squeezed = params['shallow_feat1.1.CA.conv_du.0.weight'].shape[0]
    return dict(in_c=first.shape[1], out_c=params['tail.weight'].shape[0], n_feat=n_feat,
                scale_unetfeats=params['stage1_encoder.body.0.conv_1.weight'].shape[0] - n_feat,
                kernel_size=first.shape[-1], reduction=n_feat // squeezed, bias='shallow_feat1.0.bias' in params)


def _dgunet_kwargs(params):
    # the middle stage is weight-tied: its number of iterations (depth) is not in the weights
    kwargs = _common_kwargs(params)
    return dict(kwargs, scale_orsnetfeats=params['concat67.weight'].shape[0] - kwargs['n_feat'])


_CODE = 'MC-E/Deep-Generalized-Unfolding-Networks-for-Image-Restoration @ bae845c2612d0df56a479020d59896441168d07a'
_FORMAT = CheckpointFormat("DGUNet .pth: {'state_dict': {'module.<key>': ...}, 'epoch', ...}", data_parallel_layout)
_TINY = dict(n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4)
DGUNET_CARD = register_card(MethodCard(
    name='DGUNet', arch='DGUNet',
    paper='Mou et al., "Deep Generalized Unfolding Networks for Image Restoration", CVPR 2022',
    code=_CODE + ' (Deraining/DGUNet.py; Deblurring/ and Denoising/DGUNet.py are the same class)',
    reference=ReferenceCode('DGUNet'),
    variants=(Variant('DGUNet', 'DGUNet', dict(n_feat=80, scale_unetfeats=48, scale_orsnetfeats=32, depth=5),
                      params=17_331_512, listing='keys_DGUNet_deblurring_denoising.tsv'),
              Variant('DGUNet-derain', None, {}, params=3_661_912, listing='keys_DGUNet_deraining.tsv')),
    tiny=dict(_TINY, depth=1),
    read_output=stage_list_output,
    signature=('basic.r1', 'shallow_feat1.0.weight', 'concat67.weight'),
    kwargs_from_state_dict=_dgunet_kwargs,
    checkpoint_formats=(_FORMAT,),
    recipe={'note': 'trained per task by its authors; the all-in-one numbers are other papers\' retrainings'},
    results=(
        PublishedResults('NHRBL', 'DGUNet', {'SOTS_outdoor': (24.78, 0.940), 'Rain100L': (36.62, 0.971),
                                             'CBSD68_sigma25': (31.10, 0.883), 'GoPro': (27.25, 0.837),
                                             'LOL': (21.87, 0.823)},
                         source='quoted alike in the VLU-Net, AdaIR, MoCE-IR (Table 2) and DFPIR five-task tables',
                         average=(28.32, 0.891), quoted_in='VLU-Net, AdaIR, MoCE-IR, DFPIR'),
        PublishedResults('CDD11', 'DGUNet',
                         {'CDD11_low': (26.03, 0.8030), 'CDD11_haze': (29.06, 0.9736), 'CDD11_rain': (32.06, 0.9474),
                          'CDD11_snow': (32.10, 0.9579), 'CDD11_low_haze': (24.74, 0.8005),
                          'CDD11_low_rain': (25.17, 0.7720), 'CDD11_low_snow': (24.83, 0.7627),
                          'CDD11_haze_rain': (27.32, 0.9336), 'CDD11_haze_snow': (26.92, 0.9387),
                          'CDD11_low_haze_rain': (24.19, 0.7653), 'CDD11_low_haze_snow': (23.72, 0.7600)},
                         source="OneRestore's CDD-11 results: gy65896/OneRestore @ 23a2e6af066864dca013aeed7f6c6f5958aa"
                                '7259, img_file/metrics_CDD-11_psnr_ssim.xlsx (sheets PSNR, SSIM; row 06_DGUNet; '
                                'per-type means over the 200 test images, rounded to 2/4 decimals); average as printed '
                                "in its README table (img_file/metric.png, 17.33M parameters); OneRestore's retraining "
                                'on CDD-11 (recipe not published), measured by img_file/cal_psnr_ssim.py on the results '
                                'saved as 8-bit PNG',
                         average=(26.92, 0.8559), quoted_in='OneRestore (ECCV 2024)',
                         measurement={'psnr': 'uint8', 'ssim': 'uint8_uniform7'}),
    ),
))
DGUNET_PLUS_CARD = register_card(MethodCard(
    name='DGUNet+', arch='DGUNetPlus',
    paper=DGUNET_CARD.paper,
    code=_CODE + ' (Deraining/DGUNet_plus.py, class DGUNet)',
    reference=ReferenceCode('DGUNet'),
    variants=(Variant('DGUNet+-derain', None, {}, params=12_176_107, listing='keys_DGUNetPlus_deraining.tsv'),
              Variant('DGUNet+-deblur', None, dict(n_feat=96, scale_unetfeats=48, scale_orsnetfeats=32),
                      params=69_572_915, listing='keys_DGUNetPlus_deblurring.tsv'),
              Variant('DGUNet+-denoise', None, dict(n_feat=80, scale_unetfeats=40, scale_orsnetfeats=32),
                      params=48_361_987, listing='keys_DGUNetPlus_denoising.tsv')),
    tiny=_TINY,
    read_output=stage_list_output,
    signature=('r1', 'r6', 'shallow_feat1.0.weight', 'stage6_encoder.body.0.conv_1.weight'),
    kwargs_from_state_dict=_common_kwargs,
    checkpoint_formats=(_FORMAT,),
))
