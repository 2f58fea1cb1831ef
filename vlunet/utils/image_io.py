"""The one image reader: which files are images, and how they are decoded.

The dataset (training and validation, disk or LMDB bytes), ``vlunet-restore`` and the app all
read images through :func:`decode_image`: 8- or 16-bit, gray, BGR or BGRA, any format OpenCV
decodes. A file that is not a decodable image raises :class:`ImageReadError` naming it.
"""
import cv2
import numpy as np

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm')


class ImageReadError(ValueError):
    """An image cannot be read or decoded (the message names the file)."""


class ImageTooLargeError(ImageReadError):
    """An image has more pixels than the caller allows (the message names the file, its size and the limit)."""


def is_image_file(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


def decode_image(buf, source):
    """Raw decoded pixels (uint8 or uint16, HxW or HxWxC as stored) of the encoded bytes ``buf``."""
    if not buf:
        raise ImageReadError(f'{source}: empty file (expected an image: {", ".join(IMAGE_EXTENSIONS)})')
    raw = cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise ImageReadError(f'{source}: cannot decode the image (corrupt, truncated or not an image file)')
    if bytes(buf[:3]) == b'\xff\xd8\xff':
        _check_complete_jpeg(buf, source)
    if raw.ndim not in (2, 3) or raw.dtype not in (np.uint8, np.uint16):
        raise ImageReadError(f'{source}: unsupported image ({raw.dtype}, shape {raw.shape}); '
                             'expected 8- or 16-bit gray, RGB or RGBA')
    return raw


def _check_complete_jpeg(buf, source):
    """libjpeg (inside OpenCV) silently fills in a truncated JPEG with grey; Pillow reports it."""
    import io

    from PIL import Image
    try:
        with Image.open(io.BytesIO(bytes(buf))) as pil:
            pil.load()
    except Exception as err:  # noqa: BLE001  (truncated / corrupt entropy-coded data)
        raise ImageReadError(f'{source}: corrupt or truncated JPEG ({err})') from None


def read_file(path):
    try:
        with open(path, 'rb') as f:
            return f.read()
    except FileNotFoundError:
        raise ImageReadError(f'{path}: image file not found') from None
    except OSError as err:
        raise ImageReadError(f'{path}: cannot read the file ({err.strerror or err})') from None


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
        raise ImageTooLargeError(f'{source}: the image is {width}x{height} ({pixel_count(width * height)}), above '
                                 f'the limit of {pixel_count(max_pixels)}')


def _check_header_pixels(buf, max_pixels, source):
    """The pixel limit from the image header alone, before anything is decoded (Pillow reads the
    header; formats it does not know are checked after decoding)."""
    import io
    import warnings

    from PIL import Image
    try:
        with warnings.catch_warnings():  # the limit that applies is ours
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(bytes(buf))) as pil:
                width, height = pil.size
    except Image.DecompressionBombError:
        raise ImageTooLargeError(f'{source}: the image has more than {pixel_count(2 * Image.MAX_IMAGE_PIXELS)}, '
                                 f'above the limit of {pixel_count(max_pixels)}') from None
    except Exception:  # noqa: BLE001  (not a format Pillow knows, or a broken header: decoding reports it)
        return
    check_pixels(width, height, max_pixels, source)


def read_image(path, max_pixels=None):
    """``(rgb, info)``: float32 HxWx3 RGB in [0, 1] and what :func:`to_original_kind` needs to write
    the result back as the same kind (channels, alpha, bit depth). Raises :class:`ImageReadError`;
    :class:`ImageTooLargeError` for an image of more than ``max_pixels`` pixels (checked before decoding)."""
    return image_from_bytes(read_file(path), path, max_pixels)


def image_from_bytes(buf, source, max_pixels=None):
    """:func:`read_image` of encoded bytes (``source`` names them in errors)."""
    if max_pixels and buf:
        _check_header_pixels(buf, max_pixels, source)
    raw = decode_image(buf, source)
    check_pixels(raw.shape[1], raw.shape[0], max_pixels, source)
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

