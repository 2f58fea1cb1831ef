"""``AllInOneDataset``: one dataset that mixes degradation sources (noise, rain, haze, ...).

Option file (``datasets.train``; validation sets use the same type with one source each)::

    type: AllInOneDataset
    gt_size: 128                 # random crop (train phase)
    use_hflip: true              # flips and 90-degree rotations (train phase)
    use_rot: true
    io_backend: {type: disk}     # default for every source; lmdb works too
    seed: 0                      # validation: degraded images are a fixed function of (seed, file)
    skip_unreadable: false       # true: leave out images that cannot be read (counted in the log);
                                 # default: stop with an error naming the file, the reason and the dataset
    max_pixels: 4194304          # images with more pixels are unreadable (checked from the header, before
                                 # decoding; the limit vlunet-restore and vlunet-app share); 0: no limit
    sources:
      - name: noise15            # degradation type name (reported per item)
        label: 0                 # integer label = index of its CLIP prompt (prompt_index overrides)
        prompt: image with noise # optional: the CLIP prompt text of this type
        dataroot_gt: datasets/WED_BSD400     # clean images (vlunet://demo_data/... = shipped with the package)
        degradation: {type: gaussian_noise, sigma: 15}   # ... degraded on the fly (data/degradations.py)
        repeat: 3                # how often the source's images appear per epoch
      - name: rain
        label: 4
        dataroot_gt: datasets/Rain100L/train/target      # paired data
        dataroot_lq: datasets/Rain100L/train/input
        meta_info_file: ~        # optional list of file names (first column)
        io_backend: {type: lmdb} # per-source override; dataroots then end in .lmdb
        repeat: 120

Every item is ``{'lq', 'gt', 'label', 'prompt_index', 'degradation', 'lq_path', 'gt_path'}``.
For the ``train`` phase a ``gt_size`` patch is cut at random and augmented; otherwise the whole
image is returned and synthetic degradations use a per-image seed, so validation sets are fixed.
"""
import os
import zlib

import numpy as np
import torch
from basicsr.utils import FileClient, get_root_logger, img2tensor, scandir
from basicsr.utils.registry import DATASET_REGISTRY
from torch.utils import data as data

from vlunet.data.degradations import NOISE_DEGRADATIONS, apply_degradation, check_degradation
from vlunet.utils.image_io import (DEFAULT_MAX_PIXELS, ImageReadError, ImageTooLargeError, decode_image, is_image_file,
                                   raw_to_bgr_float, unreadable_reason)


PACKAGE_PREFIX = 'vlunet://'


def resolve_dataroot(path):
    """Expand ``~`` and the ``vlunet://`` prefix (data shipped inside the package, e.g. the demo)."""
    if path.startswith(PACKAGE_PREFIX):
        return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path[len(PACKAGE_PREFIX):])
    return os.path.expanduser(path)


class DatasetError(ValueError):
    """Bad dataset input; the message names the file or option key and what was expected."""


def _read_image(file_client, path, client_key, max_pixels=DEFAULT_MAX_PIXELS):
    """Read one image as float32 HWC BGR in [0, 1] (8- or 16-bit; gray is expanded to 3 channels).
    Images above ``max_pixels`` (from the header, before decoding) are unreadable, as for vlunet-restore."""
    try:
        buf = file_client.get(path, client_key)
    except OSError as err:
        reason = unreadable_reason(path, err)
        if reason == 'image file not found':
            raise _unreadable(f'image file not found: {path}') from None
        raise _unreadable(f'{path}: {reason}') from None
    if buf is None:
        raise _unreadable(f'no entry {path!r} in LMDB {client_key!r}')
    try:
        return raw_to_bgr_float(decode_image(buf, path, max_pixels))
    except ImageReadError as err:
        hint = '; raise the dataset option max_pixels (0: no limit)' if isinstance(err, ImageTooLargeError) else ''
        raise _unreadable(f'{err}{hint}') from None


