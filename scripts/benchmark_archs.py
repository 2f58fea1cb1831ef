#!/usr/bin/env python
"""Speed and memory of the registered restoration architectures at full size.

For each arch: parameters, GMACs of one 1x3x256x256 forward, forward latency at 1x3x256x256
(no_grad), forward+backward latency with an L1 loss at 2x3x128x128 (median and best after a
warm-up step; also the process CPU time per step, steadier than wall-clock on a shared machine),
and peak memory of the forward+backward steps (CPU: peak resident set minus the resident set once
the network and inputs are built, in a fresh process; CUDA: torch.cuda.max_memory_allocated minus
the memory allocated before the steps). Every measurement runs in its own subprocess, so the
memory figures do not mix. Prints a Markdown table; ``--csv`` also writes CSV.

    python scripts/benchmark_archs.py                       # every method's released configurations, CPU
    python scripts/benchmark_archs.py --archs NAME ... --repeats 5 --device cuda
    python scripts/benchmark_archs.py --archs NAME --reference NAME=/src/<repo>/<file>.py
    python scripts/benchmark_archs.py --tiny --repeats 1     # the cards' tiny configurations (a smoke test)

The methods and their configurations come from the method cards (vlunet/archs/card.py): NAME is a
released configuration (``Variant.name`` or its option-file stem) or a method (its first release).
``--reference NAME=FILE ...`` also times the published implementation (its source file from a
checkout of the authors' repository; they need ``einops``), built as the card's ``reference`` says,
with the SAME weights and inputs, checks that the outputs agree within float32 rounding, and prints
the speed-up and memory ratio. Modules the published files import but their networks never use
(the card's ``reference.stubs``) are replaced by empty stand-ins when not installed.
"""
import argparse
import csv
import importlib.util
import json
import os
import statistics
import signal
import subprocess
import sys
import time

def _cards():
    import vlunet  # noqa: F401  (fixes basicsr, registers the archs and their cards)
    from vlunet.archs import card
    return card


def default_selection():
    """Every released configuration with option files, and the first one of a method without any."""
    names = []
    for card in _cards().list_methods():
        with_options = list({v.options: v for v in reversed(card.variants) if v.options}.values())[::-1]
        names += [v.name for v in (with_options or card.variants[:1])]
    return names


def network_opt(name, tiny=False):
    """``(card, variant name, network_g options)`` of a configuration named as ``--archs`` takes it."""
    card, variant = _cards().find_variant(name)
    return card, variant.name, (card.tiny_opt() if tiny else card.network_opt(variant.name))


def _mb(nbytes):
    return float('nan') if nbytes is None else nbytes / 2**20


def _peak_rss_mb():
    """Peak resident set (MB; NaN where /proc is not available), as the inference memory budget reads it."""
    from vlunet.inference.memory import peak_resident_bytes
    return _mb(peak_resident_bytes())


def _current_rss_mb():
    from vlunet.inference.memory import resident_bytes
    return _mb(resident_bytes())


def _reset_peak_rss():
    """Reset the peak resident set to the current one (Linux >= 4.0); otherwise leave it."""
    from vlunet.inference.memory import reset_peak_resident
    reset_peak_resident()


def _start_peak_memory(device):
    """Reset the peak-memory counter of ``device``; returns the baseline (MB) the peak is measured from."""
    import torch
    if device.startswith('cuda'):
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    baseline = _current_rss_mb()
    _reset_peak_rss()  # what was built before (e.g. both implementations for --reference) must not count
    return baseline


def _peak_memory_mb(device, baseline):
    """Peak memory (MB) above ``baseline`` since :func:`_start_peak_memory`."""
    import torch
    return (torch.cuda.max_memory_allocated() / 2**20 if device.startswith('cuda') else _peak_rss_mb()) - baseline


def _stand_in(module_name):
    """An empty module for an import the published network never uses (its names return None)."""
    import types
    module = types.ModuleType(module_name)
    module.__path__ = []  # a package, so that its submodules (fvcore.nn) can be stood in too

    def getattr_(attr):
        if attr.startswith('__'):
            raise AttributeError(attr)
        return lambda *args, **kwargs: None

    module.__getattr__ = getattr_
    return module


