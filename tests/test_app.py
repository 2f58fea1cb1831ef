"""The one restore path (``RestorationEngine.restore``: one CLIP embedding, one forward) and the page behind
``vlunet-app`` (``Restorer``): sizes, kinds, report, stages, bad input; the command's errors.

The real-browser test is tests/test_app_browser.py."""
import os
import struct
import zlib

import cv2
import numpy as np
import pytest
import torch

from conftest import run_cli, write_yaml
from test_cli_restore import DGUNET, TINY_CLIP, TINY_VLUNET, model_files
from vlunet.restore import build_engine


@pytest.fixture(scope='module')
def vlunet_model(tmp_path_factory):
    torch.set_num_threads(1)
    return build_engine(model_files(tmp_path_factory.mktemp('vlunet'), TINY_VLUNET, TINY_CLIP), device='cpu')


def _count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).random((h, w, 3), dtype=np.float32)


def test_one_clip_embedding_and_one_forward_give_image_report_and_stages(vlunet_model):
    model = vlunet_model
    rgb = _rgb(37, 29)
    net_calls, h1 = _count_calls(model.net_g)
    clip_calls, h2 = _count_calls(model.conditioner.net_clip.clip.visual)  # the CLIP image encoder
    try:
        result = model.restore(rgb, stages=True)
    finally:
        h1.remove()
        h2.remove()
    assert (len(net_calls), len(clip_calls)) == (1, 1)
    assert result.image.shape == (37, 29, 3) and result.image.dtype == np.float32
    assert 0 <= result.image.min() and result.image.max() <= 1
    assert result.stage_grid is not None and result.stage_grid.shape[0] > 8 * 100  # input row + 8 stages
    assert result.note == '' and result.seconds > 0

    # the report is the CLIP classification of that image, computed from the one embedding
    lq = torch.from_numpy(rgb.transpose(2, 0, 1).copy()).unsqueeze(0)
    with torch.no_grad():
        expected = model.conditioner.net_clip.classify(lq)[0].tolist()
        plain = model.forward(lq)[0].clamp(0, 1).permute(1, 2, 0).numpy()
    assert list(result.report) == TINY_CLIP['prompts']
    np.testing.assert_allclose(list(result.report.values()), expected, rtol=1e-5, atol=1e-6)
    assert abs(sum(result.report.values()) - 1) < 1e-5
    assert result.top_type == TINY_CLIP['prompts'][int(np.argmax(expected))]
    # recording the stages does not change the restored image
    np.testing.assert_array_equal(result.image, plain)


def test_tiles_run_one_forward_each_and_draw_no_stage_grid(vlunet_model):
    model = vlunet_model
    net_calls, h1 = _count_calls(model.net_g)
    clip_calls, h2 = _count_calls(model.conditioner.net_clip.clip.visual)
    try:
        # 50 x 70 in tiles of 32 with overlap 8: rows start at 0, 18 and columns at 0, 24, 38
        tiled = model.restore(_rgb(50, 70), tile=32, tile_overlap=8, stages=True)
        assert (len(net_calls), len(clip_calls)) == (6, 1)
        # an image that fits in one tile is one forward: its stages are drawn
        whole = model.restore(_rgb(30, 20), tile=32, tile_overlap=8, stages=True)
        assert (len(net_calls), len(clip_calls)) == (7, 2)
    finally:
        h1.remove()
        h2.remove()
    assert tiled.image.shape == (50, 70, 3) and tiled.stage_grid is None
    assert 'several 32 px tiles' in tiled.note and '70x50' in tiled.note
    assert whole.stage_grid is not None and whole.note == ''


def test_network_without_clip_restores_without_report(tmp_path):
    engine = build_engine(model_files(tmp_path, DGUNET), device='cpu')
    result = engine.restore(_rgb(21, 34), stages=True)
    assert result.image.shape == (21, 34, 3)
    assert result.report == {} and result.top_type == ''
    assert result.stage_grid is None and 'DGUNet does not record' in result.note


