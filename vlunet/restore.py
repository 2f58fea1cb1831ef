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

Every image goes through the one inference engine (:class:`vlunet.inference.RestorationEngine`, also
behind ``vlunet-app`` and ``vlunet-test``): CLIP embeds an image once, the network runs once and
gives the restored image, the degradation report computed from that same embedding and, on request,
the stage grid recorded in that same forward. With ``--tile`` the stages exist only when the image
fits in one tile (one forward); an image that runs as several tiles gets no stage grid (a note says
so) rather than a second, whole-image forward.

``--precision bf16`` (or fp16 where the device computes in float16) runs the network under autocast.
``--max-memory 3G`` bounds the process's peak memory: an image that would not fit runs in tiles chosen
from the network's measured memory model (see vlunet.inference.memory); the report says per image
whether and why it was tiled, and the pixel limit becomes what the budget's image buffers allow
unless ``--max-pixels`` is given. ``--backend onnxruntime --onnx FILE.onnx`` restores with a model
written by ``vlunet-export`` on ONNX Runtime (CPU), with the same options and outputs.
"""
import argparse
import csv
import errno
import os
import sys

from vlunet.utils.atomic import (name_too_long, remove_stale_temporaries, write_atomic, write_image_atomic,
                                 write_json_atomic)
from vlunet.utils.image_io import (DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageReadError, ImageTooLargeError,
                                   is_image_file, read_image, to_original_kind)
from vlunet.utils.tiling import MIN_TILE, check_tiling

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


def _short(keys, limit=3):
    keys = [k if len(k) <= 60 else k[:28] + '...' + k[-28:] for k in keys]
    return ', '.join(keys[:limit]) + (', ...' if len(keys) > limit else '')


def build_engine(opt_path, model_path=None, device='cpu', trust_pickle=False, precision='fp32', max_memory=None):
    """The inference engine of an option file (:meth:`RestorationEngine.from_options`) for photos
    (no known task), on ``device``, with a precision and a memory budget.

    Raises FileNotFoundError / KeyError / ValueError with a message naming the option file or the
    weights file (missing, unreadable, or not fitting ``network_g``: one line saying how)."""
    from vlunet.inference import RestorationEngine
    from vlunet.utils.checkpoint import CheckpointError
    try:
        return RestorationEngine.from_options(opt_path, model_path, device=device, precision=precision,
                                              trust_pickle=trust_pickle, max_memory=max_memory)
    except CheckpointError as err:
        raise ValueError(str(err)) from None


def save_restored(path, restoration, info):
    """Write the restored image at ``path`` in the input's kind (channels, alpha, bit depth)."""
    write_image_atomic(path, to_original_kind(restoration.image, info))


def _error(message, status=2):
    print(f'error: {message}', file=sys.stderr)
    return status


def build_onnx_engine(path, max_memory=None):
    """The ONNX Runtime engine of a ``vlunet-export`` file (:class:`vlunet.inference.onnx_backend.OnnxEngine`)."""
    import importlib.util
    if importlib.util.find_spec('onnxruntime') is None or importlib.util.find_spec('onnx') is None:
        raise ValueError('--backend onnxruntime needs onnx and onnxruntime: pip install -e ".[export]"')
    from vlunet.inference.onnx_backend import OnnxEngine, OnnxModelError
    engine = OnnxEngine.from_file(path, max_memory=max_memory)
    if 'embedding' in engine.inputs and engine.clip_session is None:  # a bare network graph, not vlunet-export's
        raise OnnxModelError(f'{path}: takes a CLIP embedding but names no CLIP model to compute it '
                             '(write it with vlunet-export, which writes both files)')
    return engine


