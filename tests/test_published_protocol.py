"""The published evaluation protocol: scikit-image PSNR/SSIM on float outputs, crop to a multiple of
16, the truncating noise rule seeded per image, recorded in metrics.json and enforced by vlunet-compare."""
import json
import os
import shutil
import zlib

import cv2
import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import vlunet  # noqa: F401
from basicsr.metrics import calculate_metric
from basicsr.utils.registry import METRIC_REGISTRY
from conftest import REPO, run_cli, write_yaml
from vlunet.data.degradations import apply_degradation
from vlunet.utils.tiling import center_crop_to_multiple

DEMO = os.path.join(REPO, 'vlunet', 'demo_data', 'train')


def _real(name, h, w, top=0, left=0):
    """A real photo (demo data, RGB float32 in [0, 1]) cropped to h x w."""
    bgr = cv2.imread(os.path.join(DEMO, name), cv2.IMREAD_COLOR)
    return np.ascontiguousarray(bgr[top:top + h, left:left + w, ::-1]).astype(np.float32) / 255.0


def _published_crop(img, base=16):
    """The published crop_img(image, base) written out for an H x W x C array."""
    h, w = img.shape[:2]
    ch, cw = h % base, w % base
    return img[ch // 2:h - ch + ch // 2, cw // 2:w - cw + cw // 2]


@pytest.mark.parametrize('size', [(157, 131), (97, 150), (64, 80), (33, 17)])
def test_metrics_equal_scikit_image_on_real_float_images(size):
    gt = _real('astronaut.png', *size)
    rng = np.random.default_rng(sum(size))
    out = gt + rng.normal(0, 0.08, gt.shape).astype(np.float32)  # leaves [0, 1]: the metric clips
    assert out.min() < 0 and out.max() > 1
    clipped = np.clip(out, 0, 1)
    psnr = calculate_metric({'img': out, 'img2': gt}, {'type': 'calculate_psnr_skimage', 'crop_border': 0,
                                                       'test_y_channel': False})
    ssim = calculate_metric({'img': out, 'img2': gt}, {'type': 'calculate_ssim_skimage', 'crop_border': 0,
                                                       'test_y_channel': False})
    assert psnr == pytest.approx(peak_signal_noise_ratio(gt, clipped, data_range=1), abs=1e-12)
    assert ssim == pytest.approx(structural_similarity(gt, clipped, data_range=1, channel_axis=2), abs=1e-12)
    # SSIM is the mean over channels of the 7x7 uniform-window SSIM
    per_channel = [structural_similarity(gt[..., c], clipped[..., c], data_range=1) for c in range(3)]
    assert ssim == pytest.approx(np.mean(per_channel), abs=1e-6)
    # BasicSR's metrics (8-bit, Gaussian window) are a different measurement
    u8 = [np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8)[..., ::-1] for x in (out, gt)]
    basicsr_ssim = calculate_metric({'img': u8[0], 'img2': u8[1]}, {'type': 'calculate_ssim', 'crop_border': 0})
    assert abs(basicsr_ssim - ssim) > 1e-4


