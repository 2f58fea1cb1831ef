"""VLUNetModel on tiny networks: stage losses, CLIP conditioning, validation metrics, metrics.json."""
import json
import os

import torch

import vlunet  # noqa: F401
from basicsr.models import build_model


def _opt(tmp_path, network_g, is_train=True, **extra):
    opt = {
        'name': 'm', 'model_type': 'VLUNetModel', 'num_gpu': 0, 'dist': False, 'is_train': is_train, 'rank': 0,
        'world_size': 1, 'network_g': network_g,
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'models': str(tmp_path / 'models'),
                 'training_states': str(tmp_path / 'states'), 'visualization': str(tmp_path / 'vis'),
                 'results_root': str(tmp_path / 'results')},
        'train': {'ema_decay': 0, 'optim_g': {'type': 'AdamW', 'lr': 1e-3}, 'total_iter': 10,
                  'scheduler': {'type': 'LinearWarmupCosineLR', 'warmup_iter': 2},
                  'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0}},
        'val': {'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 0, 'test_y_channel': False}}},
    }
    opt.update(extra)
    return opt


DGUNET = {'type': 'DGUNet', 'n_feat': 8, 'scale_unetfeats': 4, 'scale_orsnetfeats': 4, 'depth': 1}


def test_list_outputs_get_the_loss_on_every_stage(tmp_path):
    model = build_model(_opt(tmp_path, DGUNET))
    batch = {'lq': torch.rand(2, 3, 16, 16), 'gt': torch.rand(2, 3, 16, 16), 'label': torch.tensor([0, 1])}
    model.feed_data(batch)
    with torch.no_grad():
        stages = model.net_g(model.lq)
    expected = sum(torch.nn.functional.l1_loss(s, model.gt) for s in stages).item()
    model.optimize_parameters(1)
    assert abs(model.log_dict['l_pix'] - expected) < 1e-5
    assert model.output.shape == (2, 3, 16, 16)
    assert isinstance(model.optimizers[0], torch.optim.AdamW)


def test_validation_reports_restored_and_input_metrics(tmp_path, demo_images):
    from basicsr.data import build_dataloader, build_dataset
    opt = _opt(tmp_path, DGUNET, is_train=False)
    opt['val'].update(save_img=True)
    model = build_model(opt)
    ds = build_dataset({'name': 'noisy', 'type': 'AllInOneDataset', 'phase': 'val',
                        'sources': [{'name': 'n', 'label': 0, 'dataroot_gt': str(demo_images),
                                     'degradation': {'type': 'gaussian_noise', 'sigma': 25}}]})
    loader = build_dataloader(ds, {'phase': 'val'}, num_gpu=0, dist=False)
    averages = model.validation(loader, 'test', None, True) if False else model.nondist_validation(
        loader, 'test', None, True)
    assert set(averages) == {'psnr', 'input_psnr'}
    assert 19.5 < averages['input_psnr'] < 21.5  # sigma 25 on 0..255 images
    metrics = json.load(open(tmp_path / 'results' / 'metrics.json'))
    assert metrics['noisy']['images'] == len(ds) and metrics['noisy']['psnr'] == round(averages['psnr'], 6)
    assert json.load(open(tmp_path / 'results' / 'model.json'))['network_g']['type'] == 'DGUNet'
    stem = os.path.splitext(os.path.basename(ds[0]['gt_path']))[0]
    for suffix in ('m', 'lq', 'gt'):
        assert (tmp_path / 'vis' / 'noisy' / f'{stem}_{suffix}.png').is_file()


def test_tiled_validation_matches_whole_image_for_pointwise_network(tmp_path):
    net = {'type': 'DGUNet', 'n_feat': 8, 'scale_unetfeats': 4, 'scale_orsnetfeats': 4, 'depth': 1}
    opt = _opt(tmp_path, net, is_train=False)
    model = build_model(opt)
    x = torch.rand(1, 3, 45, 61)
    with torch.no_grad():
        whole = model.restore(x)
        tiled = model.restore(x, tile=32, tile_overlap=8)
    assert whole.shape == tiled.shape == x.shape
    assert (whole - tiled).abs().mean() < 0.05  # convolutional context differs only near tile borders