def _backend_problem(args):
    """None, or why the backend options do not go together."""
    if args.backend is None:
        args.backend = 'onnxruntime' if args.onnx else 'pytorch'
    if args.backend == 'onnxruntime':
        if not args.onnx:
            return '--backend onnxruntime needs --onnx FILE.onnx (written by vlunet-export)'
        if args.opt or args.model:
            return ('-opt/--model describe a PyTorch model; with --backend onnxruntime the ONNX file (--onnx) holds the '
                    'network: leave them out')
        if args.precision not in (None, 'fp32'):
            return f'--precision {args.precision}: an exported ONNX model computes in fp32 (leave --precision out)'
        if args.device not in (None, 'cpu'):
            return f'--device {args.device}: --backend onnxruntime runs on the CPU'
    else:
        if args.onnx:
            return '--onnx is read by --backend onnxruntime'
        if not args.opt:
            return '-opt is required (a train or test option file), or --backend onnxruntime --onnx FILE.onnx'
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(prog='vlunet-restore', description=__doc__.split('\n\n')[0])
    parser.add_argument('-opt', help='train or test option file (network_g, network_clip, weights); required unless '
                                     '--backend onnxruntime')
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
    parser.add_argument('--max-pixels', type=int, default=None,
                        help=f'skip images with more pixels, checked from the header before decoding (default '
                             f'{DEFAULT_MAX_PIXELS} = 2048x2048, or with --max-memory what its image buffers allow; '
                             '0: no limit)')
    parser.add_argument('--precision', choices=('fp32', 'bf16', 'fp16'), default=None,
                        help='autocast precision of the network (default fp32; fp16 only where the device computes in '
                             'float16)')
    parser.add_argument('--max-memory', metavar='SIZE',
                        help='memory budget of the process, e.g. 3G, 512M (binary units K, M, G): images that would '
                             'not fit run in tiles sized from the measured memory of the network; the report says so')
    parser.add_argument('--backend', choices=('pytorch', 'onnxruntime'), default=None,
                        help='pytorch (default) or onnxruntime (a model written by vlunet-export, see --onnx)')
    parser.add_argument('--onnx', metavar='FILE.onnx', help='the exported model (--backend onnxruntime)')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace the results of an earlier run in the output folder')
    parser.add_argument('--trust-pickle', action='store_true',
                        help='allow full unpickling of a checkpoint that holds more than tensors (this runs code '
                             'stored in the file: only for files from a source you trust)')
    args = parser.parse_args(argv)

    problem = _backend_problem(args)
    if problem:
        return _error(problem)
    from vlunet.inference.memory import budget_pixel_limit, parse_memory
    try:
        max_memory = parse_memory(args.max_memory)
    except ValueError as err:
        return _error(err.args[0])
    if max_memory and args.tile:
        return _error('--tile and --max-memory: give one of them (with --max-memory the tile is chosen for each image '
                      'from the budget)')
    if args.max_pixels is None:
        args.max_pixels = budget_pixel_limit(max_memory) if max_memory else DEFAULT_MAX_PIXELS
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

    from vlunet.inference.memory import MemoryBudgetError
    from vlunet.inference import precision_problem
    device = args.device or ('cuda' if torch.cuda.is_available() and args.backend == 'pytorch' else 'cpu')
    problem = precision_problem(args.precision or 'fp32', device)
    if problem:
        return _error(problem)
    try:
        if args.backend == 'onnxruntime':
            engine = build_onnx_engine(args.onnx, max_memory)
            if engine.meta.get('note'):  # what the export changed (e.g. MoCE-IR's routing without noise)
                print(f'{args.onnx}: {engine.meta["note"]}')
        else:
            engine = build_engine(args.opt, args.model, device, trust_pickle=args.trust_pickle,
                                  precision=args.precision or 'fp32', max_memory=max_memory)
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
            try:
                result = engine.restore(rgb, args.tile, args.tile_overlap, stages=args.save_stages, name=name)
            except MemoryBudgetError as err:
                skipped.append({'file': name, 'reason': str(err)})
                continue
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
            row.update({'precision': result.precision, 'tiles': result.tiles, 'tile': result.tile or '',
                        'tiling': result.tiling, 'seconds': round(result.seconds, 3)})
            rows.append(row)

        model = args.onnx if args.backend == 'onnxruntime' else args.model or 'path.pretrain_network_g of ' + args.opt
        report = {'model': model, 'backend': args.backend, 'precision': args.precision or 'fp32',
                  'max_memory': args.max_memory, 'images': rows, 'skipped': skipped}
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
    for row in rows:
        if row['tiles'] > 1 and max_memory:
            print(f'{row["image"]}: {row["tiling"]}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