def _unreadable(message):
    """A DatasetError for a file that cannot be read (what ``skip_unreadable`` may skip)."""
    err = DatasetError(message)
    err.unreadable = True
    return err


def _flip_rotate(imgs, rng, hflip, rotation):
    """BasicSR's ``augment`` (horizontal flip, vertical flip, transpose; each with probability 1/2),
    drawn from the item's ``rng``."""
    h = hflip and rng.random() < 0.5
    v = rotation and rng.random() < 0.5
    t = rotation and rng.random() < 0.5
    out = []
    for img in imgs:
        if h:
            img = img[:, ::-1]
        if v:
            img = img[::-1]
        if t:
            img = img.transpose(1, 0, 2)
        out.append(np.ascontiguousarray(img))
    return out


class _Source:
    """One degradation source: a list of (gt, lq) keys plus how to read/degrade them."""

    def __init__(self, opt, index, default_io):
        where = f'datasets.sources[{index}]'
        self.name = opt.get('name', f'source{index}')
        if 'label' not in opt:
            raise DatasetError(f'{where} ({self.name}): missing key "label" (integer degradation label)')
        self.label = int(opt['label'])
        self.prompt_index = int(opt.get('prompt_index', self.label))
        self.prompt = opt.get('prompt')
        self.repeat = int(opt.get('repeat', 1))
        if self.repeat < 1:
            raise DatasetError(f'{where}.repeat: expected a positive integer, got {opt["repeat"]!r}')
        self.degradation = opt.get('degradation')
        gt_root, lq_root = opt.get('dataroot_gt'), opt.get('dataroot_lq')
        if gt_root is None:
            raise DatasetError(f'{where} ({self.name}): missing key "dataroot_gt"')
        if (lq_root is None) == (self.degradation is None):
            raise DatasetError(f'{where} ({self.name}): give exactly one of "dataroot_lq" (paired data) '
                               'or "degradation" (synthesised from clean images)')
        if self.degradation is not None:
            try:  # every step of a composition, and the option names, before any image is read
                check_degradation(self.degradation, f'{where}.degradation')
            except (KeyError, ValueError, TypeError) as err:
                raise DatasetError(f'{err.args[0]} (source {self.name})') from None
        self.io_opt = dict(opt.get('io_backend') or default_io)
        self.paired = lq_root is not None
        roots = {'gt': resolve_dataroot(gt_root)}
        if self.paired:
            roots['lq'] = resolve_dataroot(lq_root)
        for key, root in roots.items():
            if not os.path.exists(root):
                raise DatasetError(f'{where}.dataroot_{key}: path does not exist: {root}')
        self.roots = roots
        self.names = self._list_names(opt.get('meta_info_file'), where)
        if not self.names:
            raise DatasetError(f'{where}.dataroot_gt: no images found in {roots["gt"]}')

    def _list_names(self, meta_info_file, where):
        if self.io_opt['type'] == 'lmdb':
            lists = {k: _lmdb_keys(root) for k, root in self.roots.items()}
        elif meta_info_file is not None:
            if not os.path.isfile(meta_info_file):
                raise DatasetError(f'{where}.meta_info_file: file not found: {meta_info_file}')
            with open(meta_info_file) as f:
                names = [line.split()[0] for line in f if line.strip()]
            for key, root in self.roots.items():
                missing = [n for n in names if not os.path.isfile(os.path.join(root, n))]
                if missing:
                    raise DatasetError(f'{meta_info_file}: {len(missing)} listed file(s) missing in '
                                       f'dataroot_{key} {root}, e.g. {missing[:3]}')
            return names
        else:
            lists = {
                k: sorted(p for p in scandir(root, recursive=True) if is_image_file(p))
                for k, root in self.roots.items()
            }
        if self.paired:
            gt, lq = set(lists['gt']), set(lists['lq'])
            if gt != lq:
                only_gt, only_lq = sorted(gt - lq), sorted(lq - gt)
                raise DatasetError(
                    f'{where} ({self.name}): dataroot_gt {self.roots["gt"]} and dataroot_lq {self.roots["lq"]} '
                    f'must hold the same file names; only in gt: {only_gt[:5]}, only in lq: {only_lq[:5]}')
        return lists['gt']

    def path(self, key, name):
        return name if self.io_opt['type'] == 'lmdb' else os.path.join(self.roots[key], name)


