"""``vlunet-prepare``: turn downloaded restoration data sets into the folders (or LMDBs) the option files read.

One task per call::

    vlunet-prepare --task derain --split train --src ~/dl/RainTrainL
    vlunet-prepare --task dehaze --src ~/dl/OTS_BETA --link
    vlunet-prepare --task deblur --split test --src ~/dl/GOPRO_Large --lmdb
    vlunet-prepare --task cdd11 --split train --src ~/dl/CDD-11_train --link

or several from a YAML file (every job is checked before anything is written)::

    vlunet-prepare --config prepare.yml

    out: datasets            # optional (default datasets); so are lmdb, link, overwrite
    link: true
    jobs:
      - {task: denoise, split: train, src: ~/dl/denoise}     # holds BSD400/ and WaterlooED/
      - {task: denoise, split: test, src: ~/dl/CBSD68}
      - {task: derain, split: test, src: ~/dl/Rain100L, name: Rain100L}

``python scripts/prepare_all_in_one.py ...`` is the same command.

Output under ``--out`` (default ``datasets``)::

    denoise/train/                       clean images only (noise is added on the fly)
    denoise/test/CBSD68/
    <task>/train/{input,target}/         paired tasks (derain, dehaze, deblur, lowlight):
    <task>/test/<Set>/{input,target}/    input = degraded, target = clean, identical file names
    <task>/meta_info_<task>_train.txt          one line per image: "name (h,w,c)" (meta_info_file)
    <task>/meta_info_<task>_test_<Set>.txt
    cdd11/<split>/clear/                 CDD-11 (split train or test): the clean images once, and
    cdd11/<split>/<type>/                one folder per composite degradation type (low, haze, ...,
    cdd11/meta_info_cdd11_<split>_<type>.txt   low_haze_snow) with the clean images' names; one list per type

With ``--lmdb`` the folders above become LMDBs made by ``basicsr.utils.lmdb_util.make_lmdb_from_imgs``
(``denoise/train.lmdb``, ``<task>/train/{input,target}.lmdb``, ``cdd11/<split>/{clear,<type>}.lmdb``, ...;
keys = file names without extension, identical in input and target, each with basicsr's ``meta_info.txt``).

Every pair is checked first: matching names, decodable images (truncated JPEGs included), equal
height and width. All problems are reported together, naming the files, and the run exits with
status 1 without writing anything. Images are read with the package's one reader
(:mod:`vlunet.utils.image_io`) and written with its one atomic writer (:mod:`vlunet.utils.atomic`)
into a hidden staging folder next to their destination (:class:`Staging`), which is renamed into
place only when complete; existing outputs are kept unless ``--overwrite``. Images are copied byte for
byte (or hard-linked with ``--link``), except where a pair's two files have different extensions
(SOTS: hazy .jpg, clean .png): then both are stored as .png (decoded and re-encoded losslessly) so that
input and target have identical names.
"""
import argparse
import os
import re
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import cv2
import yaml
from tqdm import tqdm

from vlunet.utils.atomic import encode_image, fsync_folder, write_atomic, write_text_atomic
from vlunet.utils.image_io import ImageReadError, decode_image, is_image_file, read_file

TASKS = ('denoise', 'derain', 'dehaze', 'deblur', 'lowlight', 'cdd11')
SPLITS = ('train', 'test')
TEST_SET_NAMES = {'denoise': 'CBSD68', 'derain': 'Rain100L', 'dehaze': 'SOTS_outdoor', 'deblur': 'GoPro',
                  'lowlight': 'LOL'}
STAGING_PREFIX = '.vlunet-prepare-'

# CDD-11: the clean images in clear/ and one folder per composite type, each image named like its clean one
CDD11_CLEAR = 'clear'
CDD11_TYPES = ('low', 'haze', 'rain', 'snow', 'low_haze', 'low_rain', 'low_snow', 'haze_rain', 'haze_snow',
               'low_haze_rain', 'low_haze_snow')
# the split folder names in use: the distributed archives unpack to CDD-11_train/ and CDD-11_test/, other
# copies (and loaders) use train/ and test/; matched case-insensitively
CDD11_SPLIT_DIRS = {'train': ('train', 'CDD-11_train', 'CDD11_train'), 'test': ('test', 'CDD-11_test', 'CDD11_test')}

