"""vlunet-restore on images nobody tuned for: odd sizes, gray, RGBA, 16-bit, and a text file.

The engine behind it (``vlunet.inference.RestorationEngine``, shared with vlunet-app) is tested
in-process in tests/test_app.py; ``model_files`` and the tiny networks here serve both."""
import json

import cv2
import numpy as np
import torch

from conftest import run_cli, write_yaml

DGUNET = {'type': 'DGUNet', 'n_feat': 8, 'scale_unetfeats': 4, 'scale_orsnetfeats': 4, 'depth': 1}
TINY_VLUNET = {'type': 'VLUNet', 'de_dim': 3, 'dim': 16, 'num_blocks': [1, 1, 1, 1], 'num_refinement_blocks': 1,
               'heads': [1, 2, 4, 8]}
TINY_CLIP = {'type': 'DegradationCLIP', 'clip_model': 'vlunet-tiny', 'pretrained': None,
             'prompts': ['image with noise', 'image with haze', 'image with rain']}


def _inputs(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    cv2.imwrite(str(folder / 'photo.png'), rng.integers(0, 256, (150, 140, 3), dtype=np.uint8))
    cv2.imwrite(str(folder / 'odd.png'), rng.integers(0, 256, (77, 123, 3), dtype=np.uint8))
    cv2.imwrite(str(folder / 'gray.png'), rng.integers(0, 256, (30, 41), dtype=np.uint8))
    rgba = rng.integers(0, 256, (33, 20, 4), dtype=np.uint8)
    cv2.imwrite(str(folder / 'rgba.png'), rgba)
    cv2.imwrite(str(folder / 'deep.png'), rng.integers(0, 65536, (24, 37, 3), dtype=np.uint16))
    (folder / 'notes.txt').write_text('not an image')
    return rgba


def model_files(tmp_path, network_g, network_clip=None):
    """A tmp option file + untrained weights of ``network_g`` (and ``network_clip``, random init)."""
    import vlunet  # noqa: F401
    from basicsr.archs import build_network
    torch.manual_seed(0)
    net = build_network(dict(network_g))
    weights = tmp_path / 'net_g.pth'
    torch.save({'params': net.state_dict()}, weights)
    opt = {'name': 'restore_test', 'network_g': network_g, 'path': {'pretrain_network_g': str(weights)}}
    if network_clip:
        opt['network_clip'] = network_clip
    return write_yaml(tmp_path / 'opt.yml', opt)


def test_restore_keeps_size_and_kind_and_skips_non_images(tmp_path):
    rgba = _inputs(tmp_path / 'in')
    opt = model_files(tmp_path, DGUNET)
    proc = run_cli(['-m', 'vlunet.restore', '-opt', opt, '-i', str(tmp_path / 'in'), '-o', str(tmp_path / 'out'),
                    '--tile', '64', '--tile-overlap', '16', '--save-stages'], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'skipped notes.txt: not an image file name (expected .png .jpg' in proc.stdout
    # DGUNet records no unfolding stages: said once per image, nothing drawn, nothing run twice
    assert proc.stdout.count('no stage grid: DGUNet does not record its unfolding stages') == 5
    assert not list((tmp_path / 'out').glob('*_stages.png'))
    for name in ('photo.png', 'odd.png', 'gray.png', 'rgba.png', 'deep.png'):
        src = cv2.imread(str(tmp_path / 'in' / name), cv2.IMREAD_UNCHANGED)
        out = cv2.imread(str(tmp_path / 'out' / name), cv2.IMREAD_UNCHANGED)
        assert out is not None, name
        assert out.shape == src.shape and out.dtype == src.dtype, name
    out_rgba = cv2.imread(str(tmp_path / 'out' / 'rgba.png'), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(out_rgba[..., 3], rgba[..., 3])  # alpha kept
    report = json.load(open(tmp_path / 'out' / 'report.json'))
    assert sorted(r['image'] for r in report['images']) == ['deep.png', 'gray.png', 'odd.png', 'photo.png',
                                                            'rgba.png']
    assert [entry['file'] for entry in report['skipped']] == ['notes.txt']
    assert not (tmp_path / 'out' / 'notes.txt').exists()
    assert (tmp_path / 'out' / 'report.csv').is_file()


def test_restore_errors_name_what_is_missing(tmp_path):
    opt = model_files(tmp_path, DGUNET)
    proc = run_cli(['-m', 'vlunet.restore', '-opt', opt, '-i', str(tmp_path / 'nope'), '-o', str(tmp_path / 'o')],
                   tmp_path)
    assert proc.returncode == 2 and 'input not found' in proc.stderr and 'nope' in proc.stderr
    (tmp_path / 'in').mkdir()
    proc = run_cli(['-m', 'vlunet.restore', '-opt', opt, '-i', str(tmp_path / 'in'), '-o', str(tmp_path / 'o'),
                    '--model', str(tmp_path / 'missing.pth')], tmp_path)
    assert proc.returncode == 2 and 'missing.pth' in proc.stderr



def test_restore_with_clip_reports_types_and_saves_stages(tmp_path):
    folder = tmp_path / 'in'
    folder.mkdir()
    cv2.imwrite(str(folder / 'odd.png'), np.random.default_rng(0).integers(0, 256, (37, 29, 3), dtype=np.uint8))
    opt = model_files(tmp_path, TINY_VLUNET, TINY_CLIP)
    proc = run_cli(['-m', 'vlunet.restore', '-opt', opt, '-i', str(folder / 'odd.png'), '-o', str(tmp_path / 'out'),
                    '--save-stages', '--device', 'cpu'], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert cv2.imread(str(tmp_path / 'out' / 'odd.png')).shape == (37, 29, 3)
    grid = cv2.imread(str(tmp_path / 'out' / 'odd_stages.png'))
    assert grid is not None and grid.shape[0] > 8 * 100  # input row + eight stage rows
    row = json.load(open(tmp_path / 'out' / 'report.json'))['images'][0]
    probs = {k: v for k, v in row.items() if k.startswith('p(')}
    assert list(probs) == ['p(image with noise)', 'p(image with haze)', 'p(image with rain)']
    assert abs(sum(probs.values()) - 1) < 1e-4
    assert row['top_type'] == max(probs, key=probs.get)[2:-1]


# ------------------------------------------------- nothing of the user's is lost, every failure named
def _tree(folder):
    """{relative path: bytes} of every file under ``folder`` (to show it is unchanged)."""
    import os
    out = {}
    for base, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(base, name)
            out[os.path.relpath(path, folder)] = open(path, 'rb').read() if not os.path.islink(path) else 'link'
    return out


def _restore(args, capsys):
    """vlunet-restore in this process (the model is tiny): (status, stdout, stderr)."""
    from vlunet.restore import main
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def _photos(folder, names=('a.png', 'b.png')):
    folder.mkdir()
    for i, name in enumerate(names):
        cv2.imwrite(str(folder / name), np.full((20, 24, 3), 40 * i, np.uint8))
    return folder


def test_output_that_is_holds_or_is_inside_the_input_is_refused_and_the_input_is_unchanged(tmp_path, capsys):
    import os
    opt = model_files(tmp_path, DGUNET)
    photos = _photos(tmp_path / 'photos')
    os.symlink(photos, tmp_path / 'link_to_photos')
    (tmp_path / 'file.txt').write_text('a file, not a folder')
    before = _tree(photos)
    cases = {
        photos: 'is the input folder',
        tmp_path / 'photos' / '..' / 'photos': 'is the input folder',
        tmp_path / 'link_to_photos': 'is the input folder',
        photos / 'restored': 'is inside the input folder',
        tmp_path: 'holds the input folder',
        tmp_path / 'file.txt': 'is a file; expected a folder',
    }
    for output, reason in cases.items():
        status, out, err = _restore(['-opt', opt, '-i', photos, '-o', output], capsys)
        assert status == 2 and reason in err and 'Nothing was written' in err, (output, err)
        assert 'Traceback' not in err
    # one image as the input: its own folder (or any folder above it) would overwrite it
    for output in (photos, tmp_path):
        status, _, err = _restore(['-opt', opt, '-i', photos / 'a.png', '-o', output], capsys)
        assert status == 2 and 'holds the input' in err
    assert _tree(photos) == before and (tmp_path / 'file.txt').read_text() == 'a file, not a folder'


def test_earlier_results_are_kept_unless_overwrite(tmp_path, capsys):
    opt = model_files(tmp_path, DGUNET)
    photos = _photos(tmp_path / 'photos')
    out = tmp_path / 'restored'
    assert _restore(['-opt', opt, '-i', photos, '-o', out], capsys)[0] == 0
    first = _tree(out)
    assert sorted(first) == ['a.png', 'b.png', 'report.csv', 'report.json']
    status, _, err = _restore(['-opt', opt, '-i', photos, '-o', out], capsys)
    assert status == 2 and 'holds results of an earlier run' in err and 'report.json' in err and '--overwrite' in err
    assert _tree(out) == first
    # a folder holding other files (not results this run would write) is fine
    other = tmp_path / 'other'
    other.mkdir()
    (other / 'notes.txt').write_text('mine')
    assert _restore(['-opt', opt, '-i', photos / 'a.png', '-o', other], capsys)[0] == 0
    assert (other / 'notes.txt').read_text() == 'mine' and (other / 'a.png').is_file()
    # --overwrite replaces them; the report is this run's
    (photos / 'b.png').unlink()
    status, stdout, _ = _restore(['-opt', opt, '-i', photos, '-o', out, '--overwrite'], capsys)
    assert status == 0 and 'restored 1 image(s)' in stdout
    assert [r['image'] for r in json.load(open(out / 'report.json'))['images']] == ['a.png']


def test_every_unreadable_file_is_named_with_its_reason_and_the_others_are_restored(tmp_path, capsys):
    import os

    from test_app import _png_header_only
    opt = model_files(tmp_path, DGUNET)
    photos = _photos(tmp_path / 'photos', ('fine.png', 'z_last.png'))
    (photos / 'huge.png').write_bytes(_png_header_only(16000, 16000))   # 16000 x 16000 in its header
    (photos / 'empty.png').write_bytes(b'')
    (photos / 'notes.png').write_text('not an image')
    (photos / 'cut.png').write_bytes(cv2.imencode('.png', np.zeros((64, 64, 3), np.uint8) + 7)[1].tobytes()[:60])
    ok, jpg = cv2.imencode('.jpg', np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    (photos / 'cut.jpg').write_bytes(jpg.tobytes()[:len(jpg) // 2])
    cv2.imwrite(str(photos / 'float.tif'), np.random.default_rng(0).random((8, 8, 3), dtype=np.float32))
    (photos / 'folder.png').mkdir()
    (photos / 'sub').mkdir()  # an ordinary sub-folder: not searched, not listed
    os.symlink(tmp_path / 'gone.png', photos / 'gone.png')
    (photos / 'readme.txt').write_text('notes')
    locked = photos / 'locked.png'
    cv2.imwrite(str(locked), np.zeros((8, 8, 3), np.uint8))
    os.chmod(locked, 0)
    status, out, err = _restore(['-opt', opt, '-i', photos, '-o', tmp_path / 'out'], capsys)
    os.chmod(locked, 0o644)
    assert status == 0, err
    report = json.load(open(tmp_path / 'out' / 'report.json'))
    reasons = {entry['file']: entry['reason'] for entry in report['skipped']}
    expected = {
        'huge.png': 'the image is 16000x16000 (256.0 megapixels), above the limit of 4.2 megapixels; --max-pixels',
        'empty.png': 'empty file',
        'notes.png': 'not an image (its content is no image format',
        'cut.png': 'truncated or corrupt PNG',
        'cut.jpg': 'truncated or corrupt JPEG',
        'float.tif': 'unsupported pixel type float32',
        'folder.png': 'a folder, not an image file',
        'gone.png': 'dangling link',
        'readme.txt': 'not an image file name',
    }
    if os.geteuid() != 0:  # root reads it anyway
        expected['locked.png'] = 'permission denied'
    for name, reason in expected.items():
        assert reasons[name].startswith(reason), (name, reasons[name])
        assert f'skipped {name}: {reason}' in out
    assert 'sub' not in reasons and 'skipped (not an image)' not in out
    restored = sorted(r['image'] for r in report['images'])
    assert {'fine.png', 'z_last.png'} <= set(restored) and not set(restored) & set(expected)
    assert cv2.imread(str(tmp_path / 'out' / 'z_last.png')).shape == (20, 24, 3)
    # --max-pixels 0 lifts the limit (the header-only PNG then fails to decode, named as such)
    status, out, _ = _restore(['-opt', opt, '-i', photos / 'huge.png', '-o', tmp_path / 'out2', '--max-pixels', '0'],
                              capsys)
    assert status == 0 and 'skipped huge.png: truncated or corrupt PNG' in out


def test_long_file_names_complete_or_are_refused_by_name(tmp_path, capsys, monkeypatch):
    import os

    import vlunet.utils.atomic as atomic
    opt = model_files(tmp_path, TINY_VLUNET)
    long_name = 'x' * 240 + '.png'  # 244 bytes: the atomic writer's temporary name used to need 258
    photos = _photos(tmp_path / 'photos', (long_name, 'y' * 246 + '.png', 'short.png'))
    status, out, err = _restore(['-opt', opt, '-i', photos, '-o', tmp_path / 'out', '--save-stages'], capsys)
    assert status == 0, err
    assert cv2.imread(str(tmp_path / 'out' / long_name)).shape == (20, 24, 3)
    assert (tmp_path / 'out' / ('x' * 240 + '_stages.png')).is_file()
    # 'y' * 246 + '_stages.png' is 257 bytes: that grid is refused by name, the image itself is written
    assert (tmp_path / 'out' / ('y' * 246 + '.png')).is_file()
    assert 'no stage grid written: its name' in out and 'too long' in out
    assert not [n for n in os.listdir(tmp_path / 'out') if n.endswith('.tmp')]
    # an output folder that takes shorter names than the input's (e.g. eCryptfs: 143 bytes)
    out2 = str(tmp_path / 'out2')
    real = atomic.name_max
    monkeypatch.setattr(atomic, 'name_max', lambda folder: 143 if os.path.abspath(folder) == out2 else real(folder))
    status, out, err = _restore(['-opt', opt, '-i', photos, '-o', out2], capsys)
    assert status == 0, err
    assert f'skipped {long_name}: file name too long for the output folder' in out
    assert sorted(os.listdir(out2)) == ['report.csv', 'report.json', 'short.png']


def test_tile_and_output_mistakes_are_one_clear_error(tmp_path, capsys):
    opt = model_files(tmp_path, DGUNET)
    photos = _photos(tmp_path / 'photos')
    for extra, message in ((['--tile', '8', '--tile-overlap', '8'], '--tile 8: expected at least 32 pixels'),
                           (['--tile', '64', '--tile-overlap', '64'], '--tile-overlap (64 px) must be smaller than'),
                           (['--tile', '64', '--tile-overlap', '-1'], '--tile-overlap -1: expected 0 or more'),
                           (['--max-pixels', '-5'], '--max-pixels must be >= 0')):
        status, _, err = _restore(['-opt', opt, '-i', photos, '-o', tmp_path / 'out', *extra], capsys)
        assert status == 2 and message in err and 'Traceback' not in err, err
    assert not (tmp_path / 'out').exists()


def test_pickled_checkpoint_and_wrong_architecture_give_one_clear_reason(tmp_path, capsys):
    import argparse

    import vlunet  # noqa: F401
    from basicsr.archs import build_network
    photos = _photos(tmp_path / 'photos', ('a.png', ))
    opt = model_files(tmp_path, DGUNET)
    net = build_network(dict(DGUNET))
    pickled = tmp_path / 'pickled.pth'
    torch.save({'params': net.state_dict(), 'args': argparse.Namespace(lr=1)}, pickled)
    status, _, err = _restore(['-opt', opt, '--model', pickled, '-i', photos, '-o', tmp_path / 'o1'], capsys)
    assert status == 2 and '--trust-pickle' in err and 'argparse.Namespace' in err
    # ... and the flag it names is accepted
    status, out, err = _restore(['-opt', opt, '--model', pickled, '--trust-pickle', '-i', photos, '-o', tmp_path / 'o2'],
                                capsys)
    assert status == 0 and 'restored 1 image' in out, err
    # a checkpoint of another architecture: one line that says how it differs, no per-key warnings
    (tmp_path / 'vl').mkdir()
    vl_opt = model_files(tmp_path / 'vl', TINY_VLUNET)
    status, _, err = _restore(['-opt', vl_opt, '--model', tmp_path / 'net_g.pth', '-i', photos, '-o', tmp_path / 'o3'],
                              capsys)
    assert status == 2
    assert 'does not fit network_g (VLUNet)' in err and 'keys missing (' in err and 'unexpected keys (' in err
    assert 'the weights look like DGUNet' in err
    assert len(err.strip().splitlines()) == 1 and 'WARNING' not in err
