#!/usr/bin/env python
"""Training throughput and peak memory of every registered method, per configuration.

The methods, their released full-size configurations and their tiny configurations come from
the method cards (``vlunet.archs.card``): by default every released configuration that has option
files (``--methods`` picks some by method or variant name). One training step is forward + L1 loss on
every image the card says the pixel loss supervises + backward + AdamW step on random images at
patch 128 (``--size``), batch 2 on CPU and 4 on CUDA (``--batch``); conditioned methods get a
random (B, 512) embedding. Configurations (``--configs``, join features with ``+``, e.g.
``bf16+checkpoint``):

* ``fp32``        plain float32;
* ``bf16``        forward and loss under ``torch.autocast(dtype=torch.bfloat16)``;
* ``fp16``        the same in float16, with a ``torch.amp.GradScaler`` (scale, step, update);
* ``checkpoint``  activation checkpointing, for methods whose constructor takes ``use_checkpoint``
                  (the others print n/a);
* ``compile``     ``torch.compile`` of the network; the first (compiling) step is reported apart;
* ``accum2``      gradient accumulation: 2 micro-batches of half the batch, one optimizer step.

Samples/s is the batch over the median step time after one warm-up step. Peak memory is that of
the steps above the built network and inputs (CPU: peak resident set, CUDA:
``torch.cuda.max_memory_allocated``; it holds gradients, AdamW state and activations), measured
in a fresh process per measurement, so figures do not mix. On CPU the process first makes glibc give
large freed blocks back to the system (``vlunet.inference.memory.return_freed_memory``, as the
inference memory budget does), so the resident set follows the memory in use instead of what the C
allocator keeps cached; what stays resident is still counted (e.g. oneDNN's primitive cache of bf16
kernels, about 60 MB; ``import vlunet`` bounds ideep's cache on top of it,
``vlunet.inference.memory.bound_kernel_cache``, as in every vlunet process). For a bf16/fp16
configuration the table also gives its peak memory and speed relative to the same configuration in float32
(``bf16`` against ``fp32``, ``bf16+checkpoint`` against ``checkpoint``): the speed as wall-clock
samples/s and, in brackets, as process CPU time per step (steadier on a shared machine).
``--saved-tensors`` also counts, after the timed steps, the bytes one forward keeps for the
backward pass (``torch.autograd.graph.saved_tensors_hooks``; storages counted once, parameters
not counted) and prints which module types and dtypes hold them. Prints Markdown tables;
``--csv`` also writes CSV; ``--gpu-memory 24 80`` adds the batch per GPU that the measured peaks
suggest fits into those memory sizes (an estimate: see ``estimate_batch``).

    python scripts/benchmark_train.py                                  # every variant and config, CPU (+ CUDA)
    python scripts/benchmark_train.py --methods VLU-Net --configs fp32 bf16 checkpoint --devices cuda
    python scripts/benchmark_train.py --configs fp32 bf16 --saved-tensors   # where the bf16 savings go
    python scripts/benchmark_train.py --quick --configs fp32 bf16      # tiny networks: a smoke test
"""
import argparse
import collections
import inspect
import math
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark_archs as ba  # noqa: E402  (memory meters, subprocess runner, shared options, CSV)

FEATURES = ('fp32', 'bf16', 'fp16', 'checkpoint', 'compile', 'accum2')
PRECISIONS = ('bf16', 'fp16')  # the reduced-precision features; the others are compared with them
DEFAULT_CONFIGS = ['fp32', 'bf16', 'fp16', 'checkpoint', 'compile', 'accum2']
ACCUMULATION = 2  # micro-batches per optimizer step of ``accum2``
QUICK_SIZE = 32   # --quick: patch size (at most), one timed step
SAVED_TOP = 6     # --saved-tensors: (module type, dtype) entries printed per measurement