def _load_published(card, path):
    """The published class of ``card`` from its source file (its repository root on sys.path)."""
    folder = os.path.dirname(os.path.abspath(path))
    for p in (folder, os.path.dirname(folder)):  # 'from net.arch_util import ...' and sibling imports
        if p not in sys.path:
            sys.path.insert(0, p)
    for module_name in card.reference.stubs:
        try:
            importlib.import_module(module_name)
        except ImportError:
            sys.modules[module_name] = _stand_in(module_name)
    spec = importlib.util.spec_from_file_location(f'published_{card.arch}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, card.reference.cls)


def _build(name, reference=None, tiny=False):
    import torch
    card, _, opt = network_opt(name, tiny)  # imports vlunet (which fixes basicsr) first
    from basicsr.archs import build_network
    torch.manual_seed(0)
    ours = build_network(dict(opt))
    if reference is None:
        return card, ours
    args, kwargs = card.reference.kwargs({k: v for k, v in opt.items() if k != 'type'})
    published = _load_published(card, reference)(*args, **kwargs)
    published.load_state_dict(ours.state_dict(), strict=True)
    return card, published


def _first(out):
    """The image of a forward's result (ours or the published one: a tensor, or a tuple/list led by the image)."""
    return out[0] if isinstance(out, (list, tuple)) else out


def measure(name, what, device, threads, repeats, reference=None, channels_last=False, checkpointing=False,
            save_output=None, tiny=False):
    """One measurement in this process; returns a dict (run in a fresh subprocess by main)."""
    import gc

    import torch
    torch.set_num_threads(threads)
    card, net = _build(name, reference, tiny)
    net = net.to(device)
    size = 32 if tiny else 256
    g = torch.Generator().manual_seed(1)
    if checkpointing and hasattr(net, 'refinement'):
        for m in net.modules():
            if hasattr(m, 'use_checkpoint'):
                m.use_checkpoint = True
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)
    result = {'arch': name, 'impl': 'published' if reference else 'vlunet'}
    if what == 'forward':
        net.eval()
        args = _cards().example_inputs(card, 1, size, size, generator=g, device=device)
        with torch.no_grad():
            torch.manual_seed(2)  # the same draws for both implementations (MoCE-IR's routing noise)
            out = _first(net(*args))
            times = []
            for _ in range(repeats):
                sync()
                t = time.perf_counter()
                net(*args)
                sync()
                times.append(time.perf_counter() - t)
        result['forward_s'] = statistics.median(times)
        if save_output:
            torch.save(out.detach().cpu(), save_output)
    else:
        net.train()
        args = _cards().example_inputs(card, 2, size // 2, size // 2, generator=g, device=device)
        target = torch.rand_like(args[0])
        gc.collect()
        baseline = _start_peak_memory(device)
        times, cpu_times = [], []
        for i in range(repeats + 1):  # the first is warm-up
            sync()
            t, cpu = time.perf_counter(), time.process_time()
            out = _first(net(*args))
            torch.nn.functional.l1_loss(out, target).backward()
            sync()
            if i:
                times.append(time.perf_counter() - t)
                cpu_times.append(time.process_time() - cpu)
            del out
            net.zero_grad(set_to_none=True)
        peak = _peak_memory_mb(device, baseline)
        result.update(train_step_s=statistics.median(times), train_step_best_s=min(times),
                      train_step_cpu_s=statistics.median(cpu_times), peak_mb=peak)
    return result


def static_figures(name, tiny=False):
    import torch
    _, _, opt = network_opt(name, tiny)  # imports vlunet (which fixes basicsr) first
    from basicsr.archs import build_network

    from vlunet.compare import count_gmacs
    with torch.device('meta'):
        params = sum(p.numel() for p in build_network(dict(opt)).parameters())
    return {'params_M': params / 1e6, 'gmacs_256': count_gmacs(opt)}


def scratch_dir(prefix):
    """A temporary folder for the measured outputs (a 12 MP photo's is 144 MB), removed when the script exits."""
    import atexit
    import shutil
    import tempfile
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, True)
    return path


