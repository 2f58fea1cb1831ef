"""Option-file mistakes are one clear message (file, key, value, what was expected), given before
BasicSR creates or archives any experiments/ or results/ folder; ``--force_yml`` numbers are numbers."""
import glob
import os
import sys

import pytest

from conftest import DEMO_TRAIN, REPO, load_yaml, run_cli, write_yaml

import vlunet  # noqa: F401,E402  (compat fixes and registries)
from vlunet.cli_common import _options_as_run, check_options, option_problems  # noqa: E402

DEMO_TEST = os.path.join(REPO, 'options', 'test', 'VLUNet_demo.yml')


def _problems(capsys, path, force_yml=(), is_train=True):
    """check_options on an option file: the lines of its one message ([] when it passes)."""
    argv = ['-opt', str(path)] + (['--force_yml', *force_yml] if force_yml else [])
    try:
        check_options(argv, is_train)
    except SystemExit as exit_:
        assert exit_.code == 2
        err = capsys.readouterr().err
        head, *lines = err.rstrip('\n').split('\n')
        assert head.startswith(f'error: {path}: ') and head.endswith('in the options (nothing was created):'), head
        return [line.strip() for line in lines]
    return []


def _edited(tmp_path, edit, source=DEMO_TRAIN):
    opt = load_yaml(source)
    edit(opt)
    return write_yaml(tmp_path / 'options.yml', opt)


MISTAKES = {
    'unknown network': (lambda o: o['network_g'].update(type='VLUNett'),
                        "network_g.type: 'VLUNett' is not a registered architecture; did you mean 'VLUNet'"),
    'missing network_g': (lambda o: o.pop('network_g'), 'network_g: missing (a training option file needs'),
    'total_iter text': (lambda o: o['train'].update(total_iter='abc'),
                        "train.total_iter: 'abc'; expected the number of iterations (a whole number >= 1)"),
    'unknown dataset': (lambda o: o['datasets']['train'].update(type='AllInOneDatset'),
                        "datasets.train.type: 'AllInOneDatset' is not a registered dataset; did you mean "
                        "'AllInOneDataset'"),
    'unknown model': (lambda o: o.update(model_type='VLUNetModle'),
                      "model_type: 'VLUNetModle' is not a registered model; did you mean 'VLUNetModel'"),
    'unknown loss': (lambda o: o['train']['pixel_opt'].update(type='L2Loss'),
                     "train.pixel_opt.type: 'L2Loss' is not a registered loss"),
    'unknown metric': (lambda o: o['val']['metrics']['psnr'].update(type='psnr'),
                       "val.metrics.psnr.type: 'psnr' is not a registered metric"),
    'unknown optimizer': (lambda o: o['train']['optim_g'].update(type='Adamw'),
                          "train.optim_g.type: 'Adamw' is not a torch.optim optimizer; did you mean 'AdamW'"),
    'unknown scheduler': (lambda o: o['train']['scheduler'].update(type='Cosine'),
                          "train.scheduler.type: 'Cosine'; expected one of MultiStepLR"),
    'network argument': (lambda o: o['network_g'].update(dimm=8),
                         "network_g.dimm: VLUNet has no argument 'dimm' (its arguments:"),
    'loss argument': (lambda o: o['train']['pixel_opt'].update(weight=2),
                      "train.pixel_opt.weight: L1Loss has no argument 'weight' (its arguments: loss_weight, reduction)"),
    'degradation': (lambda o: o['datasets']['train']['sources'][0]['degradation'].update(type='gauss'),
                    "datasets.train.sources[0].degradation.type: unknown degradation type 'gauss'"),
    'batch size': (lambda o: o['datasets']['train'].update(batch_size_per_gpu=0),
                   'datasets.train.batch_size_per_gpu: 0; expected the batch size per GPU (a whole number >= 1)'),
    'lr as text': (lambda o: o['train']['optim_g'].update(lr='2e-4'),
                   "train.optim_g.lr: '2e-4' is text, not a number (YAML reads an exponent without a dot as a "
                   "string); expected a number: write 0.0002 with a dot, e.g. 2.0e-4, or !!float 2e-4"),
    'not a mapping': (lambda o: o.update(train=[1, 2]), 'train: [1, 2]; expected a section'),
}


