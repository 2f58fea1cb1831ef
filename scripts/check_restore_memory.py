#!/usr/bin/env python
"""Restore one photo of N megapixels with ``vlunet-restore --max-memory SIZE`` in a subprocess and check the
subprocess's peak resident set (the kernel's ru_maxrss of that child, from ``os.wait4``) against a limit.

    python scripts/check_restore_memory.py -opt options/test/VLUNet_demo.yml --megapixels 12 \\
        --max-memory 3G --limit 3.5G --threads 2
    python scripts/check_restore_memory.py -opt OPT --megapixels 12 --max-memory 0 --limit 64G   # no budget

The photo is a real one (the package's demo image) resized to the size (4:3); it is written as PNG into a
temporary folder and restored by ``python -m vlunet.restore``, with ``--max-pixels 0``. Prints the peak
resident set, the wall time, how the report says the image ran (whole or in tiles and why) and OK or
FAIL; exits 1 when the peak passes ``--limit`` or the restore fails. Limits and budgets use binary
units (1G = 2^30 bytes).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


def photo_size(megapixels):
    """(width, height) of a 4:3 photo of about ``megapixels``, multiples of 16."""
    height = max(16, int(round((megapixels * 1e6 * 3 / 4) ** 0.5 / 16)) * 16)
    return int(round(height * 4 / 3 / 16)) * 16, height


def write_photo(path, width, height):
    import cv2
    import numpy as np
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'vlunet', 'demo_data', 'train',
                          'astronaut.png')
    img = cv2.imread(source, cv2.IMREAD_COLOR)
    if img is None:
        img = (np.random.default_rng(0).random((256, 256, 3)) * 255).astype(np.uint8)
    cv2.imwrite(path, cv2.resize(img, (width, height), interpolation=cv2.INTER_CUBIC))


def run_restore(args, threads=None, env=None, timeout=None):
    """``python -m vlunet.restore ARGS`` in a subprocess: ``(exit status, peak RSS bytes, seconds, stdout, stderr)``.

    The peak is the child's own ru_maxrss (``os.wait4`` on its pid), not that of other children."""
    full_env = dict(os.environ, PYTHONUNBUFFERED='1', **(env or {}))
    if threads:
        full_env['OMP_NUM_THREADS'] = str(threads)
    out, err = tempfile.TemporaryFile('w+'), tempfile.TemporaryFile('w+')
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, '-m', 'vlunet.restore', *map(str, args)], stdout=out, stderr=err,
                            env=full_env)
    deadline = None if timeout is None else start + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if deadline is not None and time.perf_counter() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    out.seek(0)
    err.seek(0)
    return proc.returncode, usage.ru_maxrss * 1024, seconds, out.read(), err.read()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('-opt', required=True, help='option file of the model (as for vlunet-restore)')
    parser.add_argument('--model', help='weights (overrides path.pretrain_network_g)')
    parser.add_argument('--megapixels', type=float, default=12.0)
    parser.add_argument('--max-memory', default='3G', help='the budget passed to vlunet-restore (0: none)')
    parser.add_argument('--limit', default='3.5G', help='the peak resident set the subprocess must stay below')
    parser.add_argument('--precision', default='fp32')
    parser.add_argument('--threads', type=int, default=2, help='OMP_NUM_THREADS of the subprocess')
    parser.add_argument('--keep', help='keep the restored photo and its report in this folder')
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
    from vlunet.inference.memory import format_bytes, parse_memory
    limit = parse_memory(args.limit)
    width, height = photo_size(args.megapixels)
    tmp = tempfile.mkdtemp(prefix='vlunet-rss-')
    try:
        os.makedirs(os.path.join(tmp, 'in'))
        write_photo(os.path.join(tmp, 'in', 'photo.png'), width, height)
        out = args.keep or os.path.join(tmp, 'out')
        cmd = ['-opt', args.opt, '-i', os.path.join(tmp, 'in'), '-o', out, '--device', 'cpu', '--max-pixels', '0',
               '--precision', args.precision, '--overwrite']
        if args.model:
            cmd += ['--model', args.model]
        if args.max_memory not in ('0', ''):
            cmd += ['--max-memory', args.max_memory]
        print(f'restoring a {width}x{height} photo ({width * height / 1e6:.1f} MP) with --max-memory {args.max_memory}, '
              f'{args.threads} threads ...', flush=True)
        status, peak, seconds, stdout, stderr = run_restore(cmd, args.threads)
        rows = []
        if os.path.isfile(os.path.join(out, 'report.json')):
            rows = json.load(open(os.path.join(out, 'report.json'))).get('images', [])
        how = rows[0].get('tiling', '') if rows else ''
        ok = status == 0 and bool(rows) and peak < limit
        print(f'peak resident set {format_bytes(peak)} ({peak / 1e9:.2f} GB) vs limit {format_bytes(limit)}; '
              f'{seconds:.0f} s; {how or "no report"}; exit {status}')
        if status != 0:
            print(stderr[-2000:], file=sys.stderr)
        print('OK' if ok else 'FAIL')
        return 0 if ok else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
