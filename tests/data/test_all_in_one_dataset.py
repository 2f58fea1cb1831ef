"""AllInOneDataset and the degradation registry: items, determinism, and clear errors on bad input."""
import os

import cv2
import numpy as np
import pytest
import torch

import vlunet  # noqa: F401
from basicsr.data import build_dataset
from vlunet.data.all_in_one_dataset import DatasetError
from vlunet.data.degradations import DEGRADATION_REGISTRY, apply_degradation


def _opt(sources, phase='train', **kw):
    return dict({'name': 'x', 'type': 'AllInOneDataset', 'phase': phase, 'sources': sources}, **kw)


def _paired(tmp_path, names=('a.png', 'b.png'), lq_names=None, size=(40, 48), lq_size=None):
    gt, lq = tmp_path / 'target', tmp_path / 'input'
    gt.mkdir()
    lq.mkdir()
    rng = np.random.default_rng(0)
    for n in names:
        cv2.imwrite(str(gt / n), rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    for n in (lq_names or names):
        cv2.imwrite(str(lq / n), rng.integers(0, 256, (*(lq_size or size), 3), dtype=np.uint8))
    return str(gt), str(lq)


def test_synthetic_train_items(demo_images):
    src = {'name': 'noise25', 'label': 1, 'dataroot_gt': str(demo_images), 'repeat': 3,
           'degradation': {'type': 'gaussian_noise', 'sigma': 25}}
    ds = build_dataset(_opt([src], gt_size=32))
    assert len(ds) == 3 * len(os.listdir(demo_images))
    item = ds[0]
    assert set(item) >= {'lq', 'gt', 'label', 'lq_path', 'gt_path', 'degradation'}
    assert item['lq'].shape == item['gt'].shape == (3, 32, 32)
    assert item['label'] == 1 and item['degradation'] == 'noise25'
    noise = (item['lq'] - item['gt'])[(item['gt'] > 0.2) & (item['gt'] < 0.8)]
    assert 0.07 < noise.std().item() < 0.13  # sigma 25/255 = 0.098


def test_validation_images_are_fixed_per_image(demo_images):
    src = {'name': 'noise50', 'label': 2, 'dataroot_gt': str(demo_images),
           'degradation': {'type': 'gaussian_noise', 'sigma': 50}}
    a, b = build_dataset(_opt([src], phase='val')), build_dataset(_opt([src], phase='val'))
    assert torch.equal(a[1]['lq'], b[1]['lq']) and torch.equal(a[1]['lq'], a[1]['lq'])
    assert a[1]['gt'].shape[-2:] == cv2.imread(a[1]['gt_path']).shape[:2]  # whole image
    other = build_dataset(_opt([dict(src, name='other')], phase='val'))
    assert not torch.equal(a[1]['lq'], other[1]['lq'])


def test_mixed_sources_with_repeats(tmp_path, demo_images):
    gt, lq = _paired(tmp_path)
    sources = [{'name': 'rain', 'label': 4, 'dataroot_gt': gt, 'dataroot_lq': lq, 'repeat': 5},
               {'name': 'haze', 'label': 3, 'dataroot_gt': str(demo_images), 'degradation': {'type': 'haze'}}]
    ds = build_dataset(_opt(sources, gt_size=32))
    labels = ds.labels().tolist()
    assert labels.count(4) == 10 and labels.count(3) == len(os.listdir(demo_images))
    paired = ds[0]
    raw = cv2.imread(os.path.join(lq, 'a.png'))
    assert paired['lq_path'].endswith('a.png') and paired['lq'].shape == (3, 32, 32)
    assert raw is not None


def test_every_registered_degradation_keeps_shape_and_range():
    img = np.random.default_rng(1).random((33, 47, 3), dtype=np.float32)
    for name in DEGRADATION_REGISTRY.keys():
        params = {'steps': [{'type': 'haze'}, {'type': 'jpeg'}]} if name == 'compose' else {}  # compose needs steps
        out = apply_degradation(img, {'type': name, **params}, np.random.default_rng(0))
        assert out.shape == img.shape and out.dtype == np.float32, name
        assert out.min() >= 0 and out.max() <= 1, name
        assert not np.array_equal(out, img), name


@pytest.mark.parametrize('case, match', [
    ('missing_root', r'sources\[0\]\.dataroot_gt: path does not exist: .*nowhere'),
    ('missing_key', r'missing key "dataroot_gt"'),
    ('names', r"only in gt: \['b.png'\], only in lq: \['c.png'\]"),
    ('unknown_type', r"degradation.type: unknown degradation type 'snowstorm'; registered types: .*gaussian_noise.*\(source n\)"),
    ('both', r'give exactly one of "dataroot_lq"'),
])
def test_bad_configuration_is_named(tmp_path, demo_images, case, match):
    src = {'name': 'n', 'label': 0, 'dataroot_gt': str(demo_images), 'degradation': {'type': 'gaussian_noise'}}
    if case == 'missing_root':
        src['dataroot_gt'] = str(tmp_path / 'nowhere')
    elif case == 'missing_key':
        del src['dataroot_gt']
    elif case == 'names':
        gt, lq = _paired(tmp_path, names=('a.png', 'b.png'), lq_names=('a.png', 'c.png'))
        src = {'name': 'n', 'label': 0, 'dataroot_gt': gt, 'dataroot_lq': lq}
    elif case == 'unknown_type':
        src['degradation'] = {'type': 'snowstorm'}
    elif case == 'both':
        src['dataroot_lq'] = str(demo_images)
    with pytest.raises(DatasetError, match=match):
        build_dataset(_opt([src]))


def test_bad_files_are_named(tmp_path):
    gt, lq = _paired(tmp_path, lq_size=(40, 40))
    ds = build_dataset(_opt([{'name': 'n', 'label': 0, 'dataroot_gt': gt, 'dataroot_lq': lq}], gt_size=16))
    with pytest.raises(DatasetError, match=r'size mismatch: .*input/a.png is 40x40 but .*target/a.png is 48x40'):
        ds[0]

    corrupt = tmp_path / 'corrupt'
    corrupt.mkdir()
    (corrupt / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n this is not an image')
    ds = build_dataset(_opt([{'name': 'n', 'label': 0, 'dataroot_gt': str(corrupt),
                              'degradation': {'type': 'gaussian_noise'}}], gt_size=16))
    with pytest.raises(DatasetError, match=r'broken.png: cannot decode'):
        ds[0]

    ds = build_dataset(_opt([{'name': 'n', 'label': 0, 'dataroot_gt': gt, 'degradation': {'type': 'jpeg'}}],
                            gt_size=64))
    with pytest.raises(DatasetError, match=r'a.png is 48x40, smaller than the training patch gt_size=64'):
        ds[0]