@pytest.mark.parametrize('mistake', list(MISTAKES))
def test_each_mistake_is_named_with_key_value_and_what_was_expected(tmp_path, capsys, mistake):
    edit, expected = MISTAKES[mistake]
    lines = _problems(capsys, _edited(tmp_path, edit))
    assert any(line.startswith(expected) for line in lines), lines
    assert os.listdir(tmp_path) == ['options.yml']


def test_all_problems_are_one_message(tmp_path, capsys):
    def edit(o):
        o['network_g']['type'] = 'Nope'
        o['train']['total_iter'] = 'abc'
        o['datasets']['train']['type'] = 'Nope'
    lines = _problems(capsys, _edited(tmp_path, edit))
    assert len(lines) == 3 and [line.split(':')[0] for line in lines] == ['network_g.type', 'datasets.train.type',
                                                                          'train.total_iter']


def test_yaml_syntax_errors_and_bad_force_yml_entries(tmp_path, capsys):
    broken = tmp_path / 'broken.yml'
    broken.write_text('name: x\nnetwork_g:\n  type: VLUNet\n   dim: 8\n')
    lines = _problems(capsys, broken)
    assert len(lines) == 1 and lines[0].startswith('not valid YAML (line 4, column 7: ')
    lines = _problems(capsys, DEMO_TRAIN, ['nosuch:key=1', 'train:total_iter', 'network_g:num_blocks=[1,'])
    assert lines[0].startswith('--force_yml nosuch:key=1: the option file has no section nosuch')
    assert lines[1].startswith('--force_yml train:total_iter: expected KEY:SUBKEY=VALUE')
    assert lines[2].startswith("--force_yml network_g:num_blocks=[1,: cannot read the value '[1,'")
    assert _problems(capsys, DEMO_TRAIN, ['train:total_iter=abc']) == [
        "train.total_iter: 'abc'; expected the number of iterations (a whole number >= 1)"]


def test_force_yml_numbers_are_numbers(monkeypatch):
    from vlunet import pipeline
    pipeline.install()  # as vlunet-train / vlunet-test do
    from basicsr.utils.options import _postprocess_yml_value, parse_options
    for text, value in (('1e10', 1e10), ('2e-4', 2e-4), ('-1', -1), ('+3', 3), ('.5', 0.5), ('7', 7)):
        got = _postprocess_yml_value(text)
        assert got == value and type(got) is type(value), (text, got)
    assert _postprocess_yml_value('abc') == 'abc' and _postprocess_yml_value('1.2.3') == '1.2.3'
    assert _options_as_run(DEMO_TRAIN, ['train:optim_g:lr=1e10'])['train']['optim_g']['lr'] == 1e10
    # and the options BasicSR itself runs with
    monkeypatch.setattr(sys, 'argv', ['train', '-opt', DEMO_TRAIN, '--force_yml', 'train:optim_g:lr=1e10',
                                      'train:warmup_iter=-1'])
    opt, _ = parse_options(REPO, is_train=True)
    assert opt['train']['optim_g']['lr'] == 1e10 and isinstance(opt['train']['optim_g']['lr'], float)
    assert opt['train']['warmup_iter'] == -1


def test_every_shipped_option_file_passes():
    for path in sorted(glob.glob(os.path.join(REPO, 'options', '*', '*.yml'))):
        problems = []
        opt = _options_as_run(path, None, problems)
        problems += option_problems(opt, is_train=f'{os.sep}train{os.sep}' in path)
        assert problems == [], (path, problems)


def test_nothing_is_created_or_archived_before_the_message(tmp_path):
    """End to end: a previous run's folder stays as it is (BasicSR would archive it on a retry)."""
    previous = tmp_path / 'experiments' / 'VLUNet_demo'
    previous.mkdir(parents=True)
    (previous / 'train.log').write_text('the previous run')
    proc = run_cli(['-m', 'vlunet.train', '-opt', DEMO_TRAIN, '--force_yml', 'network_g:type=VLUNett',
                    'train:total_iter=abc'], tmp_path)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert f'error: {DEMO_TRAIN}: 2 problems in the options (nothing was created):' in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ['experiments']
    assert os.listdir(tmp_path / 'experiments') == ['VLUNet_demo'] and os.listdir(previous) == ['train.log']
    test_opt = _edited(tmp_path, lambda o: o['network_g'].pop('type'), DEMO_TEST)
    proc = run_cli(['-m', 'vlunet.test', '-opt', test_opt], tmp_path)
    assert proc.returncode == 2 and 'network_g: ' in proc.stderr and 'expected a mapping with "type"' in proc.stderr
    assert not (tmp_path / 'results').exists()