def test_text_conditioned_network_is_refused_with_a_message(tmp_path):
    from basicsr.utils.registry import ARCH_REGISTRY
    from torch import nn

    if 'TextConditionedStub' not in ARCH_REGISTRY:
        @ARCH_REGISTRY.register()
        class TextConditionedStub(nn.Module):
            condition = 'text_embedding'

            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 3, 1)

            def forward(self, x, text_code):
                return self.conv(x)

    opt = write_yaml(tmp_path / 'opt.yml', {'network_g': {'type': 'TextConditionedStub'},
                                            'path': {'pretrain_network_g': str(tmp_path / 'w.pth')}})
    with pytest.raises(ValueError, match='TextConditionedStub takes a CLIP text embedding'):
        build_engine(opt)


# ------------------------------------------------------------------------------------ the page
def _png_header_only(width, height):
    """A PNG whose header says ``width`` x ``height`` but that holds a single compressed row: an
    image that may only be refused from its header (decoding it would need width*height*3 bytes)."""
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff)
    ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(b'\0' * (1 + 3 * width)))
            + chunk(b'IEND', b''))


def _uploads(folder):
    """Files as a browser would upload them (odd names included); returns {path: raw pixels or None}."""
    folder.mkdir()
    rng = np.random.default_rng(1)
    images = {
        'my photo (1).png': rng.integers(0, 256, (41, 57, 3), dtype=np.uint8),
        'gray.png': rng.integers(0, 256, (30, 23), dtype=np.uint8),
        'alpha.png': rng.integers(0, 256, (19, 26, 4), dtype=np.uint8),
        'deep.tif': rng.integers(0, 65536, (24, 17, 3), dtype=np.uint16),
        'deep gray.png': rng.integers(0, 65536, (16, 21), dtype=np.uint16),
        'shot.jpg': rng.integers(0, 256, (33, 40, 3), dtype=np.uint8),
        'no_extension': rng.integers(0, 256, (12, 18, 3), dtype=np.uint8),
    }
    paths = {}
    for name, img in images.items():
        ok, buf = cv2.imencode(os.path.splitext(name)[1] or '.png', img)
        (folder / name).write_bytes(buf.tobytes())
        paths[str(folder / name)] = img
    return paths


def test_page_restores_every_kind_at_its_size_under_generated_names(tmp_path, vlunet_model):
    from vlunet.app import Restorer
    uploads = _uploads(tmp_path / 'uploads')
    restorer = Restorer(vlunet_model, str(tmp_path / 'restored'), max_pixels=20000)
    results, messages, seconds = restorer.run(list(uploads), stages=True)
    assert messages == [] and len(results) == len(uploads) and seconds > 0
    by_name = {r.name: r for r in results}
    assert sorted(by_name) == sorted(['my_photo_1_.png', 'gray.png', 'alpha.png', 'deep.tif', 'deep_gray.png',
                                      'shot.jpg', 'no_extension'])
    for path, src in uploads.items():
        from vlunet.app import display_name
        r = by_name[display_name(path)]
        disk, download_name = restorer.download(r.token)
        assert os.path.dirname(disk) == str(tmp_path / 'restored')
        assert os.path.basename(disk).startswith(r.token) and r.name.split('.')[0] not in os.path.basename(disk)
        out = cv2.imread(disk, cv2.IMREAD_UNCHANGED)
        assert out.shape == src.shape and out.dtype == src.dtype, r.name
        assert (r.width, r.height) == (src.shape[1], src.shape[0])
        assert r.restoration.report and r.restoration.stage_grid is not None
        if src.ndim == 3 and src.shape[2] == 4:
            np.testing.assert_array_equal(out[..., 3], src[..., 3])  # alpha kept
    assert by_name['my_photo_1_.png'].download_name == 'my_photo_1__restored.png'
    assert by_name['deep.tif'].kind == 'RGB, 16-bit' and by_name['gray.png'].kind == 'gray, 8-bit'
    assert by_name['alpha.png'].kind == 'RGBA, 8-bit'
    assert restorer.download(by_name['no_extension'].token)[1] == 'no_extension_restored.png'
    assert restorer.download('0' * 24) is None


