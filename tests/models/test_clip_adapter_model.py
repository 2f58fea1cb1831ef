"""CLIPAdapterModel: feed_data / optimize_parameters / validation / save on a tiny in-test dataset
(random textures with noise, darkening or haze), vlunet-tiny CLIP, CPU, no downloads."""
import json
import logging
import os

import vlunet  # noqa: F401  (before basicsr)
import pytest
import torch
from basicsr.models import build_model
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from vlunet.models.clip_adapter_model import CLIPAdapterModel

PROMPTS = ['image with noise', 'image with low light', 'image with haze']


class TinyDegradations(Dataset):
    """Smooth random textures, each degraded by one of: 0 noise, 1 darkening, 2 haze."""

    def __init__(self, n, seed, size=48, name='tiny'):
        g = torch.Generator().manual_seed(seed)
        self.opt = {'name': name}
        self.items = []
        for i in range(n):
            low = torch.rand(1, 3, 6, 6, generator=g)
            gt = F.interpolate(low, size=(size, size), mode='bilinear', align_corners=False)[0]
            label = i % 3
            if label == 0:
                lq = (gt + 0.25 * torch.randn(gt.shape, generator=g)).clamp(0, 1)
            elif label == 1:
                lq = gt * 0.2
            else:
                lq = 0.35 * gt + 0.65 * 0.85
            self.items.append({'lq': lq, 'gt': gt, 'label': label, 'lq_path': f'{i}.png', 'gt_path': f'{i}.png'})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, idx):
        return self.items[idx]


def make_opt(tmp_path, **train_overrides):
    train = {
        'contrastive_opt': {'type': 'DegradationContrastiveLoss'},
        'optim_g': {'type': 'Adam', 'lr': 1e-3},
        'scheduler': {'type': 'MultiStepLR', 'milestones': [1000], 'gamma': 0.5},
        'total_iter': 1000,
    }
    train.update(train_overrides)
    for sub in ('models', 'training_states'):
        os.makedirs(tmp_path / sub, exist_ok=True)
    return {
        'name': 'clip_test', 'model_type': 'CLIPAdapterModel', 'num_gpu': 0, 'is_train': True, 'dist': False,
        'rank': 0, 'world_size': 1,
        'network_g': {'type': 'DegradationCLIP', 'clip_model': 'vlunet-tiny', 'pretrained': None, 'prompts': PROMPTS},
        'path': {'models': str(tmp_path / 'models'), 'training_states': str(tmp_path / 'training_states'),
                 'pretrain_network_g': None},
        'train': train,
        'val': {'metrics': {'accuracy': {'better': 'higher'}}},
    }


def build(tmp_path, seed=0, **train_overrides):
    torch.manual_seed(seed)
    return build_model(make_opt(tmp_path, **train_overrides))


def test_train_steps_change_only_adapters_and_learn_the_task(tmp_path):
    model = build(tmp_path)
    assert isinstance(model, CLIPAdapterModel)
    net = model.net_g
    backbone = {k: v.clone() for k, v in net.clip.state_dict().items()}
    adapter = net.image_adapter[0].weight.detach().clone()
    n_opt = sum(p.numel() for group in model.optimizer_g.param_groups for p in group['params'])
    assert n_opt == 1_582_080

    loader = DataLoader(TinyDegradations(24, seed=1), batch_size=12, shuffle=True)
    losses = []
    for it in range(1, 21):
        for batch in loader:
            model.feed_data(batch)
            model.optimize_parameters(it)
            losses.append(model.get_current_log()['l_contrastive'])
    assert set(model.get_current_log()) == {'l_contrastive', 'acc'}
    assert all(torch.equal(v, backbone[k]) for k, v in net.clip.state_dict().items())
    assert not torch.equal(net.image_adapter[0].weight, adapter)
    assert sum(losses[-4:]) < 0.5 * sum(losses[:4])

    val_loader = DataLoader(TinyDegradations(12, seed=2, name='tiny_val'), batch_size=1)
    model.validation(val_loader, current_iter=30, tb_logger=None, save_img=False)
    assert model.metric_results['accuracy'] >= 0.9


