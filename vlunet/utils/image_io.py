"""The one image reader: which files are images, and how they are decoded.

The dataset (training and validation, disk or LMDB bytes), ``vlunet-restore`` and the app all
read images through :func:`decode_image`: 8- or 16-bit, gray, BGR or BGRA, any format OpenCV
decodes. A file that cannot be read raises :class:`ImageReadError` naming it and one reason
(``err.reason``: ``'empty file'``, ``'truncated or corrupt PNG'``, ``'permission denied'``,
``'too large'``, ...). All of them share one pixel limit, :data:`DEFAULT_MAX_PIXELS`, checked from the
image header before anything is decoded (``max_pixels=0`` or ``None`` lifts it).
"""
import errno
import os
import stat

import cv2
import numpy as np

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm')
# The one pixel limit of vlunet-restore, vlunet-app and the datasets (2048 x 2048 = 4.2 megapixels):
# un-tiled on a CPU, the demo-sized VLU-Net needs about 2.3 GB of memory per megapixel.
DEFAULT_MAX_PIXELS = 2048 * 2048


class ImageReadError(ValueError):
    """An image cannot be read or decoded. The message names the file; ``reason`` is the short
    reason alone (e.g. ``'empty file'``), for reports."""

    def __init__(self, message, reason=None):
        super().__init__(message)
        self.reason = reason or message.split(': ', 1)[-1]


class ImageTooLargeError(ImageReadError):
    """An image has more pixels than the caller allows (the message names the file, its size and the limit)."""


def is_image_file(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _failed(source, reason, detail=''):
    return ImageReadError(f'{source}: {reason}{detail}', reason)


def decode_image(buf, source, max_pixels=None):
    """Raw decoded pixels (uint8 or uint16, HxW or HxWxC as stored) of the encoded bytes ``buf``.

    With ``max_pixels`` the size is checked from the header first (:class:`ImageTooLargeError`,
    nothing decoded); every other failure is an :class:`ImageReadError` with one named reason."""
    if not buf:
        raise _failed(source, 'empty file', f' (expected an image: {", ".join(IMAGE_EXTENSIONS)})')
    header = _header(buf) if max_pixels else False  # False: not read yet (only needed to name a failure)
    if header and header[1]:
        check_pixels(*header[1], max_pixels, source)
    try:
        raw = cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as err:
        header = _header(buf) if header is False else header  # e.g. more pixels than OpenCV's own limit (CV_IO_MAX_IMAGE_PIXELS)
        size = f'{header[1][0]}x{header[1][1]} ' if header and header[1] else ''
        raise _failed(source, f'OpenCV cannot decode this {size}{header[0] if header else "file"}',
                      f' ({_first_line(err)})') from None
    if raw is None:
        header = _header(buf) if header is False else header
        if header is None:
            reason = 'not an image (its content is no image format OpenCV or Pillow knows)'
        else:
            reason = f'truncated or corrupt {header[0]}'
        raise ImageReadError(f'{source}: cannot decode the image: {reason}', reason)
    if bytes(buf[:3]) == b'\xff\xd8\xff':
        _check_complete_jpeg(buf, source)
    if raw.ndim not in (2, 3) or raw.dtype not in (np.uint8, np.uint16):
        raise _failed(source, f'unsupported pixel type {raw.dtype}',
                      f' (shape {raw.shape}); expected 8- or 16-bit gray, RGB or RGBA')
    check_pixels(raw.shape[1], raw.shape[0], max_pixels, source)
    return raw


def _first_line(err):
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[-1] if lines else type(err).__name__)[:200]


def _header(buf):
    """``(format, (width, height))`` from the header alone (Pillow, nothing decoded; size None when the
    header has none), or None when no format Pillow knows matches the bytes."""
    import io

    from PIL import Image
    Image.init()
    prefix = bytes(buf[:16])
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        try:
            if accept is not None and not accept(prefix):
                continue
            # the plug-in's constructor reads the header only; Image.open would also apply Pillow's
            # own decompression-bomb limit, and the limit that applies here is ours
            with factory(io.BytesIO(bytes(buf)), None) as pil:
                size = tuple(pil.size)
            return fmt, (size if size[0] > 0 and size[1] > 0 else None)
        except Exception:  # noqa: BLE001  (this plug-in does not read it: try the next one)
            continue
    return None


