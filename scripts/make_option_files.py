#!/usr/bin/env python
"""Write a method's option files for every setting, from its method card and the shared protocol.

    python scripts/make_option_files.py NAME [--variant V] [--settings NHR NHRBL CDD11] [--overwrite]
    python scripts/make_option_files.py NAME --demo DIR     # a tiny run on the demo images (seconds)

For each setting that has option files (options/train/*_<SETTING>.yml), the training and the test file
of each released configuration of NAME (its card's variants with an option stem) are made from the
files of a method already there that takes the same input besides the image (its card's
``condition``) and has no training terms of its own: the datasets, schedule, validation and protocol
are copied unchanged (a test checks that every method of a setting shares them), ``name`` and
``network_g`` become the method's (full size, from the card), and the card's own training terms are
added with their published options. The header records the card's paper, code and published recipe.
Review the header and the training terms' setting-specific options (e.g. one entry per degradation
type) before training. Nothing is overwritten without ``--overwrite``; every file is written atomically.
"""
import argparse
import glob
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import vlunet  # noqa: E402,F401  (fixes basicsr, registers the archs and their cards)
import yaml  # noqa: E402
from basicsr.utils.options import ordered_yaml  # noqa: E402  (a safe loader: vlunet.compat)

from vlunet.archs.card import card_for, find_variant, list_variants  # noqa: E402
from vlunet.archs.conditioning import TEXT_EMBEDDING  # noqa: E402
from vlunet.utils.atomic import write_text_atomic  # noqa: E402


def settings(options=os.path.join(REPO, 'options')):
    """Settings with shared option files: the suffixes of options/train/*_<SETTING>.yml (not demos)."""
    names = {os.path.basename(p)[:-4].rsplit('_', 1)[-1] for p in glob.glob(os.path.join(options, 'train', '*_*.yml'))}
    return sorted(n for n in names if n.isupper())


def template_stem(card, setting, options=os.path.join(REPO, 'options')):
    """The option stem of a method with files for ``setting`` that takes what ``card`` takes besides the
    image and has no training terms of its own (its files hold only the shared protocol)."""
    for other, variant in list_variants():
        if (other is not card and variant.options and other.condition == card.condition and not other.training_terms
                and not other.extra_networks
                and all(os.path.isfile(os.path.join(options, kind, f'{variant.options}_{setting}.yml'))
                        for kind in ('train', 'test'))):
            return variant.options
    return None


def _load(path):
    with open(path, encoding='utf-8') as f:
        return yaml.load(f, Loader=ordered_yaml()[0])


