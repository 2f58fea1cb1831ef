"""PSNR and SSIM as the all-in-one restoration papers compute them (the "published protocol").

VLU-Net, PromptIR, AdaIR, MoCE-IR and DFPIR all evaluate with the same function of their code
(``utils/val_utils.py: compute_psnr_ssim``): the network's float output, clipped to [0, 1],
against the float target, with scikit-image, per image, averaged over the set::

    peak_signal_noise_ratio(gt, out, data_range=1)
    structural_similarity(gt, out, data_range=1, channel_axis=2)    # 7x7 uniform window

on RGB, with no border crop and no rounding to 8 bits. Registered in BasicSR's
``METRIC_REGISTRY`` as

* ``calculate_psnr_skimage``
* ``calculate_ssim_skimage``

Both take float images (H x W x C, RGB, any float dtype; values are clipped to [0, 1] first).
Metric functions marked ``float_input = True`` are given the float images by
``VLUNetModel``'s validation; BasicSR's own ``calculate_psnr`` / ``calculate_ssim`` (8-bit
``tensor2img`` output, 11x11 Gaussian SSIM window) stay available and unchanged.

Options (as BasicSR's, so option files state them the same way):

* ``crop_border`` (default 0): pixels removed from every side before measuring; the papers use 0.
* ``test_y_channel`` (default false): measure the BT.601 luma (MATLAB ``rgb2ycbcr``'s Y, in
  [0, 1]) instead of RGB; the papers use false.
* ``variant``: which of the published computations (the papers on composite degradations, CDD-11,
  measure differently; a named variant is recorded with the options in ``metrics.json``):

  - SSIM ``float_uniform7`` (default): the float images, scikit-image's default 7x7 uniform window
    (the all-in-one papers above; also the CDD-11 numbers of the 2026 channel-decomposition paper);
  - SSIM ``float_gaussian``: the float images, ``gaussian_weights=True`` (11x11 Gaussian window,
    sigma 1.5, sample covariance), as the complexity-experts paper measures CDD-11;
  - SSIM ``uint8_uniform7`` / PSNR ``uint8``: the images as saved to 8-bit PNG first
    (``floor(255 x + 0.5)``, computed in the images' float type as ``torchvision.utils.save_image``
    does), then read back as ``k / 255`` in float64, default 7x7 window: the CDD-11 authors' own
    evaluation of saved results (``cal_psnr_ssim.py``);
  - PSNR ``float`` (default): the float images.
"""
import numpy as np
from basicsr.utils.color_util import rgb2ycbcr
from basicsr.utils.registry import METRIC_REGISTRY
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def _prepare(img, img2, crop_border, test_y_channel):
    if img.shape != img2.shape:
        raise ValueError(f'image shapes differ: {img.shape} and {img2.shape}')
    if img.ndim == 2:  # one channel
        img, img2 = img[..., None], img2[..., None]
    if img.ndim != 3:
        raise ValueError(f'expected H x W x C or H x W images, got shape {img.shape}')
    if not (np.issubdtype(img.dtype, np.floating) and np.issubdtype(img2.dtype, np.floating)):
        raise TypeError(f'expected float images in [0, 1], got {img.dtype} and {img2.dtype} '
                        '(for 8-bit images use calculate_psnr / calculate_ssim)')
    img, img2 = np.clip(img, 0, 1), np.clip(img2, 0, 1)
    if crop_border:
        img = img[crop_border:-crop_border, crop_border:-crop_border]
        img2 = img2[crop_border:-crop_border, crop_border:-crop_border]
    if test_y_channel and img.shape[2] == 3:
        img = rgb2ycbcr(img.astype(np.float32), y_only=True)[..., None]
        img2 = rgb2ycbcr(img2.astype(np.float32), y_only=True)[..., None]
    return img, img2


def as_saved_uint8(img):
    """``img`` (float, clipped to [0, 1]) as an 8-bit PNG holds it, read back as float64 ``k / 255``:
    ``floor(255 x + 0.5)`` in the image's own float type (``torchvision.utils.save_image``)."""
    scale, half = img.dtype.type(255), img.dtype.type(0.5)
    return np.floor(img * scale + half).astype(np.float64) / 255.0


# variant -> (quantise to saved 8-bit first, SSIM keyword arguments)
SSIM_VARIANTS = {
    'float_uniform7': (False, {}),
    'float_gaussian': (False, {'gaussian_weights': True}),
    'uint8_uniform7': (True, {}),
}
PSNR_VARIANTS = {'float': False, 'uint8': True}


def _variant(table, variant, metric):
    if variant not in table:
        raise ValueError(f'{metric}: unknown variant {variant!r}; expected one of {", ".join(table)}')
    return table[variant]


@METRIC_REGISTRY.register()
def calculate_psnr_skimage(img, img2, crop_border=0, test_y_channel=False, variant='float', **kwargs):
    """PSNR (dB) of float images in [0, 1] as the papers compute it (see the module docstring).

    ``img`` is the restored image, ``img2`` the ground truth (H x W x C, RGB). ``variant``: 'float'
    (default) or 'uint8' (the images as saved to 8-bit PNG).
    """
    quantise = _variant(PSNR_VARIANTS, variant, 'calculate_psnr_skimage')
    out, gt = _prepare(img, img2, crop_border, test_y_channel)
    if quantise:
        out, gt = as_saved_uint8(out), as_saved_uint8(gt)
    return float(peak_signal_noise_ratio(gt, out, data_range=1))


@METRIC_REGISTRY.register()
def calculate_ssim_skimage(img, img2, crop_border=0, test_y_channel=False, variant='float_uniform7', **kwargs):
    """SSIM of float images in [0, 1] as the papers compute it: by default scikit-image's 7x7 uniform
    window, mean over the channels; ``variant`` selects another published computation
    ('float_gaussian', 'uint8_uniform7'; see the module docstring)."""
    quantise, options = _variant(SSIM_VARIANTS, variant, 'calculate_ssim_skimage')
    out, gt = _prepare(img, img2, crop_border, test_y_channel)
    if quantise:
        out, gt = as_saved_uint8(out), as_saved_uint8(gt)
    return float(structural_similarity(gt, out, data_range=1, channel_axis=2, **options))


calculate_psnr_skimage.float_input = True
calculate_ssim_skimage.float_input = True
