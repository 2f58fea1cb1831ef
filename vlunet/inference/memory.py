"""Memory budgets for inference (``--max-memory 3G``): measuring, modelling and choosing tiles.

A budget bounds the peak memory of the process while it restores an image: on a CPU its resident
set (what ``/proc/self/status`` calls VmHWM), on a CUDA device the memory PyTorch allocates there
(``torch.cuda.max_memory_allocated``; the caching allocator may reserve somewhat more).

How an image is fitted into a budget (:meth:`MemoryPlanner.plan`):

* what the process holds already (Python, the weights, the decoded image) is read, not guessed;
* a network's activation memory is a :class:`MemoryModel` ``fixed + per_pixel * pixels`` of one
  forward, **measured once** per network, precision, device and thread count by a calibration: a
  warm-up forward and forwards at two sizes, each peak read from the meter above
  (:func:`calibrate`); the result is kept in memory and on disk (``$VLUNET_CACHE_DIR`` or
  ``~/.cache/vlunet/memory_models.json``), so a later run does not measure again;
* the whole-image buffers the engine adds to what is held (the blended output and its weights,
  their quotient, the padded copy or the clamped result: :data:`WHOLE_IMAGE_COPIES` float32 RGB images) are added;
* if the whole image fits, it runs in one forward; otherwise the largest tile (a multiple of 8)
  whose forward fits what is left is chosen, and the reason is recorded (:class:`TilePlan`).

The measured peaks are scaled by :data:`SAFETY` before use. On Linux with glibc, a process that uses
a budget returns freed large blocks to the system at once (:func:`return_freed_memory`): otherwise
the C allocator keeps them, the resident set stays at its highest mark, and neither the calibration
nor the budget would be honest.
"""
import ctypes
import ctypes.util
import functools
import gc
import hashlib
import json
import math
import os
import re
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from vlunet.utils.tiling import MIN_TILE, TILE_MULTIPLE, balanced_tile

UNITS = {'': 1, 'B': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}
SAFETY = 1.15                 # measured activation peaks are scaled by this before planning
WHOLE_IMAGE_COPIES = 3        # float32 RGB images the engine adds beside one forward (see the module docstring)
CALIBRATION_SIDES = (128, 256)  # square calibration forwards (pixels per side), after a warm-up at the first
CALIBRATION_AGREEMENT = 0.9   # the smaller side costing less per pixel than this times the larger's: both measure again
MODEL_VERSION = 3             # bump when the calibration changes (old cached models are then ignored)


class MemoryBudgetError(ValueError):
    """An image cannot be restored within the memory budget (the message says what it would need)."""


# ------------------------------------------------------------------------------------------------
# budgets as people write them
# ------------------------------------------------------------------------------------------------
def parse_memory(value, where='--max-memory'):
    """``'3G'``, ``'512M'``, ``'1.5GiB'``, ``'800K'``, ``'3gb'`` or a number of bytes -> bytes (int).

    Units are binary (K = 1024 bytes, M = 1024 K, G = 1024 M, T = 1024 G). None/''/0 -> None (no budget).
    Raises ValueError naming ``where`` and the value."""
    if value is None or value == '' or value == 0:
        return None
    if isinstance(value, bool):
        raise ValueError(f'{where}: {value!r} is not a memory size; expected e.g. 3G, 512M or 800K')
    if isinstance(value, (int, float)):
        number, unit = float(value), ''
    else:
        match = re.fullmatch(r'\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?\s*', str(value), flags=re.IGNORECASE)
        if not match:
            raise ValueError(f'{where}: {value!r} is not a memory size; expected a number with a unit K, M or G '
                             '(binary: 1K = 1024 bytes), e.g. 3G, 512M or 800K')
        number, unit = float(match.group(1)), match.group(2).upper()
    size = int(number * UNITS[unit])
    if size <= 0:
        raise ValueError(f'{where}: {value!r}; expected a positive memory size (e.g. 3G)')
    return size


def format_bytes(size):
    """Bytes as people read them: '3.0 GiB', '512 MiB', '800 KiB'."""
    size = float(size)
    for unit, factor in (('GiB', 2**30), ('MiB', 2**20), ('KiB', 2**10)):
        if abs(size) >= factor:
            value = size / factor
            return f'{value:.1f} {unit}' if unit == 'GiB' or value < 10 else f'{value:.0f} {unit}'
    return f'{size:.0f} B'


# ------------------------------------------------------------------------------------------------
# meters
# ------------------------------------------------------------------------------------------------
def _proc_status_bytes(field):
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def resident_bytes():
    """The resident set of this process (bytes; None where /proc is not available)."""
    return _proc_status_bytes('VmRSS')


