#!/usr/bin/env python
"""One command that checks a CUDA machine end to end and prints one table (about 8 minutes on an H100).

    python scripts/gpu_selfcheck.py                 # on a CUDA machine: everything below on the GPU
    python scripts/gpu_selfcheck.py --quick         # on a CPU (CI): the same checks, smaller, in under a minute

Checks, each a row of the table (check, device, result, figure, limit, seconds):

1. **parity**: every published parity fixture in tests/fixtures (read through the method cards, as
   tests/archs/test_conformance.py does) on the device, in float64 against the published output at
   1e-9, in float32 (TF32 off) and under bf16 autocast within the stated relative tolerances
   (:data:`TOLERANCES`: the largest difference over the largest magnitude of the published output).
   Random draws (a method that routes with noise) are made on the CPU as the fixture's were;
2. **amp step + resume** of every method (its tiny configuration and its own training terms, through
   VLUNetModel, ``train.amp`` bf16 on the device): one step, then the next step twice, uninterrupted
   and from the saved training state in a new model; the two must agree (:data:`RESUME_ATOL`);
3. **ddp**: ``vlunet-train --launcher pytorch`` under torchrun with one process (NCCL on a GPU, gloo
   on a CPU), two iterations of the demo in its tiny form;
4. **benchmark_train**: scripts/benchmark_train.py (``--quick``; on a GPU each method's main release
   at full size, fp32 and bf16, one timed step) and 5. **benchmark_inference**:
   scripts/benchmark_inference.py (``--quick``; on a GPU each method's main release on a 1-megapixel
   photo, fp32 and bf16): their tables follow the summary.

Exit status 0 when every check passed. ``--skip NAME ...`` leaves checks out (listed as skipped).
"""
import argparse
import contextlib
import glob
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, 'tests', 'fixtures')
CHECKS = ('parity', 'amp_resume', 'ddp', 'benchmark_train', 'benchmark_inference')
# parity tolerances: max |ours - published| / max |published| (float64: absolute, as the conformance suite)
TOLERANCES = {'float64': 1e-9, 'float32': 1e-4, 'bf16': 1e-1}
RESUME_ATOL = 1e-5       # resumed step vs uninterrupted step, largest parameter difference
DEMO_TRAIN = os.path.join(REPO, 'options', 'train', 'VLUNet_demo.yml')
TINY_DEMO = ['datasets:train:gt_size=32', 'datasets:train:batch_size_per_gpu=2', 'network_g:dim=10',
             'logger:use_tb_logger=false', 'logger:print_freq=1']


def _cards():
    import vlunet  # noqa: F401  (fixes basicsr, registers the archs and their cards)
    from vlunet.archs import card
    return card


class Table:
    """The rows of the summary: check, device, result (ok / FAIL / skipped), figure, limit, seconds."""

    def __init__(self):
        self.rows = []

    def add(self, check, device, ok, figure='', limit='', seconds=None):
        result = 'skipped' if ok is None else ('ok' if ok else 'FAIL')
        self.rows.append({'check': check, 'device': device, 'result': result, 'figure': figure, 'limit': limit,
                          'seconds': seconds})
        print(f'  {check}: {result} {figure}', file=sys.stderr, flush=True)

    @property
    def failed(self):
        return [r for r in self.rows if r['result'] == 'FAIL']

    def markdown(self):
        lines = ['| check | device | result | figure | limit | s |', '|---|---|---|---|---|---|']
        for r in self.rows:
            seconds = '' if r['seconds'] is None else f'{r["seconds"]:.1f}'
            cells = [str(r[k]).replace('|', '/') for k in ('check', 'device', 'result', 'figure', 'limit')]
            lines.append(f'| {" | ".join(cells)} | {seconds} |')
        return '\n'.join(lines)


@contextlib.contextmanager
def cpu_random_draws():
    """``torch.randn_like`` drawn on the CPU in float64 (as the fixtures were made) and moved to the tensor's
    device and dtype, so a method that routes with noise sees the fixture's draws on any device."""
    import torch
    original = torch.randn_like

    def randn_like(t, *args, **kwargs):
        return torch.randn(t.shape, dtype=torch.float64).to(t.device, kwargs.get('dtype') or t.dtype)

    torch.randn_like = randn_like
    try:
        yield
    finally:
        torch.randn_like = original


def _to(value, device, dtype):
    import torch
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype) if value.is_floating_point() else value.to(device)
    return value


