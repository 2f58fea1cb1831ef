"""vlunet-remeasure picks up where it stopped: a measurement it started and did not finish is made again
(BasicSR keeps the partial folder); a results folder it did not make is only measured over with --overwrite,
and then the old one is kept as <name>_archived_<time>."""
import glob
import hashlib
import json
import os

from conftest import REPO
from lb_helpers import nhr_test_folders, tiny_checkpoint
from vlunet import remeasure

OPTIONS = os.path.join(REPO, 'options', 'test')


def test_an_interrupted_run_is_finished_and_overwrite_keeps_the_old_folder(tmp_path, monkeypatch, capsys):
    nhr_test_folders(str(tmp_path))
    weights = tmp_path / 'downloads'
    tiny_checkpoint(str(weights / 'adair3d.ckpt'), 'AdaIR', 1)
    tiny_checkpoint(str(weights / 'restormer' / 'deraining.pth'), 'Restormer', 0)
    monkeypatch.chdir(tmp_path)
    # an earlier run stopped after one test set: its state says 'measuring' this very file
    sha = hashlib.sha256((weights / 'adair3d.ckpt').read_bytes()).hexdigest()
    partial = tmp_path / 'results' / 'AdaIR_NHR_released'
    partial.mkdir(parents=True)
    (partial / 'metrics.json').write_text(json.dumps({'CBSD68_sigma15': {'psnr': 1.0}}))
    (tmp_path / 'released_weights').mkdir()
    (tmp_path / 'released_weights' / 'AdaIR_NHR_released.json').write_text(
        json.dumps({'sha256': sha, 'status': 'measuring'}))
    foreign = tmp_path / 'results' / 'Restormer_NHR_released'
    foreign.mkdir()
    (foreign / 'mine.txt').write_text('not made by vlunet-remeasure')

    args = ['--options', OPTIONS, '--device', 'cpu', '--no-save-img', '--setting', 'NHR']
    code = remeasure.main(args + ['--weights', str(weights)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert 'AdaIR_NHR_released is an unfinished run of vlunet-remeasure from this file: measuring it again' in out
    assert 'Restormer_NHR_released: skipped: results/Restormer_NHR_released exists' in out
    metrics = json.loads((partial / 'metrics.json').read_text())
    assert len(metrics) == 5 and metrics['CBSD68_sigma15']['psnr'] != 1.0
    assert json.loads((partial / 'weights.json').read_text())['sha256'] == sha
    assert len(glob.glob(str(tmp_path / 'results' / 'AdaIR_NHR_released_archived_*' / 'metrics.json'))) == 1
    assert sorted(os.listdir(foreign)) == ['mine.txt']

    code = remeasure.main(args + ['--weights', str(weights / 'restormer'), '--overwrite'])
    out = capsys.readouterr().out
    assert code == 0, out
    assert json.loads((foreign / 'weights.json').read_text())['file_name'] == 'deraining.pth'
    assert len(glob.glob(str(tmp_path / 'results' / 'Restormer_NHR_released_archived_*' / 'mine.txt'))) == 1