def _lmdb_keys(root):
    meta = os.path.join(root, 'meta_info.txt')
    if not root.endswith('.lmdb'):
        raise DatasetError(f'io_backend lmdb: dataroot should end with .lmdb, got {root}')
    if not os.path.isfile(meta):
        raise DatasetError(f'LMDB {root} has no meta_info.txt (incomplete or not made by basicsr.utils.lmdb_util)')
    with open(meta) as f:
        return [os.path.splitext(line.split(' ')[0])[0] for line in f if line.strip()]


@DATASET_REGISTRY.register()
class AllInOneDataset(data.Dataset):
    """Mix of degradation sources for all-in-one restoration (see the module docstring)."""

    def __init__(self, opt):
        super().__init__()
        self.opt = opt
        self.phase = opt.get('phase', 'train')
        self.gt_size = opt.get('gt_size')
        self.seed = int(opt.get('seed', 0))
        sources = opt.get('sources')
        if not sources:
            raise DatasetError(f'datasets.{opt.get("name", "?")}: "sources" must list at least one source')
        default_io = opt.get('io_backend') or {'type': 'disk'}
        self.sources = [_Source(s, i, default_io) for i, s in enumerate(sources)]
        repeat = self.phase == 'train'
        self.index = [(si, ni) for si, src in enumerate(self.sources) for _ in range(src.repeat if repeat else 1)
                      for ni in range(len(src.names))]
        self.file_clients = [None] * len(self.sources)
        self.skip_unreadable = bool(opt.get('skip_unreadable', False))
        max_pixels = opt.get('max_pixels', DEFAULT_MAX_PIXELS)
        if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 0:
            raise DatasetError(f'datasets.{opt.get("name", "?")}.max_pixels: expected a whole number >= 0 '
                               f'(0: no limit), got {max_pixels!r}')
        self.max_pixels = max_pixels or None
        self._skipped = 0
        if self.skip_unreadable and self.phase != 'train':
            self._drop_unreadable()

    def __len__(self):
        return len(self.index)

    def _client(self, si):
        if self.file_clients[si] is None:
            src = self.sources[si]
            io_opt = dict(src.io_opt)
            backend = io_opt.pop('type')
            if backend == 'lmdb':
                keys = list(src.roots)
                io_opt.update(db_paths=[src.roots[k] for k in keys], client_keys=keys)
            self.file_clients[si] = FileClient(backend, **io_opt)
        return self.file_clients[si]

    def _rng(self, src, name):
        """The random stream of one item. Training: seeded from torch's generator, which BasicSR seeds
        with ``manual_seed + rank`` and the DataLoader per worker and epoch, so a run repeats with the
        same seed and ``num_worker_per_gpu`` while every worker and rank draws a different stream.
        Otherwise a fixed function of (dataset seed, source, file): the same degraded image always."""
        if self.phase == 'train':
            return np.random.default_rng(torch.randint(0, 2**62, (2, )).tolist())
        return np.random.default_rng([self.seed, zlib.crc32(f'{src.name}/{name}'.encode())])

    def __getitem__(self, idx):
        for attempt in range(100):
            try:
                return self._item(idx)
            except DatasetError as err:
                if not (self.skip_unreadable and getattr(err, 'unreadable', False)):
                    raise DatasetError(f'datasets.{self.opt.get("phase", "?")} ({self.opt.get("name", "?")}): '
                                       f'{err}') from None
                self._skipped += 1
                get_root_logger().warning(f'{self.opt.get("name")}: skipped an unreadable image ({err}); '
                                          f'{self._skipped} skipped so far in this process (skip_unreadable: true)')
                idx = int(torch.randint(0, len(self.index), (1, )))
        raise DatasetError(f'datasets ({self.opt.get("name")}): 100 unreadable images in a row; giving up')

    def _item(self, idx):
        si, ni = self.index[idx]
        src, name = self.sources[si], self.sources[si].names[ni]
        client = self._client(si)
        rng = self._rng(src, name)
        gt_path = src.path('gt', name)
        gt = _read_image(client, gt_path, 'gt', self.max_pixels)
        if src.paired:
            lq_path = src.path('lq', name)
            lq = _read_image(client, lq_path, 'lq', self.max_pixels)
            if lq.shape != gt.shape:
                raise DatasetError(f'size mismatch: {lq_path} is {lq.shape[1]}x{lq.shape[0]} but '
                                   f'{gt_path} is {gt.shape[1]}x{gt.shape[0]} (W x H)')
        else:
            lq_path, lq = gt_path, None
        if self.phase == 'train' and self.gt_size:
            gt, lq = self._random_crop(gt, lq, gt_path, rng)
        if lq is None:
            lq = apply_degradation(gt, src.degradation, rng)
        if self.phase == 'train':
            gt, lq = _flip_rotate([gt, lq], rng, self.opt.get('use_hflip', True), self.opt.get('use_rot', True))
        gt_t, lq_t = img2tensor([gt, lq], bgr2rgb=True, float32=True)
        return {
            'lq': lq_t, 'gt': gt_t, 'label': src.label, 'prompt_index': src.prompt_index,
            'degradation': src.name, 'lq_path': lq_path, 'gt_path': gt_path
        }

    def _random_crop(self, gt, lq, gt_path, rng):
        size = int(self.gt_size)
        h, w = gt.shape[:2]
        if h < size or w < size:
            raise DatasetError(f'image {gt_path} is {w}x{h}, smaller than the training patch gt_size={size}')
        top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        crop = (slice(top, top + size), slice(left, left + size))
        return np.ascontiguousarray(gt[crop]), (None if lq is None else np.ascontiguousarray(lq[crop]))

    def _drop_unreadable(self):
        """``skip_unreadable`` outside training: decode every file once, leave out those that fail."""
        kept, dropped = [], []
        for si, ni in self.index:
            src, name = self.sources[si], self.sources[si].names[ni]
            try:
                for key in src.roots:
                    _read_image(self._client(si), src.path(key, name), key, self.max_pixels)
                kept.append((si, ni))
            except DatasetError as err:
                if not getattr(err, 'unreadable', False):
                    raise
                dropped.append(str(err))
        if dropped:
            get_root_logger().warning(f'{self.opt.get("name")}: {len(dropped)} unreadable image(s) left out of the '
                                      'set (skip_unreadable: true): ' + '; '.join(dropped[:10]))
        self.index = kept

    def protocol(self):
        """How the degraded images of this set are made, for ``metrics.json``: ``{'noise': ...,
        'synthetic': ...}``, each None or a list of ``{source, type, **params, seed, seeding}``
        (``noise``: the Gaussian-noise sources; ``synthetic``: other on-the-fly degradations).
        Paired sources read their degraded images from disk and appear in neither."""
        found = {'noise': [], 'synthetic': []}
        for src in self.sources:
            if src.degradation is None:
                continue
            entry = {'source': src.name, **dict(src.degradation)}
            if self.phase == 'train':
                entry['seeding'] = 'random (training)'
            else:
                entry.update(seed=self.seed, seeding="per image: numpy default_rng([seed, crc32('<source>/<file>')])")
            found['noise' if entry.get('type') in NOISE_DEGRADATIONS else 'synthetic'].append(entry)
        return {key: value or None for key, value in found.items()}

    def labels(self):
        """Label of every item, in order (for class-balanced samplers and statistics)."""
        return torch.tensor([self.sources[si].label for si, _ in self.index])