LAYOUTS = """\
source layouts (--src):
  denoise train  BSD400/*.png|jpg and/or WaterlooED/*.bmp (or pristine_images/, WED/), anywhere
                 under SRC; without such folders every image under SRC
  denoise test   CBSD68: SRC[/CBSD68][/original_png|original]/*.png (noisy subfolders ignored)
  derain         SRC/input/ + SRC/target/ with identical names, or rain-K.png + norain-K.png
                 anywhere under SRC (all in one folder, or the rainy ones in rainy/ and the clean
                 ones beside it or in gt/) -> K.png
  dehaze         SRC/{hazy|haze|synthetic|input}/ (searched recursively) with NNNN_A_beta.jpg|png and
                 SRC/{clear|gt|clean|original|target}/NNNN.jpg|png (RESIDE OTS, SOTS outdoor);
                 one pair per hazy image, named like the hazy image
  deblur         GoPro: SRC/{train|test}/<sequence>/{blur,sharp}/*.png (or SRC/<sequence>/...)
                 -> <sequence>_<frame>.png
  lowlight       LOL: SRC/{our485|eval15}/{low,high}/*.png (or SRC/{low,high}/); train = our485,
                 test = eval15
  cdd11          CDD-11: SRC/<split>/{clear,low,haze,rain,snow,low_haze,low_rain,low_snow,haze_rain,
                 haze_snow,low_haze_rain,low_haze_snow}/*.png, <split> = train|test or
                 CDD-11_train|CDD-11_test (the distributed archives; any case), or SRC itself holding
                 clear/ and the type folders; degraded images are named like their clean image
  derain, deblur and lowlight also take SRC/input/ + SRC/target/ with identical names (already paired)
"""


class Problem(Exception):
    """One thing wrong with the input; the message names the file and what was expected."""


class Item:
    """One output image (``lq`` is None for clean-only sets); ``key`` = output name without extension;
    ``group`` = the degradation type it belongs to where a job writes one folder per type (CDD-11)."""
    __slots__ = ('key', 'lq', 'gt', 'group')

    def __init__(self, key, gt, lq=None, group=None):
        self.key, self.gt, self.lq, self.group = key, gt, lq, group

    @property
    def source(self):
        return self.lq or self.gt

    def output_name(self):
        """``key`` + the source extension when both files share it, else + .png (re-encoded)."""
        exts = {os.path.splitext(p)[1].lower() for p in (self.gt, self.lq) if p is not None}
        return self.key + (os.path.splitext(self.gt)[1] if len(exts) == 1 else '.png')


# ------------------------------------------------------------------------------------------------
# finding files
# ------------------------------------------------------------------------------------------------
def is_image(name):
    return is_image_file(name) and not name.startswith('.')


def list_images(folder, recursive=True):
    """Sorted absolute paths of the image files in ``folder``."""
    found = []
    if recursive:
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
            found.extend(os.path.join(root, f) for f in files if is_image(f))
    else:
        found = [os.path.join(folder, f) for f in os.listdir(folder)
                 if is_image(f) and os.path.isfile(os.path.join(folder, f))]
    return sorted(found)


def subfolders(folder):
    """Sorted names of the (not hidden) sub-folders of ``folder``; [] if it cannot be listed."""
    try:
        return sorted(e for e in os.listdir(folder) if not e.startswith('.') and os.path.isdir(os.path.join(folder, e)))
    except OSError:
        return []


def child(folder, names):
    """The first sub-folder of ``folder`` whose name is one of ``names`` (case-insensitive), or None."""
    entries = {e.lower(): e for e in subfolders(folder)}
    for name in names:
        if name.lower() in entries:
            return os.path.join(folder, entries[name.lower()])
    return None


def stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def by_stem(paths, problems, what):
    """``{stem: path}``; two files with one stem are a problem (they would get one output name)."""
    table = {}
    for path in paths:
        key = stem(path)
        if key in table:
            problems.append(f'{path}: same name as {table[key]} ({what}); expected one file per name')
        else:
            table[key] = path
    return table


def match_pairs(lq, gt, problems, lq_what, gt_what, name=lambda key: key,
                expected=lambda key, side: f'one named {key}.*'):
    """Pair ``{key: path}`` tables; every file without a partner is a problem, naming the partner
    ``expected(key, 'lq' | 'gt')`` that is missing."""
    items = []
    for key in sorted(set(lq) | set(gt)):
        if key not in gt:
            problems.append(f'{lq[key]}: no matching {gt_what} image (expected {expected(key, "gt")})')
        elif key not in lq:
            problems.append(f'{gt[key]}: no matching {lq_what} image (expected {expected(key, "lq")})')
        else:
            items.append(Item(name(key), gt[key], lq[key]))
    return items


# ------------------------------------------------------------------------------------------------
# layouts: collect(src, split, problems) -> list of Item
# ------------------------------------------------------------------------------------------------
DENOISE_DIRS = ('BSD400', 'WaterlooED', 'pristine_images', 'WED')


