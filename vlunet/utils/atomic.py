"""The one atomic writer: every file that training, testing, restoring or converting writes.

A file is written to a temporary file in the same folder (``.<name>.<random>.tmp``), flushed and
fsync'ed, then renamed over the destination with ``os.replace`` (and the folder fsync'ed), so a
reader sees the old file or the complete new one, never a truncated one, even if the process is
killed mid-write. The temporary file is created with mode 0666 minus the umask, so written files
get the permissions the user's umask gives (``tempfile.mkstemp`` would give 0600).

    write_atomic(path, lambda f: f.write(data))          # bytes
    torch_save_atomic(obj, path)
    write_json_atomic(path, data)
    write_image_atomic(path, img)                        # OpenCV array, format from the extension
    write_all_atomic([(path_a, write_a), (path_b, write_b)])   # all complete before any is replaced
"""
import json
import os
import secrets


def _temp_path(path):
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f'.{name}.{secrets.token_hex(4)}.tmp')


def _fsync_folder(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not supported (e.g. some network file systems): the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_temp(path, write, binary):
    """Write ``path``'s content to a new temporary file beside it; return the temporary path."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'{path}: the folder {folder} does not exist')
    tmp = _temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    try:
        with os.fdopen(fd, 'wb' if binary else 'w', **({} if binary else {'encoding': 'utf-8', 'newline': ''})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def write_all_atomic(items, binary=True):
    """Write every ``(path, write)`` (``write(f)`` fills the open file): all temporary files are
    complete before the first is renamed into place; on any error nothing is replaced."""
    temps = []
    try:
        for path, write in items:
            temps.append((_write_temp(path, write, binary), path))
        for tmp, path in temps:
            os.replace(tmp, path)
        for folder in {os.path.dirname(os.path.abspath(p)) for _, p in temps}:
            _fsync_folder(folder)
    finally:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)


def write_atomic(path, write, binary=True):
    """Write one file atomically; ``write(f)`` fills the open (binary or text) file."""
    write_all_atomic([(path, write)], binary=binary)


def torch_save_atomic(obj, path):
    import torch
    write_atomic(path, lambda f: torch.save(obj, f))


def write_json_atomic(path, data, **dump_kwargs):
    dump_kwargs = {'indent': 2, **dump_kwargs}
    write_atomic(path, lambda f: (json.dump(data, f, **dump_kwargs), f.write('\n')), binary=False)


def write_text_atomic(path, text):
    write_atomic(path, lambda f: f.write(text), binary=False)


def encode_image(img, ext, params=None):
    """OpenCV-encode ``img`` (uint8/uint16 HxW or HxWxC, BGR[A]) as the format of ``ext`` ('.png')."""
    import cv2
    ok, buf = cv2.imencode(ext, img, params or [])
    if not ok:
        raise OSError(f'OpenCV cannot encode a {img.dtype} {img.shape} image as {ext}')
    return buf.tobytes()


def write_image_atomic(path, img, params=None, auto_mkdir=True):
    """Write an OpenCV image (format from the file extension) atomically."""
    if auto_mkdir:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data = encode_image(img, os.path.splitext(path)[1] or '.png', params)
    write_atomic(path, lambda f: f.write(data))
