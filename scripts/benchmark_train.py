#!/usr/bin/env python
"""Training throughput and peak memory of the registered restoration architectures, per configuration.

One training step is forward + L1 loss + backward + AdamW step on random images at patch 128
(``--size``), batch 2 on CPU and 4 on CUDA (``--batch``). Configurations (``--configs``, join
features with ``+``, e.g. ``bf16+checkpoint``):

* ``fp32``        plain float32;
* ``bf16``        forward and loss under ``torch.autocast(dtype=torch.bfloat16)``;
* ``fp16``        the same in float16, with a ``torch.amp.GradScaler`` (scale, step, update);
* ``checkpoint``  activation checkpointing, for archs whose constructor takes ``use_checkpoint``
                  (VLUNet; the others print n/a);
* ``compile``     ``torch.compile`` of the network; the first (compiling) step is reported apart;
* ``accum2``      gradient accumulation: 2 micro-batches of half the batch, one optimizer step.

Samples/s is the batch over the median step time after one warm-up step. Peak memory is that of
the steps above the built network and inputs (CPU: peak resident set, CUDA:
``torch.cuda.max_memory_allocated``; it holds gradients, AdamW state and activations), measured
in a fresh process per measurement, so figures do not mix. The architectures, their full-size
configurations and the memory meters are those of ``scripts/benchmark_archs.py``. Prints a
Markdown table; ``--csv`` also writes CSV; ``--gpu-memory 24 80`` adds the batch per GPU that
the measured peaks suggest fits into those memory sizes (an estimate: see ``estimate_batch``).

    python scripts/benchmark_train.py                                  # all archs and configs, CPU (+ CUDA if present)
    python scripts/benchmark_train.py --archs VLUNet --configs fp32 bf16 checkpoint --devices cuda
    python scripts/benchmark_train.py --quick --archs VLUNet --configs fp32 checkpoint   # tiny smoke test
"""
import argparse
import inspect
import math
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark_archs as ba  # noqa: E402  (CONFIGS, builders, inputs, memory meters, subprocess runner)

FEATURES = ('fp32', 'bf16', 'fp16', 'checkpoint', 'compile', 'accum2')
DEFAULT_CONFIGS = ['fp32', 'bf16', 'fp16', 'checkpoint', 'compile', 'accum2']
ACCUMULATION = 2  # micro-batches per optimizer step of ``accum2``

# --quick: tiny networks of the same classes, for a smoke test in seconds
QUICK_CONFIGS = {
    'VLUNet': {'type': 'VLUNet', 'de_dim': 3, 'dim': 10, 'num_blocks': [1, 1, 1, 1], 'num_refinement_blocks': 1,
               'heads': [1, 2, 4, 8]},
    'Restormer': {'type': 'Restormer', 'dim': 8, 'num_blocks': [1, 1, 1, 1], 'num_refinement_blocks': 1,
                  'heads': [1, 1, 1, 1]},
    'DFPIR': {'type': 'DFPIR', 'dim': 8, 'num_blocks': [1, 1, 1, 1], 'num_refinement_blocks': 1,
              'heads': [1, 1, 1, 1]},
}


def parse_config(config):
    """``'bf16+checkpoint'`` -> {'bf16', 'checkpoint'}; unknown features and fp16 with bf16 are refused."""
    features = set(config.split('+'))
    unknown = features - set(FEATURES)
    if unknown or not features:
        raise ValueError(f'configuration {config!r}: unknown feature(s) {sorted(unknown)}; known: {FEATURES}')
    if {'bf16', 'fp16'} <= features:
        raise ValueError(f'configuration {config!r}: bf16 and fp16 exclude each other')
    return features


def supports_checkpointing(arch_type):
    """Whether the registered arch's constructor takes ``use_checkpoint`` (activation checkpointing)."""
    import vlunet  # noqa: F401
    from basicsr.utils.registry import ARCH_REGISTRY
    return 'use_checkpoint' in inspect.signature(ARCH_REGISTRY.get(arch_type).__init__).parameters