def collect_denoise_train(src, split, problems):
    wanted = {n.lower() for n in DENOISE_DIRS}
    folders = []
    for root, dirs, _ in os.walk(src):
        dirs.sort()
        folders.extend(os.path.join(root, d) for d in dirs if d.lower() in wanted)
        dirs[:] = [d for d in dirs if d.lower() not in wanted and not d.startswith('.')]
    paths = [p for folder in (folders or [src]) for p in list_images(folder)]
    table = by_stem(paths, problems, 'BSD400 and WED are merged into one folder')
    return [Item(key, path) for key, path in table.items()]


def collect_cbsd68(src, split, problems):
    base = child(src, ['CBSD68']) or src
    folder = child(base, ['original_png', 'original']) or base
    table = by_stem(list_images(folder, recursive=False), problems, 'CBSD68')
    return [Item(key, path) for key, path in table.items()]


def has_input_target(src):
    """An already paired layout: input/ and target/ with identical names (the usual test-set layout)."""
    return child(src, ['input']) is not None and child(src, ['target']) is not None


def collect_input_target(src, problems):
    lq_dir, gt_dir = child(src, ['input']), child(src, ['target'])
    lq = by_stem(list_images(lq_dir), problems, 'input')
    gt = by_stem(list_images(gt_dir), problems, 'target')
    return match_pairs(lq, gt, problems, f'input ({lq_dir})', f'target ({gt_dir})')


RAIN_RE = re.compile(r'^(no)?rain-(.+)$', re.IGNORECASE)


def collect_derain(src, split, problems):
    if has_input_target(src):
        return collect_input_target(src, problems)
    lq, gt = [], []
    for path in list_images(src):
        m = RAIN_RE.match(stem(path))
        if m:
            (gt if m.group(1) else lq).append((m.group(2), path))
    if not lq and not gt:
        problems.append(f'{src}: no Rain100L layout found (expected input/ + target/ with identical names, '
                        'or rain-K.png with norain-K.png)')
        return []
    lq_table, gt_table = {}, {}
    for pairs, table in ((lq, lq_table), (gt, gt_table)):
        for key, path in pairs:
            if key in table:
                problems.append(f'{path}: same number {key} as {table[key]}; expected one file per number')
            else:
                table[key] = path
    return match_pairs(lq_table, gt_table, problems, 'rainy', 'clean',
                       expected=lambda key, side: f'{"norain" if side == "gt" else "rain"}-{key}.* under {src}')


HAZY_DIRS = ('hazy', 'haze', 'synthetic', 'input')
CLEAR_DIRS = ('clear', 'gt', 'clean', 'original', 'target')


def collect_dehaze(src, split, problems):
    hazy_dir, clear_dir = child(src, HAZY_DIRS), child(src, CLEAR_DIRS)
    if hazy_dir is None or clear_dir is None:
        problems.append(f'{src}: expected a hazy folder ({"/, ".join(HAZY_DIRS)}/) and a clean folder '
                        f'({"/, ".join(CLEAR_DIRS)}/) in it')
        return []
    clear = by_stem(list_images(clear_dir), problems, 'clean images')
    hazy = by_stem(list_images(hazy_dir), problems, 'hazy images')
    items, used = [], set()
    for key, path in sorted(hazy.items()):
        clean_key = key if key in clear else key.split('_')[0]
        if clean_key not in clear:
            problems.append(f'{path}: no matching clean image (expected {clear_dir}/{clean_key}.*; '
                            'hazy images are named NNNN_A_beta after their clean image NNNN)')
            continue
        used.add(clean_key)
        items.append(Item(key, clear[clean_key], path))
    unused = sorted(set(clear) - used)
    if unused and split == 'test':
        for key in unused:
            problems.append(f'{clear[key]}: no hazy version in {hazy_dir} (test sets need every pair)')
    elif unused:
        print(f'note: {len(unused)} clean image(s) in {clear_dir} have no hazy version and are left out, '
              f'e.g. {clear[unused[0]]}')
    return items


def collect_deblur(src, split, problems):
    if has_input_target(src):
        return collect_input_target(src, problems)
    base = child(src, [split]) or src
    sequences = [os.path.join(base, d) for d in subfolders(base)]
    sequences = [s for s in sequences if child(s, ['blur']) or child(s, ['sharp'])]
    if not sequences:
        problems.append(f'{base}: no GoPro sequences found (expected {base}/<sequence>/blur/ and .../sharp/)')
        return []
    items = []
    for seq in sequences:
        blur_dir, sharp_dir = child(seq, ['blur']), child(seq, ['sharp'])
        if blur_dir is None or sharp_dir is None:
            problems.append(f'{seq}: expected both blur/ and sharp/ folders in every sequence')
            continue
        seq_name = os.path.basename(seq)
        lq = by_stem(list_images(blur_dir, recursive=False), problems, 'blur frames')
        gt = by_stem(list_images(sharp_dir, recursive=False), problems, 'sharp frames')
        items += match_pairs(lq, gt, problems, f'blur ({blur_dir})', f'sharp ({sharp_dir})',
                             name=lambda key, s=seq_name: f'{s}_{key}')
    return items


