"""vlunet-train end to end (CPU, tiny): checkpoints, --auto_resume, torchrun, LMDB, bad option files."""
import glob
import os


from conftest import DEMO_TRAIN, TINY_DEMO, load_yaml, run_cli, write_yaml


def _log(tmp_path, name):
    logs = sorted(glob.glob(str(tmp_path / 'experiments' / name / 'train_*.log')))
    return open(logs[-1]).read()


def test_train_saves_then_auto_resumes_without_archiving(tmp_path):
    args = ['-m', 'vlunet.train', '-opt', DEMO_TRAIN, '--force_yml', 'train:total_iter=4',
            'logger:save_checkpoint_freq=2', *TINY_DEMO]
    first = run_cli(args, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    exp = tmp_path / 'experiments' / 'VLUNet_demo'
    for f in ('models/net_g_2.pth', 'models/net_g_4.pth', 'models/net_g_latest.pth', 'training_states/2.state',
              'training_states/4.state'):
        assert (exp / f).is_file(), f
    assert (tmp_path / 'experiments').is_dir()  # created under the working directory
    os.remove(exp / 'models' / 'net_g_4.pth')
    os.remove(exp / 'training_states' / '4.state')

    second = run_cli([*args, '--auto_resume'], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert 'Resuming training from epoch: 0, iter: 2.' in log
    assert 'End of training' in log
    assert (exp / 'training_states' / '4.state').is_file()
    assert sorted(os.listdir(tmp_path / 'experiments')) == ['VLUNet_demo']  # nothing archived


def test_torchrun_two_cpu_processes(tmp_path):
    import shutil
    torchrun = shutil.which('torchrun')
    assert torchrun, 'torchrun not on PATH'
    import subprocess
    import sys
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29533', '-m',
           'vlunet.train', '-opt', DEMO_TRAIN, '--launcher', 'pytorch', '--force_yml', 'train:total_iter=4',
           *TINY_DEMO]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = _log(tmp_path, 'VLUNet_demo')
    assert 'World size (gpu number): 2' in log
    assert 'End of training' in log


def test_train_and_validate_on_one_lmdb(tmp_path, demo_images):
    import vlunet  # noqa: F401  (before basicsr: its import needs vlunet's compat fixes)
    from basicsr.utils.lmdb_util import make_lmdb_from_imgs
    names = sorted(os.listdir(demo_images))
    lmdb_path = str(tmp_path / 'clean.lmdb')
    make_lmdb_from_imgs(str(demo_images), lmdb_path, names, [os.path.splitext(n)[0] for n in names])
    opt = load_yaml(DEMO_TRAIN)
    source = {'name': 'noise25', 'label': 1, 'dataroot_gt': lmdb_path, 'io_backend': {'type': 'lmdb'},
              'degradation': {'type': 'gaussian_noise', 'sigma': 25}}
    opt['datasets'] = {
        'train': dict(opt['datasets']['train'], sources=[source], gt_size=32, batch_size_per_gpu=2),
        'val': {'name': 'lmdb_val', 'type': 'AllInOneDataset', 'sources': [source]},
    }
    opt['network_g']['dim'] = 10
    opt['train']['total_iter'] = 4
    opt['val']['val_freq'] = 2  # validate twice, training reads the same LMDB in between
    opt['logger'].update(save_checkpoint_freq=4, use_tb_logger=False)
    proc = run_cli(['-m', 'vlunet.train', '-opt', write_yaml(tmp_path / 'lmdb.yml', opt)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _log(tmp_path, 'VLUNet_demo').count('Validation lmdb_val') == 3


def test_python_object_tag_executes_nothing(tmp_path):
    marker = tmp_path / 'pwned'
    evil = tmp_path / 'evil.yml'
    evil.write_text(f'name: evil\nmodel_type: !!python/object/apply:os.system ["touch {marker}"]\n')
    proc = run_cli(['-m', 'vlunet.train', '-opt', str(evil)], tmp_path)
    assert proc.returncode != 0
    assert 'python/object/apply' in proc.stderr
    assert not marker.exists()


def test_missing_option_file_is_named(tmp_path):
    proc = run_cli(['-m', 'vlunet.train', '-opt', 'missing.yml'], tmp_path)
    assert proc.returncode == 2
    assert "option file not found: 'missing.yml'" in proc.stderr
    proc = run_cli(['-m', 'vlunet.test', '-opt', 'nope/missing_test.yml'], tmp_path)
    assert proc.returncode == 2 and 'missing_test.yml' in proc.stderr


def test_missing_inputs_are_listed_before_anything_is_created(tmp_path):
    """Missing dataset roots and checkpoints (after --force_yml) are named up front; no folders are left."""
    proc = run_cli(['-m', 'vlunet.train', '-opt', DEMO_TRAIN, '--force_yml', 'train:total_iter=2', *TINY_DEMO,
                    'path:pretrain_network_g=weights/none.pth',
                    'datasets:val_2:sources=[{"name": "x", "label": 1, "dataroot_gt": "data/nowhere"}]'], tmp_path)
    assert proc.returncode == 2
    assert 'path.pretrain_network_g: weights/none.pth' in proc.stderr
    assert 'datasets.val_2.sources[0].dataroot_gt: data/nowhere' in proc.stderr
    assert 'Preparing data' in proc.stderr and 'Nothing was created' in proc.stderr
    assert os.listdir(tmp_path) == []
    test_opt = os.path.join(os.path.dirname(DEMO_TRAIN), '..', 'test', 'VLUNet_demo.yml')
    proc = run_cli(['-m', 'vlunet.test', '-opt', test_opt], tmp_path)  # no demo model trained here
    assert proc.returncode == 2 and 'path.pretrain_network_g: experiments/VLUNet_demo/models/net_g_latest.pth' in proc.stderr
    assert os.listdir(tmp_path) == []


def test_basicsr_own_sr_recipe_still_trains_on_cpu(tmp_path, demo_images):
    """vlunet extends BasicSR and never narrows it: a stock SRModel/MSRResNet recipe with num_gpu 0."""
    import cv2
    lq = tmp_path / 'lq'
    lq.mkdir()
    for name in os.listdir(demo_images):
        img = cv2.imread(str(demo_images / name))
        cv2.imwrite(str(lq / name), cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2),
                                               interpolation=cv2.INTER_AREA))
    data = {'type': 'PairedImageDataset', 'dataroot_gt': str(demo_images), 'dataroot_lq': str(lq),
            'io_backend': {'type': 'disk'}, 'filename_tmpl': '{}'}
    opt = {
        'name': 'sr_recipe', 'model_type': 'SRModel', 'scale': 2, 'num_gpu': 0, 'manual_seed': 0,
        'datasets': {
            'train': dict(data, name='train', gt_size=32, use_hflip=True, use_rot=True, num_worker_per_gpu=0,
                          batch_size_per_gpu=2, dataset_enlarge_ratio=1, prefetch_mode=None),
            'val': dict(data, name='val'),
        },
        'network_g': {'type': 'MSRResNet', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_block': 1,
                      'upscale': 2},
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {'ema_decay': 0.999, 'optim_g': {'type': 'Adam', 'lr': 2e-4, 'betas': [0.9, 0.99]},
                  'scheduler': {'type': 'CosineAnnealingRestartLR', 'periods': [4], 'restart_weights': [1],
                                'eta_min': 1e-7},
                  'total_iter': 4, 'warmup_iter': -1, 'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0}},
        'val': {'val_freq': 4, 'save_img': False,
                'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 2, 'test_y_channel': False}}},
        'logger': {'print_freq': 2, 'save_checkpoint_freq': 4, 'use_tb_logger': False},
    }
    proc = run_cli(['-m', 'vlunet.train', '-opt', write_yaml(tmp_path / 'sr.yml', opt)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / 'experiments' / 'sr_recipe' / 'models' / 'net_g_latest.pth').is_file()
    assert '# psnr' in _log(tmp_path, 'sr_recipe')
