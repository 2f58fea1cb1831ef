"""Training that survives being killed: --auto_resume picks the newest complete checkpoint, unusable
ones are named and left alone, a longer schedule is followed, runs repeat with their seed, and
unreadable training images are named (vlunet-train end to end, tiny demo)."""
import glob
import os
import random
import re
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import torch

from conftest import DEMO_TRAIN, TINY_DEMO, load_yaml, run_cli, write_yaml
from vlunet.pipeline import iteration_problems

EXP = 'VLUNet_demo'


def _args(total, freq=2, extra=()):
    return ['-m', 'vlunet.train', '-opt', DEMO_TRAIN, '--force_yml', f'train:total_iter={total}',
            f'logger:save_checkpoint_freq={freq}', 'val:val_freq=100000', *TINY_DEMO, *extra]


def _logs(tmp_path):
    return [open(p).read() for p in sorted(glob.glob(str(tmp_path / 'experiments' / EXP / 'train_*.log')))]


def _losses(log):
    return [float(v) for v in re.findall(r'l_pix: ([0-9.e+-]+)', log)]


def _truncate(path):
    data = open(path, 'rb').read()
    with open(path, 'wb') as f:
        f.write(data[:len(data) // 3])


def test_truncated_newest_checkpoint_is_named_and_the_previous_one_resumed_on_a_longer_schedule(tmp_path):
    first = run_cli(_args(4), tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    exp = tmp_path / 'experiments' / EXP
    _truncate(exp / 'training_states' / '4.state')
    _truncate(exp / 'models' / 'net_g_4.pth')
    truncated = {p: os.path.getsize(exp / p) for p in ('training_states/4.state', 'models/net_g_4.pth')}
    second = run_cli(_args(7, extra=['--auto_resume']), tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert 'iteration 4 cannot be resumed' in second.stderr
    assert str(exp / 'training_states' / '4.state') in second.stderr
    assert str(exp / 'models' / 'net_g_4.pth') in second.stderr
    assert 'Resuming training from epoch: 0, iter: 2.' in second.stdout + second.stderr
    assert sorted(os.listdir(tmp_path / 'experiments')) == [EXP]  # nothing archived
    # iteration 4 was trained again and saved over the broken files
    assert not iteration_problems(str(exp / 'models'), str(exp / 'training_states'), 4)
    assert all(os.path.getsize(exp / p) > size for p, size in truncated.items())
    # the longer schedule (total_iter 4 -> 7) is followed and announced: no iteration trains at lr 0
    log = _logs(tmp_path)[-1]
    assert 'LinearWarmupCosineLR: the training state was saved with warmup_iter=20, total_iter=4' in log
    assert 'total_iter=7' in log
    lrs = [float(v) for v in re.findall(r'iter:\s+[3-7], lr:\(([0-9.e+-]+)', log)]
    assert len(lrs) == 5 and all(lr > 0 for lr in lrs)


def test_resume_state_that_does_not_load_is_an_error_naming_it(tmp_path):
    broken = tmp_path / 'broken.state'
    broken.write_bytes(b'PK\x03\x04 not a checkpoint')
    proc = run_cli(_args(2, extra=['path:resume_state=' + str(broken)]), tmp_path)
    assert proc.returncode != 0
    assert 'path.resume_state' in proc.stderr and str(broken) in proc.stderr


def test_scheduler_shorter_than_training_with_eta_min_zero_is_refused(tmp_path):
    opt = load_yaml(DEMO_TRAIN)
    opt['train']['scheduler'] = {'type': 'LinearWarmupCosineLR', 'warmup_iter': 1, 'total_iter': 2, 'eta_min': 0}
    path = write_yaml(tmp_path / 'short.yml', opt)
    proc = run_cli(['-m', 'vlunet.train', '-opt', path, '--force_yml', 'train:total_iter=4', *TINY_DEMO], tmp_path)
    assert proc.returncode != 0 and 'would train at lr eta_min = 0' in proc.stderr


def test_killed_at_random_moments_training_still_ends_complete(tmp_path):
    total = 10
    exp = tmp_path / 'experiments' / EXP
    rng = random.Random(3)
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    resumed_from = []
    for kill in range(3):
        complete = [it for it in range(2, total + 1, 2)
                    if not iteration_problems(str(exp / 'models'), str(exp / 'training_states'), it)]
        proc = subprocess.Popen([sys.executable, *_args(total, extra=['--auto_resume'])], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(rng.uniform(6, 14))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        out = proc.communicate()[0]
        match = re.search(r'Resuming training from epoch: \d+, iter: (\d+)', out)
        resumed_from.append((max(complete) if complete else None, int(match.group(1)) if match else None))
    final = run_cli(_args(total, extra=['--auto_resume']), tmp_path)
    assert final.returncode == 0, final.stderr[-3000:]
    for newest_complete, resumed in resumed_from:
        assert resumed == newest_complete  # never behind the last complete checkpoint
    net = torch.load(exp / 'models' / 'net_g_latest.pth', weights_only=True)['params']
    assert net and all(torch.isfinite(v).all() for v in net.values())
    assert sorted(os.listdir(tmp_path / 'experiments')) == [EXP]
    assert not glob.glob(str(exp / 'models' / '.*.tmp')) and not glob.glob(str(exp / 'training_states' / '.*.tmp'))


def test_same_seed_same_losses_other_seed_other_losses(tmp_path):
    workers = 2  # each worker draws its own stream; the run still repeats
    runs = {}
    for name, seed in (('a', 10), ('b', 10), ('c', 11)):
        cwd = tmp_path / name
        cwd.mkdir()
        proc = run_cli(_args(4, freq=100, extra=[f'manual_seed={seed}',
                                                  f'datasets:train:num_worker_per_gpu={workers}']), cwd)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = _losses(_logs(cwd)[-1])
    assert len(runs['a']) == 4
    assert runs['a'] == runs['b']
    assert runs['a'] != runs['c']


def test_every_worker_and_rank_draws_its_own_stream(demo_images):
    from basicsr.data import build_dataset
    ds = build_dataset({'name': 'train', 'type': 'AllInOneDataset', 'phase': 'train', 'gt_size': 32,
                        'sources': [{'name': 'n', 'label': 0, 'dataroot_gt': str(demo_images),
                                     'degradation': {'type': 'gaussian_noise_uint8', 'sigma': 25}}]})

    def draw(seed):  # what a worker seeded by the DataLoader (base_seed + worker_id) produces
        torch.manual_seed(seed)
        return ds[0]['lq']

    assert torch.equal(draw(5), draw(5))
    assert not torch.equal(draw(5), draw(6))


def _corrupt_training_set(tmp_path, demo_images):
    bad = tmp_path / 'clean_with_bad'
    bad.mkdir()
    for name in sorted(os.listdir(demo_images))[:2]:
        cv2.imwrite(str(bad / name), cv2.imread(str(demo_images / name)))
    ok, buf = cv2.imencode('.jpg', np.full((64, 64, 3), 128, np.uint8))
    (bad / 'zz_truncated.jpg').write_bytes(buf.tobytes()[:len(buf) // 2])
    opt = load_yaml(DEMO_TRAIN)
    for source in opt['datasets']['train']['sources']:
        source['dataroot_gt'] = str(bad)
    return opt


def test_unreadable_training_image_stops_naming_file_and_dataset(tmp_path, demo_images):
    opt = _corrupt_training_set(tmp_path, demo_images)
    path = write_yaml(tmp_path / 'bad.yml', opt)
    proc = run_cli(['-m', 'vlunet.train', '-opt', path, '--force_yml', 'train:total_iter=3', *TINY_DEMO,
                    'datasets:train:num_worker_per_gpu=0'], tmp_path)
    assert proc.returncode != 0
    assert 'zz_truncated.jpg' in proc.stderr and opt['datasets']['train']['name'] in proc.stderr

    opt['datasets']['train']['skip_unreadable'] = True
    path = write_yaml(tmp_path / 'skip.yml', opt)
    proc = run_cli(['-m', 'vlunet.train', '-opt', path, '--force_yml', 'train:total_iter=3', *TINY_DEMO,
                    'datasets:train:num_worker_per_gpu=0', 'val:val_freq=100000'], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'skipped an unreadable image' in proc.stdout + proc.stderr and 'skipped so far' in proc.stdout + proc.stderr
