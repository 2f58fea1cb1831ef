"""--precision and --max-memory through the one engine: vlunet-restore, vlunet-test's option translation
and the app's status (tiny networks; the memory model is measured for real once, or stood in where a
test needs a given one)."""
import json

import cv2
import numpy as np
import pytest
import torch

import vlunet  # noqa: F401
from vlunet.archs.card import get_card
from vlunet.inference import RestorationEngine, check_precision, precision_problem
from vlunet.inference import engine as engine_module
from vlunet.inference.memory import MemoryBudgetError, MemoryModel
from vlunet.utils.tiling import tiled_forward

from conftest import write_yaml

TINY = {'type': 'Restormer', 'dim': 8, 'num_blocks': [1, 1, 1, 1], 'num_refinement_blocks': 1, 'heads': [1, 1, 1, 1]}
MiB = 2**20


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('VLUNET_CACHE_DIR', str(tmp_path / 'cache'))
    from vlunet.inference import memory
    monkeypatch.setattr(memory, '_MODELS', {})


def _engine(**kwargs):
    card = get_card('Restormer')
    torch.manual_seed(0)
    net = card.arch_class(**{k: v for k, v in TINY.items() if k != 'type'})
    return RestorationEngine(net, **kwargs)


def _model_files(tmp_path):
    torch.manual_seed(0)
    net = get_card('Restormer').arch_class(**{k: v for k, v in TINY.items() if k != 'type'})
    torch.save({'params': net.state_dict()}, tmp_path / 'net_g.pth')
    return write_yaml(tmp_path / 'opt.yml', {'name': 't', 'network_g': TINY,
                                             'path': {'pretrain_network_g': str(tmp_path / 'net_g.pth')}})


def _stand_in_model(monkeypatch, per_pixel):
    """Every engine's memory model is this one (a network needing ``per_pixel`` bytes per pixel)."""
    monkeypatch.setattr(engine_module, 'cached_model', lambda description, measure: MemoryModel(0.0, per_pixel))


# ------------------------------------------------------------------------------------------------ precision
def test_fp16_is_refused_where_the_cpu_has_no_float16_arithmetic(monkeypatch):
    monkeypatch.setattr(torch.cpu, '_is_amx_fp16_supported', lambda: False, raising=False)
    problem = precision_problem('fp16', 'cpu')
    assert problem and '--precision fp16' in problem and 'bf16' in problem and 'fp32' in problem
    with pytest.raises(ValueError, match='no float16 arithmetic'):
        _engine(precision='fp16')
    monkeypatch.setattr(torch.cpu, '_is_amx_fp16_supported', lambda: True, raising=False)
    assert precision_problem('fp16', 'cpu') is None
    assert precision_problem('bf16', 'cpu') is None and precision_problem('fp32', 'cpu') is None
    with pytest.raises(ValueError, match="'fp8' is not a precision"):
        check_precision('fp8', 'cpu')


def test_bf16_restores_close_to_fp32():
    rgb = np.random.default_rng(0).random((40, 52, 3), dtype=np.float32)
    full, half = _engine().restore(rgb), _engine(precision='bf16').restore(rgb)
    assert half.precision == 'bf16' and full.precision == 'fp32'
    assert half.image.shape == rgb.shape and np.isfinite(half.image).all()
    assert 0 < np.abs(half.image - full.image).max() < 0.05  # bf16 computed (it differs), and stays close


