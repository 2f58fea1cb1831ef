"""vlunet-restore on images nobody tuned for: odd sizes, gray, RGBA, 16-bit, and a text file.

The function behind it (``vlunet.restore.restore_image``, shared with vlunet-app) is tested
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
    assert 'skipped (not an image)' in proc.stdout and 'notes.txt' in proc.stdout
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
    assert report['skipped'] == ['notes.txt']
    assert not (tmp_path / 'out' / 'notes.txt').exists()
    assert (tmp_path / 'out' / 'report.csv').is_file()


def test_restore_errors_name_what_is_missing(tmp_path):
    opt = model_files(tmp_path, DGUNET)
    proc = run_cli(['-m', 'vlunet.restore', '-opt', opt, '-i', str(tmp_path / 'nope'), '-o', str(tmp_path / 'o')],
                   tmp_path)
    assert proc.returncode == 2 and 'input not found' in proc.stderr and 'nope' in proc.stderr
    proc = run_cli(['-m', 'vlunet.restore', '-opt', opt, '-i', str(tmp_path), '-o', str(tmp_path / 'o'),
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