def parity_fixtures():
    """``[(file name, fixture, card)]``: the published-output fixtures whose arch has a card."""
    import torch
    cards = _cards()
    found = []
    for path in sorted(glob.glob(os.path.join(FIXTURES, '*.pt'))):
        fx = torch.load(path, weights_only=True, map_location='cpu')
        if not (isinstance(fx, dict) and 'state_dict' in fx and 'targets' not in fx):
            continue
        try:
            card = cards.get_card(fx['arch'])
        except KeyError:
            continue
        found.append((os.path.basename(path), fx, card))
    return found


def check_parity(table, device, quick, names=None):
    import torch
    fixtures = parity_fixtures()
    if names:
        fixtures = [f for f in fixtures if f[0] in names or os.path.splitext(f[0])[0] in names]
    elif quick:
        fixtures = fixtures[:3]
    if not fixtures:
        table.add('parity', device, False, f'no fixtures in {FIXTURES}')
        return
    if device.startswith('cuda'):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    worst = {k: (0.0, '') for k in TOLERANCES}
    start = time.perf_counter()
    failures = []
    for name, fx, card in fixtures:
        expected = fx['output']
        expected = list(expected) if isinstance(expected, (list, tuple)) else [expected]
        for kind in TOLERANCES:
            dtype = torch.float64 if kind == 'float64' else torch.float32
            net = card.arch_class(**fx['config']).to(dtype).eval()
            net.load_state_dict(fx['state_dict'], strict=True)
            net.to(device)
            inputs = [_to(v, device, dtype) for v in fx['inputs'].values()]
            autocast = (torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if kind == 'bf16'
                        else contextlib.nullcontext())
            try:
                with torch.no_grad(), cpu_random_draws(), autocast:
                    if 'forward_seed' in fx:
                        torch.manual_seed(fx['forward_seed'])
                    raw = net(*inputs)
            except Exception as err:  # noqa: BLE001  (named in the table)
                failures.append(f'{name} {kind}: {type(err).__name__}: {str(err)[:100]}')
                continue
            got = list(raw) if len(expected) > 1 else [card.read_output(net, raw).image]
            diff = 0.0
            for g, want in zip(got, expected):
                g, want = g.detach().double().cpu(), want.double()
                scale = 1.0 if kind == 'float64' else max(float(want.abs().max()), 1e-12)
                diff = max(diff, float((g - want).abs().max()) / scale)
            if diff > worst[kind][0]:
                worst[kind] = (diff, name)
            if not diff <= TOLERANCES[kind]:
                failures.append(f'{name} {kind}: {diff:.1e}')
    seconds = time.perf_counter() - start
    for kind, tol in TOLERANCES.items():
        diff, name = worst[kind]
        what = 'max abs diff' if kind == 'float64' else 'max abs diff / max abs published'
        mine = [f for f in failures if f' {kind}:' in f]
        table.add(f'parity {kind} ({len(fixtures)} fixtures)', device, not mine,
                  f'{what} {diff:.1e} ({name})' + (f'; failed: {"; ".join(mine[:3])}' if mine else ''),
                  f'{tol:g}', seconds / len(TOLERANCES))