# ------------------------------------------------------------------------------------------------ the budget
def test_an_image_that_does_not_fit_runs_in_the_tiles_the_budget_allows(monkeypatch):
    _stand_in_model(monkeypatch, per_pixel=50_000.0)  # 100x90 px whole = 0.45 GB more than what is held
    engine = _engine()
    in_use = engine_module.MemoryMeter('cpu').in_use()
    engine.max_memory = in_use + 300 * MiB   # room for ~ 6000 px tiles (and the image buffers)
    rgb = np.random.default_rng(1).random((90, 100, 3), dtype=np.float32)
    result = engine.restore(rgb, name='photo.png')
    assert result.tiles > 1 and result.tile and result.tile % 8 == 0 and result.tile < 100
    assert f'tiles of {result.tile} px' in result.tiling and 'tiled by the memory budget' in result.tiling
    lq = torch.from_numpy(rgb.transpose(2, 0, 1).copy())[None]
    with torch.no_grad():
        expected = tiled_forward(engine.net_g, lq, result.tile, engine.tile_overlap)[0].clamp(0, 1)
    np.testing.assert_allclose(result.image, expected.permute(1, 2, 0).numpy(), atol=1e-6)
    small = engine.restore(rgb[:40, :40])
    assert small.tiles == 1 and small.tile is None and 'whole image' in small.tiling
    engine.max_memory = in_use + MiB
    with pytest.raises(MemoryBudgetError, match=r'photo.png \(100x90\) does not fit the memory budget'):
        engine.restore(rgb, name='photo.png')


def test_the_memory_model_is_measured_from_a_real_forward():
    model = _engine().memory_model()
    assert model.per_pixel > 0 and len(model.samples) == 2
    assert model.samples[1][1] > model.samples[0][1]  # the larger calibration forward needs more


