"""``vlunet-restore -opt OPT -i INPUT -o OUTPUT``: restore your own images with a trained model.

OPT is a train or test option file (its ``network_g``, ``network_clip`` and
``path.pretrain_network_g``; ``--model`` overrides the weights). INPUT is an image or a folder.
Every image is written to OUTPUT at its original size and kind: grayscale stays grayscale
(restored through RGB), RGBA keeps its alpha, 16-bit stays 16-bit. Files that cannot be restored
are listed and skipped, each with its reason (not an image, empty, truncated, permission denied,
more than ``--max-pixels`` pixels, a folder, a dangling link, a name too long for OUTPUT, ...).
OUTPUT also gets ``report.csv`` / ``report.json``: per image, the CLIP probability of each
degradation prompt and the top type (models with ``network_clip``), and the skipped files.

Nothing of yours is overwritten: OUTPUT may not be, hold or be inside the input, and an OUTPUT
holding results of an earlier run (a report, or any file this run would write) is refused unless
``--overwrite`` is given. Images above ``--max-pixels`` (default 2048 x 2048, the limit the page
and the datasets share; 0 lifts it) are refused from their header, before decoding.
``--save-stages`` draws, per image, the intermediate restorations of each unfolding stage and the
degradation-component weights it chose (VLU-Net).

The one restore path: :func:`restore_image` (also behind ``vlunet-app``) embeds an image with
CLIP once, runs the network once and returns the restored image, the degradation report computed
from that same embedding and, on request, the stage grid recorded in that same forward. With
``--tile`` the stages exist only when the image fits in one tile (one forward); an image that
runs as several tiles gets no stage grid (a note says so) rather than a second, whole-image forward.
"""
import argparse
import contextlib
import csv
import errno
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from vlunet.utils.atomic import (name_too_long, remove_stale_temporaries, write_atomic, write_image_atomic,
                                 write_json_atomic)
from vlunet.utils.image_io import (DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageReadError, ImageTooLargeError,
                                   is_image_file, read_image, to_original_kind)

MIN_TILE = 32            # smallest --tile (pixels)
TILE_MULTIPLE = 8        # tiles are rounded up to a multiple of this (vlunet.utils.tiling)
REPORTS = ('report.json', 'report.csv')


def list_inputs(input_path):
    """Every entry of the input folder that could be meant as an image (sorted): files, links (also
    dangling ones) and folders named like images, so each can be restored or skipped with its reason;
    other sub-folders are not searched. An input file is itself."""
    if os.path.isdir(input_path):
        entries = []
        for name in sorted(os.listdir(input_path)):
            path = os.path.join(input_path, name)
            if os.path.isdir(path) and not os.path.islink(path) and not is_image_file(name):
                continue  # a sub-folder: not searched
            entries.append(path)
        return entries
    if os.path.isfile(input_path):
        return [input_path]
    raise FileNotFoundError(f'input not found: {input_path} (expected an image file or a folder)')


def tile_count(height, width, tile, overlap):
    """Forwards :func:`vlunet.utils.tiling.tiled_forward` makes for an image of this size."""
    tile = int(math.ceil(tile / TILE_MULTIPLE) * TILE_MULTIPLE)
    if height <= tile and width <= tile:
        return 1
    stride = tile - overlap

    def n(length):
        return 1 if length <= tile else math.ceil((length - tile) / stride) + 1
    return n(height) * n(width)


def check_tiling(tile, overlap, min_stride=1, names=('--tile', '--tile-overlap')):
    """None when ``tile``/``overlap`` make valid tiles, else the reason (naming the options)."""
    if tile is None:
        return None
    if tile < MIN_TILE:
        return f'{names[0]} {tile}: expected at least {MIN_TILE} pixels'
    if overlap < 0:
        return f'{names[1]} {overlap}: expected 0 or more pixels'
    if overlap >= tile:
        return (f'{names[1]} ({overlap} px) must be smaller than {names[0]} ({tile} px): each tile advances by '
                f'tile - overlap pixels')
    if tile - overlap < min_stride:
        return (f'{names[0]} {tile} with {names[1]} {overlap} advances by {tile - overlap} px per tile; at least '
                f'{min_stride} px are needed (use a smaller overlap)')
    return None


