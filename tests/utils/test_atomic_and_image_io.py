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


# ------------------------------------------------------------------- full disks and long names
FULL_DISK_SCRIPT = r'''
import os, resource, signal, sys
import torch
import vlunet  # noqa: F401
from vlunet.utils.atomic import save_with_retries
path, limit = sys.argv[1], int(sys.argv[2])
save_with_retries({'w': torch.ones(16)}, path, 'network')           # fits
if limit:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)                    # a write past the limit fails (EFBIG)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
try:
    save_with_retries({'w': torch.ones(200_000)}, path, 'network')  # 800 KB: does not fit
except OSError as err:
    print('OSError:', err)
'''


def _full_disk_run(cmd):
    import subprocess
    import sys
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=os.pathsep.join(sys.path)))
    return proc


def _check_full_disk_report(proc, path, reason):
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f'OSError: cannot save the network {path}: [Errno' in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert reason in proc.stdout and f"'{path}'" in proc.stdout and 'is the disk or quota full?' in proc.stdout
    assert 'resume from them with --auto_resume' in proc.stdout
    assert proc.stderr.count('retrying') == 2  # retried as documented, then reported
    assert 'RuntimeError' not in proc.stdout


def test_a_full_disk_is_reported_as_such_naming_the_file_and_retried(tmp_path):
    """A real torch.save on a real tmpfs of 256 KB: ENOSPC from the kernel (user and mount
    namespaces; skipped where the machine does not allow them)."""
    import shutil
    import subprocess
    import sys
    unshare = shutil.which('unshare')
    mnt = tmp_path / 'small_disk'
    mnt.mkdir()
    probe = subprocess.run([unshare or 'unshare', '-rm', 'sh', '-c', f'mount -t tmpfs -o size=256k tmpfs {mnt}'],
                           capture_output=True) if unshare else None
    if probe is None or probe.returncode != 0:
        pytest.skip('no unprivileged mount namespace here to make a small tmpfs (see the RLIMIT_FSIZE test)')
    script = tmp_path / 'save.py'
    script.write_text(FULL_DISK_SCRIPT)
    path = mnt / 'net_g_10.pth'
    cmd = [unshare, '-rm', 'sh', '-c', f'mount -t tmpfs -o size=256k tmpfs {mnt} && "{sys.executable}" {script} {path} 0'
           f' && python3 -c "import os,sys; print(sorted(os.listdir(sys.argv[1])))" {mnt}'
           f' && "{sys.executable}" -c "import torch,sys; print(\'loads:\', torch.load(sys.argv[1])[\'w\'].shape)" {path}']
    proc = _full_disk_run(cmd)
    _check_full_disk_report(proc, path, 'No space left on device')
    assert "['net_g_10.pth']" in proc.stdout  # no temporary file left behind
    assert 'loads: torch.Size([16])' in proc.stdout  # the previous file is intact


def test_a_write_past_the_file_size_limit_is_reported_naming_the_file(tmp_path):
    """The same path without privileges: RLIMIT_FSIZE makes the kernel fail the write (EFBIG) in the
    middle of a real torch.save to a real file, which torch reports as RuntimeError."""
    import sys
    script = tmp_path / 'save.py'
    script.write_text(FULL_DISK_SCRIPT)
    path = tmp_path / 'models' / 'net_g_10.pth'
    path.parent.mkdir()
    proc = _full_disk_run([sys.executable, str(script), str(path), str(64 * 1024)])
    _check_full_disk_report(proc, path, 'File too large')
    assert os.listdir(path.parent) == ['net_g_10.pth']
    assert torch.load(path, weights_only=True)['w'].shape == (16, )  # the previous file is intact


def test_torch_save_write_errors_become_the_oserror_they_came_from(tmp_path, monkeypatch):
    """In-process: the temporary file's writes fail with ENOSPC after 1000 bytes; torch.save turns
    that into 'RuntimeError: [enforce fail ...] unexpected pos', the writer gives back the OSError."""
    import errno

    path = tmp_path / 'state.pth'
    torch_save_atomic({'iter': 1}, path)
    real_fdopen = os.fdopen

    class FillingFile:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 1000:
                raise OSError(errno.ENOSPC, 'No space left on device')
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(os, 'fdopen', lambda *a, **k: FillingFile(real_fdopen(*a, **k)))
    with pytest.raises(RuntimeError, match='unexpected pos'):  # what torch itself says
        torch.save({'w': torch.ones(10_000)}, FillingFile(open(tmp_path / 'direct.bin', 'wb')))
    with pytest.raises(OSError) as err:
        torch_save_atomic({'w': torch.ones(10_000)}, path)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
    assert isinstance(err.value.__cause__, RuntimeError)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {'iter': 1}
    assert sorted(os.listdir(tmp_path)) == ['direct.bin', 'state.pth']


