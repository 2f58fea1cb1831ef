"""CDD-11 for every method: a tiny CDD-11-layout folder is prepared once, then each method's own CDD-11
option files (read from the method cards) train it one step and test it under the one recorded CDD-11
protocol, and vlunet-compare puts every method into one table (the mean of the 11 per-type means).

The runs are in-process (vlunet-train / vlunet-test's own entry, BasicSR's pipelines) with the tiny
network of each card; networks that take a CLIP embedding use the tiny CLIP configuration."""
import json
import os
import shutil

import numpy as np
import pytest

from vlunet.archs.card import list_variants
from vlunet.archs.conditioning import DEGRADATION_EMBEDDING, TEXT_EMBEDDING
from vlunet.cli_common import run_pipeline
from vlunet.compare import build_table, check_protocols, load_result
from vlunet.data import prepare

from conftest import REPO
from test_cdd11 import TYPES, make_cdd11

STEMS = [(card, v.options) for card, v in list_variants() if v.options and v.released_for('CDD11')
         and os.path.isfile(os.path.join(REPO, 'options', 'train', f'{v.options}_CDD11.yml'))]


def _overrides(card):
    tiny = [f'network_g:{k}={json.dumps(v)}' for k, v in card.tiny.items() if k != 'de_dim']
    if card.condition == DEGRADATION_EMBEDDING:  # the tiny CLIP configuration (no weights), no CLIP stage file
        tiny += ['network_clip:clip_model=vlunet-tiny', 'network_clip:pretrained=~', 'network_clip:load_path=~']
    if card.condition == TEXT_EMBEDDING:
        tiny += ['text_embedding:clip_model=vlunet-tiny', 'text_embedding:pretrained=~', 'text_embedding:cache=~']
    return tiny


def test_every_method_trains_tests_and_compares_under_the_cdd11_protocol(tmp_path, monkeypatch):
    import torch
    torch.set_num_threads(1)
    names = ['000001.png', '000002.png']
    make_cdd11(tmp_path / 'dl' / 'train', names, seed=4)
    make_cdd11(tmp_path / 'dl' / 'test', names[:1], seed=5)
    monkeypatch.chdir(tmp_path)
    for split in ('train', 'test'):
        assert prepare.main(['--task', 'cdd11', '--split', split, '--src', 'dl', '--out', 'datasets']) == 0
    results = []
    for card, stem in STEMS:
        run_pipeline('train_pipeline', ['-opt', os.path.join(REPO, 'options', 'train', f'{stem}_CDD11.yml'),
                                        '--force_yml', 'train:total_iter=1', 'datasets:train:gt_size=32',
                                        'datasets:train:batch_size_per_gpu=2', 'datasets:train:num_worker_per_gpu=0',
                                        'val:val_freq=1000', 'logger:use_tb_logger=false', 'logger:print_freq=1',
                                        'logger:save_checkpoint_freq=1', *_overrides(card)])
        assert os.path.isfile(f'experiments/{stem}_CDD11/models/net_g_latest.pth'), stem
        run_pipeline('test_pipeline', ['-opt', os.path.join(REPO, 'options', 'test', f'{stem}_CDD11.yml'),
                                       '--force_yml', 'val:pbar=false', *_overrides(card)])
        results.append(load_result(f'results/{stem}_CDD11'))
        shutil.rmtree(f'experiments/{stem}_CDD11')  # its checkpoints (up to 300 MB) are not read again
        metrics = results[-1]['metrics']
        assert sorted(metrics) == sorted(f'CDD11_{t}' for t in TYPES), stem
        assert all(np.isfinite(m['psnr']) and m['protocol']['crop'] == 'none' for m in metrics.values()), stem
    check_protocols(results)  # one recorded protocol for all: raises otherwise
    rows, sets = build_table(results, with_gmacs=False)
    assert len(sets) == len(TYPES) and len(rows) == len(STEMS) + 1  # the degraded inputs' row, then a row each
    for row, result in zip(rows[1:], results):
        psnr = [result['metrics'][s]['psnr'] for s in sets]
        assert row['average'][0] == pytest.approx(np.mean(psnr), abs=1e-9)