def peak_resident_bytes():
    """The peak resident set of this process since it started or since :func:`reset_peak_resident`."""
    return _proc_status_bytes('VmHWM')


def reset_peak_resident():
    """Reset the peak resident set (VmHWM) to the current one (Linux >= 4.0). False where not possible."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


KERNEL_CACHE_ENTRIES = 32


def bound_kernel_cache(entries=KERNEL_CACHE_ENTRIES):
    """Bound ideep's cache of oneDNN computations to ``entries`` unless the user has set its size.

    On the CPU, PyTorch runs bf16 matrix products and convolutions through ideep, which keeps an LRU
    cache of up to ``LRU_CACHE_CAPACITY`` (default 1024) prepared computations, one per shape, on top
    of oneDNN's own primitive cache (which already spares the kernels' recompilation). A training step
    of a restoration network touches a few hundred shapes, so at the default the cache holds all of
    them: 30-45 MB resident in bf16 (scripts/benchmark_train.py, patch 128, batch 2), with no speed
    measured in return; a few dozen entries keep the hits of consecutive blocks of one level.
    ideep reads the variable when it first builds a computation, so this must run before the first
    one (``import vlunet`` calls it). Returns the size in force; a size that is not a positive
    integer raises ValueError (ideep would end the process without a word at its first computation)."""
    value = os.environ.setdefault('LRU_CACHE_CAPACITY', str(int(entries)))
    if not value.strip().isdigit() or int(value) < 1:
        raise ValueError(f'environment variable LRU_CACHE_CAPACITY={value!r}: expected a positive integer '
                         f'(the entries of PyTorch\'s CPU cache of oneDNN computations; unset it for {entries})')
    return int(value)


_RETURNING = []


@functools.lru_cache(maxsize=None)
def _glibc():
    """The C library (None where it cannot be loaded); found once (``find_library`` runs ldconfig)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    except OSError:
        return None


def release_free_heap():
    """Give the free pages inside glibc's heaps back to the system (``malloc_trim(0)``). Blocks under the
    mmap threshold that were freed stay in the heap, resident; freed next to each other they form large
    free regions, and a large allocation served from one would not raise the resident set, so a
    measurement would read it as nothing. True where it applied (glibc only)."""
    libc = _glibc()
    if libc is None or not hasattr(libc, 'malloc_trim'):
        return False
    libc.malloc_trim(0)
    return True


def return_freed_memory(threshold=256 * 1024):
    """Make glibc's malloc give blocks of ``threshold`` bytes or more back to the system when they are
    freed (a fixed mmap threshold, which also stops glibc from raising it after large frees), so the
    resident set follows the memory in use. Once per process; True where it applied (glibc only)."""
    if _RETURNING:
        return _RETURNING[0]
    ok = False
    try:
        mallopt = _glibc().mallopt
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = bool(mallopt(m_mmap_threshold, int(threshold))) and bool(mallopt(m_trim_threshold, int(threshold)))
        if ok:
            release_free_heap()
    except AttributeError:  # no C library, or one without mallopt
        ok = False
    _RETURNING.append(ok)
    return ok


