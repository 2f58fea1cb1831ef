"""vlunet-convert: published checkpoints -> BasicSR ``{'params': state_dict}`` files.

    vlunet-convert SRC DST [--arch NAME] [--arch-opt KEY=VALUE ...] [--clip-out PATH] [--trust-pickle]
    python -m vlunet.convert ...

SRC may be any format read by :func:`vlunet.utils.checkpoint.load_published_state_dict` (the
published formats the method cards list: Lightning .ckpt, {'params'}, {'state_dict'} with or without
'module.', files of pickled modules read without their code; BasicSR files, a bare state_dict). The
method and its constructor arguments are recognised from the keys and shapes by the method cards
(:func:`vlunet.archs.card.identify`) unless given; the network is built from BasicSR's ARCH_REGISTRY and the weights must
load into it with ``strict=True``, otherwise nothing is written and the missing / unexpected
keys and shape mismatches are reported. Outputs are written atomically (temporary file, then
rename), so a failed run never leaves a partial file. DST equal to SRC, or ``--clip-out`` equal
to SRC or DST (also through links, ``..`` or a hard link), is refused before anything is read.
"""
import argparse
import os
import sys
from collections import OrderedDict

import torch
import yaml

import vlunet  # noqa: F401  (BasicSR fixes, registers our archs; must precede basicsr)  # isort: skip
from basicsr.utils.registry import ARCH_REGISTRY  # isort: skip
from vlunet.utils.atomic import write_all_atomic
from vlunet.archs.card import guess_arch, network_entry, state_dict_differences
from vlunet.utils.checkpoint import CheckpointError, check_clip_adapters, load_published_state_dict

PROG = 'vlunet-convert'


class ConversionError(Exception):
    """The conversion is refused; the message says why."""