def collect_lowlight(src, split, problems):
    if has_input_target(src):
        return collect_input_target(src, problems)
    base = child(src, ['our485' if split == 'train' else 'eval15']) or src
    low_dir, high_dir = child(base, ['low']), child(base, ['high', 'normal'])
    if low_dir is None or high_dir is None:
        problems.append(f'{base}: expected low/ and high/ folders (LOL: our485/ for train, eval15/ for test)')
        return []
    lq = by_stem(list_images(low_dir), problems, 'low-light images')
    gt = by_stem(list_images(high_dir), problems, 'normal-light images')
    return match_pairs(lq, gt, problems, f'low ({low_dir})', f'high ({high_dir})')


def cdd11_split_folder(src, split, problems):
    """The folder of CDD-11's ``split`` that holds clear/: ``src`` itself, or its train|test|CDD-11_train|
    CDD-11_test child (any case; also one level deeper, where an archive unpacked into a folder of its
    own name). None, with a problem naming what was expected, if there is none."""
    names = CDD11_SPLIT_DIRS[split]
    if child(src, [CDD11_CLEAR]) is not None:
        other = 'test' if split == 'train' else 'train'
        if os.path.basename(os.path.normpath(src)).lower() in {n.lower() for n in CDD11_SPLIT_DIRS[other]}:
            problems.append(f'{src}: this is the CDD-11 {other} split, but --split {split} was given')
            return None
        return src
    folder = src
    for _ in range(2):
        folder = child(folder, names)
        if folder is None:
            break
        if child(folder, [CDD11_CLEAR]) is not None:
            return folder
    problems.append(f'{src}: no CDD-11 {split} split found (expected {src}/{"|".join(names)}/{CDD11_CLEAR}/ and '
                    f'the type folders beside it, or {CDD11_CLEAR}/ and the type folders in {src} itself)')
    return None


def collect_cdd11(src, split, problems):
    base = cdd11_split_folder(src, split, problems)
    if base is None:
        return []
    clear_dir = child(base, [CDD11_CLEAR])
    clear = by_stem(list_images(clear_dir, recursive=False), problems, 'clear images')
    items, used, missing = [], set(), []
    for kind in CDD11_TYPES:
        folder = child(base, [kind])
        if folder is None:
            missing.append(kind)
            continue
        degraded = by_stem(list_images(folder, recursive=False), problems, f'{kind} images')
        if not degraded:
            problems.append(f'{folder}: no images (expected the {kind} versions of the images in {clear_dir})')
        for key, path in sorted(degraded.items()):
            if key not in clear:
                problems.append(f'{path}: no matching clear image (expected {clear_dir}/{key}.*; a degraded image '
                                'is named like its clean image)')
                continue
            used.add(key)
            items.append(Item(key, clear[key], path, group=kind))
    if missing:
        problems.append(f'{base}: missing degradation folder(s) {", ".join(missing)} (expected {CDD11_CLEAR}/ and '
                        f'{", ".join(CDD11_TYPES)})')
    unused = sorted(set(clear) - used)
    if unused and split == 'test':
        for key in unused:
            problems.append(f'{clear[key]}: no degraded version in any type folder of {base} (test sets need '
                            'every pair)')
    elif unused:
        print(f'note: {len(unused)} clear image(s) in {clear_dir} have no degraded version and are left out, '
              f'e.g. {clear[unused[0]]}')
    known = {n.lower() for n in (CDD11_CLEAR, ) + CDD11_TYPES}
    ignored = [d for d in subfolders(base) if d.lower() not in known]
    if ignored:
        print(f'note: {base}: folder(s) {", ".join(ignored)} are not CDD-11 types and are ignored')
    return items


COLLECTORS = {
    ('denoise', 'train'): collect_denoise_train,
    ('denoise', 'test'): collect_cbsd68,
    ('derain', 'train'): collect_derain,
    ('derain', 'test'): collect_derain,
    ('dehaze', 'train'): collect_dehaze,
    ('dehaze', 'test'): collect_dehaze,
    ('deblur', 'train'): collect_deblur,
    ('deblur', 'test'): collect_deblur,
    ('lowlight', 'train'): collect_lowlight,
    ('lowlight', 'test'): collect_lowlight,
    ('cdd11', 'train'): collect_cdd11,
    ('cdd11', 'test'): collect_cdd11,
}