def test_metrics_on_grayscale_float64_and_options():
    gt = _real('coffee.png', 71, 93).mean(axis=2).astype(np.float64)
    out = np.clip(gt + np.random.default_rng(3).normal(0, 0.05, gt.shape), -0.2, 1.2)
    for shape in (gt.shape, gt.shape + (1, )):
        psnr = METRIC_REGISTRY.get('calculate_psnr_skimage')(out.reshape(shape), gt.reshape(shape))
        ssim = METRIC_REGISTRY.get('calculate_ssim_skimage')(out.reshape(shape), gt.reshape(shape))
        assert psnr == pytest.approx(peak_signal_noise_ratio(gt, np.clip(out, 0, 1), data_range=1), abs=1e-12)
        assert ssim == pytest.approx(structural_similarity(gt, np.clip(out, 0, 1), data_range=1), abs=1e-12)
    rgb, noisy = _real('rocket.png', 60, 70), None
    noisy = np.clip(rgb + np.random.default_rng(4).normal(0, 0.05, rgb.shape).astype(np.float32), 0, 1)
    cropped = METRIC_REGISTRY.get('calculate_psnr_skimage')(noisy, rgb, crop_border=4)
    assert cropped == pytest.approx(peak_signal_noise_ratio(rgb[4:-4, 4:-4], noisy[4:-4, 4:-4], data_range=1))
    y = METRIC_REGISTRY.get('calculate_psnr_skimage')(noisy, rgb, test_y_channel=True)
    luma = [(16 + 65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]) / 255 for x in (rgb, noisy)]
    assert y == pytest.approx(peak_signal_noise_ratio(luma[0], luma[1], data_range=1), abs=1e-4)
    with pytest.raises(TypeError, match='float images'):
        METRIC_REGISTRY.get('calculate_psnr_skimage')(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match='shapes differ'):
        METRIC_REGISTRY.get('calculate_ssim_skimage')(np.zeros((8, 8, 3)), np.zeros((8, 9, 3)))


@pytest.mark.parametrize('h, w', [(481, 321), (321, 481), (16, 16), (47, 33), (500, 375), (17, 31)])
def test_center_crop_rule_on_odd_sizes(h, w):
    x = torch.arange(h * w, dtype=torch.float64).reshape(1, 1, h, w)
    cropped = center_crop_to_multiple(x, 16)
    expected = _published_crop(x[0].permute(1, 2, 0).numpy())
    assert cropped.shape[-2:] == (h - h % 16, w - w % 16)
    np.testing.assert_array_equal(cropped[0].permute(1, 2, 0).numpy(), expected)
    if (h, w) == (481, 321):
        assert cropped.shape[-2:] == (480, 320)


def test_center_crop_of_an_image_smaller_than_the_multiple_is_refused():
    with pytest.raises(ValueError, match='smaller than the crop multiple'):
        center_crop_to_multiple(torch.zeros(1, 3, 10, 40), 16)


