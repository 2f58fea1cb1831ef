"""``vlunet-restore -opt OPT -i INPUT -o OUTPUT``: restore your own images with a trained model.

OPT is a train or test option file (its ``network_g``, ``network_clip`` and
``path.pretrain_network_g``; ``--model`` overrides the weights). INPUT is an image or a folder.
Every image is written to OUTPUT at its original size and kind: grayscale stays grayscale
(restored through RGB), RGBA keeps its alpha, 16-bit stays 16-bit. Files that are not images are
listed and skipped. OUTPUT also gets ``report.csv`` / ``report.json``: per image, the CLIP
probability of each degradation prompt and the top type (models with ``network_clip``).
``--save-stages`` draws, per image, the intermediate restorations of each unfolding stage and the
degradation-component weights it chose (VLU-Net).

The one restore path: :func:`restore_image` (also behind ``vlunet-app``) embeds an image with
CLIP once, runs the network once and returns the restored image, the degradation report computed
from that same embedding and, on request, the stage grid recorded in that same forward. With
``--tile`` the stages exist only when the image fits in one tile (one forward); an image that
runs as several tiles gets no stage grid (a note says so) rather than a second, whole-image forward.
"""
import argparse
import csv
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from vlunet.utils.atomic import write_atomic, write_image_atomic, write_json_atomic
from vlunet.utils.image_io import ImageReadError, is_image_file, read_image, to_original_kind


def list_inputs(input_path):
    if os.path.isdir(input_path):
        return sorted(os.path.join(input_path, f) for f in os.listdir(input_path)
                      if os.path.isfile(os.path.join(input_path, f)))
    if os.path.isfile(input_path):
        return [input_path]
    raise FileNotFoundError(f'input not found: {input_path} (expected an image file or a folder)')


def build_model(opt_path, model_path=None, device='cpu'):
    """A VLUNetModel (test mode) from an option file, on ``device``.

    Raises FileNotFoundError / KeyError / ValueError with a message naming the option file or the
    weights file (missing, unreadable, or not fitting ``network_g``)."""
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
    model_opt = {
        'name': opt.get('name', 'restore'), 'model_type': 'VLUNetModel', 'num_gpu': 0, 'dist': False,
        'is_train': False, 'rank': 0, 'world_size': 1, 'network_g': opt['network_g'], 'path': path_opt,
        'val': {},
    }
    for key in ('network_clip', 'text_embedding'):
        if opt.get(key):
            model_opt[key] = opt[key]
    try:
        model = basicsr_build_model(model_opt)
    except RuntimeError as err:  # load_state_dict: missing/unexpected keys or size mismatches
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f'{weights}: does not fit network_g of {opt_path} ({first})') from None
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


def main(argv=None):
    parser = argparse.ArgumentParser(prog='vlunet-restore', description=__doc__.split('\n\n')[0])
    parser.add_argument('-opt', required=True, help='train or test option file (network_g, network_clip, weights)')
    parser.add_argument('-i', '--input', required=True, help='an image or a folder of images')
    parser.add_argument('-o', '--output', required=True, help='output folder')
    parser.add_argument('--model', help='network_g weights (overrides path.pretrain_network_g)')
    parser.add_argument('--tile', type=int, default=None, help='tile side in pixels (tiled inference)')
    parser.add_argument('--tile-overlap', type=int, default=32, help='overlap of neighbouring tiles (pixels)')
    parser.add_argument('--device', default=None, help="'cpu', 'cuda', 'cuda:1' ... (default: cuda if available)")
    parser.add_argument('--save-stages', action='store_true',
                        help='also write a PNG per image with every unfolding stage (VLU-Net; with --tile only '
                             'for images that fit in one tile)')
    args = parser.parse_args(argv)

    import torch
    from tqdm import tqdm
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        files = list_inputs(args.input)
        model = build_model(args.opt, args.model, device)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f'error: {err.args[0] if err.args else err}', file=sys.stderr)
        return 2
    os.makedirs(args.output, exist_ok=True)

    rows, skipped, notes = [], [], []
    for path in tqdm(files, unit='image', desc='Restoring'):
        try:
            if not is_image_file(path):
                raise ImageReadError(f'{path}: not an image file name')
            rgb, info = read_image(path)
        except ImageReadError:
            skipped.append(path)
            continue
        result = restore_image(model, rgb, args.tile, args.tile_overlap, stages=args.save_stages)
        name = os.path.basename(path)
        save_restored(os.path.join(args.output, name), result, info)
        if result.stage_grid is not None:
            stem = os.path.splitext(name)[0]
            write_image_atomic(os.path.join(args.output, f'{stem}_stages.png'), result.stage_grid)
        elif result.note:
            notes.append(f'{name}: {result.note}')
        row = {'image': name, 'width': rgb.shape[1], 'height': rgb.shape[0], 'top_type': result.top_type}
        row.update({f'p({prompt})': round(p, 6) for prompt, p in result.report.items()})
        rows.append(row)

    report = {'model': args.model or 'path.pretrain_network_g of ' + args.opt, 'images': rows,
              'skipped': [os.path.basename(p) for p in skipped]}
    write_json_atomic(os.path.join(args.output, 'report.json'), report)
    if rows:
        fields = list(dict.fromkeys(k for r in rows for k in r))

        def write_csv(f):
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

        write_atomic(os.path.join(args.output, 'report.csv'), write_csv, binary=False)
    print(f'restored {len(rows)} image(s) into {args.output}; report: report.csv, report.json')
    for path in skipped:
        print(f'skipped (not an image): {path}')
    for note in notes:
        print(note)
    return 0


if __name__ == '__main__':
    sys.exit(main())