# ------------------------------------------------------------------------------------------------
# checking images (the package's one reader)
# ------------------------------------------------------------------------------------------------
def read_image(path):
    """Decode ``path`` as the dataset does (vlunet.utils.image_io); raise Problem if it cannot be read."""
    try:
        return decode_image(read_file(path), path)
    except ImageReadError as err:
        raise Problem(str(err)) from None


def inspect_image(path):
    """``(h, w, c, bytes per sample)`` of a decodable image, or a Problem."""
    try:
        img = read_image(path)
    except Problem as problem:
        return problem
    h, w = img.shape[:2]
    return h, w, (1 if img.ndim == 2 else img.shape[2]), img.dtype.itemsize


def inspect_all(paths, workers, desc):
    unique = sorted(set(paths))
    log_level = None
    if hasattr(cv2, 'utils') and hasattr(cv2.utils, 'logging'):
        log_level = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # we report bad files ourselves
    try:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            results = list(tqdm(pool.map(inspect_image, unique), total=len(unique), desc=desc, unit='img',
                                leave=False))
    finally:
        if log_level is not None:
            cv2.utils.logging.setLogLevel(log_level)
    return dict(zip(unique, results))


# ------------------------------------------------------------------------------------------------
# jobs
# ------------------------------------------------------------------------------------------------
class Job:
    """One (task, split) conversion: where it reads, what it writes, and the checked items."""

    def __init__(self, task, split, src, out, name=None, lmdb=False, link=False, overwrite=False):
        self.task, self.split, self.src, self.out = task, split, src, out
        self.grouped = task == 'cdd11'  # one clean folder + one degraded folder per type
        self.paired = task != 'denoise'
        self.name = name or (TEST_SET_NAMES.get(task) if split == 'test' and not self.grouped else None)
        self.lmdb, self.link, self.overwrite = lmdb, link, overwrite
        self.items, self.shapes = [], {}
        self.converted = self.link_fallbacks = 0

    @property
    def label(self):
        return f'{self.task}/{self.split}' + (f'/{self.name}' if self.name else '')

    @property
    def root(self):
        """``<out>/<task>/train``, ``<out>/<task>/test/<Set>`` or (CDD-11) ``<out>/cdd11/<split>``."""
        return os.path.join(self.out, self.task, self.split, *([self.name] if self.name else []))

    def meta_path(self, group=None):
        stem_ = f'meta_info_{self.task}_{self.split}' + (f'_{self.name}' if self.name else '')
        return os.path.join(self.out, self.task, stem_ + (f'_{group}' if group else '') + '.txt')

    def leaves(self):
        """``{role: final output path}`` in writing order (images first, the meta_info lists last); roles
        gt / lq / meta, and for CDD-11 gt (clear) plus lq:<type> and meta:<type>."""
        suffix = '.lmdb' if self.lmdb else ''
        if self.grouped:
            leaves = {'gt': os.path.join(self.root, CDD11_CLEAR + suffix)}
            leaves.update((f'lq:{kind}', os.path.join(self.root, kind + suffix)) for kind in CDD11_TYPES)
            if not self.lmdb:
                leaves.update((f'meta:{kind}', self.meta_path(kind)) for kind in CDD11_TYPES)
            return leaves
        if self.paired:
            leaves = {'gt': os.path.join(self.root, 'target' + suffix), 'lq': os.path.join(self.root, 'input' + suffix)}
        else:
            leaves = {'gt': self.root + suffix}
        if not self.lmdb:
            leaves['meta'] = self.meta_path()
        return leaves

    def staging_parent(self):
        return self.root if self.paired else os.path.dirname(self.root)

    def output_path(self):
        return self.root if self.paired or not self.lmdb else self.root + '.lmdb'

    def contents(self):
        """``{role: [(source path, output name)]}`` for image roles, ``{role: [item]}`` for meta roles."""
        roles, clean_written = {}, set()
        for item in self.items:
            name = item.output_name()
            lq_role, meta_role = (f'lq:{item.group}', f'meta:{item.group}') if self.grouped else ('lq', 'meta')
            if not self.grouped or (item.gt, name) not in clean_written:  # CDD-11: one clean image serves every type
                roles.setdefault('gt', []).append((item.gt, name))
                clean_written.add((item.gt, name))
            if self.paired:
                roles.setdefault(lq_role, []).append((item.lq, name))
            roles.setdefault(meta_role, []).append(item)
        return roles