def _inside(path, folder):
    """True when ``path`` is ``folder`` or inside it (both real paths)."""
    return os.path.commonpath([path, folder]) == folder


def output_problem(input_path, output, inputs):
    """Why writing into ``output`` could overwrite an input (real paths: links and ``..`` resolved),
    or None. ``inputs``: the entries :func:`list_inputs` found."""
    out = os.path.realpath(output)
    if os.path.exists(out) and not os.path.isdir(out):
        return f'-o {output}: is a file; expected a folder (it is created if missing)'
    source = os.path.realpath(input_path)
    if os.path.isdir(source):
        if out == source:
            return f'-o {output} is the input folder {input_path}: the restored images would overwrite the originals'
        if _inside(out, source):
            return f'-o {output} is inside the input folder {input_path}; choose a folder outside it'
        if _inside(source, out):
            return f'-o {output} holds the input folder {input_path}; choose a folder outside it'
    for path in inputs:
        real = os.path.realpath(path)
        if _inside(real, out):
            shown = path if real == os.path.abspath(path) else f'{path} (-> {real})'
            return f'-o {output} holds the input {shown}: it could be overwritten; choose another folder'
    return None


def planned_outputs(inputs, save_stages):
    """Names this run may write into the output folder."""
    names = list(REPORTS)
    for path in inputs:
        name = os.path.basename(path)
        if is_image_file(name):
            names.append(name)
            if save_stages:
                names.append(f'{os.path.splitext(name)[0]}_stages.png')
    return names


def earlier_results(output, names):
    """The names in ``names`` that already exist in ``output`` (results of an earlier run)."""
    if not os.path.isdir(output):
        return []
    return [n for n in names if os.path.lexists(os.path.join(output, n))]


def _guess_arch(params):
    for module in ('vlunet.archs.card', 'vlunet.utils.checkpoint'):
        try:
            guess = getattr(__import__(module, fromlist=['guess_arch']), 'guess_arch')
            return guess(params)
        except Exception:  # noqa: BLE001  (a guess only: any failure means no guess)
            continue
    return None


def _short(keys, limit=3):
    keys = [k if len(k) <= 60 else k[:28] + '...' + k[-28:] for k in keys]
    return ', '.join(keys[:limit]) + (', ...' if len(keys) > limit else '')


def describe_mismatch(network_opt, weights, trust_pickle=False):
    """One line saying how the weights differ from ``network_opt`` (counts and examples of missing,
    unexpected and mis-shaped keys, and which architecture the weights look like)."""
    import copy

    import torch
    from basicsr.archs import build_network

    from vlunet.utils.checkpoint import load_published_state_dict
    params = load_published_state_dict(weights, trust_pickle=trust_pickle).params
    with torch.device('meta'):
        layout = {k: tuple(v.shape) for k, v in build_network(copy.deepcopy(dict(network_opt))).state_dict().items()}
    missing = [k for k in layout if k not in params]
    unexpected = [k for k in params if k not in layout]
    shapes = [f'{k} {list(params[k].shape)} vs {list(layout[k])}' for k in layout
              if k in params and tuple(params[k].shape) != layout[k]]
    parts = []
    if missing:
        parts.append(f'{len(missing)} of its {len(layout)} keys missing ({_short(missing)})')
    if unexpected:
        parts.append(f'{len(unexpected)} unexpected keys ({_short(unexpected)})')
    if shapes:
        parts.append(f'{len(shapes)} shape mismatches (checkpoint vs network: {_short(shapes, 2)})')
    guess = _guess_arch(params)
    if guess and guess[0] != network_opt.get('type'):
        parts.append(f'the weights look like a {guess[0]}')
    return '; '.join(parts) or 'the keys match but loading failed'


