"""Test-set fingerprints (count, sizes, content hash independent of order and names) of the files a test dataset
reads; the check against the canonical sets names the files that differ; the canonical content is the data in
../shared/data; the environment recorded beside the numbers."""
import hashlib
import os
import shutil

import cv2
import numpy as np
import pytest

import vlunet  # noqa: F401
from lb_helpers import changed_copy, image_sets, install_canonical, write_images
from vlunet.metrics import fingerprint as fpm
from vlunet.metrics.environment import describe_environment, environment, environment_differences

SHARED = os.environ.get('VLUNET_SHARED_DATA', os.path.join(os.path.dirname(__file__), '..', '..', '..', 'shared',
                                                           'data'))


def test_hash_ignores_order_and_names_but_not_content(tmp_path):
    a = write_images(str(tmp_path / 'a'), ['x.png', 'y.png', 'z.png'], 0)
    fp = fpm.fingerprint_folder(a)
    assert fp['count'] == 3 and fp['sizes'] == {'32x24': 3} and not fp['paired']
    renamed = tmp_path / 'b'
    renamed.mkdir()
    for old, new in (('x.png', '3.png'), ('y.png', '1.png'), ('z.png', '2.png')):
        shutil.copy(os.path.join(a, old), renamed / new)
    assert fpm.fingerprint_folder(str(renamed))['hash'] == fp['hash']
    items = [(n, lambda n=n: open(os.path.join(a, n), 'rb').read(), None) for n in ('z.png', 'x.png', 'y.png')]
    assert fpm.fingerprint_items(items)['hash'] == fp['hash']
    img = cv2.imread(os.path.join(a, 'y.png'))
    img[3, 3, 0] ^= 1   # one bit of one pixel
    cv2.imwrite(str(tmp_path / 'y.png'), img)
    shutil.copy(tmp_path / 'y.png', os.path.join(a, 'y.png'))
    assert fpm.fingerprint_folder(a)['hash'] != fp['hash']
    # the files' SHA-256 are the recorded digests
    assert fp['files']['x.png'][0] == hashlib.sha256(open(tmp_path / 'b' / '3.png', 'rb').read()).hexdigest()


def test_check_names_changed_missing_and_extra_files(tmp_path, monkeypatch):
    sets = image_sets(str(tmp_path / 'sets'))
    install_canonical(monkeypatch, sets)
    same = fpm.check_fingerprint('Rain100L', fpm.fingerprint_folder(*sets['Rain100L']))
    assert same['status'] == 'matches' and same['canonical'] == 'Rain100L' and same['differences'] == []
    changed = fpm.check_fingerprint('Rain100L', fpm.fingerprint_folder(
        *changed_copy(str(tmp_path / 'c'), sets, 'Rain100L', change='003.png')))
    assert changed['status'] == 'differs' and changed['differences'] == ['changed (degraded 1): 003.png']
    missing = fpm.check_fingerprint('Rain100L', fpm.fingerprint_folder(
        *changed_copy(str(tmp_path / 'm'), sets, 'Rain100L', drop='001.png')))
    assert missing['differences'] == ['2 pairs, the canonical set has 3',
                                      'missing (in the canonical set, not here): 001.png']
    gt, lq = changed_copy(str(tmp_path / 'e'), sets, 'Rain100L')
    write_images(gt, ['004.png'], 5)
    write_images(lq, ['004.png'], 6)
    os.rename(os.path.join(gt, '002.png'), os.path.join(gt, 'renamed.png'))   # same content, another name: matches
    os.rename(os.path.join(lq, '002.png'), os.path.join(lq, 'renamed.png'))
    extra = fpm.check_fingerprint('Rain100L', fpm.fingerprint_folder(gt, lq))
    assert extra['differences'] == ['4 pairs, the canonical set has 3', 'not in the canonical set: 004.png']
    # a set known by its count only; a set the package does not know
    sots = fpm.check_fingerprint('SOTS_outdoor', fpm.fingerprint_folder(gt, lq))
    assert sots['checked'] == 'count' and sots['differences'] == ['4 pairs, the canonical set has 3']
    assert fpm.check_fingerprint('my_set', fpm.fingerprint_folder(gt, lq))['status'] == 'unknown'
    assert fpm.check_fingerprint('Rain100L', None)['status'] == 'unknown'