def check_job(job, workers):
    """Collect and check the job's items; returns the list of problems (empty = ready to write)."""
    problems = []
    if not os.path.isdir(job.src):
        return [f'{job.src}: source folder not found (task {job.task}, split {job.split})']
    items = COLLECTORS[(job.task, job.split)](job.src, job.split, problems)
    if not items and not problems:
        problems.append(f'{job.src}: no images found for {job.label}\n{LAYOUTS}')
    seen = {}
    for item in items:
        where = f'{job.label}' + (f' ({item.group})' if item.group else '')
        if (item.group, item.key) in seen:
            problems.append(f'{item.source} and {seen[(item.group, item.key)]}: both would be named {item.key} in {where}')
        seen.setdefault((item.group, item.key), item.source)
        if re.search(r'\s', item.key):
            problems.append(f'{item.source}: output name {item.key!r} contains white space '
                            '(meta_info files cannot list it); rename the file')
        elif job.lmdb and not item.key.isascii():
            problems.append(f'{item.source}: LMDB keys must be ASCII, got {item.key!r}; rename the file')
    if job.grouped and job.lmdb:
        problems += _lmdb_groups_complete(items)
    paths = [p for item in items for p in (item.gt, item.lq) if p is not None]
    shapes = inspect_all(paths, workers, f'check {job.label}')
    bad = set()
    for path, result in sorted(shapes.items()):
        if isinstance(result, Problem):
            problems.append(str(result))
            bad.add(path)
    for item in items:
        if item.lq is None or item.lq in bad or item.gt in bad:
            continue
        (lh, lw), (gh, gw) = shapes[item.lq][:2], shapes[item.gt][:2]
        if (lh, lw) != (gh, gw):
            problems.append(f'size mismatch: {item.lq} is {lw}x{lh} but {item.gt} is {gw}x{gh} (W x H); '
                            'a pair must have the same size')
    real_src = os.path.realpath(job.src)
    for path in job.leaves().values():
        real = os.path.realpath(path)
        if real == real_src or real_src.startswith(real + os.sep) or real.startswith(real_src + os.sep):
            problems.append(f'{path}: output overlaps the source {job.src}; choose another --out')
        elif os.path.lexists(path) and not job.overwrite:
            problems.append(f'{path}: output already exists (use --overwrite to replace it)')
    job.items, job.shapes = items, shapes
    return problems


def _lmdb_groups_complete(items):
    """An LMDB pair is read by key, so (CDD-11) every type must hold every clean image written."""
    clean = {item.key for item in items}
    problems = []
    for kind in CDD11_TYPES:
        have = {item.key for item in items if item.group == kind}
        lacking = sorted(clean - have)
        if have and lacking:
            problems.append(f'{kind}: no {kind} version of {len(lacking)} clear image(s) (e.g. {lacking[0]}); '
                            f'{CDD11_CLEAR}.lmdb is paired with {kind}.lmdb by key, so every type needs every image '
                            '(without --lmdb the meta_info files list each type\'s images)')
    return problems


# ------------------------------------------------------------------------------------------------
# writing (the package's one atomic writer, inside a staging folder renamed into place)
# ------------------------------------------------------------------------------------------------
def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


class Staging:
    """Stage a set of outputs (folders or files) in one hidden folder, then rename them into place.

    ``vlunet.utils.atomic`` makes one file (or several files) appear complete or not at all; a data
    set is thousands of files in several folders. Here each file is written with that writer into
    ``<parent>/.vlunet-prepare-XXXX/`` (:meth:`path` gives the staged path of a destination), and
    :meth:`commit` renames every staged output over its destination: what was there is moved aside
    first and put back if any rename fails, so the destinations hold the old outputs or all the new
    ones. Leaving the ``with`` block without :meth:`commit` (an error) removes the staging folder and
    the folders made for it; the folders renamed into are fsync'ed."""

    def __init__(self, parent, destinations):
        self.parent, self.destinations = parent, list(destinations)
        self.created, self.folder, self.done = [], None, False

    def __enter__(self):
        for folder in [self.parent] + [os.path.dirname(os.path.abspath(d)) for d in self.destinations]:
            self._makedirs(folder)
        self.folder = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.parent)
        return self

    def _makedirs(self, path):
        """``os.makedirs`` that records the folders it made (to remove them again on failure)."""
        missing, path = [], os.path.abspath(path)
        while not os.path.isdir(path):
            missing.append(path)
            path = os.path.dirname(path)
        for folder in reversed(missing):
            os.mkdir(folder)
            self.created.append(folder)

    def path(self, destination):
        """Where ``destination`` is built (destinations need distinct base names)."""
        return os.path.join(self.folder, os.path.basename(destination))

    def commit(self):
        """Rename each staged output over its destination, in the order given; on failure restore what was there."""
        done = []
        try:
            for i, final in enumerate(self.destinations):
                entry = {'final': final, 'backup': None, 'placed': False}
                done.append(entry)
                if os.path.lexists(final):
                    entry['backup'] = os.path.join(self.folder, f'previous-{i}')
                    os.rename(final, entry['backup'])
                os.rename(self.path(final), final)
                entry['placed'] = True
        except BaseException:
            for entry in reversed(done):
                if entry['placed']:
                    _remove(entry['final'])
                if entry['backup']:
                    os.rename(entry['backup'], entry['final'])
            raise
        for folder in {os.path.dirname(os.path.abspath(d)) for d in self.destinations}:
            fsync_folder(folder)
        self.done = True

    def __exit__(self, *exc):
        shutil.rmtree(self.folder, ignore_errors=True)  # the staging folder, with the replaced outputs
        if not self.done:
            for folder in reversed(self.created):
                try:
                    os.rmdir(folder)
                except OSError:
                    pass
        return False