def parse_arch_opts(items):
    """``['dim=16', 'num_blocks=[1,1,1,1]', 'bias=false']`` -> kwargs (values read as YAML)."""
    opts = {}
    for item in items or []:
        key, sep, value = item.partition('=')
        if not sep or not key.strip().isidentifier():
            raise ConversionError(f'--arch-opt {item!r}: expected KEY=VALUE with KEY a Python identifier')
        try:
            opts[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConversionError(f'--arch-opt {item!r}: cannot read the value ({err})') from None
    return opts


def _short_list(keys, limit=10):
    keys = list(keys)
    return ', '.join(keys[:limit]) + (f' ... ({len(keys)} in all)' if len(keys) > limit else '')


def build_and_verify(params, arch, kwargs):
    """Build ``arch(**kwargs)`` and load ``params`` strictly; return the model's key order."""
    try:
        cls = ARCH_REGISTRY.get(arch)
    except KeyError:
        ours = sorted(name for name, _ in ARCH_REGISTRY)
        raise ConversionError(f'--arch {arch!r}: not a registered architecture (known: {", ".join(ours)})') from None
    try:
        model = cls(**kwargs)
    except Exception as err:  # noqa: BLE001  (bad --arch-opt values surface as any exception type)
        raise ConversionError(f'cannot build {arch}({_fmt_kwargs(kwargs)}): {type(err).__name__}: {err}') from None
    layout = model.state_dict()
    missing, unexpected, mismatched = state_dict_differences(layout, params)
    mismatched = [f'{k}: checkpoint {list(params[k].shape)}, {arch} {list(layout[k].shape)}' for k in mismatched]
    if missing or unexpected or mismatched:
        lines = [f'the weights do not fit {arch}({_fmt_kwargs(kwargs)}):']
        if missing:
            lines.append(f'  missing keys: {_short_list(missing)}')
        if unexpected:
            lines.append(f'  unexpected keys: {_short_list(unexpected)}')
        if mismatched:
            lines.append(f'  shape mismatches: {_short_list(mismatched, 5)}')
        lines.append('  (choose the architecture with --arch and its options with --arch-opt KEY=VALUE)')
        raise ConversionError('\n'.join(lines))
    try:
        model.load_state_dict(params, strict=True)
    except RuntimeError as err:
        raise ConversionError(f'strict load into {arch} failed: {err}') from None
    return list(layout)


def _fmt_kwargs(kwargs):
    return ', '.join(f'{k}={v!r}' for k, v in kwargs.items())


def write_atomically(outputs):
    """``torch.save`` every ``(obj, path)``; all complete before any is renamed into place."""
    for _, path in outputs:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise ConversionError(f'{path}: the folder {folder} does not exist')
    write_all_atomic([(path, lambda f, obj=obj: torch.save(obj, f)) for obj, path in outputs])


def _same_file(a, b):
    """True when paths ``a`` and ``b`` name one file: the same real path (links, ``..``), or, both
    existing, the same inode (a hard link)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def refuse_overwriting_inputs(src, dst, clip_out=None):
    """Raise :class:`ConversionError` when an output would replace SRC or the other output."""
    if _same_file(src, dst):
        raise ConversionError(f'DST {dst} is the same file as SRC {src}: converting would replace the checkpoint '
                              'you convert from; choose another DST')
    if clip_out and _same_file(src, clip_out):
        raise ConversionError(f'--clip-out {clip_out} is the same file as SRC {src}: it would replace the checkpoint '
                              'you convert from; choose another path')
    if clip_out and _same_file(dst, clip_out):
        raise ConversionError(f'--clip-out {clip_out} is the same file as DST {dst}: the adapters would replace the '
                              'network weights; choose two different paths')


def convert(src, dst, arch=None, arch_opts=None, clip_out=None, trust_pickle=False, log=print):
    """Convert ``src`` to a BasicSR ``{'params': ...}`` file ``dst``; see the module docstring.

    Returns ``(arch, kwargs)``. Raises :class:`ConversionError` / :class:`CheckpointError`
    (nothing written) when the conversion is refused.
    """
    refuse_overwriting_inputs(src, dst, clip_out)
    ckpt = load_published_state_dict(src, trust_pickle=trust_pickle)
    if not ckpt.params:
        raise ConversionError(f'{src}: holds no network weights (format {ckpt.source_format!r}, '
                              f'{len(ckpt.clip_adapters or {})} CLIP adapter tensors); nothing to convert')
    if clip_out and not ckpt.clip_adapters:
        raise ConversionError(f'--clip-out {clip_out}: {src} holds no CLIP adapter entries '
                              f'(ad_imageEncoder.adapter.*, ad_textEncoder.adapter.*)')

    if len(ckpt.entries) > 1:  # several pickled modules: the one a method card recognises is the network
        chosen = network_entry(ckpt.entries)
        if chosen is not None:
            ckpt.params = ckpt.entries[chosen]
            ckpt.ignored = [k for k in ckpt.ignored + [k for k in ckpt.entries] if k != chosen]
            log(f'{src}: entry {chosen!r} is the network ({len(ckpt.params)} tensors); not converted: '
                f'{_short_list(sorted(set(ckpt.ignored)), 5)}')
    guess = guess_arch(ckpt.params)
    if arch is None and guess is None:
        raise ConversionError(f'{src}: cannot tell the architecture from its keys '
                              f'(first keys: {_short_list(ckpt.params, 5)}); pass --arch NAME')
    name = arch or guess[0]
    kwargs = dict(guess[1]) if guess and guess[0] == name else {}
    kwargs.update(arch_opts or {})
    order = build_and_verify(ckpt.params, name, kwargs)

    params = OrderedDict((k, ckpt.params[k].detach().contiguous()) for k in order)
    outputs = [({'params': params}, dst)]
    if clip_out:
        outputs.append(({'learnable_params': dict(ckpt.clip_adapters)}, clip_out))
    write_atomically(outputs)

    log(f'{src} ({ckpt.source_format}) -> {dst}: {name}({_fmt_kwargs(kwargs)}), {len(params)} tensors, '
        'strict load verified')
    if ckpt.clip_adapters:
        missing, extra = check_clip_adapters(ckpt.clip_adapters)
        note = ''
        if missing or extra:
            note = f' (differs from the published 24: missing {_short_list(missing, 3) or "none"}, ' \
                   f'extra {_short_list(extra, 3) or "none"})'
        where = f'written to {clip_out}' if clip_out else 'NOT written (pass --clip-out PATH to keep them)'
        log(f'{len(ckpt.clip_adapters)} CLIP adapter tensors{note}: {where}')
    if ckpt.ignored:
        prefixes = sorted({'.'.join(k.split('.')[:2]) for k in ckpt.ignored})
        log(f'{len(ckpt.ignored)} other entries not converted (e.g. the frozen CLIP backbone): '
            f'{_short_list(prefixes, 5)}')
    return name, kwargs


def build_parser():
    from vlunet.archs.card import list_methods
    formats = '\n'.join(f'  {card.name}: {"; ".join(f.description for f in card.checkpoint_formats)}'
                        for card in list_methods() if card.checkpoint_formats)
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f'Convert a published checkpoint of {", ".join(card.name for card in list_methods())} into a '
        "BasicSR {'params': state_dict} file, verified by a strict load into the architecture.",
        epilog=f'Published formats read (the method is recognised from the keys and shapes):\n{formats}')
    parser.add_argument('src', metavar='SRC', help='published checkpoint (.ckpt / .pth)')
    parser.add_argument('dst', metavar='DST', help="output file, {'params': state_dict}")
    parser.add_argument('--arch', metavar='NAME', help='ARCH_REGISTRY name (default: inferred from the keys)')
    parser.add_argument('--arch-opt', metavar='KEY=VALUE', action='append', default=[],
                        help='constructor argument, value read as YAML (repeatable; overrides the inferred ones), '
                        'e.g. --arch-opt depth=5 --arch-opt "num_blocks=[4,6,6,8]"')
    parser.add_argument('--clip-out', metavar='PATH',
                        help='write the CLIP adapter weights of a VLU-Net checkpoint here, in the published '
                        "format {'learnable_params': ...}")
    parser.add_argument('--trust-pickle', action='store_true',
                        help='allow full unpickling of SRC when it holds more than tensors (this runs code stored '
                        'in the file: only for files from a source you trust)')
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        convert(args.src, args.dst, arch=args.arch, arch_opts=parse_arch_opts(args.arch_opt),
                clip_out=args.clip_out, trust_pickle=args.trust_pickle)
    except (ConversionError, CheckpointError) as err:
        print(f'{PROG}: error: {err}', file=sys.stderr)
        print(f'{PROG}: nothing written', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
