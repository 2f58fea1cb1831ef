"""vlunet-prepare (vlunet/data/prepare.py; scripts/prepare_all_in_one.py is the same command): every
download layout converts; bad input is refused naming the files and leaves nothing behind; LMDB output reads
like the folders; a failed write leaves no complete-looking output."""
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
import yaml

from vlunet.data import prepare

from conftest import REPO  # noqa: E402
SCRIPT = os.path.join(REPO, 'scripts', 'prepare_all_in_one.py')


@pytest.fixture(scope='module')
def prep():
    return prepare


_RNG = np.random.default_rng(0)


def img(path, size=(24, 32), channels=3, dtype=np.uint8):
    """Write a random image (h, w) to ``path`` (format from the extension); returns the path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    shape = size if channels == 1 else (*size, channels)
    top = 65536 if dtype == np.uint16 else 256
    assert cv2.imwrite(str(path), _RNG.integers(0, top, shape).astype(dtype))
    return str(path)


def tree(root):
    """Every path under ``root`` (relative), including hidden ones."""
    found = set()
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            found.add(os.path.relpath(os.path.join(base, name), root))
    return found


def same_bytes(a, b):
    with open(a, 'rb') as fa, open(b, 'rb') as fb:
        return fa.read() == fb.read()


def pixels(path):
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def run(prep, capsys, *args):
    rc = prep.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------------------------------------
# layouts
# ------------------------------------------------------------------------------------------------
def test_denoise_train_merges_bsd400_and_wed(prep, capsys, tmp_path):
    src = tmp_path / 'dl'
    bsd = [img(src / 'BSD400' / 'test_001.png'), img(src / 'BSD400' / 'test_002.jpg')]
    wed = [img(src / 'exploration_database_and_code' / 'pristine_images' / '00001.bmp')]
    img(src / 'other' / 'ignored.png')  # outside the known folders
    out = tmp_path / 'datasets'
    rc, stdout, err = run(prep, capsys, '--task', 'denoise', '--src', src, '--out', out)
    assert rc == 0, err
    dst = out / 'denoise' / 'train'
    assert sorted(os.listdir(dst)) == ['00001.bmp', 'test_001.png', 'test_002.jpg']
    assert all(same_bytes(p, dst / os.path.basename(p)) for p in bsd + wed)
    meta = (out / 'denoise' / 'meta_info_denoise_train.txt').read_text().splitlines()
    assert sorted(meta) == ['00001.bmp (24,32,3)', 'test_001.png (24,32,3)', 'test_002.jpg (24,32,3)']
    assert 'denoise' in stdout and str(dst) in stdout and ' 3 ' in stdout  # summary table


def test_denoise_train_flat_folder_and_waterloo(prep, capsys, tmp_path):
    flat = tmp_path / 'Denoise'
    img(flat / 'a.png'), img(flat / 'sub' / 'b.bmp')
    rc, _, err = run(prep, capsys, '--task', 'denoise', '--src', flat, '--out', tmp_path / 'o1')
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path / 'o1' / 'denoise' / 'train')) == ['a.png', 'b.bmp']
    wed = tmp_path / 'wed'
    img(wed / 'WaterlooED' / 'x.bmp'), img(wed / 'BSD400' / 'x.png')  # one name twice
    rc, _, err = run(prep, capsys, '--task', 'denoise', '--src', wed, '--out', tmp_path / 'o2')
    assert rc == 1 and 'x.bmp' in err and 'x.png' in err and 'same name' in err
    assert not (tmp_path / 'o2').exists()


def test_cbsd68_takes_clean_images_only(prep, capsys, tmp_path):
    src = tmp_path / 'CBSD68-dataset'
    clean = [img(src / 'CBSD68' / 'original_png' / n) for n in ('0001.png', '0002.png')]
    img(src / 'CBSD68' / 'noisy15' / '0001.png')
    rc, _, err = run(prep, capsys, '--task', 'denoise', '--split', 'test', '--src', src, '--out', tmp_path / 'o')
    assert rc == 0, err
    dst = tmp_path / 'o' / 'denoise' / 'test' / 'CBSD68'
    assert sorted(os.listdir(dst)) == ['0001.png', '0002.png']
    assert same_bytes(clean[0], dst / '0001.png')
    assert (tmp_path / 'o' / 'denoise' / 'meta_info_denoise_test_CBSD68.txt').is_file()


@pytest.mark.parametrize('layout', ['prenet_one_folder', 'prenet_rainy', 'promptir', 'input_target'])
def test_derain_layouts(prep, capsys, tmp_path, layout):
    src = tmp_path / 'rain'
    lq_dir, gt_dir, lq_fmt, gt_fmt = {
        'prenet_one_folder': (src, src, 'rain-{}.png', 'norain-{}.png'),
        'prenet_rainy': (src / 'rainy', src, 'rain-{}.png', 'norain-{}.png'),
        'promptir': (src / 'rainy', src / 'gt', 'rain-{}.png', 'norain-{}.png'),
        'input_target': (src / 'input', src / 'target', '{}.png', '{}.png'),
    }[layout]
    pairs = {k: (img(lq_dir / lq_fmt.format(k)), img(gt_dir / gt_fmt.format(k))) for k in ('001', '002', '010')}
    rc, _, err = run(prep, capsys, '--task', 'derain', '--split', 'test', '--src', src, '--out', tmp_path / 'o')
    assert rc == 0, err
    root = tmp_path / 'o' / 'derain' / 'test' / 'Rain100L'
    for sub in ('input', 'target'):
        assert sorted(os.listdir(root / sub)) == ['001.png', '002.png', '010.png']
    for k, (lq, gt) in pairs.items():
        assert same_bytes(lq, root / 'input' / f'{k}.png') and same_bytes(gt, root / 'target' / f'{k}.png')
    meta = (tmp_path / 'o' / 'derain' / 'meta_info_derain_test_Rain100L.txt').read_text().split()
    assert meta[::2] == ['001.png', '002.png', '010.png']


def test_dehaze_ots_one_pair_per_hazy_image_hard_linked(prep, capsys, tmp_path):
    src = tmp_path / 'OTS_BETA'
    clear = {k: img(src / 'clear' / f'{k}.jpg') for k in ('0001', '0002', '0003')}
    hazy = ['0001_0.8_0.2', '0001_1_0.04', '0002_0.9_0.16']
    for i, name in enumerate(hazy):
        img(src / 'haze' / f'part{i}' / f'{name}.jpg')
    rc, stdout, err = run(prep, capsys, '--task', 'dehaze', '--src', src, '--out', tmp_path / 'o', '--link')
    assert rc == 0, err
    root = tmp_path / 'o' / 'dehaze' / 'train'
    names = [f'{n}.jpg' for n in hazy]
    assert sorted(os.listdir(root / 'input')) == sorted(os.listdir(root / 'target')) == names
    for name in names:
        clean = clear[name.split('_')[0]]
        assert os.stat(root / 'target' / name).st_ino == os.stat(clean).st_ino  # hard link to the clean image
    assert '0003.jpg' in stdout  # clean image without a hazy version: noted, left out


def test_sots_outdoor_png_targets_make_png_pairs(prep, capsys, tmp_path):
    src = tmp_path / 'SOTS' / 'outdoor'
    gts = {k: img(src / 'gt' / f'{k}.png') for k in ('0001', '0002')}
    hazy = {k: img(src / 'hazy' / f'{k}_0.8_0.2.jpg') for k in ('0001', '0002')}
    rc, stdout, err = run(prep, capsys, '--task', 'dehaze', '--split', 'test', '--src', src, '--out', tmp_path / 'o')
    assert rc == 0, err
    root = tmp_path / 'o' / 'dehaze' / 'test' / 'SOTS_outdoor'
    for k in gts:
        name = f'{k}_0.8_0.2.png'
        assert same_bytes(gts[k], root / 'target' / name)
        np.testing.assert_array_equal(pixels(root / 'input' / name), pixels(hazy[k]))  # lossless re-encode
    assert 're-encoded' in stdout
    # a test set needs every clean image paired
    img(src / 'gt' / '0003.png')
    rc, _, err = run(prep, capsys, '--task', 'dehaze', '--split', 'test', '--src', src, '--out', tmp_path / 'o2')
    assert rc == 1 and '0003.png' in err and 'no hazy version' in err


@pytest.mark.parametrize('split', ['train', 'test'])
def test_gopro_names_frames_by_sequence(prep, capsys, tmp_path, split):
    src = tmp_path / 'GOPRO_Large'
    for seq in ('GOPR0372_07_00', 'GOPR0374_11_00'):
        for frame in ('000047.png', '000048.png'):
            img(src / split / seq / 'blur' / frame), img(src / split / seq / 'sharp' / frame)
            img(src / split / seq / 'blur_gamma' / frame)
    other = 'test' if split == 'train' else 'train'
    img(src / other / 'GOPR0000_00_00' / 'blur' / '000001.png')  # the other split is not read
    rc, _, err = run(prep, capsys, '--task', 'deblur', '--split', split, '--src', src, '--out', tmp_path / 'o')
    assert rc == 0, err
    root = tmp_path / 'o' / 'deblur' / ('train' if split == 'train' else 'test/GoPro')
    expected = ['GOPR0372_07_00_000047.png', 'GOPR0372_07_00_000048.png',
                'GOPR0374_11_00_000047.png', 'GOPR0374_11_00_000048.png']
    assert sorted(os.listdir(root / 'input')) == sorted(os.listdir(root / 'target')) == expected
    assert same_bytes(src / split / 'GOPR0374_11_00' / 'sharp' / '000048.png',
                      root / 'target' / 'GOPR0374_11_00_000048.png')


def test_lol_train_and_test(prep, capsys, tmp_path):
    src = tmp_path / 'LOLdataset'
    for split_dir, names in (('our485', ('2.png', '5.png')), ('eval15', ('1.png',))):
        for n in names:
            img(src / split_dir / 'low' / n), img(src / split_dir / 'high' / n)
    assert run(prep, capsys, '--task', 'lowlight', '--src', src, '--out', tmp_path / 'o')[0] == 0
    assert run(prep, capsys, '--task', 'lowlight', '--split', 'test', '--src', src, '--out', tmp_path / 'o')[0] == 0
    assert sorted(os.listdir(tmp_path / 'o' / 'lowlight' / 'train' / 'input')) == ['2.png', '5.png']
    assert os.listdir(tmp_path / 'o' / 'lowlight' / 'test' / 'LOL' / 'target') == ['1.png']
    test_input = tmp_path / 'o' / 'lowlight' / 'test' / 'LOL' / 'input' / '1.png'
    assert same_bytes(src / 'eval15' / 'low' / '1.png', test_input)


def test_folder_output_feeds_all_in_one_dataset_through_meta_info(prep, capsys, tmp_path):
    import vlunet  # noqa: F401
    from basicsr.data import build_dataset
    src = tmp_path / 'rain'
    for k in ('1', '2'):
        img(src / f'rain-{k}.png'), img(src / f'norain-{k}.png')
    assert run(prep, capsys, '--task', 'derain', '--src', src, '--out', tmp_path / 'o')[0] == 0
    root = tmp_path / 'o' / 'derain' / 'train'
    source = {'name': 'rain', 'label': 4, 'dataroot_gt': str(root / 'target'), 'dataroot_lq': str(root / 'input'),
              'meta_info_file': str(tmp_path / 'o' / 'derain' / 'meta_info_derain_train.txt')}
    ds = build_dataset({'name': 'x', 'type': 'AllInOneDataset', 'phase': 'val', 'sources': [source]})
    assert len(ds) == 2 and ds[1]['lq_path'].endswith('2.png')


# ------------------------------------------------------------------------------------------------
# refusals: all problems named, nothing written
# ------------------------------------------------------------------------------------------------
def test_mismatched_names_are_refused_naming_every_file(prep, capsys, tmp_path):
    src = tmp_path / 'pairs'
    for n in ('a.png', 'b.png'):
        img(src / 'input' / n), img(src / 'target' / n)
    img(src / 'input' / 'only_in.png'), img(src / 'target' / 'only_tg.png')
    out = tmp_path / 'o'
    rc, _, err = run(prep, capsys, '--task', 'derain', '--src', src, '--out', out)
    assert rc == 1
    assert str(src / 'input' / 'only_in.png') in err and str(src / 'target' / 'only_tg.png') in err
    assert 'nothing was written' in err and '2 problem(s)' in err
    assert not out.exists()


def test_mismatched_sizes_are_refused_naming_both_files(prep, capsys, tmp_path):
    src = tmp_path / 'LOL'
    img(src / 'our485' / 'low' / '1.png', size=(24, 32)), img(src / 'our485' / 'high' / '1.png', size=(24, 30))
    img(src / 'our485' / 'low' / '2.png', size=(20, 32)), img(src / 'our485' / 'high' / '2.png', size=(24, 32))
    img(src / 'our485' / 'low' / '3.png'), img(src / 'our485' / 'high' / '3.png', channels=1)  # gray is fine
    out = tmp_path / 'o'
    out.mkdir()
    rc, _, err = run(prep, capsys, '--task', 'lowlight', '--src', src, '--out', out)
    assert rc == 1 and err.count('size mismatch') == 2
    assert f"{src / 'our485' / 'low' / '1.png'} is 32x24 but {src / 'our485' / 'high' / '1.png'} is 30x24" in err
    assert str(src / 'our485' / 'low' / '2.png') in err and '3.png' not in err
    assert tree(out) == set()


def test_corrupt_images_are_named(prep, capsys, tmp_path):
    src = tmp_path / 'GOPRO'
    seq = src / 'train' / 'GOPR0001_00_00'
    for frame in ('000001', '000002', '000003'):
        img(seq / 'blur' / f'{frame}.jpg', size=(64, 80)), img(seq / 'sharp' / f'{frame}.jpg', size=(64, 80))
    (seq / 'blur' / '000001.jpg').write_bytes(b'not an image at all')
    data = (seq / 'sharp' / '000002.jpg').read_bytes()
    (seq / 'sharp' / '000002.jpg').write_bytes(data[:len(data) * 3 // 4])  # truncated ...
    assert pixels(seq / 'sharp' / '000002.jpg') is not None  # ... which cv2.imread fills in silently
    out = tmp_path / 'o'
    rc, _, err = run(prep, capsys, '--task', 'deblur', '--src', src, '--out', out)
    assert rc == 1
    assert f"{seq / 'blur' / '000001.jpg'}: cannot decode" in err
    # OpenCV 5's imdecode (what the dataset uses) refuses it; where it does not, Pillow's check does
    assert re.search(re.escape(str(seq / 'sharp' / '000002.jpg')) + ': (cannot decode|corrupt JPEG)', err)
    assert '000003' not in err and not out.exists()


def test_truncated_jpeg_is_named_even_where_cv2_decodes_it(prep, tmp_path, monkeypatch):
    path = img(tmp_path / 'a.jpg', size=(64, 80))
    data = open(path, 'rb').read()
    with open(path, 'wb') as f:
        f.write(data[:len(data) * 3 // 4])
    # older OpenCV builds fill a truncated JPEG in grey instead of failing
    monkeypatch.setattr(prep.cv2, 'imdecode', lambda buf, flags: np.zeros((64, 80, 3), np.uint8))
    with pytest.raises(prep.Problem, match=re.escape(path) + ': (corrupt or truncated|truncated or corrupt) JPEG'):
        prep.read_image(path)
    assert prep.read_image(img(tmp_path / 'b.jpg')).shape == (64, 80, 3)  # an intact JPEG passes


def test_layout_not_found_and_missing_source(prep, capsys, tmp_path):
    (tmp_path / 'empty').mkdir()
    rc, _, err = run(prep, capsys, '--task', 'dehaze', '--src', tmp_path / 'empty', '--out', tmp_path / 'o')
    assert rc == 1 and 'expected a hazy folder' in err
    rc, _, err = run(prep, capsys, '--task', 'lowlight', '--src', tmp_path / 'nope', '--out', tmp_path / 'o')
    assert rc == 1 and f"{tmp_path / 'nope'}: source folder not found" in err
    hazy = tmp_path / 'h'
    img(hazy / 'hazy' / '0009_0.8_0.2.png'), img(hazy / 'clear' / '0001.png')
    rc, _, err = run(prep, capsys, '--task', 'dehaze', '--src', hazy, '--out', tmp_path / 'o')
    assert rc == 1 and '0009_0.8_0.2.png: no matching clean image' in err and '0009.*' in err
    assert not (tmp_path / 'o').exists()


def test_existing_output_needs_overwrite(prep, capsys, tmp_path):
    src = tmp_path / 'pairs'
    img(src / 'input' / 'a.png'), img(src / 'target' / 'a.png')
    out = tmp_path / 'o'
    assert run(prep, capsys, '--task', 'derain', '--src', src, '--out', out)[0] == 0
    stale = out / 'derain' / 'train' / 'input' / 'stale.png'
    img(stale)
    rc, _, err = run(prep, capsys, '--task', 'derain', '--src', src, '--out', out)
    assert rc == 1 and 'already exists' in err and stale.exists()
    assert run(prep, capsys, '--task', 'derain', '--src', src, '--out', out, '--overwrite')[0] == 0
    assert not stale.exists() and os.listdir(out / 'derain' / 'train' / 'input') == ['a.png']
    assert not [p for p in tree(out) if prep.STAGING_PREFIX in p]


def test_check_only_writes_nothing(prep, capsys, tmp_path):
    src = tmp_path / 'pairs'
    img(src / 'input' / 'a.png'), img(src / 'target' / 'a.png')
    rc, stdout, _ = run(prep, capsys, '--task', 'derain', '--src', src, '--out', tmp_path / 'o', '--check-only')
    assert rc == 0 and 'checked only' in stdout and not (tmp_path / 'o').exists()


def test_config_checks_every_job_before_writing(prep, capsys, tmp_path):
    good, bad = tmp_path / 'good', tmp_path / 'bad'
    img(good / 'input' / 'a.png'), img(good / 'target' / 'a.png')
    img(bad / 'our485' / 'low' / '1.png'), img(bad / 'our485' / 'high' / '2.png')
    out = tmp_path / 'o'
    cfg = tmp_path / 'prepare.yml'
    jobs = [{'task': 'derain', 'split': 'train', 'src': str(good)},
            {'task': 'derain', 'split': 'test', 'src': str(good), 'name': 'Rain100H'},
            {'task': 'lowlight', 'src': str(bad)}]
    cfg.write_text(yaml.safe_dump({'out': str(out), 'link': True, 'jobs': jobs}))
    rc, _, err = run(prep, capsys, '--config', cfg)
    assert rc == 1 and str(bad / 'our485' / 'low' / '1.png') in err and not out.exists()
    cfg.write_text(yaml.safe_dump({'out': str(out), 'link': True, 'jobs': jobs[:2]}))
    rc, stdout, err = run(prep, capsys, '--config', cfg)
    assert rc == 0, err
    assert (out / 'derain' / 'test' / 'Rain100H' / 'input' / 'a.png').is_file()
    assert os.stat(out / 'derain' / 'train' / 'target' / 'a.png').st_ino == os.stat(good / 'target' / 'a.png').st_ino
    assert 'test/Rain100H' in stdout
    cfg.write_text(yaml.safe_dump({'jobs': [{'task': 'derain', 'source': str(good)}]}))
    with pytest.raises(SystemExit, match=r"jobs\[0\]: unknown key\(s\) \['source'\]"):
        prep.main(['--config', str(cfg)])


# ------------------------------------------------------------------------------------------------
# LMDB
# ------------------------------------------------------------------------------------------------
def _dataset(gt, lq=None):
    import vlunet  # noqa: F401
    from basicsr.data import build_dataset
    if lq is None:
        source = {'name': 'noise', 'label': 0, 'dataroot_gt': str(gt), 'degradation': {'type': 'gaussian_noise',
                                                                                       'sigma': 15}}
    else:
        source = {'name': 'rain', 'label': 4, 'dataroot_gt': str(gt), 'dataroot_lq': str(lq)}
    if str(gt).endswith('.lmdb'):
        source['io_backend'] = {'type': 'lmdb'}
    return build_dataset({'name': 'x', 'type': 'AllInOneDataset', 'phase': 'val', 'sources': [source]})


def test_lmdb_reads_the_same_pixels_as_folders(prep, capsys, tmp_path, monkeypatch):
    import torch
    src = tmp_path / 'rain'
    for k in ('1', '2', '3'):
        size = (20 + int(k), 30)
        img(src / 'rainy' / f'rain-{k}.jpg', size=size), img(src / f'norain-{k}.jpg', size=size)
    img(src / 'rainy' / 'rain-4.png', size=(16, 16), dtype=np.uint16)  # 16-bit input, gray target
    img(src / 'norain-4.png', size=(16, 16), channels=1)
    folders, lmdbs = tmp_path / 'folders', tmp_path / 'lmdbs'
    assert run(prep, capsys, '--task', 'derain', '--src', src, '--out', folders)[0] == 0
    rc, stdout, err = run(prep, capsys, '--task', 'derain', '--src', src, '--out', lmdbs, '--lmdb')
    assert rc == 0, err
    root = lmdbs / 'derain' / 'train'
    assert sorted(os.listdir(root)) == ['input.lmdb', 'target.lmdb']
    meta = (root / 'target.lmdb' / 'meta_info.txt').read_text().splitlines()
    assert meta == ['1.png (21,30,3) 1', '2.png (22,30,3) 1', '3.png (23,30,3) 1', '4.png (16,16,1) 1']
    assert (root / 'input.lmdb' / 'meta_info.txt').read_text().split()[::3] == ['1.png', '2.png', '3.png', '4.png']
    a = _dataset(folders / 'derain' / 'train' / 'target', folders / 'derain' / 'train' / 'input')
    b = _dataset(root / 'target.lmdb', root / 'input.lmdb')
    assert len(a) == len(b) == 4
    for i in range(4):
        assert torch.equal(a[i]['lq'], b[i]['lq']) and torch.equal(a[i]['gt'], b[i]['gt'])
    assert str(root) in stdout
    # clean-only sets become one LMDB next to where the folder would be (relative paths work too)
    clean = tmp_path / 'clean'
    img(clean / 'BSD400' / 'x.png'), img(clean / 'BSD400' / 'y.jpg')
    monkeypatch.chdir(tmp_path)
    assert run(prep, capsys, '--task', 'denoise', '--src', 'clean', '--out', 'lmdbs', '--lmdb')[0] == 0
    ds = _dataset(lmdbs / 'denoise' / 'train.lmdb')
    assert len(ds) == 2 and torch.equal(ds[1]['gt'], _dataset(clean / 'BSD400')[1]['gt'])


def test_failed_lmdb_write_leaves_no_lmdb(prep, capsys, tmp_path, monkeypatch):
    import vlunet  # noqa: F401
    from basicsr.utils import lmdb_util
    real = lmdb_util.make_lmdb_from_imgs
    calls = []

    def fail_on_second(data_path, lmdb_path, *args, **kwargs):
        calls.append(lmdb_path)
        if len(calls) == 2:  # the second LMDB dies after writing its data and meta_info.txt
            real(data_path, lmdb_path, *args, **kwargs)
            raise OSError('disk full (simulated)')
        return real(data_path, lmdb_path, *args, **kwargs)

    monkeypatch.setattr(lmdb_util, 'make_lmdb_from_imgs', fail_on_second)
    src = tmp_path / 'LOL'
    for n in ('1.png', '2.png'):
        img(src / 'eval15' / 'low' / n), img(src / 'eval15' / 'high' / n)
    out = tmp_path / 'o'
    (out / 'lowlight').mkdir(parents=True)  # exists before: stays, but nothing new is left in it
    rc, _, err = run(prep, capsys, '--task', 'lowlight', '--split', 'test', '--src', src, '--out', out, '--lmdb')
    assert rc == 1 and 'disk full (simulated)' in err and len(calls) == 2
    assert tree(out) == {'lowlight'}
    assert not any(p.endswith('meta_info.txt') or p.endswith('.lmdb') for p in tree(tmp_path))


def test_failed_folder_write_leaves_nothing_and_keeps_the_old_output(prep, capsys, tmp_path, monkeypatch):
    src = tmp_path / 'pairs'
    for n in ('a.png', 'b.png', 'c.png'):
        img(src / 'input' / n), img(src / 'target' / n)
    out = tmp_path / 'o'
    assert run(prep, capsys, '--task', 'derain', '--src', src, '--out', out)[0] == 0
    before = tree(out)
    real, count = prep.shutil.copyfileobj, []

    def copy_then_fail(*args):  # the atomic writer's fourth file fails while being written
        count.append(args)
        if len(count) == 4:
            raise OSError('disk full (simulated)')
        return real(*args)

    monkeypatch.setattr(prep.shutil, 'copyfileobj', copy_then_fail)
    rc, _, err = run(prep, capsys, '--task', 'derain', '--src', src, '--out', out, '--overwrite')
    assert rc == 1 and 'disk full (simulated)' in err
    assert tree(out) == before  # the previous complete output is untouched, no staging folder is left
    count.clear()
    rc, _, err = run(prep, capsys, '--task', 'derain', '--split', 'test', '--src', src, '--out', tmp_path / 'new')
    assert rc == 1 and not (tmp_path / 'new').exists()


def test_failure_while_renaming_into_place_restores_the_old_output(prep, capsys, tmp_path, monkeypatch):
    src = tmp_path / 'pairs'
    old = img(src / 'input' / 'a.png'), img(src / 'target' / 'a.png')
    out = tmp_path / 'o'
    assert run(prep, capsys, '--task', 'derain', '--src', src, '--out', out)[0] == 0
    before, old_bytes = tree(out), (out / 'derain' / 'train' / 'target' / 'a.png').read_bytes()
    img(old[0]), img(old[1])  # new content
    real_rename, failed = os.rename, []

    def rename(a, b):
        staged = os.path.basename(os.path.dirname(a)).startswith(prep.STAGING_PREFIX)
        if staged and os.path.basename(a) == 'input' and not failed:  # the new input/, once
            failed.append(a)
            raise OSError('rename failed (simulated)')
        return real_rename(a, b)

    monkeypatch.setattr(prep.os, 'rename', rename)  # target is moved in first, then input fails
    rc, _, err = run(prep, capsys, '--task', 'derain', '--src', src, '--out', out, '--overwrite')
    assert rc == 1 and 'rename failed (simulated)' in err
    assert tree(out) == before
    assert (out / 'derain' / 'train' / 'target' / 'a.png').read_bytes() == old_bytes


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def test_command_line_exit_codes_and_messages(tmp_path):
    src = tmp_path / 'pairs'
    img(src / 'input' / 'a.png'), img(src / 'target' / 'a.png', size=(10, 10))
    cmd = [sys.executable, SCRIPT, '--task', 'derain', '--src', str(src), '--out', str(tmp_path / 'o')]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and 'size mismatch' in res.stderr and str(src / 'input' / 'a.png') in res.stderr
    img(src / 'target' / 'a.png')
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split('\n')[0].split() == ['task', 'split', 'pairs', 'output']
    assert res.stdout.split('\n')[2].split() == ['derain', 'train', '1', str(tmp_path / 'o' / 'derain' / 'train')]
    res = subprocess.run([sys.executable, SCRIPT, '--task', 'derain'], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and '--src' in res.stderr


def test_rain100l_numbered_files_without_a_partner_are_named(prep, tmp_path):
    for name in ('rain-1', 'norain-1', 'rain-2', 'norain-3'):
        img(tmp_path / f'{name}.png')
    problems = []
    items = prep.collect_derain(str(tmp_path), 'train', problems)
    assert len(items) == 1
    assert problems == [f'{tmp_path}/rain-2.png: no matching clean image (expected norain-2.* under {tmp_path})',
                        f'{tmp_path}/norain-3.png: no matching rainy image (expected rain-3.* under {tmp_path})']


def test_vlunet_prepare_is_the_module_and_the_script_wraps_it():
    import importlib
    with open(os.path.join(REPO, 'setup.py')) as f:
        entries = re.findall(r"'vlunet-prepare=([\w.]+):(\w+)'", f.read())
    assert entries == [('vlunet.data.prepare', 'main')]
    assert getattr(importlib.import_module(entries[0][0]), entries[0][1]) is prepare.main
    with open(SCRIPT) as f:
        assert 'from vlunet.data.prepare import main' in f.read()
