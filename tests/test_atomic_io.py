"""The one atomic writer and the one image reader."""
import os
import stat

import cv2
import numpy as np
import pytest
import torch

from vlunet.utils.atomic import torch_save_atomic, write_all_atomic, write_atomic, write_image_atomic, write_json_atomic
from vlunet.utils.image_io import ImageReadError, decode_image, read_file, read_image, to_original_kind


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize('umask', [0o022, 0o077, 0o002])
def test_written_files_get_the_umask_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        torch_save_atomic({'a': torch.ones(2)}, tmp_path / 'x.pth')
        write_json_atomic(tmp_path / 'x.json', {'k': 1})
        write_image_atomic(str(tmp_path / 'x.png'), np.zeros((4, 5, 3), np.uint8))
    finally:
        os.umask(old)
    for name in ('x.pth', 'x.json', 'x.png'):
        assert _mode(tmp_path / name) == 0o666 & ~umask, name


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / 'state.pth'
    torch_save_atomic({'iter': 1}, path)

    def fail(f):
        f.write(b'partial')
        raise KeyboardInterrupt  # e.g. interrupted mid-write

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, fail)
    assert torch.load(path, weights_only=True) == {'iter': 1}
    assert os.listdir(tmp_path) == ['state.pth']


def test_several_files_are_replaced_only_when_all_are_complete(tmp_path):
    a, b = tmp_path / 'a.txt', tmp_path / 'b.txt'
    write_all_atomic([(a, lambda f: f.write(b'old a')), (b, lambda f: f.write(b'old b'))])

    def fail(f):
        raise OSError('disk full')

    with pytest.raises(OSError, match='disk full'):
        write_all_atomic([(a, lambda f: f.write(b'new a')), (b, fail)])
    assert a.read_bytes() == b'old a' and b.read_bytes() == b'old b'
    assert sorted(os.listdir(tmp_path)) == ['a.txt', 'b.txt']


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        write_atomic(tmp_path / 'nope' / 'x.bin', lambda f: f.write(b'x'))


def test_image_kinds_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    kinds = {'gray.png': rng.integers(0, 256, (7, 9), dtype=np.uint8),
             'rgb.png': rng.integers(0, 256, (7, 9, 3), dtype=np.uint8),
             'rgba.png': rng.integers(0, 256, (7, 9, 4), dtype=np.uint8),
             'deep.png': rng.integers(0, 65536, (7, 9, 3), dtype=np.uint16)}
    for name, raw in kinds.items():
        path = str(tmp_path / name)
        write_image_atomic(path, raw)
        rgb, info = read_image(path)
        assert rgb.shape == (7, 9, 3) and rgb.dtype == np.float32 and 0 <= rgb.min() and rgb.max() <= 1
        back = to_original_kind(rgb, info)
        assert back.dtype == raw.dtype and back.shape == raw.shape, name
        if name != 'gray.png':  # gray goes through RGB and back: equal up to the luma rounding
            np.testing.assert_array_equal(back, raw)
        else:
            assert np.abs(back.astype(int) - raw).max() <= 1


def test_bad_images_are_named(tmp_path):
    text = tmp_path / 'notes.png'
    text.write_text('not an image')
    with pytest.raises(ImageReadError, match='notes.png: cannot decode'):
        read_image(str(text))
    with pytest.raises(ImageReadError, match='missing.png: image file not found'):
        read_image(str(tmp_path / 'missing.png'))
    empty = tmp_path / 'empty.jpg'
    empty.write_bytes(b'')
    with pytest.raises(ImageReadError, match='empty file'):
        read_image(str(empty))
    # a truncated JPEG: libjpeg fills it in silently, the reader must not
    ok, buf = cv2.imencode('.jpg', np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = buf.tobytes()
    with pytest.raises(ImageReadError, match='truncated'):
        decode_image(data[:len(data) // 2], 'half.jpg')
    # a truncated PNG
    ok, buf = cv2.imencode('.png', np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    png = tmp_path / 'half.png'
    png.write_bytes(buf.tobytes()[:len(buf) // 2])
    with pytest.raises(ImageReadError, match='half.png'):
        decode_image(read_file(str(png)), str(png))
