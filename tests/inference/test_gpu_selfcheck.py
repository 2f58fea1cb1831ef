"""scripts/gpu_selfcheck.py: on a CUDA machine one command checks everything; here its --quick form runs on the
CPU and its table is read, and the branches that can fail are made to fail."""
import os
import re
import subprocess
import sys

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, 'scripts'))
import gpu_selfcheck  # noqa: E402


def _table(text):
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        if line.startswith('| ') and len(cells) == 6 and cells[0] != 'check':
            rows[cells[0]] = cells
    return rows


def test_quick_self_check_prints_one_table_of_passed_checks(tmp_path):
    scratch = tmp_path / 'tmp'  # the benchmarks' and the checks' temporary folders, all removed at their end
    scratch.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS='1', VLUNET_CACHE_DIR=str(tmp_path / 'cache'), TMPDIR=str(scratch))
    proc = subprocess.run([sys.executable, os.path.join(REPO, 'scripts', 'gpu_selfcheck.py'), '--quick',
                           '--markdown', str(tmp_path / 'selfcheck.md')], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _table(proc.stdout)
    names = list(rows)
    for prefix in ('parity float64', 'parity float32', 'parity bf16', 'bf16 step + resume', 'ddp',
                   'benchmark_train.py', 'benchmark_inference.py'):
        assert any(n.startswith(prefix) for n in names), (prefix, names)
    assert all(r[2] == 'ok' and r[1] == 'cpu' for r in rows.values()), rows
    float64 = next(r for n, r in rows.items() if n.startswith('parity float64'))
    assert float(re.search(r'diff ([0-9.e+-]+)', float64[3]).group(1)) <= 1e-9
    assert re.search(r'0 failed', proc.stdout)
    assert '### benchmark_inference.py' in proc.stdout and '### benchmark_train.py' in proc.stdout
    assert (tmp_path / 'selfcheck.md').read_text().startswith('vlunet self-check')
    assert not [p.name for p in scratch.iterdir() if p.name.startswith('vlunet-')]


def test_random_routing_is_drawn_as_the_fixture_was_and_a_missed_tolerance_fails(monkeypatch):
    table = gpu_selfcheck.Table()
    gpu_selfcheck.check_parity(table, 'cpu', False, names=['MoCEIR_S_reduced'])  # noise drawn in its forward
    assert [r['result'] for r in table.rows] == ['ok', 'ok', 'ok'], table.rows
    monkeypatch.setitem(gpu_selfcheck.TOLERANCES, 'float32', 0.0)
    table = gpu_selfcheck.Table()
    gpu_selfcheck.check_parity(table, 'cpu', False, names=['AdaIR_A1'])
    failed = table.failed
    assert len(failed) == 1 and failed[0]['check'].startswith('parity float32') and 'AdaIR_A1.pt' in failed[0]['figure']
    assert '| FAIL |' in table.markdown()


def test_skipped_checks_are_listed(capsys):
    status = gpu_selfcheck.main(['--device', 'cpu', '--skip', *gpu_selfcheck.CHECKS])
    out = capsys.readouterr().out
    assert status == 0 and out.count('| skipped |') == len(gpu_selfcheck.CHECKS)
