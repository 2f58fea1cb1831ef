"""vlunet-leaderboard on result folders: the right number in the right cell (paper | released | retrained and the
differences), averages recomputed, a test set with one image changed or missing marked, mixed protocols
refused, folders classified from what was recorded (weights.json, the training output) and named when not."""
import csv
import json
import os

import pytest

from lb_helpers import (BASICSR, NHR_SETS, changed_copy, image_sets, install_canonical, nhr_fingerprints,
                        result_folder)
from vlunet import leaderboard
from vlunet.archs.card import get_card

TINY_PROMPTIR = {'type': 'PromptIR', 'dim': 48, 'num_blocks': [1, 1, 1, 1], 'decoder': True}
ADAIR = {'type': 'AdaIR', 'decoder': True}
RESTORMER = {'type': 'Restormer', 'dim': 8}


def _values(base):
    """Distinct numbers per set: psnr base + 0.1 i, ssim 0.8 + 0.01 i."""
    return {s: (round(base + 0.1 * i, 4), round(0.8 + 0.01 * i, 4)) for i, s in enumerate(NHR_SETS)}


@pytest.fixture
def folders(tmp_path, monkeypatch):
    sets = image_sets(str(tmp_path / 'sets'))
    install_canonical(monkeypatch, sets)
    clean = nhr_fingerprints(sets)
    one_changed = nhr_fingerprints(sets, {'Rain100L': changed_copy(str(tmp_path / 'c1'), sets, 'Rain100L',
                                                                   change='002.png')})
    one_missing = nhr_fingerprints(sets, {'Rain100L': changed_copy(str(tmp_path / 'c2'), sets, 'Rain100L',
                                                                   drop='003.png')})
    root = str(tmp_path)
    made = {
        'promptir_rel': result_folder(root, 'PromptIR_NHR_released', TINY_PROMPTIR, _values(30.0), clean, 'released',
                                      params=35_592_263),
        'promptir_re': result_folder(root, 'PromptIR_NHR', TINY_PROMPTIR, _values(31.0), one_changed),
        'adair_rel': result_folder(root, 'AdaIR_NHR_released', ADAIR, _values(32.0), one_missing, 'released'),
        'restormer_re': result_folder(root, 'Restormer_NHR', RESTORMER, _values(29.0), clean),
        'unknown': result_folder(root, 'mystery_NHR', RESTORMER, _values(28.0), clean, pretrain='downloads/x.pth'),
    }
    monkeypatch.chdir(tmp_path)
    return made


def _row(path, method, column, task):
    rows = [r for r in csv.DictReader(open(path)) if r['method'] == method and r['column'] == column
            and r['task'] == task]
    assert len(rows) == 1, (method, column, task, rows)
    return rows[0]


def test_cells_averages_and_marks(folders, tmp_path, capsys):
    out = tmp_path / 'lb'
    code = leaderboard.main(list(folders.values()) + ['--out', str(out), '--no-gmacs'])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    csv_path = out / 'leaderboard.csv'
    promptir = get_card('PromptIR').results_for('NHR')[0]
    # every measured cell is the folder's number; its difference is measured minus the paper's number
    for i, task in enumerate(NHR_SETS):
        released = _row(csv_path, 'PromptIR', 'released', task)
        retrained = _row(csv_path, 'PromptIR', 'retrained', task)
        paper = _row(csv_path, 'PromptIR', 'paper', task)
        assert float(released['psnr']) == pytest.approx(30.0 + 0.1 * i)
        assert float(retrained['psnr']) == pytest.approx(31.0 + 0.1 * i)
        assert float(paper['psnr']) == promptir.tasks[task][0] and float(paper['ssim']) == promptir.tasks[task][1]
        assert float(released['delta_psnr_vs_paper']) == pytest.approx(30.0 + 0.1 * i - promptir.tasks[task][0])
        assert float(released['delta_ssim_vs_paper']) == pytest.approx(0.8 + 0.01 * i - promptir.tasks[task][1])
        assert released['folder'].endswith('PromptIR_NHR_released') and retrained['folder'].endswith('PromptIR_NHR')
    # averages: the paper's recomputed from its per-task values (printed kept beside), the measured over the sets
    paper_avg = _row(csv_path, 'PromptIR', 'paper', 'average')
    assert float(paper_avg['psnr']) == pytest.approx(sum(v[0] for v in promptir.tasks.values()) / 5)
    assert float(paper_avg['printed_average_psnr']) == promptir.average[0]
    assert float(_row(csv_path, 'PromptIR', 'released', 'average')['psnr']) == pytest.approx(30.2)
    assert float(_row(csv_path, 'Restormer', 'retrained', 'average')['psnr']) == pytest.approx(29.2)
    # the two test sets that differ are marked, with the file that differs; the clean ones are not
    changed = _row(csv_path, 'PromptIR', 'retrained', 'Rain100L')['flags']
    assert 'changed (degraded 1): 002.png' in changed
    missing = _row(csv_path, 'AdaIR', 'released', 'Rain100L')['flags']
    assert '2 pairs, the canonical set has 3' in missing and 'missing (in the canonical set, not here): 003.png' in missing
    assert _row(csv_path, 'PromptIR', 'released', 'Rain100L')['flags'] == ''
    assert _row(csv_path, 'PromptIR', 'retrained', 'SOTS_outdoor')['flags'] == ''
    md = (out / 'leaderboard.md').read_text()
    rain = md.split('## Rain100L')[1].split('## ')[0]
    line = next(x for x in rain.splitlines() if x.startswith('| PromptIR |'))
    assert '| 36.37 / 0.972 | 30.30 / 0.8300 | 31.30 / 0.8300 ‡ | -6.07 / -0.1420 | -5.07 / -0.1420 |' in line
    assert 'retrained: changed (degraded 1): 002.png' in line
    assert '‡ PromptIR_NHR: Rain100L differs: changed (degraded 1): 002.png.' in md
    # an unclassified folder is not used and is named with the reason and what to do
    assert 'mystery_NHR: cannot tell released from retrained' in md and '--released DIR' in md
    assert 'not used: ' in captured.err and 'mystery_NHR' in captured.err
    # how each folder was placed is written down
    assert 'PromptIR_NHR_released: PromptIR, released (weights.json of vlunet-remeasure' in md
    assert 'PromptIR_NHR: PromptIR, retrained (model.json: pretrain_network_g experiments/PromptIR_NHR/models' in md


