#!/usr/bin/env python
"""Inference speed and memory per megapixel of the registered methods on photo-sized images.

For each method (its released configurations, from the method cards), each photo size (1, 4 and 12
megapixels, 4:3: 1152x864, 2304x1728, 4032x3024) and each precision (fp32, bf16 autocast), one
restoration of a real photo (the package's demo photo, resized) through the inference engine, as
``vlunet-restore`` runs it: seconds per megapixel and peak memory per megapixel (the peak above what
the process held with the network built and the photo loaded: CPU resident set, CUDA
``max_memory_allocated``), and whether it ran whole or in tiles. With ``--max-memory`` (default 3G on a
CPU) an image that would not fit runs in tiles the engine chooses from the network's measured memory
model; without it every image runs whole.

Also, with the SAME weights and inputs:

* ``--reference NAME=FILE`` / ``--published-root DIR``: the authors' published class (built as the card's
  ``reference`` says, stand-ins for imports it does not need, as ``benchmark_archs.py --reference``),
  run on the whole image as the authors' test scripts do, at the sizes it can run: a size whose memory,
  extrapolated from its smaller sizes, would pass the budget (or the machine's free memory) is listed
  as not run, with the estimate, and so is every size above one where it failed or timed out (killed
  by the out-of-memory killer, say);
* ``--onnx``: the network exported by vlunet-export's graph builder, on ONNX Runtime's CPU provider
  (fp32), under the same budget and tiling rules.

The networks have random weights (seed 0) and take a random CLIP embedding / text code where their
card says so: the CLIP tower is not timed (it runs once per image on a 224 px view, the same for every
implementation). Every measurement runs in a fresh subprocess. Prints a Markdown table (``--markdown``
also writes it to a file) and ``--csv`` writes the rows.

    python scripts/benchmark_inference.py                                      # every method, CPU, 3G budget
    python scripts/benchmark_inference.py --methods VLU-Net --sizes 1 4 12 --published-root /src --onnx
    python scripts/benchmark_inference.py --device cuda --max-memory 0          # on a GPU, whole images
    python scripts/benchmark_inference.py --quick                               # tiny networks, tiny images
"""
import argparse
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark_archs as ba  # noqa: E402  (selection, published classes, subprocess runner)

PHOTOS = {1: (1152, 864), 4: (2304, 1728), 12: (4032, 3024)}       # megapixels -> (width, height)
QUICK_PHOTOS = {0.003: (64, 48), 0.012: (128, 96)}
QUICK_TILE = 72                  # --quick: the larger image gets a budget that fits tiles of this side, not the whole
IMPLS = ('vlunet', 'published', 'onnxruntime')
CSV_FIELDS = ['method', 'impl', 'precision', 'device', 'megapixels', 'size', 'tiles', 'tile', 'seconds', 's_per_mp',
              'peak_mb', 'mb_per_mp', 'process_peak_mb', 'max_diff', 'note']


def _cards():
    import vlunet  # noqa: F401
    from vlunet.archs import card
    return card


def select(names=None, quick=False):
    """``[(label, method, variant)]``: the released configurations (``benchmark_archs.default_selection``) or
    ``names``; with ``quick`` one tiny configuration per method."""
    card = _cards()
    out = []
    for name in names or ba.default_selection():
        found, variant = card.find_variant(name)
        item = (f'{found.name} (tiny)', found.name, None) if quick else (variant.name, found.name, variant.name)
        if item not in out:
            out.append(item)
    return out


def published_file(card, root, variant=None):
    """The published source file of ``card`` in a folder of checkouts ``root/<owner>+<name>/`` (or
    ``root/<name>/``), from the card's ``code`` ('owner/name @ commit (path, ...)'); None if absent."""
    match = re.match(r'\s*([\w.-]+)/([\w.-]+)\s*@\s*\w+\s*\(([^)]*)\)', card.code or '')
    if not match or card.reference is None:
        return None
    owner, name, paths = match.groups()
    candidates = [p.strip().split(' ')[0] for p in re.split(r'[,;]', paths) if p.strip().endswith('.py')
                  or '.py' in p]
    candidates = [c for c in candidates if c.endswith('.py')]
    if variant and len(candidates) > 1:  # a file per variant (e.g. <method>_small.py, <method>_tiny.py)
        last = variant.split('-')[-1].lower()
        picked = [c for c in candidates if any(w.startswith(last) for w in re.split(r'[_/.]', c.lower()))]
        candidates = picked or candidates
    for folder in (f'{owner}+{name}', name, f'{owner}_{name}'):
        for path in candidates:
            full = os.path.join(root, folder, path)
            if os.path.isfile(full):
                return full
    return None


