"""One optimizer step: accumulation equals the large batch, clipping, fp16 scaler state, non-finite
losses, compiled networks keep their checkpoint keys (model level, float64, tiny networks)."""
import copy

import pytest
import torch

import vlunet  # noqa: F401
from basicsr.models import build_model
from vlunet.models.train_step import NonFiniteLossError, TrainStep, parse_amp, split_batch

TINY = {'type': 'Restormer', 'dim': 8, 'num_blocks': [1, 1, 1, 1], 'num_refinement_blocks': 1, 'heads': [1, 2, 2, 4]}
DGUNET = {'type': 'DGUNet', 'n_feat': 8, 'scale_unetfeats': 4, 'scale_orsnetfeats': 4, 'depth': 1}


def _opt(tmp_path, network_g=TINY, **train):
    train_opt = {'ema_decay': 0, 'optim_g': {'type': 'AdamW', 'lr': 1e-3}, 'total_iter': 10,
                 'scheduler': {'type': 'LinearWarmupCosineLR', 'warmup_iter': 0},
                 'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0}}
    train_opt.update(train)
    return {'name': 'm', 'model_type': 'VLUNetModel', 'num_gpu': 0, 'dist': False, 'is_train': True, 'rank': 0,
            'world_size': 1, 'network_g': dict(network_g),
            'path': {'pretrain_network_g': None, 'strict_load_g': True, 'models': str(tmp_path / 'models'),
                     'training_states': str(tmp_path / 'states'), 'visualization': str(tmp_path / 'vis')},
            'train': train_opt, 'val': {}}


def _model(tmp_path, state=None, network_g=TINY, **train):
    torch.manual_seed(0)
    model = build_model(_opt(tmp_path, network_g, **train))
    model.net_g.double()  # parameters keep their identity: the optimizer still holds them
    if state is not None:
        model.net_g.load_state_dict(state)
    return model


def _batch(n, seed=1, size=16):
    g = torch.Generator().manual_seed(seed)
    return {'lq': torch.rand(n, 3, size, size, generator=g, dtype=torch.float64),
            'gt': torch.rand(n, 3, size, size, generator=g, dtype=torch.float64),
            'label': torch.arange(n) % 3}


def _weights(model):
    return {k: v.detach().clone() for k, v in model.get_bare_model(model.net_g).state_dict().items()}


@pytest.mark.parametrize('network_g', [TINY, DGUNET])
def test_one_step_with_accumulation_equals_the_large_batch(tmp_path, network_g):
    start = _weights(_model(tmp_path, network_g=network_g))
    batch = _batch(4)
    results = {}
    for name, accumulate, n in (('batch4', 1, 4), ('batch2x2', 2, 4), ('batch2', 1, 2)):
        model = _model(tmp_path, start, network_g=network_g, accumulate_grad_batches=accumulate)
        model.feed_data({k: v[:n] for k, v in batch.items()})
        for it in (1, 2):
            model.optimize_parameters(it)
        results[name] = (_weights(model), model.log_dict['l_pix'])
    big, acc, small = results['batch4'][0], results['batch2x2'][0], results['batch2'][0]
    assert max((big[k] - acc[k]).abs().max().item() for k in big) < 1e-10
    assert max((big[k] - small[k]).abs().max().item() for k in big) > 1e-6  # a plain half batch differs
    assert results['batch4'][1] == pytest.approx(results['batch2x2'][1], abs=1e-10)  # logged loss: the batch mean


def test_uneven_split_weights_micro_batches_by_size():
    parts = split_batch([torch.arange(5), torch.arange(5) * 2, None], 2)
    assert [w for w, _ in parts] == [0.6, 0.4]
    assert parts[0][1][0].tolist() == [0, 1, 2] and parts[1][1][1].tolist() == [6, 8] and parts[0][1][2] is None
    with pytest.raises(ValueError, match='accumulate_grad_batches'):
        split_batch([torch.arange(2)], 3)


def test_clipping_bounds_the_gradient_norm(tmp_path):
    model = _model(tmp_path, grad_clip_norm=1e-3)
    model.feed_data(_batch(2))
    model.optimize_parameters(1)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.net_g.parameters()
                                                 if p.grad is not None]))
    assert model.train_step.last_grad_norms[0] > 1e-3  # it was larger before clipping
    assert norm.item() <= 1e-3 * (1 + 1e-6)
    restormer_fork = TrainStep({'use_grad_clip': True}, torch.device('cpu'))
    assert restormer_fork.grad_clip_norm == 0.01
    with pytest.raises(ValueError, match='grad_clip_norm'):
        TrainStep({'grad_clip_norm': -1}, torch.device('cpu'))


def test_amp_option_values():
    assert parse_amp('bf16', 'train.amp') is torch.bfloat16 and parse_amp('fp16', 'x') is torch.float16
    assert parse_amp(False, 'x') is None and parse_amp(None, 'x') is None
    with pytest.raises(ValueError, match='train.amp.*fp8'):
        parse_amp('fp8', 'train.amp')


def test_fp16_scaler_state_is_saved_and_restored(tmp_path):
    model = build_model(_opt(tmp_path, amp='fp16'))
    assert model.train_step.scaler.is_enabled()
    for it in (1, 2, 3):
        model.feed_data({k: (v.float() if v.is_floating_point() else v) for k, v in _batch(2).items()})
        model.optimize_parameters(it)
    model.train_step.scaler.update(1024.0)  # a scale a fresh scaler (65536) does not have
    (tmp_path / 'states').mkdir()
    model.save_training_state(0, 3)
    state = torch.load(tmp_path / 'states' / '3.state', weights_only=True)
    saved = state['train_step']['grad_scaler']
    assert saved['scale'] == 1024.0 and '_growth_tracker' in saved
    fresh = build_model(_opt(tmp_path, amp='fp16'))
    assert fresh.train_step.scaler.get_scale() != 1024.0
    fresh.resume_training(state)
    assert fresh.train_step.scaler.state_dict() == model.train_step.scaler.state_dict()
    assert all(p.dtype == torch.float32 for p in fresh.net_g.parameters())  # fp32 weights under fp16 autocast


