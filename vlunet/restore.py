"""``vlunet-restore -opt OPT -i INPUT -o OUTPUT``: restore your own images with a trained model.

OPT is a train or test option file (its ``network_g``, ``network_clip`` and
``path.pretrain_network_g``; ``--model`` overrides the weights). INPUT is an image or a folder.
Every image is written to OUTPUT at its original size and kind: grayscale stays grayscale
(restored through RGB), RGBA keeps its alpha, 16-bit stays 16-bit. Files that are not images are
listed and skipped. OUTPUT also gets ``report.csv`` / ``report.json``: per image, the CLIP
probability of each degradation prompt and the top type (models with ``network_clip``).
``--save-stages`` draws, per image, the intermediate restorations of each unfolding stage and the
degradation-component weights it chose (VLU-Net).
"""
import argparse
import csv
import os
import sys

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
    """A VLUNetModel (test mode) from an option file, on ``device``."""
    import torch
    import yaml

    import vlunet  # noqa: F401
    from basicsr.models import build_model as basicsr_build_model
    from basicsr.utils.options import ordered_yaml
    if not os.path.isfile(opt_path):
        raise FileNotFoundError(f'option file not found: {opt_path}')
    with open(opt_path) as f:
        opt = yaml.load(f, Loader=ordered_yaml()[0])
    for key in ('network_g', ):
        if key not in opt:
            raise KeyError(f'{opt_path}: missing "{key}" (expected a vlunet train or test option file)')
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
    if opt.get('network_clip'):
        model_opt['network_clip'] = opt['network_clip']
    model = basicsr_build_model(model_opt)
    model.device = torch.device(device)
    model.net_g.to(model.device).eval()
    if model.net_clip is not None:
        model.net_clip.to(model.device).eval()
    return model


def degradation_report(model, lq):
    """{prompt: probability} of the model's CLIP (empty without network_clip)."""
    if model.net_clip is None:
        return {}
    probs = model.net_clip.classify(lq)[0].tolist()
    return dict(zip(model.net_clip.prompts, probs))


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
                        help='also write a PNG per image with every unfolding stage (VLU-Net)')
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
    if args.save_stages:
        from vlunet.utils.stages import save_stage_grid

    rows, skipped = [], []
    for path in tqdm(files, unit='image', desc='Restoring'):
        try:
            if not is_image_file(path):
                raise ImageReadError(f'{path}: not an image file name')
            rgb, info = read_image(path)
        except ImageReadError:
            skipped.append(path)
            continue
        lq = torch.from_numpy(rgb.transpose(2, 0, 1).copy()).unsqueeze(0).to(device)
        with torch.no_grad():
            out = model.restore(lq, tile=args.tile, tile_overlap=args.tile_overlap)
            probs = degradation_report(model, lq)
            if args.save_stages:
                stem = os.path.splitext(os.path.basename(path))[0]
                save_stage_grid(model, lq, os.path.join(args.output, f'{stem}_stages.png'))
        restored = out[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy()
        name = os.path.basename(path)
        write_image_atomic(os.path.join(args.output, name), to_original_kind(restored, info))
        row = {'image': name, 'width': rgb.shape[1], 'height': rgb.shape[0],
               'top_type': max(probs, key=probs.get) if probs else ''}
        row.update({f'p({prompt})': round(p, 6) for prompt, p in probs.items()})
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
    return 0


if __name__ == '__main__':
    sys.exit(main())