def test_noise_rule_truncates_to_uint8_as_published():
    clean = np.rint(_real('hubble.png', 50, 60) * 255).astype(np.uint8)
    img = clean.astype(np.float32) / 255
    for sigma in (15, 25, 50):
        ours = apply_degradation(img, {'type': 'gaussian_noise_uint8', 'sigma': sigma}, np.random.default_rng(7))
        draws = np.random.default_rng(7).standard_normal(clean.shape)
        published = np.clip(clean + draws * sigma, 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(ours, published.astype(np.float32) / 255)
        rounded = np.clip(np.rint(clean + draws * sigma), 0, 255).astype(np.uint8)
        assert (published != rounded).mean() > 0.3  # truncation, not rounding, matters
        assert ours.dtype == np.float32


def test_validation_noise_is_seeded_per_image_and_recorded(tmp_path):
    from basicsr.data import build_dataset
    folder = tmp_path / 'clean'
    folder.mkdir()
    for name in ('astronaut.png', 'coffee.png'):
        cv2.imwrite(str(folder / name), cv2.imread(os.path.join(DEMO, name)))

    def dataset(seed):
        return build_dataset({'name': 'CBSD68_sigma25', 'type': 'AllInOneDataset', 'phase': 'val', 'seed': seed,
                              'sources': [{'name': 'noise25', 'label': 1, 'dataroot_gt': str(folder),
                                           'degradation': {'type': 'gaussian_noise_uint8', 'sigma': 25}}]})

    a, b, c = dataset(0), dataset(0), dataset(1)
    for i in range(2):
        assert torch.equal(a[i]['lq'], b[i]['lq']) and not torch.equal(a[i]['lq'], c[i]['lq'])
    assert not torch.equal(a[0]['lq'][:, :96, :96], a[1]['lq'][:, :96, :96])
    # independently: numpy default_rng([seed, crc32('<source>/<file>')]), the published rule, RGB order
    clean = cv2.imread(str(folder / 'coffee.png'))
    rng = np.random.default_rng([0, zlib.crc32(b'noise25/coffee.png')])
    noisy = np.clip(clean + rng.standard_normal(clean.shape) * 25, 0, 255).astype(np.uint8)
    expected = torch.from_numpy(noisy[..., ::-1].transpose(2, 0, 1).astype(np.float32) / 255)
    item = next(a[i] for i in range(2) if a[i]['gt_path'].endswith('coffee.png'))
    assert torch.equal(item['lq'], expected)
    assert a.protocol() == {'noise': [{'source': 'noise25', 'type': 'gaussian_noise_uint8', 'sigma': 25, 'seed': 0,
                                       'seeding': "per image: numpy default_rng([seed, crc32('<source>/<file>')])"}],
                            'synthetic': None}


TINY_RESTORMER = {'type': 'Restormer', 'dim': 8, 'num_blocks': [1, 1, 1, 1], 'num_refinement_blocks': 1,
                  'heads': [1, 2, 2, 4]}
PUBLISHED_METRICS = {'psnr': {'type': 'calculate_psnr_skimage', 'crop_border': 0, 'test_y_channel': False},
                     'ssim': {'type': 'calculate_ssim_skimage', 'crop_border': 0, 'test_y_channel': False}}


def _test_options(tmp_path, name, weights, clean, lq, gt, metrics=PUBLISHED_METRICS, crop=16):
    return write_yaml(tmp_path / f'{name}.yml', {
        'name': name, 'model_type': 'VLUNetModel', 'num_gpu': 0, 'manual_seed': 0,
        'datasets': {
            'test_1': {'name': 'noise25', 'type': 'AllInOneDataset', 'seed': 0,
                       'sources': [{'name': 'noise25', 'label': 0, 'dataroot_gt': str(clean),
                                    'degradation': {'type': 'gaussian_noise_uint8', 'sigma': 25}}]},
            'test_2': {'name': 'blur', 'type': 'AllInOneDataset', 'seed': 0,
                       'sources': [{'name': 'blur', 'label': 1, 'dataroot_gt': str(gt), 'dataroot_lq': str(lq)}]}},
        'network_g': TINY_RESTORMER,
        'path': {'pretrain_network_g': str(weights), 'strict_load_g': True},
        'val': {'save_img': False, 'pbar': False, 'center_crop_multiple': crop, 'metrics': metrics}})


@pytest.fixture
def odd_sized_sets(tmp_path):
    """Real photos at odd sizes: a clean set (noise added on the fly) and a paired blurred set."""
    clean, lq, gt = tmp_path / 'clean', tmp_path / 'lq', tmp_path / 'gt'
    for folder in (clean, lq, gt):
        folder.mkdir()
    for name, (h, w) in {'astronaut.png': (157, 131), 'coffee.png': (99, 150)}.items():
        bgr = cv2.imread(os.path.join(DEMO, name))[:h, :w]
        cv2.imwrite(str(clean / name), bgr)
        cv2.imwrite(str(gt / name), bgr)
        cv2.imwrite(str(lq / name), cv2.GaussianBlur(bgr, (7, 7), 2))
    torch.manual_seed(0)
    weights = tmp_path / 'net.pth'
    net = vlunet.archs.restormer_arch.Restormer(**{k: v for k, v in TINY_RESTORMER.items() if k != 'type'})
    torch.save({'params': net.state_dict()}, weights)
    return {'clean': clean, 'lq': lq, 'gt': gt, 'weights': weights, 'net': net.eval()}


def test_vlunet_test_writes_what_an_independent_computation_gives(tmp_path, odd_sized_sets):
    s = odd_sized_sets
    opt = _test_options(tmp_path, 'Published', s['weights'], s['clean'], s['lq'], s['gt'])
    proc = run_cli(['-m', 'vlunet.test', '-opt', opt], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / 'results' / 'Published' / 'metrics.json').read_text())

    def rgb(path):
        return cv2.imread(str(path))[..., ::-1].astype(np.float32) / 255

    def restore(lq):  # crop to 16, the network on the float image, clip
        with torch.no_grad():
            out = s['net'](torch.from_numpy(lq.transpose(2, 0, 1).copy())[None])[0]
        return np.clip(out.numpy().transpose(1, 2, 0), 0, 1)

    expected = {}
    for set_name in ('noise25', 'blur'):
        values = {'psnr': [], 'ssim': [], 'input_psnr': [], 'input_ssim': []}
        for name in ('astronaut.png', 'coffee.png'):
            gt = rgb(s['gt'] / name)
            if set_name == 'noise25':
                clean = cv2.imread(str(s['clean'] / name))
                rng = np.random.default_rng([0, zlib.crc32(f'noise25/{name}'.encode())])
                noisy = np.clip(clean + rng.standard_normal(clean.shape) * 25, 0, 255).astype(np.uint8)
                lq = noisy[..., ::-1].astype(np.float32) / 255
            else:
                lq = rgb(s['lq'] / name)
            gt, lq = _published_crop(gt), _published_crop(lq)
            out = restore(lq)
            values['psnr'].append(peak_signal_noise_ratio(gt, out, data_range=1))
            values['ssim'].append(structural_similarity(gt, out, data_range=1, channel_axis=2))
            values['input_psnr'].append(peak_signal_noise_ratio(gt, np.clip(lq, 0, 1), data_range=1))
            values['input_ssim'].append(structural_similarity(gt, np.clip(lq, 0, 1), data_range=1, channel_axis=2))
        expected[set_name] = {k: float(np.mean(v)) for k, v in values.items()}
    for set_name, want in expected.items():
        for key, value in want.items():
            assert metrics[set_name][key] == pytest.approx(value, abs=1e-4), (set_name, key)
        protocol = metrics[set_name]['protocol']
        assert protocol['metrics'] == PUBLISHED_METRICS
        assert protocol['crop'] == 'center crop to a multiple of 16'
    assert metrics['noise25']['protocol']['noise'][0]['seed'] == 0
    assert metrics['noise25']['protocol']['noise'][0]['type'] == 'gaussian_noise_uint8'
    assert metrics['blur']['protocol']['noise'] is None