# ------------------------------------------------------------------------------------------------ vlunet-restore
def _restore(args, capsys):
    from vlunet.restore import main
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def test_restore_reports_precision_and_how_each_image_was_tiled(tmp_path, capsys, monkeypatch):
    opt = _model_files(tmp_path)
    folder = tmp_path / 'in'
    folder.mkdir()
    rng = np.random.default_rng(0)
    cv2.imwrite(str(folder / 'big.png'), rng.integers(0, 256, (96, 120, 3), dtype=np.uint8))
    cv2.imwrite(str(folder / 'small.png'), rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    _stand_in_model(monkeypatch, per_pixel=50_000.0)
    from vlunet.inference.memory import resident_bytes
    budget = (resident_bytes() + 600 * MiB) // MiB  # far more than the tiny network needs: room only for tiles
    status, out, err = _restore(['-opt', opt, '-i', folder, '-o', tmp_path / 'out', '--device', 'cpu', '--precision',
                                 'bf16', '--max-memory', f'{budget}M'], capsys)
    assert status == 0, err
    report = json.load(open(tmp_path / 'out' / 'report.json'))
    rows = {r['image']: r for r in report['images']}
    assert report['precision'] == 'bf16' and report['max_memory'] == f'{budget}M' and report['backend'] == 'pytorch'
    assert rows['big.png']['tiles'] > 1 and 'tiled by the memory budget' in rows['big.png']['tiling']
    assert rows['small.png']['tiles'] == 1 and rows['small.png']['tiling'].startswith('whole image')
    assert all(r['precision'] == 'bf16' for r in rows.values())
    assert 'big.png: ' in out and 'tiles of' in out
    assert cv2.imread(str(tmp_path / 'out' / 'big.png')).shape == (96, 120, 3)
    header = open(tmp_path / 'out' / 'report.csv').readline()
    assert 'tiles' in header and 'tiling' in header and 'precision' in header


def test_restore_skips_an_image_no_tile_fits_and_names_it(tmp_path, capsys, monkeypatch):
    opt = _model_files(tmp_path)
    folder = tmp_path / 'in'
    folder.mkdir()
    cv2.imwrite(str(folder / 'a.png'), np.zeros((64, 64, 3), np.uint8))
    _stand_in_model(monkeypatch, per_pixel=10 * MiB)
    from vlunet.inference.memory import resident_bytes
    budget = (resident_bytes() + 64 * MiB) // MiB
    status, out, err = _restore(['-opt', opt, '-i', folder, '-o', tmp_path / 'out', '--device', 'cpu',
                                 '--max-memory', f'{budget}M'], capsys)
    assert status == 0, err
    skipped = json.load(open(tmp_path / 'out' / 'report.json'))['skipped']
    assert skipped[0]['file'] == 'a.png' and 'does not fit the memory budget' in skipped[0]['reason']


@pytest.mark.parametrize('extra,message', [
    (['--max-memory', '3X'], "--max-memory: '3X' is not a memory size"),
    (['--max-memory', '3G', '--tile', '64'], '--tile and --max-memory: give one'),
    (['--backend', 'onnxruntime'], '--backend onnxruntime needs --onnx'),
    (['--onnx', 'x.onnx', '--backend', 'pytorch'], '--onnx is read by --backend onnxruntime'),
])
def test_option_mistakes_are_one_clear_error(tmp_path, capsys, extra, message):
    opt = _model_files(tmp_path)
    (tmp_path / 'in').mkdir()
    status, _, err = _restore(['-opt', opt, '-i', tmp_path / 'in', '-o', tmp_path / 'out', *extra], capsys)
    assert status == 2 and message in err
    assert not (tmp_path / 'out').exists()


def test_fp16_on_this_cpu_is_refused_before_the_model_is_read(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cpu, '_is_amx_fp16_supported', lambda: False, raising=False)
    (tmp_path / 'in').mkdir()
    status, _, err = _restore(['-opt', tmp_path / 'missing.yml', '-i', tmp_path / 'in', '-o', tmp_path / 'out',
                               '--device', 'cpu', '--precision', 'fp16'], capsys)
    assert status == 2 and 'no float16 arithmetic' in err and 'missing.yml' not in err


def test_a_budget_lifts_the_default_pixel_limit_to_what_it_allows():
    from vlunet.inference.memory import budget_pixel_limit, parse_memory
    assert budget_pixel_limit(parse_memory('3G')) > 4032 * 3024 > 2048 * 2048


# ------------------------------------------------------------------------------------------------ vlunet-test, app
def test_vlunet_test_options_become_val_options(tmp_path, capsys):
    from vlunet.cli_common import inference_options
    opt = write_yaml(tmp_path / 'test.yml', {'name': 't', 'val': {'metrics': {}}})
    argv = inference_options(['-opt', opt, '--precision', 'bf16', '--max-memory', '2G', '--force_yml', 'name=u'])
    assert argv[:2] == ['-opt', opt]
    assert argv[argv.index('--force_yml') + 1:] == ['name=u', 'val:amp=bf16', f'val:max_memory={2 * 2**30}']
    assert inference_options(['-opt', opt]) == ['-opt', opt]
    bare = write_yaml(tmp_path / 'bare.yml', {'name': 't'})
    with pytest.raises(SystemExit):
        inference_options(['-opt', bare, '--precision', 'bf16'])
    assert 'has no val section' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        inference_options(['-opt', opt, '--max-memory', 'lots'])
    assert "'lots' is not a memory size" in capsys.readouterr().err


def test_the_model_forwards_within_val_max_memory(monkeypatch):
    """VLUNetModel.test passes val.max_memory to the engine: a stand-in budget tiles the batch."""
    from basicsr.models import build_model
    _stand_in_model(monkeypatch, per_pixel=50_000.0)
    opt = {'name': 't', 'model_type': 'VLUNetModel', 'num_gpu': 0, 'dist': False, 'is_train': False, 'rank': 0,
           'world_size': 1, 'network_g': TINY, 'path': {'pretrain_network_g': None, 'strict_load_g': True},
           'val': {'max_memory': None}}
    model = build_model(opt)
    calls = []
    original = engine_module.RestorationEngine.tiling_for

    def spy(self, *args, **kwargs):
        found = original(self, *args, **kwargs)
        calls.append(found)
        return found
    monkeypatch.setattr(engine_module.RestorationEngine, 'tiling_for', spy)
    model.opt['val']['max_memory'] = engine_module.MemoryMeter('cpu').in_use() + 300 * MiB
    model.lq = torch.rand(1, 3, 90, 100)
    model.label = None
    model.test()
    assert calls and calls[-1][0] is not None and model.output.shape == (1, 3, 90, 100)


def test_the_app_status_says_how_an_image_was_tiled():
    from types import SimpleNamespace

    from vlunet.app import _status
    restoration = SimpleNamespace(seconds=1.0, report={}, tiles=6, top_type='',
                                  tiling='6 tiles of 48 px (32 px overlap): tiled by the memory budget')
    result = SimpleNamespace(name='a.png', width=100, height=90, kind='RGB, 8-bit', restoration=restoration)
    assert 'tiled by the memory budget' in _status([result], [], 1.0, None)