def photo(width, height):
    """A real photo (the package's demo image) resized to ``width`` x ``height``: float32 RGB in [0, 1]."""
    import cv2
    import numpy as np
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'vlunet', 'demo_data', 'train',
                        'astronaut.png')
    img = cv2.imread(here, cv2.IMREAD_COLOR)
    if img is None:
        img = (np.random.default_rng(0).random((512, 512, 3)) * 255).astype(np.uint8)
    img = cv2.resize(img, (width, height), interpolation=cv2.INTER_CUBIC)
    return np.ascontiguousarray(img[..., ::-1], dtype=np.float32) / 255.0


def _network(method, variant, quick):
    import torch
    card = _cards().get_card(method)
    opt = card.tiny_opt() if quick else card.network_opt(variant)
    from basicsr.archs import build_network
    torch.manual_seed(0)
    return card, build_network(dict(opt)).eval()


def _conditioning(card):
    """(embedding or None, text code or None) of the seeded random conditioning."""
    import torch

    from vlunet.archs.conditioning import CLIP_DIM, DEGRADATION_EMBEDDING, TEXT_EMBEDDING
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(1, CLIP_DIM, generator=g)
    return (emb if card.condition == DEGRADATION_EMBEDDING else None,
            emb if card.condition == TEXT_EMBEDDING else None)


def measure(method, variant, impl, precision, width, height, device, threads, budget, quick, reference=None,
            onnx=None, quick_tiles=False, save_output=None):
    """One restoration in this process (main runs it in a fresh subprocess); returns a dict."""
    import gc

    import numpy as np
    import torch
    torch.set_num_threads(threads)
    from vlunet.inference import Conditioner, RestorationEngine, parse_precision, precision_name
    from vlunet.inference.memory import (MemoryMeter, format_bytes, image_buffer_bytes, peak_resident_bytes,
                                         return_freed_memory)
    from vlunet.utils.tiling import crop_to, pad_to_multiple
    card, net = _network(method, variant, quick)
    emb, code = _conditioning(card)
    meter = MemoryMeter(device)
    if meter.kind == 'cpu':
        return_freed_memory()
    rgb = photo(width, height)
    lq = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None].to(device)
    sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)
    tile, how = None, 'whole image'
    if impl == 'vlunet':
        conditioner = Conditioner(card.condition, None, code, 'oracle')
        engine = RestorationEngine(net, conditioner, device, precision, max_memory=budget)
        extra = dict(label=[0] if code is not None else None, embedding=emb.to(device) if emb is not None else None)
        if budget or quick_tiles:
            model = engine.memory_model()  # the calibration (once per network, cached) is not timed
        if quick_tiles:  # --quick: a budget with room for tiles of QUICK_TILE px but not for the whole image
            engine.max_memory = budget = (meter.in_use() + image_buffer_bytes(1, height, width)
                                          + int(model.forward_bytes(QUICK_TILE ** 2)) + 1)

        def run():
            out, _, used, text = engine._forward(lq, **extra)
            return out, used, text
    elif impl == 'published':
        args, kwargs = card.reference.kwargs({k: v for k, v in (card.tiny_opt() if quick else
                                                                   card.network_opt(variant)).items() if k != 'type'})
        pub = ba._load_published(card, reference)(*args, **kwargs)
        pub.load_state_dict(net.state_dict(), strict=True)
        del net
        pub = pub.to(device).eval()
        inputs = [t.to(device) for t in (emb, code) if t is not None]
        dtype = parse_precision(precision)

        def run():
            padded, size = pad_to_multiple(lq, 8)
            with torch.no_grad(), (torch.autocast(torch.device(device).type, dtype=dtype) if dtype else
                                   _nullcontext()):
                if card.reference.seed_forward:
                    torch.manual_seed(2)
                out = ba._first(pub(padded, *inputs))
            return crop_to(out.float(), size), None, 'whole image (as the published test scripts)'
    else:
        from vlunet.inference.onnx_backend import OnnxEngine
        engine = OnnxEngine(onnx, threads=threads, max_memory=budget)
        if budget or quick_tiles:
            model = engine.memory_model()
        if quick_tiles:
            engine.max_memory = budget = (meter.in_use() + image_buffer_bytes(1, height, width)
                                          + int(model.forward_bytes(QUICK_TILE ** 2)) + 1)

        def run():
            return engine.forward(lq, emb)
    gc.collect()
    meter.start()
    before = meter.in_use()
    sync()
    start = time.perf_counter()
    out, tile, how = run()
    sync()
    seconds = time.perf_counter() - start
    peak = meter.peak() - before
    mp = width * height / 1e6
    result = {'seconds': seconds, 's_per_mp': seconds / mp, 'peak_mb': peak / 2**20, 'mb_per_mp': peak / 2**20 / mp,
              'process_peak_mb': (peak_resident_bytes() if meter.kind == 'cpu' else meter.peak()) / 2**20,
              'tile': tile or '', 'how': how, 'precision': precision_name(parse_precision(precision)),
              'budget': format_bytes(budget) if budget else ''}
    if save_output:
        torch.save(out.float().cpu()[..., :256, :256].clone(), save_output)
    return result


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _tiles(how):
    match = re.match(r'\s*(\d+) ', how or '')
    return int(match.group(1)) if match and 'tile' in how else 1


