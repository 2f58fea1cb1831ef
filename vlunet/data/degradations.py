"""Synthetic degradations: the one place where a new degradation function is added.

A degradation is a function ``fn(img, rng, **params) -> degraded`` registered under a name:

* ``img``: float32 array, H x W x C, values in [0, 1] (any channel order; BasicSR reads BGR);
* ``rng``: a ``numpy.random.Generator`` (the dataset seeds it, so validation images are fixed);
* ``params``: the keyword arguments given in the option file, e.g.
  ``degradation: {type: gaussian_noise, sigma: 25}``.

It returns an array of the same shape, float32, clipped to [0, 1]. Adding a type::

    from vlunet.data.degradations import DEGRADATION_REGISTRY

    @DEGRADATION_REGISTRY.register()
    def snow(img, rng, amount=0.05):
        ...

and then ``degradation: {type: snow, amount: 0.08}`` in an ``AllInOneDataset`` source.

Registered types compose in an option file, applied in order with the one random generator of the
image (``compose``; e.g. low light, then rain, then haze, the order in which the CDD-11 composite
types were synthesised)::

    degradation:
      type: compose
      steps:
        - {type: low_light, gamma: [1.5, 2.0]}
        - {type: rain_streaks, density: 0.01}
        - {type: haze, beta: [0.6, 1.2]}

:func:`check_degradation` checks such a description (types registered, option names accepted by
each function, ``steps`` a non-empty list) and names the offending option in its error.
"""
import inspect

import cv2
import numpy as np
from basicsr.utils.registry import Registry

DEGRADATION_REGISTRY = Registry('degradation')


class DegradationOptionError(ValueError):
    """A degradation description that cannot be applied; the message names the option (e.g.
    ``degradation.steps[1].type``), what it holds and what was expected."""


def apply_degradation(img, degradation_opt, rng, where='degradation'):
    """Apply the registered degradation described by ``{type: name, **params}`` to ``img``
    (checked first by :func:`check_degradation`; ``where`` names the option in its errors)."""
    params = check_degradation(degradation_opt, where)
    name = params.pop('type')
    out = get_degradation(name)(img, rng, **params)
    return np.clip(out, 0, 1).astype(np.float32, copy=False)


def get_degradation(name):
    if name not in DEGRADATION_REGISTRY:
        known = ', '.join(sorted(DEGRADATION_REGISTRY.keys()))
        raise KeyError(f'unknown degradation type {name!r}; registered types: {known}')
    return DEGRADATION_REGISTRY.get(name)


def check_degradation(degradation_opt, where='degradation'):
    """Check a degradation description and return it as a new dict.

    The type must be registered and every other key a keyword the function accepts (a function
    with ``**kwargs`` accepts any); a type may check its own options further with a ``check``
    attribute ``check(params, where)`` (``compose`` checks its steps). Raises
    :class:`DegradationOptionError` naming ``where`` and the offending key.
    """
    if not isinstance(degradation_opt, dict):
        raise DegradationOptionError(f'{where}: expected a mapping {{type: <registered degradation>, ...}}, '
                                     f'got {degradation_opt!r}')
    params = dict(degradation_opt)
    name = params.get('type')
    try:
        fn = get_degradation(name)
    except KeyError as err:
        raise DegradationOptionError(f'{where}.type: {err.args[0]}') from None
    accepted = _keywords(fn)
    if accepted is not None:
        unknown = sorted(set(params) - {'type'} - accepted)
        if unknown:
            raise DegradationOptionError(f'{where}: {name} has no option {", ".join(map(repr, unknown))} '
                                         f'(its options: {", ".join(sorted(accepted)) or "none"})')
    check = getattr(fn, 'check', None)
    if check is not None:
        check(params, where)
    return params


def _keywords(fn):
    """The keyword options of a degradation function (after ``img, rng``), or None if it takes ``**kwargs``."""
    parameters = list(inspect.signature(fn).parameters.values())[2:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                     inspect.Parameter.KEYWORD_ONLY)}


@DEGRADATION_REGISTRY.register()
def compose(img, rng, steps=()):
    """Registered degradations applied one after the other with the same generator ``rng``:
    ``steps`` is a list of descriptions ``{type: name, **params}`` (``compose`` steps may nest). Each
    step's result is clipped to [0, 1] before the next, as a single degradation's is."""
    _check_steps({'steps': steps}, 'degradation')
    for i, step in enumerate(steps):
        img = apply_degradation(img, step, rng, f'degradation.steps[{i}]')
    return img


def _check_steps(params, where):
    steps = params.get('steps')
    if not isinstance(steps, (list, tuple)) or not steps:
        raise DegradationOptionError(f'{where}.steps: expected a non-empty list of degradations '
                                     f'[{{type: <registered degradation>, ...}}, ...], got {steps!r}')
    for i, step in enumerate(steps):
        check_degradation(step, f'{where}.steps[{i}]')


compose.check = _check_steps


@DEGRADATION_REGISTRY.register()
def gaussian_noise(img, rng, sigma=25):
    """Additive white Gaussian noise; ``sigma`` on the 0..255 scale (published protocol: 15/25/50)."""
    return img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma / 255.0)