@contextlib.contextmanager
def _quiet_basicsr():
    """BasicSR's loader logs one warning per missing or unexpected key (hundreds for a wrong
    architecture): keep its logger to errors while the model is built; the caller summarises."""
    from basicsr.utils import get_root_logger
    logger = get_root_logger()  # configured once here, so the level set below is not reset
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def build_model(opt_path, model_path=None, device='cpu', trust_pickle=False):
    """A VLUNetModel (test mode) from an option file, on ``device``.

    ``trust_pickle``: allow full unpickling of a checkpoint that holds more than tensors (as
    ``path.trust_pickle: true``; only for files from a source you trust).

    Raises FileNotFoundError / KeyError / ValueError with a message naming the option file or the
    weights file (missing, unreadable, or not fitting ``network_g``: one line saying how)."""
    import torch
    import yaml

    import vlunet  # noqa: F401
    from basicsr.models import build_model as basicsr_build_model
    from basicsr.utils.options import ordered_yaml

    from vlunet.archs.conditioning import TEXT_EMBEDDING, condition_of
    if not os.path.isfile(opt_path):
        raise FileNotFoundError(f'option file not found: {opt_path}')
    try:
        with open(opt_path) as f:
            opt = yaml.load(f, Loader=ordered_yaml()[0])
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ValueError(f'{opt_path}: cannot read the option file ({err})') from None
    if not isinstance(opt, dict) or not isinstance(opt.get('network_g'), dict):
        raise KeyError(f'{opt_path}: missing "network_g" (expected a vlunet train or test option file)')
    text_opt = opt.get('text_embedding') if isinstance(opt.get('text_embedding'), dict) else {}
    if condition_of(opt['network_g']) == TEXT_EMBEDDING and text_opt.get('mode', 'oracle') != 'blind':
        raise ValueError(f"{opt_path}: network_g {opt['network_g'].get('type')} takes a CLIP text embedding of the "
                         "task prompt (condition 'text_embedding'); your photos have no known task, so set "
                         "text_embedding.mode: blind (the prompt of the type network_clip sees) in the option file.")
    weights = model_path or (opt.get('path') or {}).get('pretrain_network_g')
    if not weights:
        raise KeyError(f'{opt_path}: no weights: set path.pretrain_network_g or pass --model')
    if not os.path.isfile(weights):
        raise FileNotFoundError(f'model weights not found: {weights}')
    path_opt = dict(opt.get('path') or {})
    path_opt.update(pretrain_network_g=weights, resume_state=None, results_root=None)
    if trust_pickle:
        path_opt['trust_pickle'] = True
    model_opt = {
        'name': opt.get('name', 'restore'), 'model_type': 'VLUNetModel', 'num_gpu': 0, 'dist': False,
        'is_train': False, 'rank': 0, 'world_size': 1, 'network_g': opt['network_g'], 'path': path_opt,
        'val': {},
    }
    for key in ('network_clip', 'text_embedding'):
        if opt.get(key):
            model_opt[key] = opt[key]
    try:
        with _quiet_basicsr():
            model = basicsr_build_model(model_opt)
    except RuntimeError as err:  # load_state_dict: missing/unexpected keys or size mismatches
        try:
            how = describe_mismatch(opt['network_g'], weights, trust_pickle or path_opt.get('trust_pickle', False))
        except Exception:  # noqa: BLE001  (fall back to torch's own words)
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            how = '; '.join(lines[1:3] or lines[:1])[:300] or type(err).__name__
        raise ValueError(f'{weights}: does not fit network_g ({opt["network_g"].get("type")}) of {opt_path}: '
                         f'{how}') from None
    model.device = torch.device(device)
    model.net_g.to(model.device).eval()
    if model.net_clip is not None:
        model.net_clip.to(model.device).eval()
    return model


def degradation_report(model, embedding):
    """{prompt: probability} of the model's CLIP for the embedding of one image (the one the
    network was given); empty without network_clip."""
    if model.net_clip is None:
        return {}
    probs = model.net_clip.classify_embedding(embedding)[0].tolist()
    return dict(zip(model.net_clip.prompts, probs))


@dataclass
class Restoration:
    """What one forward pass gave for one image (see :func:`restore_image`)."""

    image: np.ndarray                 # float32 HxWx3 RGB in [0, 1], the input's size
    report: dict                      # {prompt: CLIP probability}; empty without network_clip
    seconds: float                    # CLIP embedding + network forward (+ drawing the stages)
    stage_grid: Optional[np.ndarray] = None   # BGR uint8 picture of the unfolding stages, on request
    note: str = ''                    # why there is no stage grid although one was asked for

    @property
    def top_type(self):
        return max(self.report, key=self.report.get) if self.report else ''