def parse_config(config):
    """``'bf16+checkpoint'`` -> {'bf16', 'checkpoint'}; unknown features and fp16 with bf16 are refused."""
    features = set(config.split('+'))
    unknown = features - set(FEATURES)
    if unknown or not features:
        raise ValueError(f'configuration {config!r}: unknown feature(s) {sorted(unknown)}; known: {FEATURES}')
    if set(PRECISIONS) <= features:
        raise ValueError(f'configuration {config!r}: {" and ".join(PRECISIONS)} exclude each other')
    return features


def float32_counterpart(config):
    """The features of ``config`` without its reduced precision ({'fp32'} if nothing else is left), or
    None for a configuration that is float32 already."""
    features = parse_config(config)
    if not features & set(PRECISIONS):
        return None
    rest = features - set(PRECISIONS) - {'fp32'}
    return rest or {'fp32'}


# ------------------------------------------------------------------------------------------------
# what is measured: (method card, variant) pairs, or the cards' tiny configurations with --quick
# ------------------------------------------------------------------------------------------------
def _cards():
    import vlunet  # noqa: F401  (registers the archs and their cards)
    from vlunet.archs import card
    return card


def select_methods(names=None, quick=False):
    """``[(label, method name, variant name or None)]`` to measure, in the order of ``names``.

    Full size: the released configurations ``names`` picks (a variant's name or option stem; a
    method's name gives its main variant), by default those of ``benchmark_archs.default_selection``
    (every one with option files, else a method's first). ``quick``: one tiny configuration per
    method (``card.tiny_opt()``). Unknown names raise KeyError naming the known methods.
    """
    card = _cards()
    pairs = []
    for name in ba.default_selection() if names is None else names:
        found, variant = card.find_variant(name)
        pair = (found, None) if quick else (found, variant)
        if pair not in pairs and not (quick and not found.tiny):
            pairs.append(pair)
    if quick:
        return [(f'{c.name} (tiny)', c.name, None) for c, _ in pairs]
    return [(v.name, c.name, v.name) for c, v in pairs]


def network_opt(method, variant, quick=False, **overrides):
    """The ``network_g`` option of a method's variant (full size) or of its tiny configuration."""
    found = _cards().get_card(method)
    return found.tiny_opt(**overrides) if quick else found.network_opt(variant, **overrides)


def supports_checkpointing(arch):
    """Whether the constructor of ``arch`` (a card, or a method, variant or registry name) takes ``use_checkpoint``."""
    cards = _cards()
    if isinstance(arch, str):
        try:
            arch = cards.get_card(arch)
        except KeyError:
            arch = cards.generic_card(arch)
    return 'use_checkpoint' in inspect.signature(arch.arch_class.__init__).parameters


def make_inputs(method, batch, size, device):
    """``(target, forward arguments)``: random images, and a random (B, CLIP_DIM) embedding for a
    method whose card names a condition (``vlunet.archs.card.example_inputs``)."""
    import torch
    cards = _cards()
    args = cards.example_inputs(cards.get_card(method), batch, size, size, generator=torch.Generator().manual_seed(1),
                                device=device)
    return args[0], args


# ------------------------------------------------------------------------------------------------
# saved-tensor accounting
# ------------------------------------------------------------------------------------------------
def saved_tensor_bytes(net, forward):
    """Bytes that ``forward()`` keeps for the backward pass, as ``{(module type, dtype): bytes}``.

    Every tensor autograd saves goes through ``torch.autograd.graph.saved_tensors_hooks``; it is
    attributed to the two innermost modules of ``net`` running when it is saved ('Outer/Inner' module
    types), each storage is counted
    once (its whole size) and parameters' storages are not counted. Returns (counts, forward's result).
    """
    import torch
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen, counts, stack = set(), collections.Counter(), ['(outside modules)']

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if t.device.type != 'meta' and ptr not in params and ptr not in seen:
            seen.add(ptr)
            counts[('/'.join(stack[-2:]), str(t.dtype).replace('torch.', ''))] += storage.nbytes()
        return t

    def enter(module, args):
        stack.append(type(module).__name__)

    def leave(module, args, out):
        stack.pop()

    handles = []
    for m in net.modules():
        handles.append(m.register_forward_pre_hook(enter))
        handles.append(m.register_forward_hook(leave))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            result = forward()
    finally:
        for h in handles:
            h.remove()
    return counts, result