def measure_train(name, config, device, threads, batch, size, steps, quick=False):
    """One measurement in this process (main runs it in a fresh subprocess); returns a dict."""
    import gc

    import torch
    torch.set_num_threads(threads)
    features = parse_config(config)
    configs = QUICK_CONFIGS if quick else ba.CONFIGS
    micro = ACCUMULATION if 'accum2' in features else 1
    if batch % micro:
        raise ValueError(f'batch {batch} does not split into {micro} micro-batches')
    net = ba._build(name, configs=configs, **({'use_checkpoint': True} if 'checkpoint' in features else {}))
    net = net.to(device).train()
    params = sum(p.numel() for p in net.parameters())
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-4, weight_decay=1e-4)
    model = torch.compile(net) if 'compile' in features else net
    device_type = torch.device(device).type
    amp_dtype = torch.bfloat16 if 'bf16' in features else torch.float16 if 'fp16' in features else None
    scaler = torch.amp.GradScaler(device_type) if 'fp16' in features else None
    target, args = ba._inputs(name, batch, size, device, configs=configs)
    chunks = list(zip(target.chunk(micro), *[a.chunk(micro) for a in args]))
    sync = torch.cuda.synchronize if device_type == 'cuda' else (lambda: None)

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
            with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = ba._first(model(*inputs))
                loss = torch.nn.functional.l1_loss(out.float(), target_chunk) / micro
            (scaler.scale(loss) if scaler is not None else loss).backward()
            step_loss += loss.item()
            del out, loss
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
    return {'arch': name, 'device': device, 'config': config, 'batch': batch, 'micro_batch': batch // micro,
            'samples_per_s': batch / step_s, 'step_s': step_s, 'step_cpu_s': statistics.median(cpu_times),
            'first_step_s': first_step_s, 'peak_mb': peak, 'params': params,
            'losses_finite': all(math.isfinite(v) for v in losses), 'note': ''}


def device_description(device, threads):
    """Where the numbers come from: CPU model, threads and torch version, or the GPU's name."""
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
    return f'{model} ({os.cpu_count()} logical CPUs), {threads} threads, torch {torch.__version__}'


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


def _fmt(value, digits):
    return '-' if value is None or (isinstance(value, float) and math.isnan(value)) else f'{value:.{digits}f}'


def print_table(rows, descriptions, steps, size):
    for device, text in descriptions.items():
        print(f'\n{device}: {text}')
    print(f'\nPatch {size}; samples/s = batch / median step time over {steps} steps after a warm-up step; '
          'peak memory of the steps above the built network (gradients, AdamW state, activations).\n')
    print('| arch | device | config | batch (micro-batch) | samples/s | step (s) | peak memory (MB) | notes |')
    print('|---|---|---|---|---|---|---|---|')
    for r in rows:
        batch = f'{r["batch"]}' + (f' ({r["micro_batch"]})' if r.get('micro_batch') not in (None, r['batch']) else '')
        print(f'| {r["arch"]} | {r["device"]} | {r["config"]} | {batch} | {_fmt(r.get("samples_per_s"), 2)} | '
              f'{_fmt(r.get("step_s"), 2)} | {_fmt(r.get("peak_mb"), 0)} | {r.get("note", "")} |')


def print_estimates(rows, gpu_gbs):
    measured = [r for r in rows if r.get('peak_mb') is not None and 'compile' not in r['config']
                and r['micro_batch'] == r['batch']]
    if not measured:
        return
    print('\nEstimated batch per GPU that fits (from the peak memory above; '
          f'{GPU_RESERVE_MB} MB reserved, {GPU_USABLE_FRACTION:.0%} usable; see estimate_batch):\n')
    print('| arch | measured on | config | ' + ' | '.join(f'{g} GB' for g in gpu_gbs) + ' |')
    print('|---|---|---|' + '---|' * len(gpu_gbs))
    for r in measured:
        cells = [estimate_batch(r, g) for g in gpu_gbs]
        print(f'| {r["arch"]} | {r["device"]} | {r["config"]} | ' + ' | '.join('-' if c is None else str(c)
                                                                           for c in cells) + ' |')