def copy_file(src, dst):
    """Byte-for-byte copy through the atomic writer."""
    with open(src, 'rb') as f_src:
        write_atomic(dst, lambda f: shutil.copyfileobj(f_src, f, 1 << 20))


def place(job, src, dst):
    """Copy/link ``src`` to ``dst``, re-encoding to PNG when the extensions differ."""
    if os.path.splitext(src)[1].lower() != os.path.splitext(dst)[1].lower():
        data = encode_image(read_image(src), '.png', [cv2.IMWRITE_PNG_COMPRESSION, 3])
        write_atomic(dst, lambda f: f.write(data))
        job.converted += 1
        return
    if job.link:
        try:
            os.link(src, dst)
            return
        except OSError:  # another file system, or links not allowed: copy instead
            job.link_fallbacks += 1
    copy_file(src, dst)


def write_lmdb(paths, keys, lmdb_path, shapes, src_root):
    """One LMDB through basicsr's make_lmdb_from_imgs, with a map size from the checked shapes."""
    from basicsr.utils import lmdb_util
    raw = sum(h * w * c * size for h, w, c, size in (shapes[p] for p in paths))
    map_size = int(raw * 1.1) + 8192 * len(paths) + (64 << 20)  # PNG at worst ~raw; page overhead
    lmdb_util.make_lmdb_from_imgs(os.path.abspath(src_root), lmdb_path, [os.path.abspath(p) for p in paths], keys,
                                  map_size=map_size)
    if not os.path.isfile(os.path.join(lmdb_path, 'meta_info.txt')):
        raise RuntimeError(f'{lmdb_path}: make_lmdb_from_imgs wrote no meta_info.txt')


def write_job(job):
    """Build the job's outputs in a staging folder, then rename them into place (:class:`Staging`)."""
    leaves = job.leaves()
    contents = job.contents()
    with Staging(job.staging_parent(), leaves.values()) as stage:
        for role, final in leaves.items():
            staged = stage.path(final)
            if role.startswith('meta'):
                lines = [f'{item.output_name()} ({",".join(map(str, job.shapes[item.gt][:3]))})\n'
                         for item in contents.get(role, [])]
                write_text_atomic(staged, ''.join(lines))
            elif job.lmdb:
                sources = contents.get(role, [])
                print(f'{job.label}: writing {final}')
                write_lmdb([src for src, _ in sources], [os.path.splitext(name)[0] for _, name in sources], staged,
                           job.shapes, job.src)
            else:
                os.mkdir(staged)
                for src, name in tqdm(contents.get(role, []), desc=f'{"link" if job.link else "copy"} {final}',
                                      unit='img', leave=False):
                    place(job, src, os.path.join(staged, name))
        stage.commit()


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
CONFIG_KEYS = {'out', 'lmdb', 'link', 'overwrite', 'jobs'}
JOB_KEYS = {'task', 'split', 'src', 'name'}


def jobs_from_config(path, args):
    """Jobs of a --config YAML file; command-line --out/--lmdb/--link/--overwrite win over it."""
    if not os.path.isfile(path):
        raise SystemExit(f'error: config file not found: {path}')
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise SystemExit(f'error: {path}: not valid YAML ({err})') from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get('jobs'), list) or not cfg['jobs']:
        raise SystemExit(f'error: {path}: expected a mapping with a non-empty list "jobs" '
                         '(each {task, split, src[, name]})')
    unknown = set(cfg) - CONFIG_KEYS
    if unknown:
        raise SystemExit(f'error: {path}: unknown key(s) {sorted(unknown)}; expected {sorted(CONFIG_KEYS)}')
    out = args.out if args.out is not None else cfg.get('out', 'datasets')
    flags = {k: (getattr(args, k) if getattr(args, k) is not None else bool(cfg.get(k, False)))
             for k in ('lmdb', 'link', 'overwrite')}
    jobs = []
    for i, spec in enumerate(cfg['jobs']):
        where = f'{path}: jobs[{i}]'
        if not isinstance(spec, dict):
            raise SystemExit(f'error: {where}: expected a mapping {{task, split, src[, name]}}, got {spec!r}')
        unknown = set(spec) - JOB_KEYS
        if unknown:
            raise SystemExit(f'error: {where}: unknown key(s) {sorted(unknown)}; expected {sorted(JOB_KEYS)}')
        jobs.append(make_job(spec.get('task'), spec.get('split', 'train'), spec.get('src'), out,
                             spec.get('name'), where, **flags))
    return jobs


