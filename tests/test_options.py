"""The shipped option files: full-size networks build from the registry; one protocol per setting."""
import glob
import os

import pytest
import torch
import yaml

import vlunet  # noqa: F401
from basicsr.archs import build_network
from basicsr.utils.options import ordered_yaml
from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, LOSS_REGISTRY, MODEL_REGISTRY

from conftest import REPO
from vlunet.archs.moceir_arch import RELEASED_CONFIGS

METHODS = ('VLUNet', 'PromptIR', 'Restormer', 'DGUNet', 'AdaIR', 'MoCEIR_S', 'MoCEIR', 'DFPIR')
SETTINGS = ('NHR', 'NHRBL')
# A method's own auxiliary losses are part of the method, not of the protocol: the shared-protocol check
# compares `train` without these keys (MoCE-IR's published balance loss lives in train.balance_opt).
METHOD_LOSS_KEYS = ('balance_opt', 'fft_opt')
# full-size parameter counts of the published networks (../shared/reference/README.md, "Peers of the leaderboard")
PUBLISHED_PARAMS = {'AdaIR': 28_784_824, 'MoCEIR_S': 11_477_752, 'MoCEIR': 25_353_796, 'DFPIR': 31_104_761}
RELEASED = {'MoCEIR_S': 'MoCE-IR-S', 'MoCEIR': 'MoCE-IR'}
# DFPIR's published prompt of each of our training sources (row k of text_embedding.prompts = label k)
DFPIR_PROMPTS = {'noise15': 'Gaussian noise with a standard deviation of 15',
                 'noise25': 'Gaussian noise with a standard deviation of 25',
                 'noise50': 'Gaussian noise with a standard deviation of 50',
                 'rain': 'Rain degradation with rain lines', 'haze': 'Hazy degradation with normal haze',
                 'blur': 'Blur degradation with motion blur', 'lowlight': 'Lowlight degradation'}


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
        for key, loss in (opt.get('train') or {}).items():
            if key.endswith('_opt') and loss:  # pixel_opt, balance_opt, fft_opt, ...
                assert loss['type'] in LOSS_REGISTRY, (path, key)
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


def _protocol(opt, key):
    if key == 'train':
        return {k: v for k, v in opt['train'].items() if k not in METHOD_LOSS_KEYS}
    return opt[key]


@pytest.mark.parametrize('setting', SETTINGS)
def test_all_methods_share_one_protocol(setting):
    opts = {m: _load(os.path.join(REPO, 'options', 'train', f'{m}_{setting}.yml')) for m in METHODS}
    reference = opts['VLUNet']
    assert not set(METHOD_LOSS_KEYS) & set(reference['train'])
    for method, opt in opts.items():
        assert opt['name'] == f'{method}_{setting}'
        for key in ('datasets', 'train', 'val', 'logger', 'manual_seed', 'model_type'):
            assert _protocol(opt, key) == _protocol(reference, key), \
                f'{method}_{setting}.yml differs from VLUNet_{setting}.yml in {key}'
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
        assert opt.get('text_embedding') == opts[method].get('text_embedding'), method


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
    if method in PUBLISHED_PARAMS:
        assert params == PUBLISHED_PARAMS[method], f'{method}_{setting}: {params} parameters'
    if method in RELEASED:  # the released MoCE-IR settings, and the published balance loss without FFT loss
        released = RELEASED_CONFIGS[RELEASED[method]]
        assert {k: opt['network_g'][k] for k in released} == released
        assert opt['train']['balance_opt'] == {'type': 'BalanceLoss', 'loss_weight': 0.01}
        assert 'fft_opt' not in opt['train']
    else:
        assert not set(METHOD_LOSS_KEYS) & set(opt['train']), method
    if method == 'DFPIR':  # one published prompt per label, listed in the order of our labels
        text = opt['text_embedding']
        labels = {s['label']: s['name'] for s in opt['datasets']['train']['sources']}  # distinct labels
        assert sorted(labels) == list(range(len(labels))) and len(text['prompts']) == len(labels)
        assert text['prompts'] == [DFPIR_PROMPTS[labels[k]] for k in range(len(labels))]
        assert (text['clip_model'], text['pretrained'], text['mode']) == ('ViT-B-32', 'openai', 'oracle')
        assert text['cache'].startswith(f'experiments/{method}_{setting}/')
    else:
        assert 'text_embedding' not in opt
