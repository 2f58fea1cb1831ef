"""The one atomic writer: every file that training, testing, restoring or converting writes.

A file is written to a temporary file in the same folder (``.<name>.<random>.tmp``, the name
shortened to fit the file system's NAME_MAX; the final name is never changed), flushed and
fsync'ed, then renamed over the destination with ``os.replace`` (and the folder fsync'ed), so a
reader sees the old file or the complete new one, never a truncated one, even if the process is
killed mid-write. The temporary file is created with mode 0666 minus the umask, so written files
get the permissions the user's umask gives (``tempfile.mkstemp`` would give 0600).

A failed write (full disk, quota, file size limit) is always an ``OSError`` naming the
destination, with the errno of the failing write: ``torch.save`` reports such a failure as
``RuntimeError: [enforce fail at inline_container.cc] unexpected pos ...``, which is turned back
into the ``OSError`` it came from. The temporary file is removed; the destination is untouched.
A final name longer than the folder allows is refused (``ENAMETOOLONG``) before anything is written.

    write_atomic(path, lambda f: f.write(data))          # bytes
    torch_save_atomic(obj, path)
    write_json_atomic(path, data)
    write_image_atomic(path, img)                        # OpenCV array, format from the extension
    write_all_atomic([(path_a, write_a), (path_b, write_b)])   # all complete before any is replaced
"""
import errno
import json
import os
import re
import secrets

# temporary files of this writer: '.<name, maybe shortened>.<8 hex digits>.tmp'
TEMP_PATTERN = re.compile(r'^\..*\.[0-9a-f]{8}\.tmp$', re.DOTALL)
# what torch.save's zip writer raises when a write of the file object failed
_TORCH_WRITE_FAILURES = ('unexpected pos', 'file write failed', 'PytorchStreamWriter failed')


def name_max(folder):
    """The longest file name (bytes) the file system of ``folder`` allows (255 where unknown)."""
    try:
        return os.pathconf(folder, 'PC_NAME_MAX')
    except (OSError, ValueError):
        return 255


def name_too_long(folder, name):
    """True when ``name`` does not fit the file system of ``folder`` (NAME_MAX bytes)."""
    return len(os.fsencode(name)) > name_max(folder)


def _temp_path(path):
    """``.<name>.<random>.tmp`` beside ``path``; the name part is shortened (never the final name)
    so the temporary name fits NAME_MAX."""
    folder, name = os.path.split(os.path.abspath(path))
    suffix = f'.{secrets.token_hex(4)}.tmp'
    room = name_max(folder) - 1 - len(suffix)
    while len(os.fsencode(name)) > room:
        name = name[:-1]
    return os.path.join(folder, f'.{name}{suffix}')


def remove_stale_temporaries(folder):
    """Delete the temporary files a killed process left in ``folder``; returns their paths."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(folder, name)
        if TEMP_PATTERN.match(name) and os.path.isfile(path) and not os.path.islink(path):
            try:
                os.unlink(path)
                removed.append(path)
            except OSError:
                pass
    return removed


class _RecordingFile:
    """The open temporary file as ``write(f)`` sees it, keeping the first OSError a write raised
    (torch.save turns it into a RuntimeError that no longer says what happened)."""

    def __init__(self, f):
        self._f = f
        self.error = None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def _write_failure(err, recorded, path):
    """The OSError naming ``path`` that a failed write is reported as, or None to re-raise ``err``."""
    if isinstance(err, OSError):
        cause = err
    elif recorded is not None and isinstance(err, Exception):
        cause = recorded
    elif isinstance(err, RuntimeError) and any(s in str(err) for s in _TORCH_WRITE_FAILURES):
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else 'RuntimeError'
        return OSError(errno.EIO, f'writing failed ({first}; is the disk or quota full?)', str(path))
    else:
        return None
    if cause.errno is None:
        return None if cause is err else OSError(str(cause))
    return OSError(cause.errno, cause.strerror or os.strerror(cause.errno), str(path))


def fsync_folder(folder):
    """Make renames in ``folder`` durable (where the file system allows opening a folder)."""
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
    if name_too_long(folder, os.path.basename(os.path.abspath(path))):
        raise OSError(errno.ENAMETOOLONG, f'File name too long for this folder (more than {name_max(folder)} bytes)',
                      str(path))
    tmp = _temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    recording = None
    try:
        with os.fdopen(fd, 'wb' if binary else 'w', **({} if binary else {'encoding': 'utf-8', 'newline': ''})) as f:
            recording = _RecordingFile(f)
            write(recording)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        failure = _write_failure(err, recording.error if recording else None, path)
        if failure is None or failure is err:
            raise
        raise failure from err
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
            fsync_folder(folder)
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


def save_with_retries(obj, path, what, attempts=3, wait=1.0):
    """``torch.save`` ``obj`` atomically, retried ``attempts`` times; then an OSError naming the file
    (``what``: 'network', 'training state', ...) and saying that the previous files are intact."""
    import sys
    import time
    for attempt in range(attempts):
        try:
            torch_save_atomic(obj, path)
            return
        except OSError as err:
            if attempt == attempts - 1:
                failure = OSError(f'cannot save the {what} {path}: {err} (is the disk or quota full?); the previous '
                                  'checkpoints are intact, resume from them with --auto_resume')
                failure.errno = err.errno  # the cause stays readable (ENOSPC, EDQUOT, ...) without changing the text
                raise failure from err
            sys.stderr.write(f'WARNING: saving {path} failed ({err}); retrying\n')
            time.sleep(wait)
