"""vlunet-remeasure end to end: a folder of published-format checkpoints of several methods (tiny networks, files
named as their authors name them) is recognised, converted and measured with the setting's real test option
files by one command; files it cannot recognise or place are named with the reason; nothing is written over a
folder it did not make without --overwrite; an interrupted run is finished and a measured one skipped."""
import glob
import hashlib
import json
import os

import pytest
import torch

from conftest import REPO
from lb_helpers import nhr_test_folders, tiny_checkpoint
from vlunet import remeasure
from vlunet.archs.card import get_card

OPTIONS = os.path.join(REPO, 'options', 'test')


@pytest.fixture
def downloads(tmp_path, monkeypatch):
    nhr_test_folders(str(tmp_path))
    w = tmp_path / 'downloads'
    tiny_checkpoint(str(w / 'restormer' / 'deraining.pth'), 'Restormer', 0)     # {'params'}: tells no setting
    tiny_checkpoint(str(w / 'adair3d.ckpt'), 'AdaIR', 1)                        # Lightning, name: three tasks
    tiny_checkpoint(str(w / 'adair5d.ckpt'), 'AdaIR', 2)                        # name: five tasks (NHRBL)
    tiny_checkpoint(str(w / 'MoCE-IR_AIO3.ckpt'), 'MoCE-IR', 4)                 # not a released size: S or full?
    (w / 'README.txt').write_text('weights from the drive folder')
    torch.save({'optimizer': {'lr': 0.1}}, w / 'optimizer.pth')
    monkeypatch.chdir(tmp_path)
    return w


def _run(capsys, *args):
    code = remeasure.main(['--options', OPTIONS, '--device', 'cpu', '--no-save-img', *args])
    return code, capsys.readouterr().out


def test_a_folder_of_released_checkpoints_in_one_command(downloads, tmp_path, capsys):
    foreign = tmp_path / 'results' / 'Restormer_NHR_released'
    foreign.mkdir(parents=True)
    (foreign / 'mine.txt').write_text('an earlier run of someone else')
    code, out = _run(capsys, '--weights', str(downloads), '--setting', 'NHR', '--variant', 'MoCE-IR_AIO3.ckpt=MoCE-IR-S')
    assert code == 4, out   # measured what it could; one file needs an answer
    # recognised and placed, each with how its setting was told
    assert 'adair3d.ckpt: AdaIR (AdaIR, NHR)' in out and 'MoCE-IR_AIO3.ckpt: MoCE-IR (MoCE-IR-S, NHR)' in out
    assert "AdaIR AdaIR, NHR: file name 'adair3d.ckpt'" in out
    assert 'Restormer Restormer, NHR: --setting NHR (the file does not tell)' in out
    # named, with the reason, and what to pass
    assert 'README.txt: not a PyTorch checkpoint' in out
    assert "optimizer.pth: unknown checkpoint layout (top-level keys: 'optimizer')" in out
    assert "adair5d.ckpt: AdaIR: a NHRBL model (file name 'adair5d.ckpt'), not NHR" in out
    assert '--setting-of adair5d.ckpt=NHR' in out
    # progress of each measurement
    assert '[1/3]' in out and '[3/3]' in out and 'Val Rain100L' in out
    # the folder it did not make is untouched
    assert 'Restormer_NHR_released: skipped: results/Restormer_NHR_released exists and was not written' in out
    assert sorted(os.listdir(foreign)) == ['mine.txt']
    for name, source, fmt in (('AdaIR_NHR_released', 'adair3d.ckpt', 'lightning'),
                              ('MoCEIR_S_NHR_released', 'MoCE-IR_AIO3.ckpt', 'lightning')):
        folder = tmp_path / 'results' / name
        marker = json.loads((folder / 'weights.json').read_text())
        raw = (downloads / source).read_bytes()
        assert marker['origin'] == 'released' and marker['sha256'] == hashlib.sha256(raw).hexdigest()
        assert marker['file_name'] == source and marker['source_format'] == fmt and marker['setting'] == 'NHR'
        metrics = json.loads((folder / 'metrics.json').read_text())
        assert sorted(metrics) == ['CBSD68_sigma15', 'CBSD68_sigma25', 'CBSD68_sigma50', 'Rain100L', 'SOTS_outdoor']
        for entry in metrics.values():   # the published protocol, the fingerprint and the environment of every set
            assert entry['protocol']['crop'] == 'center crop to a multiple of 16'
            assert entry['protocol']['metrics']['ssim']['type'] == 'calculate_ssim_skimage'
            assert entry['fingerprint']['count'] == 1 and entry['fingerprint']['sizes'] == {'32x32': 1}
            assert entry['test_set']['status'] == 'differs'    # one image is not the canonical set
            assert entry['environment']['device_type'] == 'cpu' and entry['environment']['versions']['torch']
        model = json.loads((folder / 'model.json').read_text())
        assert model['network_g'] == marker['network_g']       # the network as the file defines it: tiny widths
        assert model['network_g']['dim'] == get_card(marker['method']).tiny['dim'] == 8
        assert marker['variant'] == {'adair3d.ckpt': 'AdaIR', 'MoCE-IR_AIO3.ckpt': 'MoCE-IR-S'}[source]
        assert model['pretrain_network_g'] == marker['converted'] and os.path.isfile(marker['converted'])

    # measured once: a second run skips them (and still writes nothing over the foreign folder)
    code, out = _run(capsys, '--weights', str(downloads), '--setting', 'NHR', '--variant', 'MoCE-IR_AIO3.ckpt=MoCE-IR-S')
    assert 'AdaIR_NHR_released: skipped: already measured from this file' in out
    assert 'MoCEIR_S_NHR_released: skipped: already measured from this file' in out
    assert sorted(os.listdir(foreign)) == ['mine.txt'] and not glob.glob(str(tmp_path / 'results' / '*_archived_*'))

    # the leaderboard puts them in the released column
    from vlunet import leaderboard
    folders = [str(tmp_path / 'results' / n) for n in ('AdaIR_NHR_released', 'MoCEIR_S_NHR_released')]
    assert leaderboard.main(folders + ['--out', 'lb', '--no-gmacs']) == 0
    rows = [line for line in open('lb/leaderboard.csv') if ',released,' in line]
    assert len(rows) == 2 * 6   # two methods x (five sets + average)


