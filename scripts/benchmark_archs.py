#!/usr/bin/env python
"""Speed and memory of the registered restoration architectures at full size.

For each arch: parameters, GMACs of one 1x3x256x256 forward, forward latency at 1x3x256x256
(no_grad), forward+backward latency with an L1 loss at 2x3x128x128 (median and best after a
warm-up step; also the process CPU time per step, steadier than wall-clock on a shared machine),
and peak memory of the forward+backward steps (CPU: peak resident set minus the resident set once
the network and inputs are built, in a fresh process; CUDA: torch.cuda.max_memory_allocated minus
the memory allocated before the steps). Every measurement runs in its own subprocess, so the
memory figures do not mix. Prints a Markdown table; ``--csv`` also writes CSV.

    python scripts/benchmark_archs.py                          # all archs, CPU, 2 threads
    python scripts/benchmark_archs.py --archs VLUNet --repeats 5 --device cuda
    python scripts/benchmark_archs.py --archs VLUNet --reference /path/to/VLU-Net/net/Final.py
    python scripts/benchmark_archs.py --archs AdaIR MoCEIR-S DFPIR --reference AdaIR=/src/AdaIR/net/model.py \
        MoCEIR-S=/src/MoCE-IR/src/net/moce_ir.py DFPIR=/src/DFPIR/net/model.py

``--reference [ARCH=]FILE ...`` also times the published implementation (its source file from a
checkout of the authors' repository; they need ``einops``) with the SAME weights and inputs, checks
that the outputs agree within float32 rounding, and prints the speed-up and memory ratio. A bare
FILE means VLUNet. Modules the published files import but their networks never use (OpenAI's
``clip`` in DFPIR, ``fvcore`` in MoCE-IR) are replaced by empty stand-ins when not installed.
"""
import argparse
import csv
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = {
    'VLUNet': {'type': 'VLUNet', 'de_dim': 5},
    'Restormer': {'type': 'Restormer'},
    'PromptIR': {'type': 'PromptIR', 'decoder': True},
    'DGUNet': {'type': 'DGUNet', 'n_feat': 80, 'scale_unetfeats': 48, 'scale_orsnetfeats': 32},
    'DGUNetPlus': {'type': 'DGUNetPlus'},
    'AdaIR': {'type': 'AdaIR'},
    # the released MoCE-IR models (vlunet.archs.moceir_arch.RELEASED_CONFIGS; a test checks they agree)
    'MoCEIR-S': {'type': 'MoCEIR', 'dim': 32, 'levels': 4, 'num_blocks': [4, 6, 6, 8], 'num_dec_blocks': [2, 4, 4],
                 'num_refinement_blocks': 4, 'heads': [1, 2, 4, 8], 'rank': 2, 'num_experts': 4, 'topk': 1,
                 'stage_depth': [1, 1, 1], 'rank_type': 'spread', 'depth_type': 'constant', 'with_complexity': False,
                 'complexity_scale': 'max'},
    'MoCEIR': {'type': 'MoCEIR', 'dim': 48, 'levels': 4, 'num_blocks': [4, 6, 6, 8], 'num_dec_blocks': [2, 4, 4],
               'num_refinement_blocks': 4, 'heads': [1, 2, 4, 8], 'rank': 2, 'num_experts': 4, 'topk': 1,
               'stage_depth': [1, 1, 1], 'rank_type': 'spread', 'depth_type': 'constant', 'with_complexity': False,
               'complexity_scale': 'max'},
    'DFPIR': {'type': 'DFPIR'},
}


def registered(name, configs=CONFIGS):
    """Whether the arch of ``configs[name]`` is in BasicSR's ARCH_REGISTRY (archs being added may not be yet)."""
    import vlunet  # noqa: F401
    from basicsr.utils.registry import ARCH_REGISTRY
    return name in configs and configs[name]['type'] in ARCH_REGISTRY


def _proc_status_mb(field):
    """A memory field of /proc/self/status (VmHWM: peak resident set, VmRSS: current) in MB; NaN elsewhere."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float('nan')


def _peak_rss_mb():
    return _proc_status_mb('VmHWM')


def _current_rss_mb():
    return _proc_status_mb('VmRSS')


def _reset_peak_rss():
    """Reset VmHWM to the current resident set (Linux >= 4.0); otherwise leave it."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        pass


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


def _kwargs(config):
    return {k: v for k, v in config.items() if k != 'type'}


# arch -> (class in the published file, (args, kwargs) of its constructor from our config, modules the
# file imports that its network never uses)
PUBLISHED = {
    'VLUNet': ('VLUNet', lambda c: ((c['de_dim'], ), {}), ()),
    'AdaIR': ('AdaIR', lambda c: ((), {'decoder': True}), ()),
    'MoCEIR-S': ('MoCEIR', lambda c: ((), _kwargs(c)), ('fvcore', 'fvcore.nn')),
    'MoCEIR': ('MoCEIR', lambda c: ((), _kwargs(c)), ('fvcore', 'fvcore.nn')),
    'DFPIR': ('ChannelShuffle_skip_textguaid', lambda c: ((), {'device': 'cpu'}), ('clip', )),
}


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