def test_page_bad_inputs_give_readable_messages_and_the_next_image_works(tmp_path, vlunet_model):
    from vlunet.app import Restorer
    folder = tmp_path / 'uploads'
    folder.mkdir()
    (folder / 'notes.txt').write_text('not an image')
    (folder / 'empty.png').write_bytes(b'')
    ok, png = cv2.imencode('.png', np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    (folder / 'cut.png').write_bytes(png.tobytes()[:200])
    ok, jpg = cv2.imencode('.jpg', np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    (folder / 'cut.jpg').write_bytes(jpg.tobytes()[:len(jpg) // 2])
    (folder / 'huge.png').write_bytes(_png_header_only(12000, 12000))
    cv2.imwrite(str(folder / 'big.png'), np.zeros((150, 200, 3), np.uint8))
    cv2.imwrite(str(folder / 'fine.png'), np.zeros((20, 30, 3), np.uint8))
    order = ['notes.txt', 'empty.png', 'cut.png', 'cut.jpg', 'huge.png', 'big.png', 'fine.png']
    restorer = Restorer(vlunet_model, str(tmp_path / 'restored'), max_pixels=20000)
    results, messages, _ = restorer.run([str(folder / n) for n in order])
    assert [r.name for r in results] == ['fine.png'] and results[0].restoration.image.shape == (20, 30, 3)
    assert len(messages) == 6
    text = dict(zip(order, messages))
    for name, message in text.items():
        assert message.startswith(name + ':'), message
        assert 'Traceback' not in message
    for name in ('notes.txt', 'empty.png', 'cut.png', 'cut.jpg'):
        assert 'expected an image file (.png .jpg' in text[name]
    assert 'truncated' in text['cut.jpg'] and 'empty file' in text['empty.png']
    assert '12000x12000 (144.0 megapixels), above the limit of 20000 pixels' in text['huge.png']
    assert '200x150 (30000 pixels), above the limit of 20000 pixels' in text['big.png']
    assert '--max-pixels' in text['big.png']
    assert os.listdir(tmp_path / 'restored') == [os.path.basename(restorer.download(results[0].token)[0])]


def test_app_command_names_what_is_missing_or_unreadable(tmp_path):
    proc = run_cli(['-m', 'vlunet.app'], tmp_path)  # no -opt, no demo model here
    assert proc.returncode == 2
    assert 'experiments/VLUNet_demo/models/net_g_latest.pth' in proc.stderr
    assert 'vlunet-train -opt options/train/VLUNet_demo.yml' in proc.stderr

    opt = model_files(tmp_path, DGUNET)
    garbage = tmp_path / 'garbage.pth'
    garbage.write_bytes(b'this is no checkpoint')
    proc = run_cli(['-m', 'vlunet.app', '-opt', opt, '--model', str(garbage), '--port', '0'], tmp_path)
    assert proc.returncode == 2 and 'garbage.pth' in proc.stderr and 'not a PyTorch checkpoint' in proc.stderr
    assert 'Traceback' not in proc.stderr

    # a checkpoint that needs unpickling: the refusal names --trust-pickle, and the page takes that flag
    import argparse

    from basicsr.archs import build_network
    pickled = tmp_path / 'pickled.pth'
    torch.save({'params': build_network(dict(DGUNET)).state_dict(), 'args': argparse.Namespace(lr=1)}, pickled)
    proc = run_cli(['-m', 'vlunet.app', '-opt', opt, '--model', str(pickled), '--port', '0'], tmp_path)
    assert proc.returncode == 2 and '--trust-pickle' in proc.stderr and 'Traceback' not in proc.stderr
    proc = run_cli(['-m', 'vlunet.app', '-opt', opt, '--trust-pickle', '--allowed-host', 'lab.example',
                    '--max-pixels', '-1'], tmp_path)  # parsed, then refused for the limit: the flags exist
    assert proc.returncode == 2 and '--max-pixels must be >= 0' in proc.stderr