# ------------------------------------------------------------------------------------------------
# one measurement (run in a fresh subprocess by main)
# ------------------------------------------------------------------------------------------------
def measure_train(method, variant, config, device, threads, batch, size, steps, quick=False, saved_tensors=False):
    """One measurement in this process (main runs it in a fresh subprocess); returns a dict."""
    import gc

    import torch
    torch.set_num_threads(threads)
    card = _cards().get_card(method)  # imports vlunet (which fixes basicsr) first
    if torch.device(device).type == 'cpu':
        from vlunet.inference.memory import return_freed_memory
        return_freed_memory()  # the resident set follows the memory in use (see the module docstring)
    from basicsr.archs import build_network
    features = parse_config(config)
    micro = ACCUMULATION if 'accum2' in features else 1
    if batch % micro:
        raise ValueError(f'batch {batch} does not split into {micro} micro-batches')
    torch.manual_seed(0)
    opt = network_opt(method, variant, quick, **({'use_checkpoint': True} if 'checkpoint' in features else {}))
    net = build_network(opt).to(device).train()
    params = sum(p.numel() for p in net.parameters())
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-4, weight_decay=1e-4)
    model = torch.compile(net) if 'compile' in features else net
    device_type = torch.device(device).type
    amp_dtype = torch.bfloat16 if 'bf16' in features else torch.float16 if 'fp16' in features else None
    scaler = torch.amp.GradScaler(device_type) if 'fp16' in features else None
    target, args = make_inputs(method, batch, size, device)
    chunks = list(zip(target.chunk(micro), *[a.chunk(micro) for a in args]))
    sync = torch.cuda.synchronize if device_type == 'cuda' else (lambda: None)

    def forward_loss(target_chunk, inputs):
        with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = card.read_output(net, model(*inputs))
            return sum(torch.nn.functional.l1_loss(img.float(), target_chunk) for img in out.supervised) / micro

    gc.collect()
    baseline = ba._start_peak_memory(device)
    times, cpu_times, losses = [], [], []
    first_step_s = None
    for i in range(steps + 1):  # the first is warm-up (and compilation)
        sync()
        t, cpu = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for target_chunk, *inputs in chunks:
            loss = forward_loss(target_chunk, inputs)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            step_loss += loss.item()
            del loss
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        sync()
        if i:
            times.append(time.perf_counter() - t)
            cpu_times.append(time.process_time() - cpu)
        else:
            first_step_s = time.perf_counter() - t
        losses.append(step_loss)
    peak = ba._peak_memory_mb(device, baseline)
    step_s = statistics.median(times)
    result = {'method': variant or method, 'device': device, 'config': config, 'batch': batch,
              'micro_batch': batch // micro, 'samples_per_s': batch / step_s, 'step_s': step_s,
              'step_cpu_s': statistics.median(cpu_times), 'first_step_s': first_step_s, 'peak_mb': peak,
              'params': params, 'losses_finite': all(math.isfinite(v) for v in losses), 'note': ''}
    if saved_tensors:
        optimizer.zero_grad(set_to_none=True)
        target_chunk, *inputs = chunks[0]
        counts, loss = saved_tensor_bytes(net, lambda: forward_loss(target_chunk, inputs))
        del loss
        result['saved_mb'] = sum(counts.values()) / 2**20
        result['saved_by'] = [[module, dtype, n / 2**20] for (module, dtype), n in counts.most_common()]
    return result


# ------------------------------------------------------------------------------------------------
# where the figures come from
# ------------------------------------------------------------------------------------------------
CPU_FLAGS = ('amx_bf16', 'amx_fp16', 'avx512_bf16', 'avx512_fp16')  # reduced-precision matrix/vector units


