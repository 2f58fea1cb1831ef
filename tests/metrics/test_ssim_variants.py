"""The published PSNR/SSIM variants (vlunet/metrics/published_metric.py): the default is unchanged, each
named variant is the computation its papers run, and an unknown name is refused naming the choices."""
import numpy as np
import pytest
import torch

import vlunet  # noqa: F401
from basicsr.metrics import calculate_metric
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from vlunet.metrics.published_metric import calculate_psnr_skimage, calculate_ssim_skimage


def _pair(seed=0, shape=(40, 56, 3)):
    """A float32 'restored' image (a little outside [0, 1], as a network's output) and an 8-bit ground truth."""
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 256, shape).astype(np.float32) / np.float32(255)
    out = (gt + rng.normal(0, 0.05, shape)).astype(np.float32)
    return out, gt


def test_default_is_the_float_7x7_computation_and_named_the_same():
    out, gt = _pair()
    clipped = np.clip(out, 0, 1)
    expected = structural_similarity(gt, clipped, data_range=1, channel_axis=2)
    assert calculate_ssim_skimage(out, gt) == expected
    assert calculate_ssim_skimage(out, gt, variant='float_uniform7') == expected
    assert calculate_psnr_skimage(out, gt) == calculate_psnr_skimage(out, gt, variant='float') \
        == peak_signal_noise_ratio(gt, clipped, data_range=1)


def test_gaussian_variant_is_gaussian_weights_on_floats():
    out, gt = _pair(1)
    value = calculate_metric({'img': out, 'img2': gt},
                             {'type': 'calculate_ssim_skimage', 'crop_border': 0, 'test_y_channel': False,
                              'variant': 'float_gaussian'})
    assert value == structural_similarity(gt, np.clip(out, 0, 1), data_range=1, channel_axis=2, gaussian_weights=True)
    assert abs(value - calculate_ssim_skimage(out, gt)) > 1e-4  # a different number, not a renamed default


def test_uint8_variants_measure_the_saved_png(tmp_path):
    """As the composite-degradation benchmark's authors score saved results: torchvision's save_image
    writes the 8-bit PNG, OpenCV reads it (BGR) divided by 255, scikit-image with a 7x7 window."""
    import cv2
    from torchvision.utils import save_image
    out, gt = _pair(2)
    paths = {}
    for name, img in (('out', out), ('gt', gt)):
        paths[name] = str(tmp_path / f'{name}.png')
        save_image(torch.from_numpy(img).permute(2, 0, 1), paths[name])
    saved_out, saved_gt = (cv2.imread(paths[k]) / 255.0 for k in ('out', 'gt'))
    assert saved_gt.dtype == np.float64
    ssim = structural_similarity(saved_gt, saved_out, win_size=7, channel_axis=-1, data_range=1.0)
    psnr = peak_signal_noise_ratio(saved_gt, saved_out, data_range=1.0)
    assert calculate_ssim_skimage(out, gt, variant='uint8_uniform7') == pytest.approx(ssim, abs=1e-12, rel=0)
    assert calculate_psnr_skimage(out, gt, variant='uint8') == pytest.approx(psnr, abs=1e-10, rel=0)
    # the saved 8-bit image is not the float one
    assert abs(calculate_ssim_skimage(out, gt, variant='uint8_uniform7') - calculate_ssim_skimage(out, gt)) > 1e-6


def test_half_way_values_round_up_as_save_image_does():
    from vlunet.metrics.published_metric import as_saved_uint8
    x = (np.arange(256, dtype=np.float32) + np.float32(0.5)) / np.float32(255)  # k + 1/2 steps
    expected = torch.from_numpy(x).mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).numpy()
    np.testing.assert_array_equal(as_saved_uint8(np.clip(x, 0, 1)) * 255.0, expected.astype(np.float64))


@pytest.mark.parametrize('fn, name', [(calculate_ssim_skimage, 'gaussian'), (calculate_psnr_skimage, 'uint8_uniform7')])
def test_unknown_variant_is_refused_naming_the_choices(fn, name):
    out, gt = _pair()
    with pytest.raises(ValueError, match=rf"{fn.__name__}: unknown variant '{name}'; expected one of "):
        fn(out, gt, variant=name)