def _row(label, impl, precision, device, mp, size, note='', **figures):
    return {'method': label, 'impl': impl, 'precision': precision, 'device': device, 'megapixels': mp, 'size': size,
            'tiles': figures.get('tiles', ''), 'tile': figures.get('tile', ''), 'seconds': figures.get('seconds'),
            's_per_mp': figures.get('s_per_mp'), 'peak_mb': figures.get('peak_mb'),
            'mb_per_mp': figures.get('mb_per_mp'), 'process_peak_mb': figures.get('process_peak_mb'),
            'max_diff': figures.get('max_diff'), 'note': note}


def _fmt(value, digits):
    return '' if value is None or value == '' else f'{value:.{digits}f}'


def print_table(rows, header, out=sys.stdout):
    lines = [header, '',
             '| method | impl | precision | photo | tiles | s/MP | peak MB/MP | s | peak MB | note |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        photo_ = f'{r["megapixels"]:g} MP ({r["size"]})'
        tiles = (f'{r["tiles"]} x {r["tile"]} px' if r['tile'] else ('whole' if r['tiles'] else ''))
        lines.append(f'| {r["method"]} | {r["impl"]} | {r["precision"]} | {photo_} | {tiles} | {_fmt(r["s_per_mp"], 2)} '
                     f'| {_fmt(r["mb_per_mp"], 0)} | {_fmt(r["seconds"], 1)} | {_fmt(r["peak_mb"], 0)} | {r["note"]} |')
    text = '\n'.join(lines)
    print(text, file=out)
    return text


def comparisons(rows):
    """Lines comparing ours with the published code and ONNX Runtime with PyTorch at the same size and precision."""
    out = []
    by = {(r['method'], r['impl'], r['precision'], r['megapixels']): r for r in rows if r['seconds'] is not None}
    for (method, impl, precision, mp), r in by.items():
        if impl == 'vlunet':
            continue
        ours = by.get((method, 'vlunet', precision, mp))
        if ours is None:
            continue
        what = 'published' if impl == 'published' else 'onnxruntime'
        mem = (f', peak memory {ours["peak_mb"] / r["peak_mb"]:.2f}x of {what}'
               if r['peak_mb'] and impl == 'published' else
               (f', peak memory {r["peak_mb"] / ours["peak_mb"]:.2f}x of pytorch' if ours['peak_mb'] else ''))
        if impl == 'published':
            out.append(f'- {method} {precision} {mp:g} MP: ours {r["seconds"] / ours["seconds"]:.2f}x as fast as the '
                       f'published code{mem}' + (f'; max |difference| {r["max_diff"]:.1e}' if r['max_diff'] is not None
                                                  else ''))
        else:
            out.append(f'- {method} {mp:g} MP: onnxruntime {ours["seconds"] / r["seconds"]:.2f}x the speed of PyTorch'
                       f' fp32{mem}' + (f'; max |difference| {r["max_diff"]:.1e}' if r['max_diff'] is not None else ''))
    return out


def free_memory():
    """Bytes the machine can still give (MemAvailable), or None."""
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def export_child(method, variant, quick, path):
    """Export the (seeded) network as vlunet-export's graph for ONNX Runtime (run in a subprocess)."""
    import torch
    torch.set_num_threads(2)
    from vlunet.export import write_network_onnx
    card, net = _network(method, variant, quick)
    _, code = _conditioning(card)
    write_network_onnx(net, card, path, code=code[0] if code is not None else None)
    return {'path': path}


def _child(**job):
    if job.pop('what', None) == 'export':
        return export_child(**job)
    return measure(**job)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--methods', '--archs', nargs='+', metavar='NAME', help='methods or released configurations '
                        '(default: every released configuration with option files)')
    parser.add_argument('--sizes', nargs='+', type=float, default=None, metavar='MP',
                        help=f'photo sizes in megapixels (default {" ".join(map(str, PHOTOS))})')
    parser.add_argument('--precisions', nargs='+', default=['fp32', 'bf16'], choices=('fp32', 'bf16', 'fp16'))
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--max-memory', default=None, metavar='SIZE',
                        help='memory budget under which our engine tiles (default 3G on CPU, none on CUDA; 0: none)')
    parser.add_argument('--reference', nargs='+', default=[], metavar='NAME=FILE',
                        help='published source files (as benchmark_archs.py --reference)')
    parser.add_argument('--published-root', metavar='DIR',
                        help='a folder of checkouts of the authors\' repositories (DIR/<owner>+<name>/...): every '
                             'selected method whose card names its published class is compared')
    parser.add_argument('--published-sizes', nargs='+', type=float, default=None, metavar='MP',
                        help='sizes at which to run the published code (default: all, while it fits)')
    parser.add_argument('--onnx', action='store_true', help='also ONNX Runtime (CPU, fp32) on the exported graph')
    parser.add_argument('--onnx-methods', nargs='+', metavar='NAME', help='methods for --onnx (default: all selected)')
    parser.add_argument('--timeout', type=float, help='seconds per measurement before it is listed as timed out')
    parser.add_argument('--markdown', help='also write the table (and comparisons) to this Markdown file')
    parser.add_argument('--quick', action='store_true',
                        help='tiny configurations on tiny images, a budget that makes the larger one tile (a smoke test)')
    args = ba.parse_with_child(parser, argv, _child)
    if args is None:
        return 0

    from vlunet.inference.memory import format_bytes, parse_memory
    photos = QUICK_PHOTOS if args.quick else PHOTOS
    sizes = args.sizes or list(photos)
    for mp in sizes:
        if mp not in photos:
            parser.error(f'--sizes {mp:g}: known sizes {", ".join(f"{k:g}" for k in photos)}')
    try:
        selected = select(args.methods, args.quick)
    except KeyError as err:
        parser.error(str(err.args[0]) if err.args else str(err))
    default_budget = None if args.device.startswith('cuda') or args.quick else '3G'
    budget = parse_memory(args.max_memory if args.max_memory not in (None, '0') else
                          (None if args.max_memory == '0' else default_budget))
    cards = _cards()
    references = {}
    for item in args.reference:
        name, sep, path = item.rpartition('=')
        if not sep or not os.path.isfile(path):
            parser.error(f'--reference {item}: expected NAME=FILE with an existing published source file')
        references[cards.find_variant(name)[1].name if not args.quick else cards.get_card(name).name] = path
    if args.published_root:
        for label, method, variant in selected:
            card = cards.get_card(method)
            found = published_file(card, args.published_root, variant)
            key = variant if not args.quick else method
            if found and key not in references:
                references[key] = found

    tmp = ba.scratch_dir('vlunet-bench-inference-')
    rule = (f'--quick: the largest photo gets a budget with room for {QUICK_TILE} px tiles only' if args.quick else
            f'budget {format_bytes(budget) if budget else "none"} (our engine and onnxruntime tile what would not fit)')
    header = (f'{ba_describe(args.device, args.threads)}; load average at the start {_load()}; {rule}; '
              f'peak = memory above the built network and the loaded photo; the published code runs whole images')
    print(header, file=sys.stderr, flush=True)
    rows = []
    def published_limit():  # what the published code may use: the machine's free memory (a GPU's is not checked)
        free = None if args.device.startswith('cuda') else free_memory()
        return int(free * 0.8) if free else None
    for label, method, variant in selected:
        card = cards.get_card(method)
        ref_key = method if args.quick else variant
        onnx_path = None
        if args.onnx and (not args.onnx_methods or any(n in (label, method, variant) for n in args.onnx_methods)):
            onnx_path = os.path.join(tmp, f'{re.sub(r"[^A-Za-z0-9]+", "_", label)}.onnx')
            print(f'[{label}] exporting for onnxruntime ...', file=sys.stderr, flush=True)
            try:
                ba._subprocess(dict(what='export', method=method, variant=variant, quick=args.quick, path=onnx_path),
                               script=__file__, timeout=args.timeout)
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                onnx_path = None
                rows.append(_row(label, 'onnxruntime', 'fp32', args.device, 0, '', f'export failed: {_last(err)}'))
        for precision in args.precisions:
            published_per_mp, published_failed = None, None
            for mp in sizes:
                width, height = photos[mp]
                size = f'{width}x{height}'
                impls = ['vlunet'] + (['published'] if ref_key in references else []) + \
                    (['onnxruntime'] if onnx_path and precision == 'fp32' and not args.device.startswith('cuda') else [])
                outputs = {}
                for impl in impls:
                    if impl == 'published' and args.published_sizes and mp not in args.published_sizes:
                        rows.append(_row(label, impl, precision, args.device, mp, size, 'not run (--published-sizes)'))
                        continue
                    if impl == 'published' and published_failed:
                        rows.append(_row(label, impl, precision, args.device, mp, size,
                                         f'not run: it failed at {published_failed}'))
                        continue
                    limit = published_limit()
                    if impl == 'published' and published_per_mp and limit and published_per_mp * mp > limit:
                        rows.append(_row(label, impl, precision, args.device, mp, size,
                                         f'not run: needs about {format_bytes(published_per_mp * mp)} '
                                         f'(from its smaller sizes), more than the {format_bytes(limit)} free'))
                        continue
                    out_path = os.path.join(tmp, f'{len(rows)}.pt')
                    job = dict(method=method, variant=variant, impl=impl, precision=precision, width=width,
                               height=height, device=args.device, threads=args.threads,
                               budget=budget if impl != 'published' else None, quick=args.quick,
                               reference=references.get(ref_key), onnx=onnx_path, save_output=out_path,
                               quick_tiles=args.quick and impl != 'published' and mp == max(sizes))
                    print(f'[{label} {impl} {precision} {size}] ...', file=sys.stderr, flush=True)
                    try:
                        r = ba._subprocess(job, script=__file__, timeout=args.timeout)
                    except subprocess.TimeoutExpired:
                        rows.append(_row(label, impl, precision, args.device, mp, size,
                                         f'timed out after {args.timeout:.0f} s'))
                        published_failed = f'{mp:g} MP' if impl == 'published' else published_failed
                        continue
                    except RuntimeError as err:
                        rows.append(_row(label, impl, precision, args.device, mp, size, f'failed: {_last(err)}'))
                        published_failed = f'{mp:g} MP' if impl == 'published' else published_failed
                        continue
                    outputs[impl] = out_path
                    note = r['how'].split(', tiled by')[0] + ' (budget)' if r['tile'] else ''
                    row = _row(label, impl, r['precision'], args.device, mp, size, note, tiles=_tiles(r['how']),
                               **{k: r[k] for k in ('tile', 'seconds', 's_per_mp', 'peak_mb', 'mb_per_mp',
                                                    'process_peak_mb')})
                    ours = next((x for x in reversed(rows) if x['method'] == label and x['impl'] == 'vlunet'
                                 and x['precision'] == row['precision'] and x['megapixels'] == mp), None)
                    if impl != 'vlunet' and 'vlunet' in outputs and ours and ours['tile'] == row['tile']:
                        import torch
                        row['max_diff'] = float((torch.load(outputs['vlunet']) - torch.load(out_path)).abs().max())
                    if impl == 'published':
                        published_per_mp = r['peak_mb'] * 2**20 / mp * 1.1  # 10 % margin
                    rows.append(row)
                    if args.csv:  # after every row: a long run that is stopped keeps what it measured
                        ba.write_csv(args.csv, rows, CSV_FIELDS)
                    print(f'    {_fmt(row["s_per_mp"], 2)} s/MP, {_fmt(row["mb_per_mp"], 0)} MB/MP {note}',
                          file=sys.stderr, flush=True)
    header += f'; load average at the end {_load()}'
    text = print_table(rows, header)
    lines = comparisons(rows)
    if lines:
        print('\n' + '\n'.join(lines))
    if args.markdown:
        with open(args.markdown, 'w') as f:
            f.write(text + '\n' + ('\n' + '\n'.join(lines) + '\n' if lines else ''))
    if args.csv:
        ba.write_csv(args.csv, rows, CSV_FIELDS)
    return 0


def _load():
    try:
        return '/'.join(f'{v:.1f}' for v in os.getloadavg())
    except OSError:
        return '?'


def _last(err):
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1][:160] if lines else '?'


def ba_describe(device, threads):
    """Where the numbers come from (benchmark_train's description: CPU model, bf16/fp16 units, threads; or the GPU)."""
    try:
        import benchmark_train
        return benchmark_train.device_description(device, threads)
    except Exception:  # noqa: BLE001  (an older benchmark_train: a plainer line)
        import platform
        return f'{device} {platform.processor()}, {threads} threads'


if __name__ == '__main__':
    sys.exit(main())