def test_bf16_autocast_trains_with_fp32_weights(tmp_path):
    model = build_model(_opt(tmp_path, amp='bf16'))
    before = _weights(model)
    model.feed_data({k: (v.float() if v.is_floating_point() else v) for k, v in _batch(2).items()})
    model.optimize_parameters(1)
    after = _weights(model)
    assert all(v.dtype == torch.float32 for v in after.values())
    assert any((before[k] - after[k]).abs().max() > 0 for k in before)


def test_nonfinite_loss_stops_before_any_update_or_is_skipped(tmp_path):
    model = _model(tmp_path)
    before = _weights(model)
    bad = _batch(2)
    bad['gt'][0, 0, 0, 0] = float('nan')
    model.feed_data(bad)
    with pytest.raises(NonFiniteLossError, match=r'iteration 7: non-finite loss \(l_pix = nan\)'):
        model.optimize_parameters(7)
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())

    model = _model(tmp_path, before, nonfinite_loss='skip')
    model.feed_data(bad)
    model.optimize_parameters(1)
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())
    assert model.train_step.skipped == 1 and model.log_dict['skipped_steps'] == 1
    model.feed_data(_batch(2))
    model.optimize_parameters(2)  # the next finite step trains
    assert any(not torch.equal(before[k], v) for k, v in _weights(model).items())
    with pytest.raises(ValueError, match='nonfinite_loss'):
        _model(tmp_path, nonfinite_loss='ignore')


def test_compiled_network_saves_the_plain_keys(tmp_path):
    model = build_model(_opt(tmp_path, compile={'backend': 'eager'}))
    assert type(model.net_g).__name__ == 'OptimizedModule'
    model.feed_data({k: (v.float() if v.is_floating_point() else v) for k, v in _batch(2).items()})
    model.optimize_parameters(1)
    (tmp_path / 'models').mkdir()
    model.save_network(model.net_g, 'net_g', 1)
    saved = torch.load(tmp_path / 'models' / 'net_g_1.pth', weights_only=True)['params']
    plain = vlunet.archs.restormer_arch.Restormer(**{k: v for k, v in TINY.items() if k != 'type'})
    assert list(saved) == list(plain.state_dict())
    plain.load_state_dict(saved, strict=True)


def test_clip_adapters_trained_alongside_accumulate_too(tmp_path):
    clip = {'type': 'DegradationCLIP', 'clip_model': 'vlunet-tiny', 'pretrained': None, 'prompts': ['a', 'b', 'c'],
            'freeze_backbone': False}
    vl = {'type': 'VLUNet', 'de_dim': 3, 'dim': 10, 'num_blocks': [1, 1, 1, 1], 'num_refinement_blocks': 1,
          'heads': [1, 1, 1, 1]}
    results = {}
    for accumulate in (1, 2):
        opt = _opt(tmp_path, vl, accumulate_grad_batches=accumulate, clip_opt={'type': 'DegradationContrastiveLoss'},
                   optim_clip={'type': 'Adam', 'lr': 1e-3})
        opt['network_clip'] = clip
        torch.manual_seed(0)
        model = build_model(opt)
        model.net_g.double()
        model.net_clip.double()
        if accumulate == 1:
            start = (copy.deepcopy(model.net_g.state_dict()), copy.deepcopy(model.net_clip.state_dict()))
        else:
            model.net_g.load_state_dict(start[0])
            model.net_clip.load_state_dict(start[1])
        model.feed_data(_batch(4, size=32))
        model.optimize_parameters(1)
        results[accumulate] = ({k: v.clone() for k, v in model.net_g.state_dict().items()},
                               {k: v.clone() for k, v in model.net_clip.state_dict().items()})
    net_g, net_clip = (max((a[k] - b[k]).abs().max().item() for k in a) for a, b in zip(results[1], results[2]))
    assert net_g < 1e-10
    # the key biases of CLIP's attention have a gradient that is zero in exact arithmetic; its rounding
    # noise (~1e-15) differs with the split and Adam's first step magnifies it: 1e-9 still rules out logic errors
    assert net_clip < 1e-9


def test_bf16_training_loss_decreases_on_demo_images(tmp_path, demo_images):
    from basicsr.data import build_dataset
    ds = build_dataset({'name': 'demo', 'type': 'AllInOneDataset', 'phase': 'train', 'gt_size': 32,
                        'sources': [{'name': 'noise', 'label': 0, 'dataroot_gt': str(demo_images),
                                     'degradation': {'type': 'gaussian_noise_uint8', 'sigma': 50}}]})
    torch.manual_seed(0)
    items = [ds[i] for i in range(4)]
    batch = {k: torch.stack([it[k] for it in items]) for k in ('lq', 'gt')}
    batch['label'] = torch.zeros(4, dtype=torch.long)
    model = build_model(_opt(tmp_path, amp='bf16', optim_g={'type': 'AdamW', 'lr': 2e-3}))
    losses = []
    for it in range(1, 13):
        model.feed_data(batch)
        model.optimize_parameters(it)
        losses.append(model.log_dict['l_pix'])
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
