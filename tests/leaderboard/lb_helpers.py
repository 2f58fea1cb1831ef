"""Shared by the leaderboard tests: tiny image sets, their canonical versions, and results/<name>/ folders as
vlunet-test and vlunet-remeasure write them (metrics.json with protocol, fingerprint, environment; model.json;
weights.json), with chosen numbers so that every cell of a table can be checked."""
import json
import os
import shutil

import cv2
import numpy as np

from vlunet.metrics import fingerprint as fpm
from vlunet.metrics.environment import environment

NHR_SETS = ['CBSD68_sigma15', 'CBSD68_sigma25', 'CBSD68_sigma50', 'Rain100L', 'SOTS_outdoor']
PUBLISHED = {'psnr': {'type': 'calculate_psnr_skimage', 'crop_border': 0, 'test_y_channel': False},
             'ssim': {'type': 'calculate_ssim_skimage', 'crop_border': 0, 'test_y_channel': False}}
BASICSR = {'psnr': {'type': 'calculate_psnr', 'crop_border': 0, 'test_y_channel': False},
           'ssim': {'type': 'calculate_ssim', 'crop_border': 0, 'test_y_channel': False}}


def write_images(folder, names, seed, size=(24, 32)):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        cv2.imwrite(os.path.join(folder, name), rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    return folder


def image_sets(root):
    """Tiny 'canonical' test sets: CBSD68 (3 clean images), Rain100L and SOTS_outdoor (3 pairs each)."""
    names = ['001.png', '002.png', '003.png']
    sets = {'CBSD68': (write_images(os.path.join(root, 'cbsd'), names, 1), None)}
    for i, name in enumerate(('Rain100L', 'SOTS_outdoor')):
        sets[name] = (write_images(os.path.join(root, name, 'target'), names, 10 + i),
                      write_images(os.path.join(root, name, 'input'), names, 20 + i))
    return sets


def install_canonical(monkeypatch, sets):
    """Make the tiny sets the canonical ones the package knows (Rain100L and CBSD68 by content, SOTS by count)."""
    known = []
    for name, pattern in (('CBSD68', r'CBSD68(_sigma\d+)?'), ('Rain100L', r'Rain100L')):
        fp = fpm.fingerprint_folder(*sets[name])
        known.append(fpm.CanonicalSet(name, pattern, fp['count'], f'test copy of {name}', fp['sizes'], fp['hash'],
                                      {k: tuple(v) for k, v in fp['files'].items()}, fp['paired']))
    known.append(fpm.CanonicalSet('SOTS_outdoor', r'SOTS(_outdoor)?', 3, 'test: 3 pairs', paired=True))
    monkeypatch.setattr(fpm, 'CANONICAL_SETS', known)
    return known


def changed_copy(root, sets, name, change=None, drop=None):
    """A copy of a set with one degraded image changed (``change``) or one pair removed (``drop``)."""
    gt, lq = sets[name]
    out_gt, out_lq = os.path.join(root, 'gt'), os.path.join(root, 'lq')
    shutil.copytree(gt, out_gt)
    shutil.copytree(lq, out_lq)
    if change:
        img = cv2.imread(os.path.join(out_lq, change))
        img[0, 0] = 255 - img[0, 0]
        cv2.imwrite(os.path.join(out_lq, change), img)
    if drop:
        os.remove(os.path.join(out_gt, drop))
        os.remove(os.path.join(out_lq, drop))
    return out_gt, out_lq


def protocol(set_name, metrics=PUBLISHED):
    noise = None
    if set_name.startswith('CBSD68_sigma'):
        sigma = int(set_name.rsplit('sigma', 1)[1])
        noise = [{'source': f'noise{sigma}', 'type': 'gaussian_noise_uint8', 'sigma': sigma, 'seed': 0,
                  'seeding': "per image: numpy default_rng([seed, crc32('<source>/<file>')])"}]
    return {'metrics': metrics, 'crop': 'center crop to a multiple of 16', 'noise': noise, 'synthetic': None}


def result_folder(root, name, network, values, fingerprints, origin=None, pretrain=None, metrics=PUBLISHED,
                  params=1_000_000, marker_extra=None):
    """results/<name>/ with metrics.json (``values``: {set: (psnr, ssim)}), model.json and, for
    ``origin='released'``, the weights.json of vlunet-remeasure."""
    folder = os.path.join(root, 'results', name)
    os.makedirs(folder)
    env = environment('cpu')
    data = {}
    for set_name, (psnr, ssim) in values.items():
        fp = fingerprints[set_name]
        data[set_name] = {'psnr': psnr, 'ssim': ssim, 'input_psnr': 20.0, 'input_ssim': 0.5, 'images': fp['count'],
                          'seconds': 1.0, 'protocol': protocol(set_name, metrics), 'fingerprint': fp,
                          'test_set': fpm.check_fingerprint(set_name, fp), 'environment': env}
    with open(os.path.join(folder, 'metrics.json'), 'w') as f:
        json.dump(data, f)
    if pretrain is None:
        pretrain = (f'released_weights/{name}.pth' if origin == 'released' else
                    f'experiments/{name}/models/net_g_latest.pth')
    with open(os.path.join(folder, 'model.json'), 'w') as f:
        json.dump({'name': name, 'network_g': network, 'params': params, 'network_clip': None,
                   'conditioning': 'none', 'pretrain_network_g': pretrain}, f)
    if origin == 'released':
        marker = {'origin': 'released', 'file': f'/downloads/{name}.ckpt', 'sha256': 'ab' * 32,
                  'source_format': 'lightning', 'converted': pretrain, 'cwd': root, 'written_by': 'vlunet-remeasure'}
        marker.update(marker_extra or {})
        with open(os.path.join(folder, 'weights.json'), 'w') as f:
            json.dump(marker, f)
    return folder


def nhr_fingerprints(sets, overrides=None):
    """{NHR set: fingerprint} of the tiny sets (``overrides``: {set: (gt, lq) folders} for changed copies)."""
    overrides = overrides or {}
    out = {}
    for s in NHR_SETS:
        base = 'CBSD68' if s.startswith('CBSD68') else s
        out[s] = fpm.fingerprint_folder(*overrides.get(s, sets[base]))
    return out


def tiny_checkpoint(path, method, seed):
    """A published-format checkpoint (the card's first layout) of the method's tiny network."""
    import torch
    from basicsr.archs import build_network
    from vlunet.archs.card import get_card
    torch.manual_seed(seed)
    card = get_card(method)
    net = build_network(card.tiny_opt())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(card.checkpoint_formats[0].layout(net), path)   # the layout the authors' code saves


def nhr_test_folders(root):
    """The NHR test folders of the option files, one 32x32 image (pair) each."""
    rng = np.random.default_rng(0)

    def img():
        return rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    os.makedirs(os.path.join(root, 'datasets/denoise/test/CBSD68'))
    cv2.imwrite(os.path.join(root, 'datasets/denoise/test/CBSD68/1.png'), img())
    for task in ('derain/test/Rain100L', 'dehaze/test/SOTS_outdoor'):
        for side in ('target', 'input'):
            os.makedirs(os.path.join(root, 'datasets', task, side))
            cv2.imwrite(os.path.join(root, 'datasets', task, side, '1.png'), img())
