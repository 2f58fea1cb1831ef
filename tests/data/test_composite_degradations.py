"""Composite degradations (``degradation: {type: compose, steps: [...]}``): the registered degradations
applied in order with the image's one generator, checked with errors naming the option, and a composite
type defined only in an option file trains and tests."""
import json
import os

import numpy as np
import pytest

import vlunet  # noqa: F401
from basicsr.data import build_dataset
from vlunet.data.all_in_one_dataset import DatasetError
from vlunet.data.degradations import (DEGRADATION_REGISTRY, DegradationOptionError, apply_degradation,
                                      check_degradation)

from conftest import REPO, load_yaml, run_cli, write_yaml

# low light, then rain, then haze: the order in which CDD-11's composite types were synthesised
LOW_RAIN_HAZE = [{'type': 'low_light', 'gamma': [1.5, 2.0]}, {'type': 'rain_streaks', 'density': 0.01},
                 {'type': 'haze', 'beta': [0.6, 1.2]}]


def _img(seed=3, shape=(40, 52, 3)):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def test_steps_are_applied_in_order_with_one_generator():
    img = _img()
    out = apply_degradation(img, {'type': 'compose', 'steps': LOW_RAIN_HAZE}, np.random.default_rng(11))
    rng, expected = np.random.default_rng(11), img
    for step in LOW_RAIN_HAZE:  # each registered function in turn, clipped as a single degradation is
        params = {k: v for k, v in step.items() if k != 'type'}
        expected = np.clip(DEGRADATION_REGISTRY.get(step['type'])(expected, rng, **params), 0, 1).astype(np.float32)
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.float32 and out.shape == img.shape and 0 <= out.min() and out.max() <= 1
    reordered = apply_degradation(img, {'type': 'compose', 'steps': LOW_RAIN_HAZE[::-1]}, np.random.default_rng(11))
    assert np.abs(reordered - out).max() > 0.05  # the order is part of the type
    nested = {'type': 'compose', 'steps': [LOW_RAIN_HAZE[0], {'type': 'compose', 'steps': LOW_RAIN_HAZE[1:]}]}
    np.testing.assert_array_equal(apply_degradation(img, nested, np.random.default_rng(11)), out)


@pytest.mark.parametrize('steps, match', [
    ([], r"degradation\.steps: expected a non-empty list of degradations"),
    ('haze', r"degradation\.steps: expected a non-empty list"),
    ([{'type': 'haze'}, {'type': 'rian'}], r"degradation\.steps\[1\]\.type: unknown degradation type 'rian'; "
                                           r"registered types: .*rain_streaks"),
    ([{'type': 'low_light'}, {'type': 'haze', 'betta': 1.0}],
     r"degradation\.steps\[1\]: haze has no option 'betta' \(its options: airlight, beta\)"),
    ([{'type': 'haze'}, 'rain_streaks'], r"degradation\.steps\[1\]: expected a mapping \{type: "),
    ([{'type': 'compose', 'steps': [{'type': 'jpeg', 'qualty': 20}]}],
     r"degradation\.steps\[0\]\.steps\[0\]: jpeg has no option 'qualty' \(its options: quality\)"),
])
def test_bad_steps_are_named(steps, match):
    with pytest.raises(DegradationOptionError, match=match):
        check_degradation({'type': 'compose', 'steps': steps})
    with pytest.raises(DegradationOptionError, match=match):  # applying checks first, nothing is drawn
        apply_degradation(_img(), {'type': 'compose', 'steps': steps}, np.random.default_rng(0))


def test_single_degradations_are_checked_too():
    with pytest.raises(DegradationOptionError, match=r"degradation: gaussian_noise has no option 'sgma' "
                                                     r"\(its options: sigma\)"):
        apply_degradation(_img(), {'type': 'gaussian_noise', 'sgma': 5}, np.random.default_rng(0))
    with pytest.raises(DegradationOptionError, match=r"datasets\.val\.sources\[0\]\.degradation\.type: unknown"):
        check_degradation({'type': 'snowstorm'}, 'datasets.val.sources[0].degradation')
    assert check_degradation({'type': 'haze', 'beta': 1.0}) == {'type': 'haze', 'beta': 1.0}


def test_validation_set_of_a_composite_source_is_fixed_and_recorded(tmp_path):
    source = {'name': 'low_rain_haze', 'label': 0, 'dataroot_gt': 'vlunet://demo_data/val',
              'degradation': {'type': 'compose', 'steps': LOW_RAIN_HAZE}}
    opt = {'name': 'v', 'type': 'AllInOneDataset', 'phase': 'val', 'seed': 0, 'sources': [source]}
    a, b = build_dataset(dict(opt)), build_dataset(dict(opt))
    np.testing.assert_array_equal(a[1]['lq'].numpy(), b[1]['lq'].numpy())
    assert not np.array_equal(a[0]['lq'].numpy(), a[0]['gt'].numpy())
    synthetic = a.protocol()['synthetic']
    assert synthetic[0]['type'] == 'compose' and synthetic[0]['steps'] == LOW_RAIN_HAZE and synthetic[0]['seed'] == 0