def _not_run(name, device, config, batch, note):
    return {'arch': name, 'device': device, 'config': config, 'batch': batch, 'micro_batch': None, 'note': note}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--archs', nargs='+', default=list(ba.CONFIGS))
    parser.add_argument('--configs', nargs='+', default=DEFAULT_CONFIGS, help=f'features {FEATURES}, joined by +')
    parser.add_argument('--devices', nargs='+', help='default: cpu, and cuda when a CUDA device is present')
    parser.add_argument('--batch', type=int, help='batch per step (default 2 on CPU, 4 on CUDA)')
    parser.add_argument('--size', type=int, default=128, help='patch size')
    parser.add_argument('--steps', type=int, default=3, help='timed steps after one warm-up step')
    parser.add_argument('--exclude', nargs='+', default=[], metavar='ARCH:CONFIG',
                        help='measurements not to run (listed as excluded), e.g. MoCEIR:compile')
    parser.add_argument('--timeout', type=float, help='seconds per measurement before it is reported as timed out')
    parser.add_argument('--gpu-memory', nargs='+', type=float, default=[], metavar='GB',
                        help='also print the batch per GPU estimated to fit into these memory sizes')
    parser.add_argument('--quick', action='store_true', help='tiny networks (QUICK_CONFIGS), patch 32, one step')
    args = ba.parse_with_child(parser, argv, measure_train)
    if args is None:
        return 0
    for config in args.configs:
        parse_config(config)
    if args.quick:
        args.size, args.steps = min(args.size, 32), 1

    import torch
    devices = args.devices or ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
    configs = QUICK_CONFIGS if args.quick else ba.CONFIGS
    rows, descriptions = [], {}
    for device in devices:
        descriptions[device] = device_description(device, args.threads)
        batch = args.batch or (4 if device.startswith('cuda') else 2)
        for name in args.archs:
            if not ba.registered(name, configs):
                print(f'skipping {name}: not a registered restoration arch'
                      + (' with a --quick configuration' if args.quick else ''), file=sys.stderr)
                continue
            for config in args.configs:
                features = parse_config(config)
                if 'checkpoint' in features and not supports_checkpointing(configs[name]['type']):
                    rows.append(_not_run(name, device, config, batch, 'n/a: no activation checkpointing option'))
                    continue
                if f'{name}:{config}' in args.exclude:
                    rows.append(_not_run(name, device, config, batch, 'not run (--exclude)'))
                    continue
                print(f'[{name} {device} {config}] batch {batch}, {args.size}x{args.size} ...', file=sys.stderr,
                      flush=True)
                job = dict(name=name, config=config, device=device, threads=args.threads, batch=batch,
                           size=args.size, steps=args.steps, quick=args.quick)
                try:
                    row = ba._subprocess(job, script=__file__, timeout=args.timeout)
                except subprocess.TimeoutExpired:
                    row = _not_run(name, device, config, batch, f'timed out after {args.timeout:.0f} s')
                except RuntimeError as err:
                    last = [line for line in str(err).strip().splitlines() if line.strip()][-1:]
                    row = _not_run(name, device, config, batch, f'failed: {last[0][:120] if last else "?"}')
                if 'compile' in features and row.get('first_step_s') is not None:
                    row['note'] = f'first (compiling) step {row["first_step_s"]:.0f} s'
                if row.get('losses_finite') is False:
                    row['note'] = (row['note'] + '; ' if row['note'] else '') + 'non-finite loss'
                rows.append(row)
                print(f'    {_fmt(row.get("samples_per_s"), 2)} samples/s, peak {_fmt(row.get("peak_mb"), 0)} MB '
                      f'{row.get("note", "")}', file=sys.stderr, flush=True)

    print_table(rows, descriptions, args.steps, args.size)
    if args.gpu_memory:
        print_estimates(rows, args.gpu_memory)
    if args.csv:
        ba.write_csv(args.csv, rows, ['arch', 'device', 'config', 'batch', 'micro_batch', 'samples_per_s', 'step_s',
                                      'step_cpu_s', 'first_step_s', 'peak_mb', 'params', 'note'])
    return 0


if __name__ == '__main__':
    sys.exit(main())