def test_long_names_get_short_temporary_names_and_too_long_ones_are_refused(tmp_path):
    import errno

    from vlunet.utils.atomic import TEMP_PATTERN, _temp_path, remove_stale_temporaries
    for n in (200, 241, 244, 255):
        name = 'x' * (n - 4) + '.png'
        tmp = os.path.basename(_temp_path(str(tmp_path / name)))
        assert len(tmp.encode()) <= 255 and TEMP_PATTERN.match(tmp), n
        write_atomic(tmp_path / name, lambda f: f.write(b'ok'))
        assert (tmp_path / name).read_bytes() == b'ok'  # the final name is never shortened
    multibyte = 'é' * 127 + '.p'  # 256 bytes: one too many
    with pytest.raises(OSError) as err:
        write_atomic(tmp_path / multibyte, lambda f: f.write(b'x'))
    assert err.value.errno == errno.ENAMETOOLONG and 'File name too long' in str(err.value)
    fits = 'é' * 125 + '.png'  # 254 bytes: fits; its temporary name is cut between characters
    write_atomic(tmp_path / fits, lambda f: f.write(b'ok'))
    assert (tmp_path / fits).read_bytes() == b'ok'
    (tmp_path / '.killed.png.0123abcd.tmp').write_bytes(b'half')
    (tmp_path / '.keep.tmp').write_bytes(b'not ours')
    assert remove_stale_temporaries(str(tmp_path)) == [str(tmp_path / '.killed.png.0123abcd.tmp')]
    assert (tmp_path / '.keep.tmp').exists()


def test_each_unreadable_image_has_one_named_reason(tmp_path, monkeypatch):
    import builtins
    import errno

    from vlunet.utils.image_io import DEFAULT_MAX_PIXELS, ImageTooLargeError
    from test_app import _png_header_only
    (tmp_path / 'folder.png').mkdir()
    os.symlink(tmp_path / 'nowhere.png', tmp_path / 'gone.png')
    cases = {'folder.png': 'a folder, not an image file', 'gone.png': 'dangling link',
             'missing.png': 'image file not found'}
    for name, reason in cases.items():
        with pytest.raises(ImageReadError) as err:
            read_image(str(tmp_path / name))
        assert err.value.reason.startswith(reason) and str(err.value).startswith(str(tmp_path / name))
    # permission denied (simulated: root reads any file)
    locked = tmp_path / 'locked.png'
    locked.write_bytes(b'x')
    real_open = builtins.open

    def deny(path, *args, **kwargs):
        if str(path) == str(locked):
            raise PermissionError(errno.EACCES, 'Permission denied', str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(builtins, 'open', deny)
    with pytest.raises(ImageReadError) as err:
        read_file(str(locked))
    assert err.value.reason == 'permission denied'
    monkeypatch.undo()
    # a header of 60000 x 60000: OpenCV itself raises cv2.error; it must be an ImageReadError
    huge = _png_header_only(60000, 60000)
    with pytest.raises(ImageTooLargeError, match='60000x60000'):
        decode_image(huge, 'huge.png', DEFAULT_MAX_PIXELS)
    with pytest.raises(ImageReadError) as err:
        decode_image(huge, 'huge.png')  # no limit of ours: OpenCV's own refuses it
    assert 'OpenCV cannot decode this 60000x60000 PNG' in str(err.value)
    float_tif = cv2.imencode('.tiff', np.random.default_rng(0).random((6, 7, 3), dtype=np.float32))[1].tobytes()
    with pytest.raises(ImageReadError) as err:
        decode_image(float_tif, 'float.tif')
    assert err.value.reason == 'unsupported pixel type float32'


def test_the_datasets_share_the_pixel_limit_checked_from_the_header(tmp_path):
    import vlunet  # noqa: F401
    from basicsr.data import build_dataset
    from test_app import _png_header_only
    from vlunet.data.all_in_one_dataset import DatasetError
    from vlunet.utils.image_io import DEFAULT_MAX_PIXELS
    assert DEFAULT_MAX_PIXELS == 2048 * 2048
    clean = tmp_path / 'clean'
    clean.mkdir()
    cv2.imwrite(str(clean / 'a.png'), np.full((24, 24, 3), 100, np.uint8))
    (clean / 'huge.png').write_bytes(_png_header_only(16000, 16000))  # 16000 x 16000 in its header only
    source = {'name': 'noise', 'label': 0, 'dataroot_gt': str(clean), 'degradation': {'type': 'gaussian_noise'}}

    def dataset(**options):
        return build_dataset({'name': 'val_set', 'type': 'AllInOneDataset', 'phase': 'val', 'sources': [source],
                              **options})
    with pytest.raises(DatasetError) as err:
        dataset()[1]
    message = str(err.value)
    assert 'huge.png: the image is 16000x16000 (256.0 megapixels), above the limit of 4.2 megapixels' in message
    assert 'max_pixels' in message and 'val_set' in message
    assert [item['gt_path'] for item in dataset(skip_unreadable=True)] == [str(clean / 'a.png')]
    with pytest.raises(DatasetError, match='huge.png: cannot decode the image: truncated or corrupt PNG'):
        dataset(max_pixels=0)[1]  # no limit: it is decoded (and found to hold one row only)
    with pytest.raises(DatasetError, match=r'val_set.max_pixels: expected a whole number >= 0'):
        dataset(max_pixels='big')