def make_job(task, split, src, out, name, where, **flags):
    if task not in TASKS:
        raise SystemExit(f'error: {where}: task must be one of {", ".join(TASKS)}, got {task!r}')
    if split not in SPLITS:
        raise SystemExit(f'error: {where}: split must be train or test, got {split!r}')
    if not src:
        raise SystemExit(f'error: {where}: missing the source folder (src)')
    if name is not None and task == 'cdd11':
        raise SystemExit(f'error: {where}: cdd11 writes one folder per degradation type (cdd11/<split>/<type>/); '
                         f'name does not apply, got {name!r}')
    if name is not None and (split != 'test' or not re.fullmatch(r'[\w.-]+', str(name))):
        raise SystemExit(f'error: {where}: name (a test set folder name like Rain100H) needs split test '
                         f'and letters, digits, "_", "-", "." only; got {name!r}')
    return Job(task, split, os.path.expanduser(str(src)), os.path.expanduser(str(out)), name, **flags)


def build_parser():
    parser = argparse.ArgumentParser(
        prog='vlunet-prepare',
        description='Prepare the all-in-one restoration data sets (folders or LMDBs + meta_info files).',
        epilog=LAYOUTS, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--task', choices=TASKS, help='which data set to convert (one per call)')
    parser.add_argument('--src', help='the downloaded folder (see the layouts below)')
    parser.add_argument('--split', choices=SPLITS, default='train', help='train (default) or test')
    parser.add_argument('--name', help='test set folder name (default CBSD68/Rain100L/SOTS_outdoor/GoPro/LOL)')
    parser.add_argument('--config', help='YAML file with several jobs (instead of --task/--src)')
    parser.add_argument('--out', default=None, help='output root (default: datasets)')
    parser.add_argument('--lmdb', action='store_true', default=None, help='write .lmdb folders instead')
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument('--link', action='store_true', default=None,
                      help='hard-link the images (falls back to copying across file systems)')
    mode.add_argument('--copy', action='store_false', dest='link', default=None, help='copy the images (default)')
    parser.add_argument('--overwrite', action='store_true', default=None, help='replace existing outputs')
    parser.add_argument('--check-only', action='store_true', help='check the input, write nothing')
    parser.add_argument('--workers', type=int, default=min(4, os.cpu_count() or 1),
                        help='threads that decode images while checking (default: min(4, CPUs))')
    return parser


def print_table(rows):
    header = ('task', 'split', 'pairs', 'output')
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for row in [header, tuple('-' * w for w in widths)] + rows:
        print('  '.join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        if args.task or args.src or args.name:
            parser.error('--config lists the jobs; do not combine it with --task/--src/--name')
        jobs = jobs_from_config(args.config, args)
    else:
        if not args.task or not args.src:
            parser.error('give --task and --src (or --config)')
        jobs = [make_job(args.task, args.split, args.src, args.out or 'datasets', args.name, 'command line',
                         lmdb=bool(args.lmdb), link=bool(args.link), overwrite=bool(args.overwrite))]

    problems, owners = [], {}
    for job in jobs:
        for path in job.leaves().values():
            key = os.path.realpath(path)
            if key in owners:
                problems.append(f'{path}: written by both {owners[key]} and {job.label}')
            owners[key] = job.label
        problems += check_job(job, args.workers)
    if problems:
        sys.stderr.write(f'error: {len(problems)} problem(s) found; nothing was written:\n')
        for problem in problems:
            sys.stderr.write(f'  - {problem}\n')
        return 1

    rows = []
    for job in jobs:
        if not args.check_only:
            try:
                write_job(job)
            except Exception as err:
                sys.stderr.write(f'error: writing {job.label} failed ({type(err).__name__}: {err}); '
                                 f'nothing of it was left in {job.output_path()}\n')
                if rows:
                    print('completed before the failure:')
                    print_table(rows)
                return 1
            if job.converted:
                print(f'note: {job.label}: {job.converted} image(s) re-encoded as PNG '
                      '(input and target extensions differ)')
            if job.link_fallbacks:
                print(f'note: {job.label}: {job.link_fallbacks} image(s) copied (hard links not possible)')
        rows.append((job.task, job.split + (f'/{job.name}' if job.name else ''), len(job.items),
                     job.output_path() if not args.check_only else '(checked only)'))
    print_table(rows)
    return 0


if __name__ == '__main__':
    sys.exit(main())