def test_pickled_modules_and_answers(downloads, tmp_path, capsys):
    """A file of pickled modules is recognised without running its code; the answers (--setting-of, --variant)
    place the files that need them; without --setting a file that does not tell is asked about."""
    tiny_checkpoint(str(downloads / 'checkpoint' / 'model_allBaryNet128__56_1.0.pt'), 'BaryIR', 5)
    tiny_checkpoint(str(downloads / 'dgunet' / 'model_best.pth'), 'DGUNet', 3)    # DataParallel {'state_dict'}
    code, out = _run(capsys, '--weights', str(downloads), '--dry-run', '--setting-of', 'adair5d.ckpt=NHR',
                     '--variant', 'MoCE-IR_AIO3.ckpt=MoCE-IR-S')
    assert code == 4, out
    assert 'checkpoint/model_allBaryNet128__56_1.0.pt: BaryIR' in out and 'dgunet/model_best.pth: DGUNet' in out
    assert 'neither its contents nor its name tell the setting; pass --setting' in out
    assert 'adair5d.ckpt: AdaIR (AdaIR, NHR)' in out and 'MoCE-IR_AIO3.ckpt: MoCE-IR (MoCE-IR-S, NHR)' in out
    assert 'adair3d.ckpt -> results/AdaIR_NHR_released_adair3d' in out    # two AdaIR NHR files: named apart
    assert not os.path.exists(tmp_path / 'results')   # --dry-run writes nothing
    code, out = _run(capsys, '--weights', str(downloads), '--dry-run', '--setting', 'NHRBL')
    assert 'adair3d.ckpt: AdaIR: a NHR model' in out and 'adair5d.ckpt: AdaIR (AdaIR, NHRBL)' in out
    assert 'model_allBaryNet128__56_1.0.pt: BaryIR (BaryIR, NHRBL)' in out