def test_the_dataset_reads_these_files(tmp_path):
    from vlunet.data.all_in_one_dataset import AllInOneDataset
    gt = write_images(str(tmp_path / 'gt'), ['a.png', 'b.png'], 1)
    lq = write_images(str(tmp_path / 'lq'), ['a.png', 'b.png'], 2)
    paired = AllInOneDataset({'name': 'p', 'phase': 'val', 'sources': [
        {'name': 'rain', 'label': 0, 'dataroot_gt': gt, 'dataroot_lq': lq}]})
    assert fpm.dataset_fingerprint(paired) == fpm.fingerprint_folder(gt, lq)
    noisy = AllInOneDataset({'name': 'n', 'phase': 'val', 'sources': [
        {'name': 'noise', 'label': 0, 'dataroot_gt': gt, 'degradation': {'type': 'gaussian_noise', 'sigma': 25}}]})
    assert fpm.dataset_fingerprint(noisy) == fpm.fingerprint_folder(gt)   # the clean files it reads
    two = AllInOneDataset({'name': 't', 'phase': 'val', 'sources': [
        {'name': 'rain', 'label': 0, 'dataroot_gt': gt, 'dataroot_lq': lq},
        {'name': 'noise', 'label': 1, 'dataroot_gt': gt, 'degradation': {'type': 'gaussian_noise', 'sigma': 25}}]})
    fp = fpm.dataset_fingerprint(two)
    assert fp['count'] == 4 and sorted(fp['files']) == ['noise/a.png', 'noise/b.png', 'rain/a.png', 'rain/b.png']
    os.remove(os.path.join(lq, 'b.png'))
    assert 'cannot be read' in fpm.dataset_fingerprint(paired)['error']


@pytest.mark.skipif(not os.path.isfile(os.path.join(SHARED, 'SHA256SUMS')), reason='../shared/data is not here')
def test_canonical_sets_are_the_shared_data(tmp_path):
    sums = {}
    with open(os.path.join(SHARED, 'SHA256SUMS')) as f:
        for line in f:
            digest, path = line.split()
            sums[os.path.normpath(path)] = digest
    layout = {name: (gt, lq) for name, gt, lq, _ in fpm.SHARED_LAYOUT}
    for known in fpm.canonical_sets():
        if not known.hash:
            continue
        gt, lq = layout[known.name]
        for name, (gt_sha, lq_sha) in known.items.items():
            assert sums[os.path.normpath(os.path.join(gt, name))] == gt_sha
            if lq:
                assert sums[os.path.normpath(os.path.join(lq, name))] == lq_sha
    assert {k.name: k.count for k in fpm.canonical_sets() if k.hash} == {'Rain100L': 100, 'CBSD68': 68,
                                                                        'Kodak24': 24, 'LOL': 15}
    # the real Rain100L with one rainy image re-saved with one pixel changed: that file is named
    gt, lq = str(tmp_path / 'target'), str(tmp_path / 'input')
    shutil.copytree(os.path.join(SHARED, 'rain100L_test', 'target'), gt)
    shutil.copytree(os.path.join(SHARED, 'rain100L_test', 'input'), lq)
    assert fpm.check_fingerprint('Rain100L', fpm.fingerprint_folder(gt, lq))['status'] == 'matches'
    img = cv2.imread(os.path.join(lq, '042.png'))
    img[0, 0] = 255 - img[0, 0]
    cv2.imwrite(os.path.join(lq, '042.png'), img)
    os.remove(os.path.join(gt, '077.png'))
    os.remove(os.path.join(lq, '077.png'))
    check = fpm.check_fingerprint('Rain100L', fpm.fingerprint_folder(gt, lq))
    assert check['differences'] == ['99 pairs, the canonical set has 100', 'changed (degraded 1): 042.png',
                                    'missing (in the canonical set, not here): 077.png']


def test_environment_records_what_changes_a_metric():
    env = environment('cpu', precision=None, tile=None)
    assert set(env['versions']) >= {'scikit-image', 'numpy', 'torch', 'opencv', 'pillow', 'python'}
    assert env['versions']['numpy'] == np.__version__ and env['versions']['opencv'] == cv2.__version__
    assert env['device_type'] == 'cpu' and env['precision'] == 'fp32' and env['tiling'] == 'none'
    import torch
    other = environment('cpu', precision=torch.bfloat16, tile=256, tile_overlap=32)
    assert other['precision'] == 'bf16 autocast' and other['tiling'] == 'tile 256, overlap 32'
    assert environment_differences(env, other) == ['precision: fp32 vs bf16 autocast',
                                                   'tiling: none vs tile 256, overlap 32']
    older = dict(env, versions=dict(env['versions'], **{'scikit-image': '0.19.3'}))
    assert environment_differences(env, older) == [f'versions.scikit-image: {env["versions"]["scikit-image"]} vs '
                                                   '0.19.3']
    assert 'scikit-image' in describe_environment(env) and 'not recorded' in describe_environment(None)