def _load_published(name, path):
    """The published class of ``name`` from its source file (its repository root on sys.path)."""
    cls_name, _, unused = PUBLISHED[name]
    folder = os.path.dirname(os.path.abspath(path))
    for p in (folder, os.path.dirname(folder)):  # 'from net.arch_util import ...' and sibling imports
        if p not in sys.path:
            sys.path.insert(0, p)
    for module_name in unused:
        try:
            importlib.import_module(module_name)
        except ImportError:
            sys.modules[module_name] = _stand_in(module_name)
    spec = importlib.util.spec_from_file_location(f'published_{name.replace("-", "_")}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, cls_name)


def _build(name, reference=None, configs=CONFIGS, **overrides):
    import torch

    import vlunet  # noqa: F401
    from basicsr.archs import build_network
    torch.manual_seed(0)
    ours = build_network(dict(configs[name], **overrides))
    if reference is None:
        return ours
    args, kwargs = PUBLISHED[name][1](configs[name])
    published = _load_published(name, reference)(*args, **kwargs)
    published.load_state_dict(ours.state_dict(), strict=True)
    return published


def _inputs(name, batch, size, device, configs=CONFIGS):
    """(target, forward arguments): the image, plus a (B, CLIP_DIM) embedding for conditioned archs."""
    import torch

    import vlunet  # noqa: F401
    from vlunet.archs.conditioning import CLIP_DIM, condition_of
    g = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 3, size, size, generator=g).to(device)
    if condition_of(configs[name]) is not None:
        return x, (x, torch.randn(batch, CLIP_DIM, generator=g).to(device))
    return x, (x, )


def _first(out):
    return out[0] if isinstance(out, (list, tuple)) else out


def measure(name, what, device, threads, repeats, reference=None, channels_last=False, checkpointing=False,
            save_output=None):
    """One measurement in this process; returns a dict (run in a fresh subprocess by main)."""
    import gc

    import torch
    torch.set_num_threads(threads)
    net = _build(name, reference).to(device)
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
        _, args = _inputs(name, 1, 256, device)
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
        target, args = _inputs(name, 2, 128, device)
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


def static_figures(name):
    import torch

    from vlunet.compare import count_gmacs
    import vlunet  # noqa: F401
    from basicsr.archs import build_network
    with torch.device('meta'):
        params = sum(p.numel() for p in build_network(dict(CONFIGS[name])).parameters())
    return {'params_M': params / 1e6, 'gmacs_256': count_gmacs(CONFIGS[name])}


def _subprocess(args, script=__file__, timeout=None):
    """``script --_child JSON(args)`` in a fresh interpreter; returns the JSON its last output line holds."""
    cmd = [sys.executable, os.path.abspath(script), '--_child', json.dumps(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f'{args}: {proc.stderr[-2000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--archs', nargs='+', default=list(CONFIGS))
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--checkpointing', action='store_true', help='activation checkpointing (VLUNet)')
    parser.add_argument('--reference', nargs='+', default=[], metavar='[ARCH=]FILE',
                        help='published source files timed side by side (a bare FILE is VLUNet\'s net/Final.py); '
                        f'ARCH one of {", ".join(PUBLISHED)}')
    args = parse_with_child(parser, argv, measure)
    if args is None:
        return 0

    import tempfile

    import torch

    references = {}
    for item in args.reference:
        arch, sep, path = item.rpartition('=')
        arch = arch if sep else 'VLUNet'
        if arch not in PUBLISHED or not os.path.isfile(path):
            parser.error(f'--reference {item}: expected ARCH=FILE with ARCH one of {", ".join(PUBLISHED)} and an '
                         'existing published source file')
        references[arch] = path
    tmp = tempfile.mkdtemp(prefix='vlunet-bench-')
    rows = []
    for name in args.archs:
        if not registered(name):
            print(f'skipping {name}: not a registered restoration arch', file=sys.stderr)
            continue
        impls = [None] + ([references[name]] if name in references else [])
        static = static_figures(name)
        for reference in impls:
            common = dict(name=name, device=args.device, threads=args.threads, repeats=args.repeats,
                          reference=reference, channels_last=args.channels_last,
                          checkpointing=args.checkpointing and reference is None)
            label = f'{name} ({"published" if reference else "vlunet"})'
            print(f'[{label}] forward 1x3x256x256 ...', file=sys.stderr, flush=True)
            out_path = os.path.join(tmp, f'{name}-{"published" if reference else "ours"}.pt')
            fwd = _subprocess(dict(common, what='forward', save_output=out_path))
            print(f'[{label}] forward+backward 2x3x128x128 ...', file=sys.stderr, flush=True)
            step = _subprocess(dict(common, what='train'))
            rows.append({'arch': label, **static, 'forward_s': fwd['forward_s'], 'train_step_s': step['train_step_s'],
                         'train_step_best_s': step['train_step_best_s'], 'train_step_cpu_s': step['train_step_cpu_s'],
                         'peak_mb': step['peak_mb'], 'output': out_path})

    unit = f'{args.threads} CPU threads' if args.device == 'cpu' else args.device
    print(f'\n{unit}; median of {args.repeats} runs after warm-up; peak memory of the forward+backward step\n')
    print('| arch | params (M) | GMACs@256 | forward 1x3x256² (s) | fwd+bwd 2x3x128² (s, best) | fwd+bwd CPU (s) '
          '| peak mem (MB) |')
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