def test_compare_refuses_mixed_protocols_and_prints_the_shared_one(tmp_path, odd_sized_sets):
    s = odd_sized_sets
    basicsr_metrics = {'psnr': {'type': 'calculate_psnr', 'crop_border': 0, 'test_y_channel': False},
                       'ssim': {'type': 'calculate_ssim', 'crop_border': 0, 'test_y_channel': False}}
    runs = {'A_pub': {}, 'C_basicsr': {'metrics': basicsr_metrics, 'crop': None}}
    for name, kwargs in runs.items():
        opt = _test_options(tmp_path, name, s['weights'], s['clean'], s['lq'], s['gt'], **kwargs)
        proc = run_cli(['-m', 'vlunet.test', '-opt', opt], tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    results = tmp_path / 'results'
    shutil.copytree(results / 'A_pub', results / 'B_pub')  # a second method measured the same way
    proc = run_cli(['-m', 'vlunet.compare', str(results / 'A_pub'), str(results / 'C_basicsr'), '--no-gmacs',
                    '--out', str(tmp_path / 'cmp_bad')], tmp_path)
    assert proc.returncode != 0
    assert str(results / 'A_pub') in proc.stderr and str(results / 'C_basicsr') in proc.stderr
    assert 'calculate_psnr_skimage' in proc.stderr and 'crop' in proc.stderr
    assert not (tmp_path / 'cmp_bad').exists()
    proc = run_cli(['-m', 'vlunet.compare', str(results / 'A_pub'), str(results / 'B_pub'), '--no-gmacs',
                    '--out', str(tmp_path / 'cmp')], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'Protocol: psnr = calculate_psnr_skimage(crop_border=0, test_y_channel=False)' in proc.stdout
    assert 'center crop to a multiple of 16' in proc.stdout and 'gaussian_noise_uint8 (sigma 25, seed 0)' in proc.stdout
    assert 'Protocol:' in (tmp_path / 'cmp' / 'comparison.md').read_text()