def cpu_flags():
    """The reduced-precision CPU features of CPU_FLAGS that /proc/cpuinfo lists (empty where unreadable)."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = next((line.split(':', 1)[1].split() for line in f if line.startswith('flags')), [])
    except OSError:
        flags = []
    return [f for f in CPU_FLAGS if f in flags]


def device_description(device, threads):
    """Where the numbers come from: CPU model, its bf16/fp16 units, threads and torch version, or the GPU."""
    import torch
    if device.startswith('cuda'):
        name = torch.cuda.get_device_name(torch.device(device))
        return f'{name}, torch {torch.__version__}, CUDA {torch.version.cuda}'
    model = platform.processor() or 'unknown CPU'
    try:
        with open('/proc/cpuinfo') as f:
            model = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    flags = cpu_flags()
    units = ', '.join(flags) if flags else 'no ' + '/'.join(CPU_FLAGS)
    return f'{model} ({os.cpu_count()} logical CPUs; {units}), {threads} threads, torch {torch.__version__}'


def load_average():
    """'1/5/15-minute load average' of the machine, or '?' where unknown."""
    try:
        return '/'.join(f'{v:.1f}' for v in os.getloadavg())
    except OSError:
        return '?'


# ------------------------------------------------------------------------------------------------
# batch-per-GPU estimate
# ------------------------------------------------------------------------------------------------
# bytes per parameter, fp32 training with AdamW: weights 4 (not in the measured peak, which starts
# with the network built), gradients 4 + exp_avg 4 + exp_avg_sq 4 (in the measured peak)
WEIGHT_BYTES, STATE_BYTES = 4, 12
GPU_RESERVE_MB = 1536      # CUDA context, cuDNN/cuBLAS workspaces
GPU_USABLE_FRACTION = 0.9  # allocator fragmentation and caching


def estimate_batch(row, gpu_gb):
    """Largest batch per GPU whose training step should fit into ``gpu_gb`` GB, from one measured row.

    Activation memory per sample = (measured peak - gradient/AdamW state) / measured batch, taken
    as linear in the batch; fixed = weights + gradient/AdamW state + GPU_RESERVE_MB; usable memory
    = GPU_USABLE_FRACTION of the GPU's. An estimate, no better than the assumption that the
    measured device (e.g. the CPU) saves as much for backward as the GPU kernels do.
    """
    state_mb = row['params'] * STATE_BYTES / 2**20
    per_sample = (row['peak_mb'] - state_mb) / row['micro_batch']
    if not per_sample > 0:
        return None
    fixed = row['params'] * (WEIGHT_BYTES + STATE_BYTES) / 2**20 + GPU_RESERVE_MB
    return max(0, int((gpu_gb * 1024 * GPU_USABLE_FRACTION - fixed) // per_sample))


# ------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------
def _fmt(value, digits):
    return '-' if value is None or (isinstance(value, float) and math.isnan(value)) else f'{value:.{digits}f}'


def add_ratios(rows):
    """Each measured bf16/fp16 row gets ``peak_vs_fp32`` (its peak / the float32 counterpart's),
    ``speed_vs_fp32`` (samples/s ratio) and ``cpu_speed_vs_fp32`` (CPU time per step, inverted), from
    the row of the same method, device and batch whose configuration is :func:`float32_counterpart`."""
    for r in rows:
        base_features = float32_counterpart(r['config'])
        if base_features is None or r.get('peak_mb') is None:
            continue
        base = next((b for b in rows if b['method'] == r['method'] and b['device'] == r['device']
                     and b['batch'] == r['batch'] and b.get('peak_mb') is not None
                     and (parse_config(b['config']) - {'fp32'} or {'fp32'}) == base_features), None)
        if base is None:
            continue
        r['peak_vs_fp32'] = r['peak_mb'] / base['peak_mb'] if base['peak_mb'] > 0 else None
        r['speed_vs_fp32'] = r['samples_per_s'] / base['samples_per_s']
        r['cpu_speed_vs_fp32'] = base['step_cpu_s'] / r['step_cpu_s'] if r['step_cpu_s'] > 0 else None
    return rows


def print_table(rows, descriptions, steps, size, loads=None):
    for device, text in descriptions.items():
        print(f'\n{device}: {text}')
    if loads:
        print(f'load average (1/5/15 min) at the start: {loads[0]}, at the end: {loads[1]}')
    print(f'\nPatch {size}; samples/s = batch / median step time over {steps} steps after a warm-up step; '
          'peak memory of the steps above the built network (gradients, AdamW state, activations); '
          'bf16/fp16 rows against the same configuration in float32: peak memory ratio, speed ratio '
          '(wall clock; in brackets CPU time).\n')
    saved = any(r.get('saved_mb') is not None for r in rows)
    print('| method | device | config | batch (micro-batch) | samples/s | step (s) | peak memory (MB) | '
          'peak vs fp32 | speed vs fp32 | ' + ('saved for backward (MB) | ' if saved else '') + 'notes |')
    print('|---|---|---|---|---|---|---|---|---|' + ('---|' if saved else '') + '---|')
    for r in rows:
        batch = f'{r["batch"]}' + (f' ({r["micro_batch"]})' if r.get('micro_batch') not in (None, r['batch']) else '')
        speed = _fmt(r.get('speed_vs_fp32'), 2)
        if r.get('cpu_speed_vs_fp32') is not None:
            speed += f' ({r["cpu_speed_vs_fp32"]:.2f})'
        print(f'| {r["method"]} | {r["device"]} | {r["config"]} | {batch} | {_fmt(r.get("samples_per_s"), 3)} | '
              f'{_fmt(r.get("step_s"), 2)} | {_fmt(r.get("peak_mb"), 0)} | {_fmt(r.get("peak_vs_fp32"), 2)} | '
              f'{speed} | ' + (f'{_fmt(r.get("saved_mb"), 0)} | ' if saved else '') + f'{r.get("note", "")} |')


def print_saved(rows, top=SAVED_TOP):
    """Per measurement with --saved-tensors: the module types and dtypes holding the most saved bytes."""
    measured = [r for r in rows if r.get('saved_by')]
    if not measured:
        return
    print(f'\nSaved for the backward pass by one forward (MB; the two innermost module types, dtype; top {top}):\n')
    print('| method | device | config | total | largest holders |')
    print('|---|---|---|---|---|')
    for r in measured:
        holders = ', '.join(f'{module} {dtype} {mb:.0f} ({mb / r["saved_mb"]:.0%})'
                            for module, dtype, mb in r['saved_by'][:top])
        print(f'| {r["method"]} | {r["device"]} | {r["config"]} | {r["saved_mb"]:.0f} | {holders} |')


def print_estimates(rows, gpu_gbs):
    measured = [r for r in rows if r.get('peak_mb') is not None and 'compile' not in r['config']
                and r['micro_batch'] == r['batch']]
    if not measured:
        return
    print('\nEstimated batch per GPU that fits (from the peak memory above; '
          f'{GPU_RESERVE_MB} MB reserved, {GPU_USABLE_FRACTION:.0%} usable; see estimate_batch):\n')
    print('| method | measured on | config | ' + ' | '.join(f'{g} GB' for g in gpu_gbs) + ' |')
    print('|---|---|---|' + '---|' * len(gpu_gbs))
    for r in measured:
        cells = [estimate_batch(r, g) for g in gpu_gbs]
        print(f'| {r["method"]} | {r["device"]} | {r["config"]} | ' + ' | '.join('-' if c is None else str(c)
                                                                             for c in cells) + ' |')


def _not_run(label, device, config, batch, note):
    return {'method': label, 'device': device, 'config': config, 'batch': batch, 'micro_batch': None, 'note': note}


CSV_FIELDS = ['method', 'device', 'config', 'batch', 'micro_batch', 'samples_per_s', 'step_s', 'step_cpu_s',
              'first_step_s', 'peak_mb', 'peak_vs_fp32', 'speed_vs_fp32', 'cpu_speed_vs_fp32', 'saved_mb', 'params',
              'note']


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--methods', '--archs', nargs='+', metavar='NAME',
                        help='method or variant names (default: every released configuration with option files)')
    parser.add_argument('--configs', nargs='+', default=DEFAULT_CONFIGS, help=f'features {FEATURES}, joined by +')
    parser.add_argument('--devices', nargs='+', help='default: cpu, and cuda when a CUDA device is present')
    parser.add_argument('--batch', type=int, help='batch per step (default 2 on CPU, 4 on CUDA)')
    parser.add_argument('--size', type=int, default=128, help='patch size')
    parser.add_argument('--steps', type=int, default=3, help='timed steps after one warm-up step')
    parser.add_argument('--exclude', nargs='+', default=[], metavar='NAME:CONFIG',
                        help='measurements not to run (listed as excluded), e.g. NAME:compile with NAME a row label')
    parser.add_argument('--timeout', type=float, help='seconds per measurement before it is reported as timed out')
    parser.add_argument('--gpu-memory', nargs='+', type=float, default=[], metavar='GB',
                        help='also print the batch per GPU estimated to fit into these memory sizes')
    parser.add_argument('--saved-tensors', action='store_true',
                        help='also count the bytes one forward saves for the backward pass, by module type and dtype')
    parser.add_argument('--quick', action='store_true',
                        help=f'the cards\' tiny configurations, patch {QUICK_SIZE}, one step (a smoke test)')
    args = ba.parse_with_child(parser, argv, measure_train)
    if args is None:
        return 0
    for config in args.configs:
        parse_config(config)
    if args.steps < 1:
        parser.error(f'--steps {args.steps}: at least one timed step is needed')
    if args.quick:
        args.size, args.steps = min(args.size, QUICK_SIZE), 1
    try:
        selected = select_methods(args.methods, args.quick)
    except KeyError as err:
        parser.error(str(err.args[0]) if err.args else str(err))

    import torch
    devices = args.devices or ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
    rows, descriptions = [], {}
    load_start = load_average()
    for device in devices:
        descriptions[device] = device_description(device, args.threads)
        batch = args.batch or (4 if device.startswith('cuda') else 2)
        for label, method, variant in selected:
            for config in args.configs:
                features = parse_config(config)
                if 'checkpoint' in features and not supports_checkpointing(method):
                    rows.append(_not_run(label, device, config, batch, 'n/a: no activation checkpointing option'))
                    continue
                if f'{label}:{config}' in args.exclude:
                    rows.append(_not_run(label, device, config, batch, 'not run (--exclude)'))
                    continue
                print(f'[{label} {device} {config}] batch {batch}, {args.size}x{args.size} ...', file=sys.stderr,
                      flush=True)
                job = dict(method=method, variant=variant, config=config, device=device, threads=args.threads,
                           batch=batch, size=args.size, steps=args.steps, quick=args.quick,
                           saved_tensors=args.saved_tensors)
                try:
                    row = ba._subprocess(job, script=__file__, timeout=args.timeout)
                    row['method'] = label
                except subprocess.TimeoutExpired:
                    row = _not_run(label, device, config, batch, f'timed out after {args.timeout:.0f} s')
                except RuntimeError as err:
                    last = [line for line in str(err).strip().splitlines() if line.strip()][-1:]
                    row = _not_run(label, device, config, batch, f'failed: {last[0][:120] if last else "?"}')
                if 'compile' in features and row.get('first_step_s') is not None:
                    row['note'] = f'first (compiling) step {row["first_step_s"]:.0f} s'
                if row.get('losses_finite') is False:
                    row['note'] = (row['note'] + '; ' if row['note'] else '') + 'non-finite loss'
                rows.append(row)
                print(f'    {_fmt(row.get("samples_per_s"), 3)} samples/s, peak {_fmt(row.get("peak_mb"), 0)} MB '
                      f'{row.get("note", "")}', file=sys.stderr, flush=True)

    add_ratios(rows)
    print_table(rows, descriptions, args.steps, args.size, (load_start, load_average()))
    if args.saved_tensors:
        print_saved(rows)
    if args.gpu_memory:
        print_estimates(rows, args.gpu_memory)
    if args.csv:
        ba.write_csv(args.csv, rows, CSV_FIELDS)
    return 0


if __name__ == '__main__':
    sys.exit(main())