def test_printed_averages_are_recomputed_and_flagged(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert leaderboard.main(['--setting', 'NHRBL', '--out', 'lb', '--no-gmacs']) == 0
    rows = list(csv.DictReader(open(tmp_path / 'lb' / 'leaderboard.csv')))
    quotes = {(r['method'], r['source'].split(':')[0]): r for r in rows if r['task'] == 'average'}
    moce = quotes[('MoCE-IR', 'BaryIR (TPAMI 2026)')]   # printed 30.25, its per-task values average 30.58
    assert float(moce['printed_average_psnr']) == 30.25 and float(moce['psnr']) == pytest.approx(30.582)
    assert 'printed average PSNR 30.25 is not the mean of its per-task values (30.582' in moce['flags']
    own = next(r for r in rows if r['method'] == 'MoCE-IR' and r['column'] == 'paper' and r['task'] == 'average')
    assert own['flags'] == '' and float(own['printed_average_psnr']) == 30.58
    # PromptIR's five-task average as two papers print it, each with its source
    promptir = [r for r in rows if r['method'] == 'PromptIR' and r['task'] == 'average']
    assert sorted(float(r['printed_average_psnr']) for r in promptir) == [29.15, 29.72]
    assert all('figure' in r['source'] for r in promptir)
    # NHR: BaryIR's own three-task average (32.86 printed, 32.874 from its values) is flagged
    assert leaderboard.main(['--setting', 'NHR', '--out', 'lb3', '--no-gmacs']) == 0
    md = (tmp_path / 'lb3' / 'leaderboard.md').read_text()
    assert '† printed average PSNR 32.86 is not the mean of its per-task values (32.874, -0.014 dB)' in md
    assert '| Restormer |' in md and '(30.716, +0.034 dB)' in md    # VLU-Net's quote of it


def test_mixed_protocols_are_refused_naming_both(folders, tmp_path, capsys):
    sets_fp = json.load(open(os.path.join(folders['restormer_re'], 'metrics.json')))
    other = result_folder(str(tmp_path), 'AdaIR_NHR', ADAIR, _values(27.0),
                          {s: sets_fp[s]['fingerprint'] for s in NHR_SETS}, metrics=BASICSR)
    out = tmp_path / 'lb'
    code = leaderboard.main([folders['promptir_rel'], folders['restormer_re'], other, '--out', str(out),
                             '--no-gmacs'])
    err = capsys.readouterr().err
    assert code == 3 and 'different protocols' in err and 'AdaIR_NHR' in err
    assert 'calculate_psnr_skimage' in err and 'calculate_psnr"' in err
    assert not out.exists()  # nothing written
    # a folder nobody classified still counts for the protocol check
    assert leaderboard.main([folders['unknown'], other, '--out', str(out), '--no-gmacs']) == 3


def test_settings_are_read_from_the_folders_or_chosen(folders, tmp_path, capsys):
    clean = json.load(open(os.path.join(folders['restormer_re'], 'metrics.json')))
    nhrbl = result_folder(str(tmp_path), 'Restormer_NHRBL', RESTORMER, {'Rain100L': (30.0, 0.9)},
                          {'Rain100L': clean['Rain100L']['fingerprint']})
    code = leaderboard.main([folders['restormer_re'], nhrbl, '--out', 'lb', '--no-gmacs'])
    assert code == 2 and 'several settings' in capsys.readouterr().err
    code = leaderboard.main([folders['restormer_re'], nhrbl, '--setting', 'NHR', '--out', 'lb', '--no-gmacs'])
    assert code == 0
    md = (tmp_path / 'lb' / 'leaderboard.md').read_text()
    assert 'Restormer_NHRBL: measured for NHRBL (model.json name Restormer_NHRBL), not NHR' in md
    # --released / --retrained decide a folder nothing recorded for
    code = leaderboard.main([folders['unknown'], '--retrained', folders['unknown'], '--out', 'lb2', '--no-gmacs'])
    assert code == 0
    rows = list(csv.DictReader(open(tmp_path / 'lb2' / 'leaderboard.csv')))
    assert any(r['column'] == 'retrained' and r['folder'].endswith('mystery_NHR') for r in rows)


def test_a_stale_marker_is_not_trusted(folders, tmp_path, capsys):
    sets_fp = json.load(open(os.path.join(folders['restormer_re'], 'metrics.json')))
    stale = result_folder(str(tmp_path), 'Restormer_NHR_released', RESTORMER, _values(25.0),
                          {s: sets_fp[s]['fingerprint'] for s in NHR_SETS}, 'released',
                          marker_extra={'converted': 'released_weights/another.pth'})
    code = leaderboard.main([stale, folders['restormer_re'], '--out', 'lb', '--no-gmacs'])
    assert code == 0
    assert 'weights.json names released_weights/another.pth but model.json loaded' in capsys.readouterr().err


def test_compare_marks_the_changed_test_set_and_keeps_its_average(folders, tmp_path):
    from vlunet.compare import build_table, describe_test_sets, load_result
    results = [load_result(folders[k]) for k in ('promptir_rel', 'promptir_re', 'adair_rel')]
    rows, sets = build_table(results, with_gmacs=False)
    by_name = {r['method'].split(' ')[0]: r for r in rows[1:]}
    assert by_name['PromptIR_NHR_released']['test_set'] == []
    assert by_name['PromptIR_NHR']['test_set'] == ['Rain100L: changed (degraded 1): 002.png']
    assert by_name['PromptIR_NHR']['average'][0] == pytest.approx(31.2)   # marked, still averaged
    lines = describe_test_sets(results, sets)
    assert any('AdaIR_NHR_released: Rain100L differs: 2 pairs' in line for line in lines)


def test_one_changed_file_stands_out_among_copies(tmp_path, monkeypatch):
    """SOTS is known by its count only, and here every folder measured the same subset of Rain100L: the folder
    whose files differ from the others' is marked against the files most folders measured, naming the file."""
    from vlunet.compare import build_table, check_test_sets, load_result
    sets = image_sets(str(tmp_path / 'sets'))
    install_canonical(monkeypatch, sets)
    subset = changed_copy(str(tmp_path / 's'), sets, 'Rain100L', drop='001.png')
    other = changed_copy(str(tmp_path / 'o'), {'Rain100L': subset}, 'Rain100L', change='002.png')
    sots = changed_copy(str(tmp_path / 'x'), sets, 'SOTS_outdoor', change='003.png')
    base = nhr_fingerprints(sets, {'Rain100L': subset})
    odd = nhr_fingerprints(sets, {'Rain100L': other, 'SOTS_outdoor': sots})
    root = str(tmp_path)
    folders = [result_folder(root, 'A_NHR', RESTORMER, _values(30.0), base),
               result_folder(root, 'B_NHR', RESTORMER, _values(30.0), base),
               result_folder(root, 'C_NHR', RESTORMER, _values(30.0), odd)]
    results = [load_result(f) for f in folders]
    checks = check_test_sets(results)
    assert checks[(folders[0], 'SOTS_outdoor')]['status'] == 'matches'
    c_sots = checks[(folders[2], 'SOTS_outdoor')]
    assert c_sots['status'] == 'differs' and c_sots['lines'] == [
        'measured on other files than A_NHR, B_NHR',
        'changed (degraded 1): 003.png']
    a_rain, c_rain = checks[(folders[0], 'Rain100L')]['lines'], checks[(folders[2], 'Rain100L')]['lines']
    assert 'missing (in the canonical set, not here): 001.png' in a_rain and 'other files' not in ' '.join(a_rain)
    assert 'measured on other files than A_NHR, B_NHR' in c_rain
    assert 'changed (degraded 1): 002.png' in c_rain
    rows, _ = build_table(results, with_gmacs=False, test_sets=checks)
    assert rows[3]['average'][0] == pytest.approx(30.2)   # marked, still averaged


def test_an_archived_earlier_run_is_left_out_beside_the_newer(folders, tmp_path, capsys):
    import shutil
    old = str(tmp_path / 'results' / 'Restormer_NHR_archived_20260101_120000')
    shutil.copytree(folders['restormer_re'], old)
    assert leaderboard.main([folders['restormer_re'], old, '--out', 'lb', '--no-gmacs']) == 0
    assert 'an earlier run of Restormer_NHR that BasicSR archived' in capsys.readouterr().err
    rows = [r for r in csv.DictReader(open(tmp_path / 'lb' / 'leaderboard.csv')) if r['column'] == 'retrained']
    assert {r['folder'] for r in rows} == {folders['restormer_re']}
    assert leaderboard.main([old, '--out', 'lb2', '--no-gmacs']) == 0   # alone, it is used