def test_validation_accuracy_and_confusion_matrix(tmp_path, caplog):
    model = build(tmp_path)
    dataset = TinyDegradations(9, seed=3, name='tiny_val')
    loader = DataLoader(dataset, batch_size=1)
    with caplog.at_level(logging.INFO, logger='basicsr'):
        logging.getLogger('basicsr').propagate = True
        model.validation(loader, current_iter=7, tb_logger=None, save_img=False)

    expected = torch.zeros(3, 3, dtype=torch.long)
    for item in dataset:
        model.feed_data({'lq': item['lq'][None], 'label': torch.tensor([item['label']])})
        model.test()
        expected[item['label'], int(model.pred)] += 1
        torch.testing.assert_close(model.output.sum(), torch.tensor(1.0))
    assert torch.equal(model.confusion_matrix, expected)
    assert model.metric_results['accuracy'] == pytest.approx(float(expected.trace()) / 9)
    best = model.best_metric_results['tiny_val']['accuracy']
    assert best['iter'] == 7 and best['val'] == pytest.approx(model.metric_results['accuracy'])

    table = model.confusion_table()
    rows = table.splitlines()
    assert len(rows) == 4 and rows[1].startswith('[0] image with noise') and rows[3].startswith('[2] image with haze')
    assert [int(v) for v in rows[2].split()[-4:-1]] == expected[1].tolist()
    assert 'accuracy' in caplog.text and 'image with low light' in caplog.text

    model.opt['dist'] = True  # distributed validation falls back to rank 0 running the whole set
    model.dist_validation(loader, current_iter=8, tb_logger=None, save_img=False)
    assert torch.equal(model.confusion_matrix, expected)


def test_feed_data_prefers_prompt_index_and_checks_labels(tmp_path):
    model = build(tmp_path)
    lq = torch.rand(2, 3, 32, 32)
    model.feed_data({'lq': lq, 'label': torch.tensor([0, 1]), 'prompt_index': torch.tensor([2, 2]), 'gt': lq})
    assert model.label.tolist() == [2, 2]
    with pytest.raises(ValueError, match=r"label values \[3\] out of range.*3 prompts.*image with haze"):
        model.feed_data({'lq': lq, 'label': torch.tensor([0, 3])})
    with pytest.raises(KeyError, match='label'):
        model.feed_data({'lq': lq})


def test_save_writes_basicsr_and_published_checkpoints_and_reloads(tmp_path):
    model = build(tmp_path)
    model.feed_data({'lq': torch.rand(3, 3, 32, 32), 'label': torch.tensor([0, 1, 2])})
    model.optimize_parameters(1)
    model.save(epoch=0, current_iter=5)
    models = tmp_path / 'models'
    assert sorted(os.listdir(models)) == ['clip_adapters_5.pth', 'net_g_5.pth']
    assert os.path.isfile(tmp_path / 'training_states' / '5.state')
    published = torch.load(models / 'clip_adapters_5.pth', weights_only=True)['learnable_params']
    assert len(published) == 24
    assert torch.equal(published['ad_textEncoder.adapter.3.weight'], model.net_g.text_adapter[3].weight)

    # the published-format file holds adapters only: it needs the same (here: same-seed random) backbone;
    # net_g holds the backbone too, since a random backbone cannot be rebuilt from `pretrained`
    for path, seed in (('clip_adapters_5.pth', 0), ('net_g_5.pth', 123)):
        opt = make_opt(tmp_path)
        opt['path']['pretrain_network_g'] = str(models / path)
        opt['is_train'] = False
        torch.manual_seed(seed)
        other = build_model(opt)
        x = torch.rand(2, 3, 40, 40)
        other.net_g.eval()
        model.net_g.eval()
        with torch.no_grad():
            torch.testing.assert_close(other.net_g(x), model.net_g(x), rtol=0, atol=0)


def test_learnable_temperature_is_optimised_and_saved(tmp_path):
    model = build(tmp_path, contrastive_opt={'type': 'DegradationContrastiveLoss', 'normalize': True,
                                             'temperature': 0.1, 'learnable_temperature': True})
    assert model.normalize
    scale = model.cri_contrastive.logit_scale
    assert any(p is scale for p in model.optimizer_g.param_groups[0]['params'])
    before = scale.item()
    model.feed_data({'lq': torch.rand(3, 3, 32, 32), 'label': torch.tensor([0, 1, 2])})
    model.optimize_parameters(1)
    assert scale.item() != before
    model.save(epoch=0, current_iter=2)
    assert os.path.isfile(tmp_path / 'models' / 'contrastive_loss_2.pth')


def test_missing_loss_option_is_reported(tmp_path):
    opt = make_opt(tmp_path)
    del opt['train']['contrastive_opt']
    with pytest.raises(ValueError, match='train.contrastive_opt'):
        build_model(opt)