def _check_complete_jpeg(buf, source):
    """libjpeg (inside OpenCV) silently fills in a truncated JPEG with grey; Pillow reports it."""
    import io
    import warnings

    from PIL import Image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(bytes(buf))) as pil:
                pil.load()
    except Image.DecompressionBombError:
        return  # complete or not, OpenCV decoded it; the caller's pixel limit applies
    except Exception as err:  # noqa: BLE001  (truncated / corrupt entropy-coded data)
        raise _failed(source, 'truncated or corrupt JPEG', f' ({err})') from None


def unreadable_reason(path, err):
    """The named reason why ``path`` could not be opened or read (``err``: the OSError)."""
    if os.path.islink(path) and not os.path.exists(path):
        return f'dangling link (it points to {os.readlink(path)}, which does not exist)'
    if isinstance(err, IsADirectoryError) or os.path.isdir(path):
        return 'a folder, not an image file'
    if isinstance(err, FileNotFoundError):
        return 'image file not found'
    if isinstance(err, PermissionError):
        return 'permission denied'
    if err.errno == errno.ENAMETOOLONG:
        return 'file name too long'
    return f'cannot read the file ({err.strerror or err})'


def read_file(path):
    """The bytes of an image file; ImageReadError with the named reason when it cannot be read
    (not found, dangling link, a folder, not a regular file, permission denied, ...)."""
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, 'is a folder')
        if not stat.S_ISREG(mode):  # a FIFO would block the reader, a device never ends
            raise _failed(path, 'not a regular file (a pipe, socket or device)')
        with open(path, 'rb') as f:
            return f.read()
    except OSError as err:
        raise _failed(path, unreadable_reason(path, err)) from None


def peak_of(dtype):
    return 65535.0 if dtype == np.uint16 else 255.0


def raw_to_bgr_float(raw):
    """float32 HxWx3 BGR in [0, 1] (gray is repeated, alpha dropped): what the networks see."""
    img = raw.astype(np.float32) / np.float32(peak_of(raw.dtype))
    if img.ndim == 2 or img.shape[2] == 1:
        return np.repeat(img.reshape(img.shape[0], img.shape[1], 1), 3, axis=2)
    return img[..., :3]


def pixel_count(n):
    """'4.2 megapixels' / '30000 pixels': an image size for messages."""
    return f'{n / 1e6:.1f} megapixels' if n >= 100_000 else f'{n} pixels'


def check_pixels(width, height, max_pixels, source):
    """Raise :class:`ImageTooLargeError` when ``width * height`` exceeds ``max_pixels`` (None: no limit)."""
    if max_pixels and width * height > max_pixels:
        reason = (f'the image is {width}x{height} ({pixel_count(width * height)}), above the limit of '
                  f'{pixel_count(max_pixels)}')
        raise ImageTooLargeError(f'{source}: {reason}', reason)


def read_image(path, max_pixels=None):
    """``(rgb, info)``: float32 HxWx3 RGB in [0, 1] and what :func:`to_original_kind` needs to write
    the result back as the same kind (channels, alpha, bit depth). Raises :class:`ImageReadError`;
    :class:`ImageTooLargeError` for an image of more than ``max_pixels`` pixels (checked before decoding)."""
    return image_from_bytes(read_file(path), path, max_pixels)


def image_from_bytes(buf, source, max_pixels=None):
    """:func:`read_image` of encoded bytes (``source`` names them in errors)."""
    raw = decode_image(buf, source, max_pixels)
    channels = 1 if raw.ndim == 2 or raw.shape[2] == 1 else raw.shape[2]
    info = {'dtype': raw.dtype, 'channels': channels, 'alpha': raw[..., 3] if channels == 4 else None,
            'height': raw.shape[0], 'width': raw.shape[1]}
    return np.ascontiguousarray(raw_to_bgr_float(raw)[..., ::-1]), info


def to_original_kind(rgb, info):
    """Restored float RGB HxWx3 -> array of the input's channels and bit depth (OpenCV order)."""
    peak = peak_of(info['dtype'])
    rgb = np.clip(rgb, 0, 1).astype(np.float32, copy=False)
    if info['channels'] == 1:
        out = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    else:
        out = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        if info['alpha'] is not None:
            out = np.dstack([out, info['alpha'].astype(np.float32) / np.float32(peak)])
    return np.rint(out * peak).astype(info['dtype'])