def _subprocess(args, script=__file__, timeout=None):
    """``script --_child JSON(args)`` in a fresh interpreter; returns the JSON its last output line holds."""
    cmd = [sys.executable, os.path.abspath(script), '--_child', json.dumps(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode < 0:  # a signal: its name last, where a note reads the last line
        number = -proc.returncode
        name = signal.Signals(number).name if number in signal.valid_signals() else f'signal {number}'
        hint = ' (the out-of-memory killer?)' if number == signal.SIGKILL else ''
        raise RuntimeError(f'{args}: {proc.stderr[-2000:]}\nkilled by {name}{hint}')
    if proc.returncode != 0:
        raise RuntimeError(f'{args}: {proc.stderr[-2000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--archs', nargs='+', default=None, metavar='NAME',
                        help='released configurations or methods (default: every method card\'s releases)')
    parser.add_argument('--tiny', action='store_true', help="the cards' tiny configurations at 32x32 (smoke test)")
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--checkpointing', action='store_true', help='activation checkpointing (VLUNet)')
    parser.add_argument('--reference', nargs='+', default=[], metavar='NAME=FILE',
                        help='published source files timed side by side with the same weights (NAME as in --archs; '
                        'the method\'s card must say how to build its published class)')
    args = parse_with_child(parser, argv, measure)
    if args is None:
        return 0

    import torch

    names = args.archs or default_selection()
    for name in names:
        try:
            network_opt(name)
        except KeyError as err:
            parser.error(f'--archs {name}: {err.args[0]}')
    references = {}
    for item in args.reference:
        name, sep, path = item.rpartition('=')
        card = _cards().find_variant(name)[0] if sep else None
        if card is None or card.reference is None or not os.path.isfile(path):
            parser.error(f'--reference {item}: expected NAME=FILE with NAME a configuration whose card names its '
                         'published class, and an existing published source file')
        references[_cards().find_variant(name)[1].name] = path
    tmp = scratch_dir('vlunet-bench-')
    rows = []
    for query in names:
        _, name, _ = network_opt(query)
        impls = [None] + ([references[name]] if name in references else [])
        static = static_figures(name, args.tiny)
        for reference in impls:
            common = dict(name=name, device=args.device, threads=args.threads, repeats=args.repeats,
                          reference=reference, channels_last=args.channels_last, tiny=args.tiny,
                          checkpointing=args.checkpointing and reference is None)
            label = f'{name} ({"published" if reference else "vlunet"})'
            print(f'[{label}] forward ...', file=sys.stderr, flush=True)
            out_path = os.path.join(tmp, f'{name}-{"published" if reference else "ours"}.pt')
            fwd = _subprocess(dict(common, what='forward', save_output=out_path))
            print(f'[{label}] forward+backward ...', file=sys.stderr, flush=True)
            step = _subprocess(dict(common, what='train'))
            rows.append({'arch': label, **static, 'forward_s': fwd['forward_s'], 'train_step_s': step['train_step_s'],
                         'train_step_best_s': step['train_step_best_s'], 'train_step_cpu_s': step['train_step_cpu_s'],
                         'peak_mb': step['peak_mb'], 'output': out_path})

    unit = f'{args.threads} CPU threads' if args.device == 'cpu' else args.device
    size = 32 if args.tiny else 256
    print(f'\n{unit}; median of {args.repeats} runs after warm-up; peak memory of the forward+backward step'
          f'{"; TINY configurations" if args.tiny else ""}\n')
    print(f'| arch | params (M) | GMACs@256 | forward 1x3x{size}² (s) | fwd+bwd 2x3x{size // 2}² (s, best) '
          '| fwd+bwd CPU (s) | peak mem (MB) |')
    print('|---|---|---|---|---|---|---|')
    for r in rows:
        print(f'| {r["arch"]} | {r["params_M"]:.2f} | {r["gmacs_256"]:.1f} | {r["forward_s"]:.2f} | '
              f'{r["train_step_s"]:.2f} ({r["train_step_best_s"]:.2f}) | {r["train_step_cpu_s"]:.2f} | '
              f'{r["peak_mb"]:.0f} |')
    for name in references:
        pub = next((r for r in rows if r['arch'] == f'{name} (published)'), None)
        ours = next((r for r in rows if r['arch'] == f'{name} (vlunet)'), None)
        if not (pub and ours):
            continue
        diff = (torch.load(pub['output']) - torch.load(ours['output'])).abs().max().item()
        print(f'\n{name} vs published (same weights and inputs): fwd+bwd speed-up '
              f'{pub["train_step_s"] / ours["train_step_s"]:.2f}x '
              f'(best {pub["train_step_best_s"] / ours["train_step_best_s"]:.2f}x, '
              f'CPU time {pub["train_step_cpu_s"] / ours["train_step_cpu_s"]:.2f}x), forward speed-up '
              f'{pub["forward_s"] / ours["forward_s"]:.2f}x, peak memory {ours["peak_mb"] / pub["peak_mb"]:.2f}x; '
              f'max |output difference| {diff:.1e} (float32)')
    if args.csv:
        write_csv(args.csv, rows, [k for k in rows[0] if k != 'output'])
    return 0


def parse_with_child(parser, argv, measure_fn):
    """Add the options both benchmarks share (``--threads``, ``--csv`` and the hidden ``--_child``
    of a measurement subprocess) and parse; in a child, run ``measure_fn`` and return None."""
    parser.add_argument('--threads', type=int, default=2, help='CPU threads (torch.set_num_threads)')
    parser.add_argument('--csv', help='also write the table as CSV')
    parser.add_argument('--_child', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        print(json.dumps(measure_fn(**json.loads(args._child))))
        return None
    return args


def write_csv(path, rows, fields):
    """The table's rows (dicts) as CSV with the given columns (also used by benchmark_train.py)."""
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction='ignore')
        writer.writeheader()
        writer.writerows(rows)


if __name__ == '__main__':
    sys.exit(main())