def restore_image(model, rgb, tile=None, tile_overlap=32, stages=False):
    """Restore one image (float32 HxWx3 RGB in [0, 1], as :func:`read_image` gives it).

    One CLIP embedding and one network forward (or one per tile with ``tile``) give the restored
    image, the degradation report from that embedding and, with ``stages``, the stage grid from
    that same forward. Used by ``vlunet-restore`` and ``vlunet-app``.
    """
    import torch

    from vlunet.stage_grid import stage_grid, type_names
    start = time.perf_counter()
    lq = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).unsqueeze(0).to(model.device)
    with torch.no_grad():
        embedding = model.degradation_embedding(lq)
        report = degradation_report(model, embedding)
        if stages:
            out, recorded = model.restore(lq, tile=tile, tile_overlap=tile_overlap, embedding=embedding,
                                          return_stages=True)
        else:
            out, recorded = model.restore(lq, tile=tile, tile_overlap=tile_overlap, embedding=embedding), None
    restored = out[0].clamp(0, 1)
    grid, note = None, ''
    if stages and recorded:
        k = recorded[0]['weights'].shape[1]
        grid = stage_grid(lq[0], restored, recorded, type_names(model.net_clip, k))
    elif stages and not model.records_stages():
        note = (f'no stage grid: {type(model.get_bare_model(model.net_g)).__name__} does not record its '
                'unfolding stages (VLUNet does)')
    elif stages:
        note = (f'no stage grid: the image ({rgb.shape[1]}x{rgb.shape[0]}) ran as several {tile} px tiles and the '
                'stages come from one whole-image forward; restore it without tiling, or with a tile at least '
                'as large as the image, to see them')
    image = restored.permute(1, 2, 0).float().cpu().numpy()
    return Restoration(image, report, time.perf_counter() - start, grid, note)


def save_restored(path, restoration, info):
    """Write the restored image at ``path`` in the input's kind (channels, alpha, bit depth)."""
    write_image_atomic(path, to_original_kind(restoration.image, info))


def _error(message, status=2):
    print(f'error: {message}', file=sys.stderr)
    return status