def test_demo_option_file_trains_validates_and_saves_through_vlunet_train(tmp_path):
    """CLIPAdapter_demo.yml through vlunet-train, then the two-stage VLU-Net demo on what it wrote."""
    from conftest import REPO, TINY_DEMO, run_cli
    demo = os.path.join(REPO, 'options', 'train', 'CLIPAdapter_demo.yml')
    proc = run_cli(['-m', 'vlunet.train', '-opt', demo, '--force_yml', 'train:total_iter=2', 'val:val_freq=2',
                    'logger:save_checkpoint_freq=2', 'logger:use_tb_logger=false', 'logger:print_freq=1',
                    'datasets:train:batch_size_per_gpu=2', 'datasets:train:gt_size=32'], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert 'Validation demo_val' in log and '# accuracy:' in log
    assert '[5] image with low light' in log  # confusion matrix rows = the demo's prompts
    models = tmp_path / 'experiments' / 'CLIPAdapter_demo' / 'models'
    assert {'net_g_2.pth', 'clip_adapters_2.pth'} <= set(os.listdir(models))
    assert (tmp_path / 'experiments' / 'CLIPAdapter_demo' / 'training_states' / '2.state').is_file()
    state = torch.load(models / 'net_g_2.pth', weights_only=True)['params']
    assert any(k.startswith('clip.') for k in state)  # trained-from-scratch backbone is saved with the adapters

    # stage 2: VLU-Net with that CLIP frozen (options/train/VLUNet_demo_two_stage.yml), then its test file
    stage2 = os.path.join(REPO, 'options', 'train', 'VLUNet_demo_two_stage.yml')
    proc = run_cli(['-m', 'vlunet.train', '-opt', stage2, '--force_yml', 'train:total_iter=2',
                    'logger:save_checkpoint_freq=2', *TINY_DEMO,
                    'network_clip:load_path=experiments/CLIPAdapter_demo/models/net_g_2.pth'], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert 'Loaded CLIP weights from experiments/CLIPAdapter_demo/models/net_g_2.pth' in log
    saved = set(os.listdir(tmp_path / 'experiments' / 'VLUNet_demo_two_stage' / 'models'))
    assert 'net_g_latest.pth' in saved and not any(f.startswith('net_clip') for f in saved)  # CLIP stayed frozen
    test_file = os.path.join(REPO, 'options', 'test', 'VLUNet_demo_two_stage.yml')
    proc = run_cli(['-m', 'vlunet.test', '-opt', test_file, '--force_yml', 'network_g:dim=10', 'val:save_img=false',
                    'network_clip:load_path=experiments/CLIPAdapter_demo/models/net_g_2.pth'], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / 'results' / 'VLUNet_demo_two_stage' / 'metrics.json') as f:
        assert len(json.load(f)) == 6


def test_two_stage_demo_without_the_clip_stage_names_what_to_run(tmp_path):
    from conftest import REPO, TINY_DEMO, run_cli
    stage2 = os.path.join(REPO, 'options', 'train', 'VLUNet_demo_two_stage.yml')
    proc = run_cli(['-m', 'vlunet.train', '-opt', stage2, '--force_yml', 'train:total_iter=2', *TINY_DEMO], tmp_path)
    assert proc.returncode == 2
    assert 'network_clip.load_path: experiments/CLIPAdapter_demo/models/net_g_latest.pth' in proc.stderr
    assert 'CLIPAdapter_demo.yml' in proc.stderr
    assert os.listdir(tmp_path) == []  # refused before BasicSR created experiments/ or tb_logger/


def test_accumulated_micro_batches_give_the_large_batch_step(tmp_path):
    g = torch.Generator().manual_seed(4)
    batch = {'lq': torch.rand(4, 3, 32, 32, generator=g, dtype=torch.float64), 'label': torch.tensor([0, 1, 2, 1])}
    results = {}
    for accumulate in (1, 2):
        model = build(tmp_path, accumulate_grad_batches=accumulate,
                      contrastive_opt={'type': 'DegradationContrastiveLoss', 'normalize': True,
                                       'temperature': 0.07, 'learnable_temperature': True})
        model.net_g.double()
        model.cri_contrastive.double()
        model.feed_data(batch)
        model.optimize_parameters(1)
        results[accumulate] = ({k: v.clone() for k, v in model.net_g.adapter_state_dict().items()},
                               model.cri_contrastive.logit_scale.detach().clone(), model.log_dict)
    one, two = results[1], results[2]
    assert max((one[0][k] - two[0][k]).abs().max().item() for k in one[0]) < 1e-10
    assert abs(one[1] - two[1]).item() < 1e-12
    assert one[2]['l_contrastive'] == pytest.approx(two[2]['l_contrastive'], abs=1e-10)
    assert one[2]['acc'] == two[2]['acc']