def _composite_option_files(tmp_path):
    """A tiny training file whose only type is a composite defined in the file, and its test file."""
    composite = {'type': 'compose', 'steps': LOW_RAIN_HAZE}
    val = {'name': 'demo_low_rain_haze', 'type': 'AllInOneDataset', 'seed': 0,
           'sources': [{'name': 'low_rain_haze', 'label': 1, 'dataroot_gt': 'vlunet://demo_data/val',
                        'degradation': composite}]}
    network = {'type': 'Restormer', 'dim': 8, 'num_blocks': [1, 1, 1, 1], 'num_refinement_blocks': 1,
               'heads': [1, 2, 4, 8]}
    metrics = {'psnr': {'type': 'calculate_psnr_skimage', 'crop_border': 0, 'test_y_channel': False},
               'ssim': {'type': 'calculate_ssim_skimage', 'crop_border': 0, 'test_y_channel': False}}
    train = {
        'name': 'composite_demo', 'model_type': 'VLUNetModel', 'num_gpu': 0, 'manual_seed': 0,
        'datasets': {
            'train': {'name': 'composite_train', 'type': 'AllInOneDataset', 'gt_size': 32, 'use_hflip': True,
                      'use_rot': True, 'num_worker_per_gpu': 0, 'batch_size_per_gpu': 2, 'dataset_enlarge_ratio': 1,
                      'prefetch_mode': None,
                      'sources': [{'name': 'rain', 'label': 0, 'dataroot_gt': 'vlunet://demo_data/train',
                                   'degradation': {'type': 'rain_streaks'}},
                                  {'name': 'low_rain_haze', 'label': 1, 'dataroot_gt': 'vlunet://demo_data/train',
                                   'degradation': composite}]},
            'val': val},
        'network_g': network,
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {'ema_decay': 0, 'optim_g': {'type': 'AdamW', 'lr': 1e-3},
                  'scheduler': {'type': 'LinearWarmupCosineLR', 'warmup_iter': 0}, 'total_iter': 2,
                  'warmup_iter': -1, 'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0}},
        'val': {'val_freq': 1000, 'save_img': False, 'metrics': metrics},  # tested by vlunet-test below
        'logger': {'print_freq': 1, 'save_checkpoint_freq': 2, 'use_tb_logger': False},
    }
    test = {'name': 'composite_demo', 'model_type': 'VLUNetModel', 'num_gpu': 0, 'manual_seed': 0,
            'datasets': {'test_1': val}, 'network_g': network,
            'path': {'pretrain_network_g': 'experiments/composite_demo/models/net_g_latest.pth',
                     'strict_load_g': True, 'param_key_g': 'params'},
            'val': {'save_img': False, 'pbar': False, 'metrics': metrics}}
    return write_yaml(tmp_path / 'train.yml', train), write_yaml(tmp_path / 'test.yml', test)


def test_a_composite_type_defined_in_an_option_file_trains_and_tests(tmp_path):
    train_yml, test_yml = _composite_option_files(tmp_path)
    proc = run_cli(['-m', 'vlunet.train', '-opt', train_yml], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / 'experiments' / 'composite_demo' / 'models' / 'net_g_latest.pth').is_file()
    proc = run_cli(['-m', 'vlunet.test', '-opt', test_yml], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    entry = json.load(open(tmp_path / 'results' / 'composite_demo' / 'metrics.json'))['demo_low_rain_haze']
    assert entry['images'] == len(os.listdir(os.path.join(REPO, 'vlunet', 'demo_data', 'val')))
    assert np.isfinite(entry['psnr']) and 0 < entry['ssim'] <= 1
    assert entry['input_psnr'] < 25  # the composite really degraded the inputs
    recorded = entry['protocol']['synthetic'][0]
    assert recorded['type'] == 'compose' and [s['type'] for s in recorded['steps']] == ['low_light', 'rain_streaks',
                                                                                       'haze']


def test_a_misspelt_step_in_an_option_file_is_named(tmp_path):
    train_yml, _ = _composite_option_files(tmp_path)
    opt = load_yaml(train_yml)['datasets']['train']
    opt['sources'][1]['degradation']['steps'][2] = {'type': 'haze', 'betta': 1.0}
    with pytest.raises(DatasetError, match=r"degradation\.steps\[2\]: haze has no option 'betta'.*low_rain_haze"):
        build_dataset(dict(opt, phase='train'))  # when the dataset is made, before any image is read