def _training_options(card, device, tmp, amp):
    from vlunet.archs.conditioning import TEXT_EMBEDDING
    train = {'ema_decay': 0, 'optim_g': {'type': 'AdamW', 'lr': 1e-3}, 'total_iter': 10, 'amp': amp,
             'scheduler': {'type': 'LinearWarmupCosineLR', 'warmup_iter': 0},
             'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0}}
    for term in card.training_terms:
        train[term.key] = {'type': term.loss, **dict(term.published)}
    opt = {'name': 'selfcheck', 'model_type': 'VLUNetModel', 'num_gpu': 1 if device.startswith('cuda') else 0,
           'dist': False, 'is_train': True, 'rank': 0, 'world_size': 1, 'network_g': card.tiny_opt(), 'train': train,
           'val': {}, 'path': {'pretrain_network_g': None, 'strict_load_g': True, 'results_root': tmp}}
    if card.condition == TEXT_EMBEDDING:
        opt['text_embedding'] = {'clip_model': 'vlunet-tiny', 'pretrained': None, 'mode': 'oracle',
                                 'prompts': ['image with noise', 'image with rain']}
    return opt


def _state(model):
    import copy
    return copy.deepcopy({'net_g': model.get_bare_model(model.net_g).state_dict(),
                          'optimizers': [o.state_dict() for o in model.optimizers],
                          'schedulers': [s.state_dict() for s in model.schedulers],
                          **model.training_state_extras()})


def check_amp_resume(table, device, quick, amp='bf16'):
    import torch
    from basicsr.models import build_model
    cards = _cards().list_methods()
    if quick:
        cards = cards[:2]
    tmp = tempfile.mkdtemp(prefix='vlunet-selfcheck-')
    for card in cards:
        start = time.perf_counter()
        try:
            torch.manual_seed(0)
            model = build_model(_training_options(card, device, tmp, amp))
            g = torch.Generator().manual_seed(1)
            batch = {'lq': torch.rand(2, 3, 32, 32, generator=g), 'gt': torch.rand(2, 3, 32, 32, generator=g),
                     'label': torch.tensor([0, 1])}
            model.feed_data(batch)
            model.optimize_parameters(1)
            saved = _state(model)
            rng = torch.get_rng_state(), (torch.cuda.get_rng_state() if device.startswith('cuda') else None)
            model.feed_data(batch)
            model.optimize_parameters(2)
            log = {k: float(v) for k, v in model.get_current_log().items()}
            straight = {k: v.detach().float().cpu() for k, v in model.get_bare_model(model.net_g).state_dict().items()}
            again = build_model(_training_options(card, device, tmp, amp))
            again.get_bare_model(again.net_g).load_state_dict(saved['net_g'])
            again.resume_training({k: v for k, v in saved.items() if k != 'net_g'})
            torch.set_rng_state(rng[0])
            if rng[1] is not None:
                torch.cuda.set_rng_state(rng[1])
            again.feed_data(batch)
            again.optimize_parameters(2)
            resumed = {k: v.detach().float().cpu() for k, v in again.get_bare_model(again.net_g).state_dict().items()}
            diff = max(float((straight[k] - resumed[k]).abs().max()) for k in straight)
            moved = any(not torch.equal(saved['net_g'][k].float().cpu(), straight[k]) for k in straight)
            finite = all(map(lambda v: v == v and abs(v) != float('inf'), log.values()))
            ok = diff <= RESUME_ATOL and moved and finite
            table.add(f'{amp} step + resume: {card.name}', device, ok,
                      f'resumed vs uninterrupted {diff:.1e}; losses {", ".join(f"{k} {v:.3g}" for k, v in log.items())}'
                      + ('' if moved else '; weights did not change') + ('' if finite else '; non-finite loss'),
                      f'{RESUME_ATOL:g}', time.perf_counter() - start)
        except Exception as err:  # noqa: BLE001
            table.add(f'{amp} step + resume: {card.name}', device, False, f'{type(err).__name__}: {str(err)[:160]}',
                      '', time.perf_counter() - start)
    shutil.rmtree(tmp, ignore_errors=True)


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _run(cmd, cwd, timeout, threads=None):
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    if threads:
        env['OMP_NUM_THREADS'] = str(threads)
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def check_ddp(table, device, quick, timeout):
    tmp = tempfile.mkdtemp(prefix='vlunet-selfcheck-ddp-')
    start = time.perf_counter()
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=1', f'--master_port={_free_port()}',
           '-m', 'vlunet.train', '-opt', DEMO_TRAIN, '--launcher', 'pytorch', '--force_yml', 'train:total_iter=2',
           'logger:save_checkpoint_freq=2', 'val:val_freq=100000', *TINY_DEMO]
    try:
        proc = _run(cmd, tmp, timeout, threads=1 if quick else None)
        logs = sorted(glob.glob(os.path.join(tmp, 'experiments', '*', 'train_*.log')))
        log = open(logs[-1]).read() if logs else ''
        ok = proc.returncode == 0 and 'World size (gpu number): 1' in log and 'End of training' in log
        losses = re.findall(r'l_pix: ([0-9.e+-]+)', log)
        figure = (f'2 iterations, world size 1, l_pix {", ".join(losses[-2:])}' if ok else
                  f'exit {proc.returncode}: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}')
        table.add('ddp (torchrun, 1 process)', device, ok, figure, '', time.perf_counter() - start)
    except subprocess.TimeoutExpired:
        table.add('ddp (torchrun, 1 process)', device, False, f'timed out after {timeout} s', '',
                  time.perf_counter() - start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_script(table, name, args, device, timeout, outputs):
    start = time.perf_counter()
    script = os.path.join(REPO, 'scripts', name)
    try:
        proc = _run([sys.executable, script, *args], REPO, timeout)
    except subprocess.TimeoutExpired:
        table.add(name, device, False, f'timed out after {timeout} s', '', time.perf_counter() - start)
        return
    rows = [line for line in proc.stdout.splitlines() if line.startswith('|') and not line.startswith('|---')]
    failed = [line for line in rows if 'failed' in line or 'timed out' in line]
    ok = proc.returncode == 0 and len(rows) > 1 and not failed
    figure = (f'{len(rows) - 1} rows' + (f', {len(failed)} failed' if failed else '') if proc.returncode == 0 else
              f'exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] if proc.stderr else ""}')
    table.add(f'{name} {" ".join(a for a in args if a.startswith("--q"))}'.strip(), device, ok, figure, '',
              time.perf_counter() - start)
    outputs.append((name, proc.stdout.strip()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true', help='small and fast (CI on a CPU): fewer fixtures and '
                        'methods, the benchmarks\' --quick modes')
    parser.add_argument('--device', default=None, help='default: cuda when present, else cpu')
    parser.add_argument('--skip', nargs='+', default=[], choices=CHECKS, help='checks to leave out')
    parser.add_argument('--fixtures', nargs='+', metavar='NAME', help='parity fixtures to run (default: all; --quick: '
                        'the first three)')
    parser.add_argument('--timeout', type=float, default=None, help='seconds per subprocess check (default 300, '
                                                                    'quick 120)')
    parser.add_argument('--markdown', help='also write the summary table (and the benchmark tables) to this file')
    args = parser.parse_args(argv)
    import torch
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if device.startswith('cuda') and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device is available')
    timeout = args.timeout or (120 if args.quick else 300)
    on_gpu = device.startswith('cuda')
    where = (f'{torch.cuda.get_device_name(torch.device(device))}, CUDA {torch.version.cuda}' if on_gpu
             else f'CPU ({os.cpu_count()} logical), {torch.get_num_threads()} threads')
    begin = time.perf_counter()
    table, outputs = Table(), []
    print(f'vlunet GPU self-check on {where}, torch {torch.__version__}{" (--quick)" if args.quick else ""}',
          file=sys.stderr, flush=True)
    if 'parity' in args.skip:
        table.add('parity', device, None)
    else:
        check_parity(table, device, args.quick, args.fixtures)
    if 'amp_resume' in args.skip:
        table.add('amp step + resume', device, None)
    else:
        check_amp_resume(table, device, args.quick)
    if 'ddp' in args.skip:
        table.add('ddp', device, None)
    else:
        check_ddp(table, device, args.quick, timeout)
    methods = [card.name for card in _cards().list_methods()]  # full size on a GPU: each method's main release
    first_card = methods[0]
    if 'benchmark_train' in args.skip:
        table.add('benchmark_train.py', device, None)
    else:
        bench = (['--quick', '--methods', first_card, '--configs', 'bf16', '--devices', device] if args.quick
                 else ['--devices', device, '--methods', *methods, '--configs', 'fp32', 'bf16', '--steps', '1'])
        check_script(table, 'benchmark_train.py', bench, device, timeout if args.quick else 4 * timeout, outputs)
    if 'benchmark_inference' in args.skip:
        table.add('benchmark_inference.py', device, None)
    else:
        bench = (['--quick', '--methods', first_card, '--sizes', '0.012', '--precisions', 'bf16',
                  '--device', device, '--threads', '1'] if args.quick else
                 ['--device', device, '--methods', *methods, '--sizes', '1', '--precisions', 'fp32', 'bf16',
                  '--max-memory', '0'])
        check_script(table, 'benchmark_inference.py', bench, device, timeout if args.quick else 2 * timeout, outputs)
    total = time.perf_counter() - begin
    summary = (f'vlunet self-check: {where}, torch {torch.__version__}; {len(table.rows)} checks, '
               f'{len(table.failed)} failed, {total:.0f} s\n\n{table.markdown()}')
    print(summary)
    for name, text in outputs:
        print(f'\n### {name}\n\n{text}')
    if args.markdown:
        with open(args.markdown, 'w') as f:
            f.write(summary + ''.join(f'\n\n### {n}\n\n{t}' for n, t in outputs) + '\n')
    return 1 if table.failed else 0


if __name__ == '__main__':
    sys.exit(main())
