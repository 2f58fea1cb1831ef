"""vlunet-compare: table over result folders, CSV next to it, side-by-side grids."""
import csv
import json
import os

import cv2
import numpy as np

from conftest import run_cli

DGUNET = {'type': 'DGUNet', 'n_feat': 8, 'scale_unetfeats': 4, 'scale_orsnetfeats': 4, 'depth': 1}


def _result(root, name, metrics, network=None, images=('cat', )):
    folder = root / 'results' / name
    folder.mkdir(parents=True)
    (folder / 'metrics.json').write_text(json.dumps(metrics))
    (folder / 'model.json').write_text(json.dumps({'name': name, 'network_g': network, 'params': 1234567}))
    for set_name in metrics:
        vis = folder / 'visualization' / set_name
        vis.mkdir(parents=True)
        for stem in images:
            for suffix in ('lq', 'gt', name):
                cv2.imwrite(str(vis / f'{stem}_{suffix}.png'), np.full((20, 30, 3), 100, np.uint8))
    return folder


def test_table_csv_and_grid(tmp_path):
    m1 = {'rain': {'psnr': 30.0, 'ssim': 0.9, 'input_psnr': 25.0, 'input_ssim': 0.8},
          'haze': {'psnr': 20.0, 'ssim': 0.7, 'input_psnr': 12.0, 'input_ssim': 0.6}}
    m2 = {'rain': {'psnr': 28.0, 'ssim': 0.85, 'input_psnr': 25.0, 'input_ssim': 0.8},
          'haze': {'psnr': 22.0, 'ssim': 0.75, 'input_psnr': 12.0, 'input_ssim': 0.6}}
    a = _result(tmp_path, 'A_demo', m1, DGUNET)
    b = _result(tmp_path, 'B_demo', m2, DGUNET)
    (tmp_path / 'results' / 'empty').mkdir()
    proc = run_cli(['-m', 'vlunet.compare', str(a), str(b), str(tmp_path / 'results' / 'empty'), '--out',
                    str(tmp_path / 'cmp'), '--images', 'cat'], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert '| Input (degraded) |' in out and 'A_demo (DGUNet)' in out and 'B_demo (DGUNet)' in out
    assert 'rain PSNR/SSIM' in out and 'haze PSNR/SSIM' in out and 'Average' in out
    row_a = next(line for line in out.splitlines() if line.startswith('| A_demo'))
    assert row_a.endswith('| 25.00 / 0.8000 |')  # average over the two sets
    assert '| 30.00 / 0.9000 |' in row_a and '| 1.23 |' in row_a
    assert 'skipping' in proc.stderr and 'empty' in proc.stderr
    rows = list(csv.DictReader(open(tmp_path / 'cmp' / 'comparison.csv')))
    assert [r['method'] for r in rows] == ['Input (degraded)', 'A_demo (DGUNet)', 'B_demo (DGUNet)']
    assert float(rows[2]['average_psnr']) == 25.0 and float(rows[0]['average_psnr']) == 18.5
    assert float(rows[1]['gmacs_256']) > 0 and float(rows[1]['params_M']) == 1.234567
    grid = cv2.imread(str(tmp_path / 'cmp' / 'grid_cat.png'))
    assert grid is not None and grid.shape[1] >= 4 * 100  # input | A | B | ground truth
    assert os.path.isfile(tmp_path / 'cmp' / 'comparison.md')


def test_no_results_is_an_error(tmp_path):
    proc = run_cli(['-m', 'vlunet.compare', str(tmp_path)], tmp_path)
    assert proc.returncode == 2 and 'metrics.json' in proc.stderr


def test_a_folder_missing_a_validation_set_is_marked_and_not_averaged(tmp_path):
    shared = {'rain': {'psnr': 30.0, 'ssim': 0.9, 'input_psnr': 25.0, 'input_ssim': 0.8}}
    full = dict(shared, haze={'psnr': 10.0, 'ssim': 0.5, 'input_psnr': 9.0, 'input_ssim': 0.4})
    a = _result(tmp_path, 'A_full', full)
    b = _result(tmp_path, 'B_rain_only', shared)  # the same numbers on the shared set, one set fewer
    proc = run_cli(['-m', 'vlunet.compare', str(a), str(b), '--out', str(tmp_path / 'cmp'), '--no-gmacs'], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row_a = next(line for line in proc.stdout.splitlines() if line.startswith('| A_full'))
    row_b = next(line for line in proc.stdout.splitlines() if line.startswith('| B_rain_only'))
    assert row_a.endswith('| 20.00 / 0.7000 |')
    assert '| 30.00 / 0.9000 | missing | not averaged (incomplete) |' in row_b
    assert 'Not averaged: B_rain_only: incomplete: missing haze.' in proc.stdout
    assert 'warning: Not averaged: B_rain_only: incomplete: missing haze' in proc.stderr
    rows = {r['method']: r for r in csv.DictReader(open(tmp_path / 'cmp' / 'comparison.csv'))}
    assert rows['B_rain_only']['average_psnr'] == '' and rows['B_rain_only']['note'] == 'incomplete: missing haze'
    assert float(rows['A_full']['average_psnr']) == 20.0 and rows['A_full']['note'] == ''
    assert 'Not averaged: B_rain_only' in open(tmp_path / 'cmp' / 'comparison.md').read()


def test_non_finite_or_missing_metrics_are_named(tmp_path):
    good = {'rain': {'psnr': 30.0, 'ssim': 0.9, 'input_psnr': 25.0, 'input_ssim': 0.8},
            'haze': {'psnr': 20.0, 'ssim': 0.7, 'input_psnr': 12.0, 'input_ssim': 0.6}}
    a = _result(tmp_path, 'A', good)
    b = _result(tmp_path, 'B_nan', {'rain': dict(good['rain'], psnr=float('nan')),
                                    'haze': dict(good['haze'], ssim=float('inf'))})
    c = _result(tmp_path, 'C_nokey', {'rain': {k: v for k, v in good['rain'].items() if k != 'ssim'},
                                      'haze': dict(good['haze'], psnr='n/a')})
    bad = tmp_path / 'results' / 'D_broken'
    bad.mkdir()
    (bad / 'metrics.json').write_text('{"rain": {"psnr": 30.0,')
    proc = run_cli(['-m', 'vlunet.compare', str(a), str(b), str(c), str(bad), '--out', str(tmp_path / 'cmp'),
                    '--no-gmacs'], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row_b = next(line for line in proc.stdout.splitlines() if line.startswith('| B_nan'))
    assert '| - / 0.9000 | 20.00 / - | not averaged (invalid values) |' in row_b  # no number is made of them
    b_json, c_json = str(b / 'metrics.json'), str(c / 'metrics.json')
    assert f'rain: "psnr" is nan in {b_json}' in proc.stderr and f'haze: "ssim" is inf in {b_json}' in proc.stderr
    assert f'rain: no "ssim" in {c_json}' in proc.stderr and f"haze: \"psnr\" is 'n/a', not a number in {c_json}" \
        in proc.stderr
    assert f'warning: skipping {bad}: {bad}/metrics.json: cannot be read as JSON' in proc.stderr
    rows = {r['method']: r for r in csv.DictReader(open(tmp_path / 'cmp' / 'comparison.csv'))}
    assert rows['B_nan']['average_psnr'] == '' and rows['C_nokey']['average_psnr'] == ''
    assert rows['B_nan']['note'].startswith('invalid: rain: "psnr" is nan')
    assert float(rows['A']['average_psnr']) == 25.0 and 'D_broken' not in proc.stdout


def test_a_metric_no_folder_recorded_has_no_average(tmp_path):
    """Sets without the degraded inputs' metrics: the inputs' row has no average, the method's has its own."""
    sets = {'low': {'psnr': 20.0, 'ssim': 0.5}, 'haze': {'psnr': 30.0, 'ssim': 0.9}}
    folder = _result(tmp_path, 'A', sets)
    proc = run_cli(['-m', 'vlunet.compare', str(folder), '--no-gmacs'], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith('| A'))
    assert row.endswith('| 25.00 / 0.7000 |')