def _renamed(obj, old, new):
    """``obj`` with ``old`` replaced by ``new`` in every string (experiment names inside paths)."""
    if isinstance(obj, str):
        return obj.replace(old, new)
    if isinstance(obj, dict):
        return type(obj)((k, _renamed(v, old, new)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_renamed(v, old, new) for v in obj]
    return obj


def _header(card, variant, setting, kind, template_path):
    with open(template_path, encoding='utf-8') as f:
        protocol = [line.rstrip('\n') for line in f if line.startswith('# Protocol:')]
    lines = [f'# {"Test" if kind == "test" else "Train"} {variant.name} ({card.name}) in the {setting} setting, '
             'under the shared protocol of this setting (written by scripts/make_option_files.py).', *protocol,
             f'# Method: {card.paper}; code {card.code}; type {card.arch}.',
             '# Datasets, schedule, validation and protocol are those of every method of this setting; only '
             'network_g and the method\'s own training terms differ.']
    if kind == 'train' and card.recipe:
        lines.append('# Published recipe (where it differs from the shared one):')
        lines += [f'#   {key}: {value}' for key, value in card.recipe.items()]
    return '\n'.join(lines) + '\n'


def make(name, variant=None, wanted=None, overwrite=False, options=os.path.join(REPO, 'options'), log=print):
    """Write the files; returns their paths. Raises SystemExit with a message for what cannot be done."""
    card, _ = find_variant(name)
    variants = [card.variant(variant)] if variant else [v for v in card.variants if v.options]
    if not variants:
        raise SystemExit(f'{card.name}: no variant has an option stem (Variant.options) on its card')
    written = []
    for setting in wanted or settings(options):
        stem = template_stem(card, setting, options)
        if stem is None:
            raise SystemExit(f'{setting}: no method with files for this setting takes what {card.name} takes '
                             f'besides the image ({card.condition or "nothing"}) without terms of its own')
        for v in (v for v in variants if v.released_for(setting)):
            for kind in ('train', 'test'):
                source = os.path.join(options, kind, f'{stem}_{setting}.yml')
                target = os.path.join(options, kind, f'{v.options}_{setting}.yml')
                if os.path.exists(target) and not overwrite:
                    raise SystemExit(f'{target} exists; pass --overwrite to replace it')
                opt = _renamed(_load(source), f'{stem}_{setting}', f'{v.options}_{setting}')
                keep = {k: opt['network_g'][k] for k in ('de_dim',) if k in opt['network_g']
                        and card_for(opt['network_g']).condition == card.condition and k in card.network_opt(v.name)}
                opt['network_g'] = dict(card.network_opt(v.name), **keep)
                if kind == 'train':
                    for term in card.training_terms:
                        opt['train'][term.key] = {'type': term.loss, **dict(term.published)}
                text = _header(card, v, setting, kind, source) + yaml.dump(
                    opt, Dumper=ordered_yaml()[1], sort_keys=False, default_flow_style=None, width=120)
                write_text_atomic(target, text)
                written.append(target)
                log(f'wrote {target} (from {os.path.basename(source)})')
    return written


DEMO_SOURCES = (('noise25', {'type': 'gaussian_noise_uint8', 'sigma': 25}), ('rain', {'type': 'rain_streaks'}))


def make_demo(name, out, overwrite=False, log=print):
    """A training and a test file of the method's TINY network on the demo images inside the package
    (noise and rain synthesised; a run of seconds on a CPU: a smoke test, not a result)."""
    card, variant = find_variant(name)
    stem = f'{variant.options or card.arch}_demo'
    network = card.tiny_opt()
    if 'de_dim' in network:
        network['de_dim'] = len(DEMO_SOURCES)
    sources = [{'name': n, 'label': k, 'dataroot_gt': 'vlunet://demo_data/{}', 'degradation': d}
               for k, (n, d) in enumerate(DEMO_SOURCES)]
    common = {'name': stem, 'model_type': 'VLUNetModel', 'num_gpu': 'auto', 'manual_seed': 0,
              'network_g': network}
    if card.condition == TEXT_EMBEDDING:  # the tiny CLIP configuration: no weights to download
        prompts = [card.task_prompts.get(n, n) for n, _ in DEMO_SOURCES]
        common['text_embedding'] = {'clip_model': 'vlunet-tiny', 'pretrained': None, 'prompts': prompts,
                                    'mode': 'oracle'}
    metrics = {'psnr': {'type': 'calculate_psnr', 'crop_border': 0, 'test_y_channel': False},
               'ssim': {'type': 'calculate_ssim', 'crop_border': 0, 'test_y_channel': False}}
    train = dict(common, datasets={'train': {
        'name': 'demo_train', 'type': 'AllInOneDataset',
        'sources': [dict(s, dataroot_gt=s['dataroot_gt'].format('train')) for s in sources],
        'gt_size': 32, 'use_hflip': True, 'use_rot': True, 'num_worker_per_gpu': 0, 'batch_size_per_gpu': 2,
        'dataset_enlarge_ratio': 1, 'prefetch_mode': None}},
        path={'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        train={'ema_decay': 0, 'optim_g': {'type': 'AdamW', 'lr': 1e-3},
               'scheduler': {'type': 'LinearWarmupCosineLR', 'warmup_iter': 0}, 'total_iter': 2, 'warmup_iter': -1,
               'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0},
               **{t.key: {'type': t.loss, **dict(t.published)} for t in card.training_terms}},
        logger={'print_freq': 1, 'save_checkpoint_freq': 2, 'use_tb_logger': False})
    test = dict(common, datasets={f'test_{k + 1}': {'name': f'demo_{s["name"]}', 'type': 'AllInOneDataset',
                                                    'seed': 0, 'sources': [dict(s, dataroot_gt=s['dataroot_gt']
                                                                                .format('val'))]}
                                  for k, s in enumerate(sources)},
                path={'pretrain_network_g': f'experiments/{stem}/models/net_g_latest.pth', 'strict_load_g': True},
                val={'save_img': True, 'pbar': False, 'metrics': metrics})
    written = []
    for kind, opt in (('train', train), ('test', test)):
        target = os.path.join(out, kind, f'{stem}.yml')
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.exists(target) and not overwrite:
            raise SystemExit(f'{target} exists; pass --overwrite to replace it')
        header = (f'# {kind.title()} the TINY {card.name} ({card.arch}) on the demo images inside the package (noise '
                  'and rain): a smoke test of seconds, not a result (scripts/make_option_files.py --demo).\n')
        write_text_atomic(target, header + yaml.dump(opt, Dumper=ordered_yaml()[1], sort_keys=False,
                                                     default_flow_style=None, width=120))
        written.append(target)
        log(f'wrote {target}')
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('name', help='a method, or one of its released configurations (as its card names it)')
    parser.add_argument('--variant', help='only this released configuration')
    parser.add_argument('--settings', nargs='+', help=f'default: every setting ({", ".join(settings())})')
    parser.add_argument('--overwrite', action='store_true', help='replace existing files')
    parser.add_argument('--demo', metavar='DIR', help='instead: a tiny training and test file on the demo images, '
                        'written to DIR/train and DIR/test (e.g. a scratch folder)')
    args = parser.parse_args(argv)
    try:
        if args.demo:
            make_demo(args.name, args.demo, args.overwrite)
        else:
            make(args.name, args.variant, args.settings, args.overwrite)
    except KeyError as err:
        parser.error(err.args[0])
    return 0


if __name__ == '__main__':
    sys.exit(main())
