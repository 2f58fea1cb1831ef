"""The shipped option files: full-size networks build from the registry; one protocol per setting."""
import glob
import os

import pytest
import torch
import yaml

import vlunet  # noqa: F401
from basicsr.archs import build_network
from basicsr.utils.options import ordered_yaml
from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, MODEL_REGISTRY

from conftest import REPO

METHODS = ('VLUNet', 'PromptIR', 'Restormer', 'DGUNet')
SETTINGS = ('NHR', 'NHRBL')


def _load(path):
    with open(path) as f:
        return yaml.load(f, Loader=ordered_yaml()[0])


def test_every_option_file_parses_and_names_registered_types():
    files = sorted(glob.glob(os.path.join(REPO, 'options', '*', '*.yml')))
    assert len(files) >= 2 * 8 + 2
    for path in files:
        opt = _load(path)
        assert opt['model_type'] in MODEL_REGISTRY, path
        for key in ('network_g', 'network_clip'):
            if key in opt:
                assert opt[key]['type'] in ARCH_REGISTRY, (path, key)
        for phase, dataset in opt['datasets'].items():
            assert dataset['type'] in DATASET_REGISTRY, (path, phase)
        if opt['model_type'] == 'VLUNetModel':  # restoration metrics: say how PSNR/SSIM are computed
            for metric in (opt.get('val', {}).get('metrics') or {}).values():
                assert {'crop_border', 'test_y_channel'} <= set(metric), f'{path}: state crop_border, test_y_channel'


PUBLISHED_METRICS = {'psnr': {'type': 'calculate_psnr_skimage', 'crop_border': 0, 'test_y_channel': False},
                     'ssim': {'type': 'calculate_ssim_skimage', 'crop_border': 0, 'test_y_channel': False}}


def _noise_types(opt):
    found = []

    def walk(node):
        if isinstance(node, dict):
            if 'degradation' in node and node['degradation'].get('type', '').startswith('gaussian_noise'):
                found.append(node['degradation']['type'])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(opt.get('datasets'))
    return found


@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(REPO, 'options', '*', '*_NHR*.yml'))))
def test_every_nhr_nhrbl_file_declares_the_published_protocol(path):
    opt = _load(path)
    with open(path) as f:
        header = [line for line in f if line.startswith('#')]
    assert any(line.startswith('# Protocol: published') for line in header), f'{path}: no "# Protocol:" line'
    noise = _noise_types(opt)
    assert noise and set(noise) == {'gaussian_noise_uint8'}, f'{path}: noise sources must use the published rule'
    if opt['model_type'] == 'VLUNetModel':
        assert opt['val']['metrics'] == PUBLISHED_METRICS, path
        assert opt['val']['center_crop_multiple'] == 16, path


@pytest.mark.parametrize('setting', SETTINGS)
def test_four_methods_share_one_protocol(setting):
    opts = {m: _load(os.path.join(REPO, 'options', 'train', f'{m}_{setting}.yml')) for m in METHODS}
    reference = opts['VLUNet']
    for method, opt in opts.items():
        assert opt['name'] == f'{method}_{setting}'
        for key in ('datasets', 'train', 'val', 'logger', 'manual_seed', 'model_type'):
            assert opt[key] == reference[key], f'{method}_{setting}.yml differs from VLUNet_{setting}.yml in {key}'
    train = reference['train']
    assert reference['datasets']['train']['gt_size'] == 128
    assert train['optim_g']['type'] == 'AdamW' and train['optim_g']['lr'] == 2e-4
    sched = train['scheduler']
    assert sched['type'] == 'LinearWarmupCosineLR' and 'total_iter' not in sched  # follows train.total_iter
    assert sched['warmup_iter'] * 200 == train['total_iter'] * 15  # 15 of 200 epochs
    tests = {m: _load(os.path.join(REPO, 'options', 'test', f'{m}_{setting}.yml')) for m in METHODS}
    val_sets = [v['name'] for k, v in reference['datasets'].items() if k.startswith('val')]
    for method, opt in tests.items():
        assert [v['name'] for v in opt['datasets'].values()] == val_sets
        assert opt['network_g'] == opts[method]['network_g']


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('setting', SETTINGS)
def test_full_size_networks_build(method, setting):
    opt = _load(os.path.join(REPO, 'options', 'train', f'{method}_{setting}.yml'))
    with torch.device('meta'):
        net = build_network(dict(opt['network_g']))
    params = sum(p.numel() for p in net.parameters())
    assert params > 10_000_000, f'{method}_{setting}: {params} parameters is not the full-size model'
    if method == 'VLUNet':
        n_prompts = {'NHR': 5, 'NHRBL': 7}[setting]
        assert opt['network_g']['de_dim'] == n_prompts
        assert opt['network_clip']['prompts'] == setting
        assert params == {5: 34_364_852, 7: 35_353_028}[n_prompts]