def main(argv=None):
    parser = argparse.ArgumentParser(prog='vlunet-restore', description=__doc__.split('\n\n')[0])
    parser.add_argument('-opt', required=True, help='train or test option file (network_g, network_clip, weights)')
    parser.add_argument('-i', '--input', required=True, help='an image or a folder of images')
    parser.add_argument('-o', '--output', required=True,
                        help='output folder (created if missing; never the input folder, nor inside or above it)')
    parser.add_argument('--model', help='network_g weights (overrides path.pretrain_network_g)')
    parser.add_argument('--tile', type=int, default=None,
                        help=f'tile side in pixels (tiled inference; at least {MIN_TILE})')
    parser.add_argument('--tile-overlap', type=int, default=32,
                        help='overlap of neighbouring tiles (pixels, smaller than --tile)')
    parser.add_argument('--device', default=None, help="'cpu', 'cuda', 'cuda:1' ... (default: cuda if available)")
    parser.add_argument('--save-stages', action='store_true',
                        help='also write a PNG per image with every unfolding stage (VLU-Net; with --tile only '
                             'for images that fit in one tile)')
    parser.add_argument('--max-pixels', type=int, default=DEFAULT_MAX_PIXELS,
                        help=f'skip images with more pixels, checked from the header before decoding (default '
                             f'{DEFAULT_MAX_PIXELS} = 2048x2048; 0: no limit)')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace the results of an earlier run in the output folder')
    parser.add_argument('--trust-pickle', action='store_true',
                        help='allow full unpickling of a checkpoint that holds more than tensors (this runs code '
                             'stored in the file: only for files from a source you trust)')
    args = parser.parse_args(argv)

    if args.max_pixels < 0:
        return _error(f'--max-pixels must be >= 0 (0: no limit), got {args.max_pixels}')
    problem = check_tiling(args.tile, args.tile_overlap)
    if problem:
        return _error(problem)
    try:
        files = list_inputs(args.input)
    except FileNotFoundError as err:
        return _error(err.args[0])
    problem = output_problem(args.input, args.output, files)
    if problem:
        return _error(f'{problem}. Nothing was written.')
    earlier = earlier_results(args.output, planned_outputs(files, args.save_stages))
    if earlier and not args.overwrite:
        return _error(f'{args.output} holds results of an earlier run ({len(earlier)} file(s) this run would '
                      f'replace: {_short(earlier, 5)}); pass --overwrite to replace them, or choose another -o. '
                      'Nothing was written.')

    import torch
    from tqdm import tqdm
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        model = build_model(args.opt, args.model, device, trust_pickle=args.trust_pickle)
    except (FileNotFoundError, KeyError, ValueError) as err:
        return _error(err.args[0] if err.args else err)
    try:
        os.makedirs(args.output, exist_ok=True)
    except OSError as err:
        return _error(f'-o {args.output}: cannot create the folder ({err.strerror or err})')
    for path in remove_stale_temporaries(args.output):
        print(f'removed the temporary file of an interrupted write: {path}')

    rows, skipped, notes = [], [], []
    max_pixels = args.max_pixels or None
    try:
        for path in tqdm(files, unit='image', desc='Restoring'):
            name = os.path.basename(path)
            try:
                if not is_image_file(name):
                    raise ImageReadError(f'{path}: not an image file name', 'not an image file name (expected '
                                         f'{" ".join(IMAGE_EXTENSIONS)})')
                if name_too_long(args.output, name):
                    raise ImageReadError(f'{path}: file name too long', f'file name too long for the output folder '
                                         f'{args.output} ({len(os.fsencode(name))} bytes)')
                rgb, info = read_image(path, max_pixels)
            except ImageReadError as err:
                hint = '; --max-pixels N raises the limit (0: none)' if isinstance(err, ImageTooLargeError) else ''
                skipped.append({'file': name, 'reason': err.reason + hint})
                continue
            result = restore_image(model, rgb, args.tile, args.tile_overlap, stages=args.save_stages)
            save_restored(os.path.join(args.output, name), result, info)
            if result.stage_grid is not None:
                grid = f'{os.path.splitext(name)[0]}_stages.png'
                if name_too_long(args.output, grid):
                    notes.append(f'{name}: no stage grid written: its name {grid} would be too long for the output '
                                 'folder')
                else:
                    write_image_atomic(os.path.join(args.output, grid), result.stage_grid)
            elif result.note:
                notes.append(f'{name}: {result.note}')
            row = {'image': name, 'width': rgb.shape[1], 'height': rgb.shape[0], 'top_type': result.top_type}
            row.update({f'p({prompt})': round(p, 6) for prompt, p in result.report.items()})
            rows.append(row)

        report = {'model': args.model or 'path.pretrain_network_g of ' + args.opt, 'images': rows,
                  'skipped': skipped}
        write_json_atomic(os.path.join(args.output, 'report.json'), report)
        if rows:
            fields = list(dict.fromkeys(k for r in rows for k in r))

            def write_csv(f):
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)

            write_atomic(os.path.join(args.output, 'report.csv'), write_csv, binary=False)
        elif os.path.lexists(os.path.join(args.output, 'report.csv')):
            os.unlink(os.path.join(args.output, 'report.csv'))  # an earlier run's (--overwrite): not this run's
    except OSError as err:  # a full disk, a quota, a folder that went away: nothing half-written, say where
        full = ' (is the disk or quota full?)' if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else ''
        return _error(f'cannot write into {args.output}: {err}{full}; {len(rows)} image(s) were restored before '
                      'this', 1)
    print(f'restored {len(rows)} image(s) into {args.output}; report: report.csv, report.json')
    for entry in skipped:
        print(f'skipped {entry["file"]}: {entry["reason"]}')
    for note in notes:
        print(note)
    return 0


if __name__ == '__main__':
    sys.exit(main())