class MemoryMeter:
    """The memory a process uses on one device and its peak, as a budget counts them.

    ``in_use()``: bytes held now. ``start()`` then ``peak()``: the highest use since ``start``.
    CPU: the resident set (Linux /proc; a sampling thread where the peak cannot be reset); CUDA:
    ``torch.cuda`` memory statistics of that device. ``available`` is False elsewhere."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.kind = self.device.type
        if self.kind == 'cpu':
            self.available = resident_bytes() is not None
            self.resettable = self.available and reset_peak_resident()
        else:
            self.available = self.kind == 'cuda' and torch.cuda.is_available()
            self.resettable = self.available
        self._sampler = None

    def describe(self):
        return {'cpu': 'peak resident set of the process', 'cuda': 'torch.cuda.max_memory_allocated'}.get(
            self.kind, 'not measurable')

    def in_use(self):
        if self.kind == 'cpu':
            return resident_bytes() or 0
        if self.kind == 'cuda':
            return torch.cuda.memory_allocated(self.device)
        return 0

    def start(self):
        if self.kind == 'cuda':
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == 'cpu':
            if not (self.resettable and reset_peak_resident()):
                self._sampler = _Sampler()
                self._sampler.start()

    def peak(self):
        if self.kind == 'cuda':
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        if self._sampler is not None:
            sampler, self._sampler = self._sampler, None
            return max(sampler.stop(), self.in_use())
        return peak_resident_bytes() or self.in_use()


class _Sampler(threading.Thread):
    """Reads the resident set every millisecond (where the kernel's peak cannot be reset)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.highest, self._done = resident_bytes() or 0, threading.Event()

    def run(self):
        while not self._done.is_set():
            self.highest = max(self.highest, resident_bytes() or 0)
            time.sleep(0.001)

    def stop(self):
        self._done.set()
        self.join()
        return self.highest


# ------------------------------------------------------------------------------------------------
# the memory model of one network
# ------------------------------------------------------------------------------------------------
@dataclass
class MemoryModel:
    """Peak memory of one forward above what was held before it: ``fixed + per_pixel * pixels`` (bytes),
    measured by :func:`calibrate` (``samples``: the (pixels, peak bytes) it measured)."""
    fixed: float
    per_pixel: float
    samples: tuple = ()
    what: str = ''

    def forward_bytes(self, pixels):
        """The measured peak of a forward over ``pixels`` input pixels (batch x height x width), times SAFETY."""
        return SAFETY * (self.fixed + self.per_pixel * pixels)

    def largest_pixels(self, room):
        """The most input pixels one forward may take with ``room`` bytes free (0 if not even a tiny one)."""
        return max(0.0, (room / SAFETY - self.fixed) / self.per_pixel) if self.per_pixel > 0 else math.inf


def calibrate(run, device, channels=3, sides=CALIBRATION_SIDES, what=''):
    """Measure ``run`` ((1, C, h, w) float32 in [0, 1] -> restored batch; it applies the precision and the
    conditioning) at a warm-up size and at the two sides in ``sides``; returns the fitted :class:`MemoryModel`.

    Each peak is the meter's peak during that forward minus what was held just before it; the line
    through the two sizes gives ``per_pixel`` (at least half the larger size's average, so a noisy
    small size cannot make it optimistic) and ``fixed`` the rest.

    On the CPU the free pages inside the C allocator's heaps are given back before each forward
    (:func:`release_free_heap`): a process that freed many small blocks (a test suite, an app that
    restored other photos) would otherwise serve the forward from resident pages, and read nothing.
    Memory freed during a forward by someone else (the cyclic garbage collector, another thread)
    lowers its measured peak by as much, so the collector runs before each forward and is paused
    during it; and where the two sizes disagree (the smaller one costing less per pixel than the
    larger one, which a non-negative ``fixed`` rules out), both are measured again and the larger
    reading of each is kept: a one-off drop cannot make a budget optimistic."""
    meter = MemoryMeter(device)
    if not meter.available:
        raise MemoryBudgetError(f'a memory budget cannot be measured on {device} (only CPUs with Linux /proc and '
                                'CUDA devices); restore without --max-memory, with --tile if needed')
    if meter.kind == 'cpu':
        return_freed_memory()
    generator = torch.Generator().manual_seed(0)

    def measure(side):
        x = torch.rand(1, channels, side, side, generator=generator).to(device)
        gc.collect()
        if meter.kind == 'cpu':
            release_free_heap()  # so what the forward allocates comes as fresh pages, which the meter sees
        collecting = gc.isenabled()
        gc.disable()
        try:
            meter.start()
            before = meter.in_use()
            out = run(x)
            peak = meter.peak()
            del out
        finally:
            if collecting:
                gc.enable()
        return side * side, max(0, peak - before)

    with torch.no_grad():
        measure(sides[0])  # a warm-up (one-off buffers, kernel caches)
        samples = [measure(side) for side in sides]
        (n1, p1), (n2, p2) = samples
        if p1 / n1 < CALIBRATION_AGREEMENT * p2 / n2:
            again = [measure(side) for side in sides]
            samples = [(n, max(p, q)) for (n, p), (_, q) in zip(samples, again)]
    (n1, p1), (n2, p2) = samples
    per_pixel = max((p2 - p1) / (n2 - n1), p2 / n2 * 0.5, 1.0)
    fixed = max(0.0, p2 - per_pixel * n2)
    return MemoryModel(float(fixed), float(per_pixel), tuple(samples), what)


def _cache_path():
    folder = os.environ.get('VLUNET_CACHE_DIR') or os.path.join(os.path.expanduser('~'), '.cache', 'vlunet')
    return os.path.join(folder, 'memory_models.json')


def model_key(description):
    """A stable key of a calibration's circumstances (a JSON-able dict)."""
    text = json.dumps({**description, 'version': MODEL_VERSION, 'torch': torch.__version__}, sort_keys=True,
                      default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:20]


_MODELS = {}
_LOCK = threading.Lock()


def cached_model(description, measure: Callable[[], MemoryModel], use_disk=True):
    """The :class:`MemoryModel` of ``description`` (network, precision, device, threads): from this process,
    from the disk cache, or measured now by ``measure()`` and stored in both."""
    key = model_key(description)
    with _LOCK:
        if key in _MODELS:
            return _MODELS[key]
        path = _cache_path()
        stored = {}
        if use_disk and os.path.isfile(path):
            try:
                with open(path) as f:
                    stored = json.load(f)
                entry = stored.get(key)
                if entry:
                    model = MemoryModel(float(entry['fixed']), float(entry['per_pixel']),
                                        tuple(tuple(s) for s in entry.get('samples', ())), entry.get('what', ''))
                    _MODELS[key] = model
                    return model
            except (OSError, ValueError, KeyError, TypeError):
                stored = {}  # a damaged cache is measured again and replaced
        model = measure()
        _MODELS[key] = model
        if use_disk:
            try:
                from vlunet.utils.atomic import write_json_atomic
                os.makedirs(os.path.dirname(path), exist_ok=True)
                stored = stored if isinstance(stored, dict) else {}
                stored[key] = {**asdict(model), 'described': description}
                write_json_atomic(path, stored, default=str)
            except OSError:
                pass  # a read-only home: measured again next time
        return model


# ------------------------------------------------------------------------------------------------
# plans
# ------------------------------------------------------------------------------------------------
@dataclass
class TilePlan:
    """How one image runs within a budget: ``tile`` None (whole) or the tile side in pixels, and why."""
    tile: Optional[int]
    reason: str
    estimate: float        # estimated peak of the process (bytes)
    budget: int


def image_buffer_bytes(batch, height, width, channels=3):
    """What the engine holds beside a forward for one batch: WHOLE_IMAGE_COPIES float32 images."""
    return WHOLE_IMAGE_COPIES * 4 * batch * channels * height * width


def padded(n, multiple=TILE_MULTIPLE):
    return int(math.ceil(n / multiple) * multiple)


def plan_tiles(model, budget, in_use, batch, height, width, overlap, channels=3, what='the image'):
    """A :class:`TilePlan` for a (batch, channels, height, width) input within ``budget`` bytes of which
    ``in_use`` are held already. Raises MemoryBudgetError when not even a tile of MIN_TILE pixels fits."""
    buffers = image_buffer_bytes(batch, height, width, channels)
    room = budget - in_use - buffers
    whole = model.forward_bytes(batch * padded(height) * padded(width))
    size = f'{width}x{height}' + (f' (batch {batch})' if batch > 1 else '')
    if whole <= room:
        return TilePlan(None, f'whole image: needs about {format_bytes(in_use + buffers + whole)} of the '
                              f'{format_bytes(budget)} budget', in_use + buffers + whole, budget)
    side = math.isqrt(int(model.largest_pixels(room) / batch)) if room > 0 else 0
    side = min(side // TILE_MULTIPLE * TILE_MULTIPLE, padded(max(height, width)))
    smallest = max(MIN_TILE, padded(overlap + TILE_MULTIPLE))
    if side < smallest:
        need = in_use + buffers + model.forward_bytes(batch * smallest * smallest)
        raise MemoryBudgetError(
            f'{what} ({size}) does not fit the memory budget of {format_bytes(budget)}: {format_bytes(in_use)} are in '
            f'use already, its buffers take {format_bytes(buffers)} and even tiles of {smallest} px need '
            f'{format_bytes(model.forward_bytes(batch * smallest * smallest))} (about {format_bytes(need)} in all); '
            'raise --max-memory, or restore smaller images')
    largest = side
    side = max(balanced_tile(height, width, largest, overlap), smallest)  # as many tiles, less overlap recomputed
    tile_bytes = model.forward_bytes(batch * side * side)
    return TilePlan(side, f'tiled by the memory budget: the whole image would need about '
                          f'{format_bytes(in_use + buffers + whole)}, more than {format_bytes(budget)}; with tiles of '
                          f'{side} px about {format_bytes(in_use + buffers + tile_bytes)}'
                          + (f' (tiles up to {largest} px would fit; as many smaller ones recompute less overlap)'
                             if side < largest else ''),
                    in_use + buffers + tile_bytes, budget)


IMAGE_BYTES_PER_PIXEL = 4 * 3 * (WHOLE_IMAGE_COPIES + 2) + 8   # + the decoded file and the float image read from it


def budget_pixel_limit(budget):
    """The most pixels an image may have under ``budget`` bytes: its whole-image buffers alone must fit
    (checked from the header before decoding, as the pixel limit)."""
    return int(budget // IMAGE_BYTES_PER_PIXEL)
