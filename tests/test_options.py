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
from vlunet.archs.card import find_variant, list_variants
from vlunet.archs.conditioning import DEGRADATION_EMBEDDING, TEXT_EMBEDDING

# every released configuration with option files, by its option stem (read from the method cards)
METHODS = tuple(dict.fromkeys(v.options for _, v in list_variants() if v.options))
SETTINGS = ('NHR', 'NHRBL')
# A method's own training terms are part of the method, not of the protocol: the shared-protocol check
# compares `train` without these keys (e.g. MoCE-IR's balance loss in train.balance_opt).
METHOD_LOSS_KEYS = tuple(sorted({t.key for card, _ in list_variants() for t in card.training_terms} | {'fft_opt'}))


def _load(path):
    with open(path) as f:
        return yaml.load(f, Loader=ordered_yaml()[0])


def test_every_option_file_parses_and_names_registered_types():
    files = sorted(glob.glob(os.path.join(REPO, 'options', '*', '*.yml')))
    assert len(files) >= 2 * len(METHODS) + 2
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
    assert params > 5_000_000, f'{method}_{setting}: {params} parameters is not the full-size model'
    card, _ = find_variant(method)
    variant = next(v for v in card.variants if v.options == method and v.released_for(setting))
    assert {k: opt['network_g'][k] for k in variant.kwargs} == dict(variant.kwargs), f'{method}_{setting}'
    if variant.params is not None:
        assert params == variant.params, f'{method}_{setting}: {params} parameters'
    # the method's own training terms with their published options, and no other method's
    assert {k for k in opt['train'] if k in METHOD_LOSS_KEYS} == {t.key for t in card.training_terms}, method
    for term in card.training_terms:  # the published weights; other options may be adapted to the setting's data
        given = opt['train'][term.key]
        assert given['type'] == term.loss and set(term.published) <= set(given), (method, term.key)
        if 'loss_weight' in term.published:
            assert given['loss_weight'] == term.published['loss_weight'], (method, term.key)
    labels = {s['label']: s['name'] for s in opt['datasets']['train']['sources']}  # distinct labels
    if card.condition == DEGRADATION_EMBEDDING:  # one CLIP prompt and one D-GDM component per label
        assert opt['network_g']['de_dim'] == len(labels)
        assert opt['network_clip']['prompts'] == setting
    if card.condition == TEXT_EMBEDDING:  # one published prompt per label, listed in the order of our labels
        text = opt['text_embedding']
        assert sorted(labels) == list(range(len(labels))) and len(text['prompts']) == len(labels)
        assert text['prompts'] == [card.task_prompts[labels[k]] for k in range(len(labels))]
        assert (text['clip_model'], text['pretrained'], text['mode']) == ('ViT-B-32', 'openai', 'oracle')
        assert text['cache'].startswith(f'experiments/{method}_{setting}/')
    else:
        assert 'text_embedding' not in opt


# ------------------------------------------------------------------------------------------------
# CDD-11: eleven composite types, one paired source and one validation set per type, the whole image
# ------------------------------------------------------------------------------------------------
CDD11_TYPES = ('low', 'haze', 'rain', 'snow', 'low_haze', 'low_rain', 'low_snow', 'haze_rain', 'haze_snow',
               'low_haze_rain', 'low_haze_snow')
CDD11_METRICS = {'psnr': {'type': 'calculate_psnr_skimage', 'crop_border': 0, 'test_y_channel': False,
                          'variant': 'float'},
                 'ssim': {'type': 'calculate_ssim_skimage', 'crop_border': 0, 'test_y_channel': False,
                          'variant': 'float_uniform7'}}


def _cdd11_methods():
    """Every method with CDD-11 files: those of the NHR setting, and any newer one that has its own."""
    found = {os.path.basename(p)[:-len('_CDD11.yml')] for p in glob.glob(os.path.join(REPO, 'options', 'train', '*_CDD11.yml'))}
    found.discard('CLIPAdapter')
    assert set(METHODS) <= found, f'CDD11 training files missing for {sorted(set(METHODS) - found)}'
    return sorted(found)


def _own_loss_keys():
    """A method's own training terms (train.<key>), read from the method cards: not part of the protocol."""
    from vlunet.archs.card import list_methods
    return set(METHOD_LOSS_KEYS) | {term.key for card in list_methods() for term in card.training_terms}


@pytest.mark.parametrize('path', sorted(p for p in glob.glob(os.path.join(REPO, 'options', '*', '*_CDD11.yml'))
                                        if 'CLIPAdapter' not in p))
def test_every_cdd11_file_declares_the_cdd11_protocol(path):
    opt = _load(path)
    with open(path) as f:
        header = [line for line in f if line.startswith('#')]
    assert any(line.startswith('# Protocol: CDD-11') for line in header), f'{path}: no "# Protocol: CDD-11" line'
    assert opt['val']['metrics'] == CDD11_METRICS, path
    assert opt['val'].get('center_crop_multiple') is None, f'{path}: CDD-11 measures the whole image'
    val_sets = [v for k, v in opt['datasets'].items() if k != 'train']
    assert [v['name'] for v in val_sets] == [f'CDD11_{t}' for t in CDD11_TYPES], path
    for k, (t, val) in enumerate(zip(CDD11_TYPES, val_sets)):
        (source, ) = val['sources']
        assert (source['name'], source['label']) == (t, k), path
        assert source['dataroot_gt'] == 'datasets/cdd11/test/clear' and source['dataroot_lq'] == f'datasets/cdd11/test/{t}'
        assert source['meta_info_file'] == f'datasets/cdd11/meta_info_cdd11_test_{t}.txt'
    if 'train' in opt['datasets']:
        sources = opt['datasets']['train']['sources']
        assert [(s['name'], s['label'], s['dataroot_lq']) for s in sources] == \
            [(t, k, f'datasets/cdd11/train/{t}') for k, t in enumerate(CDD11_TYPES)], path


