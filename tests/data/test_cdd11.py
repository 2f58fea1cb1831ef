"""CDD-11 end to end: vlunet-prepare reads the distributed layouts (train/test and CDD-11_train/CDD-11_test
split folders), refuses a broken copy naming the files, and what it writes is what the CDD-11 option
files read: a tiny CDD-11-layout folder is prepared, trained one step and tested under the CDD-11 protocol
(the whole image, named SSIM variant), and compared as the mean of the 11 per-type means."""
import json
import os

import cv2
import numpy as np
import pytest

from vlunet.data import prepare

from conftest import REPO, run_cli

TYPES = prepare.CDD11_TYPES
SIZE = (32, 40)  # H, W: a multiple of 8 but not of 16, like CDD-11's 1080 x 720


def make_cdd11(split_dir, names, size=SIZE, seed=0):
    """A CDD-11 split folder: clear/ and one folder per type, every image named like its clean one."""
    rng = np.random.default_rng(seed)
    for folder in ('clear', ) + TYPES:
        os.makedirs(split_dir / folder, exist_ok=True)
    for name in names:
        clean = rng.integers(0, 256, (*size, 3)).astype(np.uint8)
        assert cv2.imwrite(str(split_dir / 'clear' / name), clean)
        for k, kind in enumerate(TYPES):  # a different, fixed 'degradation' per type
            degraded = np.clip(clean.astype(np.int16) // 2 + 10 * k, 0, 255).astype(np.uint8)
            assert cv2.imwrite(str(split_dir / kind / name), degraded)
    return split_dir


def run(capsys, *args):
    rc = prepare.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize('layout', ['train_test', 'archive_names', 'split_folder_itself'])
def test_both_split_names_are_read(tmp_path, capsys, layout):
    names = ['000001.png', '000002.png']
    src = tmp_path / 'dl'
    split_dir = {'train_test': src / 'test', 'archive_names': src / 'CDD-11_test' / 'CDD-11_test',
                 'split_folder_itself': src}[layout]
    make_cdd11(split_dir, names)
    make_cdd11(src / ('train' if layout == 'train_test' else 'CDD-11_train'), ['000009.png'], seed=1)  # not read
    out = tmp_path / 'datasets'
    rc, stdout, err = run(capsys, '--task', 'cdd11', '--split', 'test', '--src', src, '--out', out)
    assert rc == 0, err
    root = out / 'cdd11' / 'test'
    assert sorted(os.listdir(root)) == sorted(('clear', ) + TYPES)  # the staging folder is gone
    for folder in ('clear', ) + TYPES:
        assert sorted(os.listdir(root / folder)) == names
        for name in names:  # byte-for-byte copies
            assert (root / folder / name).read_bytes() == (split_dir / folder / name).read_bytes()
    for kind in TYPES:
        meta = (out / 'cdd11' / f'meta_info_cdd11_test_{kind}.txt').read_text().splitlines()
        assert meta == [f'{n} ({SIZE[0]},{SIZE[1]},3)' for n in names]
    assert f'{len(names) * len(TYPES)}' in stdout and str(root) in stdout  # summary: 22 pairs


def test_link_and_the_dataset_reads_each_type(tmp_path, capsys):
    import vlunet  # noqa: F401
    from basicsr.data import build_dataset
    src = make_cdd11(tmp_path / 'CDD-11_train', ['a.png', 'b.png', 'c.png'])
    out = tmp_path / 'datasets'
    assert run(capsys, '--task', 'cdd11', '--src', src, '--out', out, '--link')[0] == 0
    root = out / 'cdd11' / 'train'
    assert os.stat(root / 'clear' / 'b.png').st_ino == os.stat(src / 'clear' / 'b.png').st_ino
    source = {'name': 'haze_snow', 'label': 8, 'dataroot_gt': str(root / 'clear'), 'dataroot_lq': str(root / 'haze_snow'),
              'meta_info_file': str(out / 'cdd11' / 'meta_info_cdd11_train_haze_snow.txt')}
    ds = build_dataset({'name': 'x', 'type': 'AllInOneDataset', 'phase': 'val', 'sources': [source]})
    item = ds[2]
    assert len(ds) == 3 and item['lq_path'].endswith(os.path.join('haze_snow', 'c.png'))
    expected = cv2.imread(str(src / 'haze_snow' / 'c.png'))[..., ::-1].astype(np.float32) / 255
    np.testing.assert_array_equal(item['lq'].numpy().transpose(1, 2, 0), expected)


def test_a_broken_copy_is_refused_naming_the_files(tmp_path, capsys):
    src = make_cdd11(tmp_path / 'dl' / 'test', ['1.png', '2.png'])
    os.remove(src / 'low_rain' / '2.png')
    os.rename(src / 'snow', src / 'snowy')  # a type folder missing (and an unknown one)
    cv2.imwrite(str(src / 'haze' / '3.png'), np.zeros((*SIZE, 3), np.uint8))  # no clean image 3
    cv2.imwrite(str(src / 'rain' / '1.png'), np.zeros((SIZE[0], SIZE[1] + 8, 3), np.uint8))  # other size
    out = tmp_path / 'datasets'
    rc, _, err = run(capsys, '--task', 'cdd11', '--split', 'test', '--src', tmp_path / 'dl', '--out', out)
    assert rc == 1 and '3 problem(s) found; nothing was written' in err  # low_rain lacking 2.png is fine
    assert f'{src}: missing degradation folder(s) snow' in err
    assert f"{src / 'haze' / '3.png'}: no matching clear image (expected {src / 'clear'}/3.*" in err
    assert f"size mismatch: {src / 'rain' / '1.png'} is 48x32 but {src / 'clear' / '1.png'} is 40x32" in err
    assert not out.exists()
    # the train archive's folder given as the test split; no split folder at all; --name does not apply
    train = make_cdd11(tmp_path / 'other' / 'CDD-11_train', ['1.png'])
    rc, _, err = run(capsys, '--task', 'cdd11', '--split', 'test', '--src', train, '--out', out)
    assert rc == 1 and f'{train}: this is the CDD-11 train split, but --split test was given' in err
    rc, _, err = run(capsys, '--task', 'cdd11', '--split', 'test', '--src', tmp_path / 'other', '--out', out)
    assert rc == 1 and 'no CDD-11 test split found (expected' in err and 'CDD-11_test' in err
    with pytest.raises(SystemExit, match='cdd11 writes one folder per degradation type'):
        prepare.main(['--task', 'cdd11', '--split', 'test', '--src', str(train), '--name', 'CDD11'])
    assert not out.exists()


def test_lmdb_needs_every_type_complete_and_reads_like_folders(tmp_path, capsys):
    import torch

    import vlunet  # noqa: F401
    from basicsr.data import build_dataset
    src = make_cdd11(tmp_path / 'dl' / 'train', ['a.png', 'b.png'])
    rc, _, err = run(capsys, '--task', 'cdd11', '--src', tmp_path / 'dl', '--out', tmp_path / 'l', '--lmdb')
    assert rc == 0, err
    root = tmp_path / 'l' / 'cdd11' / 'train'
    assert sorted(os.listdir(root)) == sorted(f'{f}.lmdb' for f in ('clear', ) + TYPES)
    source = {'name': 'low', 'label': 0, 'dataroot_gt': str(root / 'clear.lmdb'), 'dataroot_lq': str(root / 'low.lmdb'),
              'io_backend': {'type': 'lmdb'}}
    ds = build_dataset({'name': 'x', 'type': 'AllInOneDataset', 'phase': 'val', 'sources': [source]})
    assert len(ds) == 2
    expected = torch.from_numpy(cv2.imread(str(src / 'low' / 'b.png'))[..., ::-1].astype(np.float32) / 255)
    assert torch.equal(ds[1]['lq'], expected.permute(2, 0, 1))
    os.remove(src / 'low' / 'b.png')
    rc, _, err = run(capsys, '--task', 'cdd11', '--src', tmp_path / 'dl', '--out', tmp_path / 'l2', '--lmdb')
    assert rc == 1 and 'low: no low version of 1 clear image(s) (e.g. b)' in err
    assert not (tmp_path / 'l2').exists()


def _tiny(method):
    """--force_yml overrides: the method's tiny network (its card) and a run of seconds."""
    import vlunet  # noqa: F401
    from vlunet.archs.card import get_card
    card = get_card(method)
    return [f'network_g:{k}={json.dumps(v)}' for k, v in card.tiny.items()]


@pytest.mark.parametrize('method', ['Restormer'])
def test_tiny_cdd11_folder_prepared_trained_and_tested_under_the_cdd11_protocol(tmp_path, capsys, method):
    names = ['000001.png', '000002.png']
    make_cdd11(tmp_path / 'dl' / 'CDD-11_train', names, seed=2)
    make_cdd11(tmp_path / 'dl' / 'test', names, seed=3)
    out = tmp_path / 'datasets'  # where the option files read (datasets/cdd11/...), relative to the run folder
    for split in ('train', 'test'):
        assert run(capsys, '--task', 'cdd11', '--split', split, '--src', tmp_path / 'dl', '--out', out)[0] == 0
    tiny = _tiny(method)
    train = run_cli(['-m', 'vlunet.train', '-opt', os.path.join(REPO, 'options', 'train', f'{method}_CDD11.yml'),
                     '--force_yml', 'train:total_iter=1', 'datasets:train:gt_size=32', 'datasets:train:batch_size_per_gpu=2',
                     'datasets:train:num_worker_per_gpu=0', 'val:val_freq=1000', 'logger:use_tb_logger=false',
                     'logger:save_checkpoint_freq=1', 'logger:print_freq=1', *tiny], tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    assert (tmp_path / 'experiments' / f'{method}_CDD11' / 'models' / 'net_g_latest.pth').is_file()
    test = run_cli(['-m', 'vlunet.test', '-opt', os.path.join(REPO, 'options', 'test', f'{method}_CDD11.yml'),
                    '--force_yml', 'val:pbar=false', *tiny], tmp_path)
    assert test.returncode == 0, test.stderr[-3000:]
    results = tmp_path / 'results' / f'{method}_CDD11'
    metrics = json.load(open(results / 'metrics.json'))
    assert sorted(metrics) == sorted(f'CDD11_{t}' for t in TYPES)
    for t in TYPES:
        entry = metrics[f'CDD11_{t}']
        assert entry['images'] == len(names) and np.isfinite(entry['psnr']) and 0 < entry['ssim'] <= 1
        protocol = entry['protocol']
        assert protocol['crop'] == 'none'
        assert protocol['metrics']['ssim']['variant'] == 'float_uniform7'
        assert protocol['metrics']['psnr']['variant'] == 'float'
    # the whole image was restored and measured: no crop to a multiple of 16 (40 is not one)
    saved = cv2.imread(str(results / 'visualization' / 'CDD11_low_haze' / f'000002_{method}_CDD11.png'))
    assert saved.shape[:2] == SIZE
    # compared as the mean of the 11 per-type means
    from vlunet.compare import build_table, load_result
    rows, sets = build_table([load_result(str(results))], with_gmacs=False)
    assert len(sets) == len(TYPES)
    assert rows[1]['average'][0] == pytest.approx(np.mean([metrics[s]['psnr'] for s in sets]), abs=1e-9)
    assert rows[1]['average'][1] == pytest.approx(np.mean([metrics[s]['ssim'] for s in sets]), abs=1e-9)