@DEGRADATION_REGISTRY.register()
def gaussian_noise_uint8(img, rng, sigma=25):
    """The published denoising rule of PromptIR, VLU-Net, AdaIR, MoCE-IR and DFPIR (training and
    test): ``np.clip(clean + randn(shape) * sigma, 0, 255).astype(np.uint8)`` on the 8-bit clean
    image, i.e. float64 Gaussian noise, clipped, then TRUNCATED (not rounded) to 8 bits.

    ``img`` is taken as an 8-bit image (values k / 255); ``sigma`` is on the 0..255 scale. Unlike
    :func:`gaussian_noise` (float noise, no quantisation) the result is an 8-bit image again.
    """
    clean = np.rint(img.astype(np.float64) * 255.0)
    noisy = np.clip(clean + rng.standard_normal(img.shape) * float(sigma), 0, 255).astype(np.uint8)
    return noisy.astype(np.float32) / np.float32(255.0)


NOISE_DEGRADATIONS = ('gaussian_noise', 'gaussian_noise_uint8')


def _line_kernel(length, angle_deg):
    """A normalised 2-D line kernel (motion blur along ``angle_deg``)."""
    length = max(1, int(round(length)))
    size = length if length % 2 == 1 else length + 1
    kernel = np.zeros((size, size), np.float32)
    kernel[size // 2, (size - length) // 2:(size - length) // 2 + length] = 1.0
    rot = cv2.getRotationMatrix2D(((size - 1) / 2, (size - 1) / 2), angle_deg, 1.0)
    kernel = cv2.warpAffine(kernel, rot, (size, size))
    return kernel / max(kernel.sum(), 1e-8)


@DEGRADATION_REGISTRY.register()
def rain_streaks(img, rng, density=0.02, length=(10, 20), angle=(-20, 20), intensity=(0.6, 0.9)):
    """Bright, slanted, motion-blurred streaks added to the image (screen blend), like Rain100L.

    ``density`` is the fraction of pixels that seed a drop; ``length``, ``angle`` (degrees from
    vertical) and ``intensity`` are values or (low, high) ranges drawn once per image.
    """
    h, w = img.shape[:2]

    def draw(v):
        return rng.uniform(*v) if isinstance(v, (list, tuple)) else float(v)

    drops = (rng.random((h, w), dtype=np.float32) < density).astype(np.float32)
    drops *= rng.uniform(0.5, 1.0, size=(h, w)).astype(np.float32)
    streaks = cv2.filter2D(drops, -1, _line_kernel(draw(length), 90 + draw(angle)), borderType=cv2.BORDER_REFLECT)
    streaks = np.clip(streaks / max(streaks.max(), 1e-6) * draw(intensity), 0, 1)[..., None]
    return 1 - (1 - img) * (1 - streaks)


@DEGRADATION_REGISTRY.register()
def haze(img, rng, beta=(0.6, 1.6), airlight=(0.7, 0.95)):
    """Atmospheric scattering ``I = J t + A (1 - t)``, ``t = exp(-beta d)`` with a smooth random depth ``d``.

    ``beta`` (scattering) and ``airlight`` ``A`` are values or (low, high) ranges.
    """
    h, w = img.shape[:2]
    b = rng.uniform(*beta) if isinstance(beta, (list, tuple)) else float(beta)
    a = rng.uniform(*airlight) if isinstance(airlight, (list, tuple)) else float(airlight)
    # depth grows towards a random "horizon" side, plus low-frequency variation
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(theta) * xx / max(w - 1, 1) + np.sin(theta) * yy / max(h - 1, 1))
    ramp = (ramp - ramp.min()) / max(ramp.max() - ramp.min(), 1e-6)
    coarse = cv2.resize(rng.random((4, 4), dtype=np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    depth = np.clip(0.3 + 0.5 * ramp + 0.2 * coarse, 0, 1.2)
    t = np.exp(-b * depth)[..., None]
    return img * t + a * (1 - t)


@DEGRADATION_REGISTRY.register()
def low_light(img, rng, gamma=(1.5, 2.5), scale=(0.1, 0.3), noise_sigma=2):
    """Dark, low-contrast image: ``scale * img ** gamma`` plus a little sensor noise (sigma on 0..255)."""
    g = rng.uniform(*gamma) if isinstance(gamma, (list, tuple)) else float(gamma)
    s = rng.uniform(*scale) if isinstance(scale, (list, tuple)) else float(scale)
    dark = s * np.power(img, g)
    return dark + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(noise_sigma / 255.0)


@DEGRADATION_REGISTRY.register()
def motion_blur(img, rng, length=(7, 15), angle=(0, 180)):
    """Linear motion blur with a random (or fixed) length in pixels and angle in degrees."""
    ln = rng.uniform(*length) if isinstance(length, (list, tuple)) else float(length)
    an = rng.uniform(*angle) if isinstance(angle, (list, tuple)) else float(angle)
    return cv2.filter2D(img, -1, _line_kernel(ln, an), borderType=cv2.BORDER_REFLECT)


@DEGRADATION_REGISTRY.register()
def jpeg(img, rng, quality=(10, 30)):
    """JPEG compression artifacts at a random (or fixed) quality."""
    q = int(rng.integers(quality[0], quality[1] + 1)) if isinstance(quality, (list, tuple)) else int(quality)
    u8 = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode('.jpg', u8, [int(cv2.IMWRITE_JPEG_QUALITY), q])
    if not ok:
        raise RuntimeError('jpeg degradation: OpenCV could not encode the image')
    out = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED).astype(np.float32) / 255.0
    return out.reshape(img.shape)