def test_all_methods_share_one_cdd11_protocol():
    methods = _cdd11_methods()
    own = _own_loss_keys()

    def protocol(opt, key):
        return {k: v for k, v in opt['train'].items() if k not in own} if key == 'train' else opt[key]

    opts = {m: _load(os.path.join(REPO, 'options', 'train', f'{m}_CDD11.yml')) for m in methods}
    reference = opts['VLUNet']
    assert not own & set(reference['train'])
    for method, opt in opts.items():
        assert opt['name'] == f'{method}_CDD11'
        for key in ('datasets', 'train', 'val', 'logger', 'manual_seed', 'model_type'):
            assert protocol(opt, key) == protocol(reference, key), f'{method}_CDD11.yml differs from VLUNet_CDD11.yml in {key}'
        nhr = os.path.join(REPO, 'options', 'train', f'{method}_NHR.yml')
        if os.path.isfile(nhr):  # the same network and own training terms as the method's NHR file
            nhr = _load(nhr)
            assert {k: v for k, v in opt['network_g'].items() if k != 'de_dim'} == \
                {k: v for k, v in nhr['network_g'].items() if k != 'de_dim'}, method
            terms = {k: (v['type'], v.get('loss_weight')) for k, v in opt['train'].items() if k in own}
            assert terms == {k: (v['type'], v.get('loss_weight')) for k, v in nhr['train'].items() if k in own}, method
    # the published CDD-11 run of MoCE-IR in iterations: 15 warm-up epochs, cosine over 150 epochs, 120 trained
    train = reference['train']
    sched = train['scheduler']
    assert sched['type'] == 'LinearWarmupCosineLR' and train['optim_g']['type'] == 'AdamW' and train['optim_g']['lr'] == 2e-4
    assert sched['warmup_iter'] * 150 == sched['total_iter'] * 15 and sched['total_iter'] * 120 == train['total_iter'] * 150
    data = reference['datasets']['train']
    assert data['gt_size'] == 128 and data['batch_size_per_gpu'] == 8 and {s['repeat'] for s in data['sources']} == {2}
    tests = {m: _load(os.path.join(REPO, 'options', 'test', f'{m}_CDD11.yml')) for m in methods}
    val_sets = [v['name'] for k, v in reference['datasets'].items() if k.startswith('val')]
    for method, opt in tests.items():
        assert [v['name'] for v in opt['datasets'].values()] == val_sets
        assert opt['val']['metrics'] == reference['val']['metrics']
        assert opt['network_g'] == opts[method]['network_g']
        assert opt.get('text_embedding') == opts[method].get('text_embedding'), method
        assert opt.get('network_clip') == opts[method].get('network_clip'), method


@pytest.mark.parametrize('method', sorted({os.path.basename(p)[:-len('_CDD11.yml')] for p in glob.glob(
    os.path.join(REPO, 'options', 'train', '*_CDD11.yml'))} - {'CLIPAdapter'}))
def test_full_size_cdd11_networks_build(method):
    from vlunet.archs.card import find_variant
    opt = _load(os.path.join(REPO, 'options', 'train', f'{method}_CDD11.yml'))
    with torch.device('meta'):
        net = build_network(dict(opt['network_g']))
    params = sum(p.numel() for p in net.parameters())
    card, variant = find_variant(method)
    assert opt['network_g']['type'] == card.arch
    if all(opt['network_g'].get(k) == v for k, v in variant.kwargs.items()) and variant.params:
        assert params == variant.params, f'{method}_CDD11: {params} parameters, published {variant.params}'
    else:  # VLU-Net: 11 prompt components instead of the released 5 or 7
        assert params > 10_000_000, f'{method}_CDD11: {params} parameters is not the full-size model'
    for term in card.training_terms:  # a method's own training terms at their published weight
        if term.key in opt['train']:
            assert opt['train'][term.key]['type'] == term.loss, term.key
            assert opt['train'][term.key].get('loss_weight') == term.published.get('loss_weight'), term.key
    prompts = [s['prompt'] for s in opt['datasets']['train']['sources']]
    assert len(set(prompts)) == len(CDD11_TYPES)
    if method == 'VLUNet':  # one prompt component per type; the CLIP stage of this setting has the same prompts
        clip = _load(os.path.join(REPO, 'options', 'train', 'CLIPAdapter_CDD11.yml'))
        assert opt['network_g']['de_dim'] == len(CDD11_TYPES)
        assert opt['network_clip']['prompts'] == clip['network_g']['prompts'] == prompts
        assert opt['network_clip']['load_path'].startswith('experiments/CLIPAdapter_CDD11/')
        assert [s['label'] for s in clip['datasets']['train']['sources']] == list(range(len(CDD11_TYPES)))
    if method == 'DFPIR':  # one text prompt per label
        text = opt['text_embedding']
        assert len(text['prompts']) == len(set(text['prompts'])) == len(CDD11_TYPES)
        assert text['cache'].startswith(f'experiments/{method}_CDD11/') and text['mode'] == 'oracle'
    else:
        assert 'text_embedding' not in opt
