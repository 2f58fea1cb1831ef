"""Run by tests/models/test_distributed.py under ``torch.distributed.run --nproc_per_node=2`` (CPU, gloo).

1. Trainable tensors stay identical across ranks: VLUNetModel with its CLIP adapters trained
   alongside (``clip_opt``) and a learnable temperature, ranks initialised with different seeds,
   a few optimizer steps on different data per rank.
2. Gradient accumulation under DDP: per rank 2 samples as one batch, or as 2 micro-batches of 1,
   give the weights of one process stepping on all 4 samples (float64).

Rank 0 writes the largest differences to the JSON file named by argv[1].
"""
import json
import os
import sys

import torch
import torch.distributed as dist

import vlunet  # noqa: F401
from basicsr.models import build_model

RANK, WORLD = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])


def opt(network_g, distributed=True, **train):
    train_opt = {'ema_decay': 0, 'optim_g': {'type': 'AdamW', 'lr': 1e-3}, 'total_iter': 10,
                 'scheduler': {'type': 'LinearWarmupCosineLR', 'warmup_iter': 0},
                 'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0}}
    train_opt.update(train)
    return {'name': 'ddp', 'model_type': 'VLUNetModel', 'num_gpu': 0, 'dist': distributed, 'is_train': True,
            'rank': RANK if distributed else 0, 'world_size': WORLD if distributed else 1,
            'find_unused_parameters': True, 'network_g': network_g, 'val': {},
            'path': {'pretrain_network_g': None, 'strict_load_g': True}, 'train': train_opt}


def batch(n, seed, size=32):
    g = torch.Generator().manual_seed(seed)
    return {'lq': torch.rand(n, 3, size, size, generator=g, dtype=torch.float64),
            'gt': torch.rand(n, 3, size, size, generator=g, dtype=torch.float64), 'label': torch.arange(n) % 3}


def trainable(model):
    tensors = {f'net_g.{k}': p for k, p in model.get_bare_model(model.net_g).named_parameters() if p.requires_grad}
    if model.net_clip is not None:
        tensors.update({f'net_clip.{k}': p for k, p in model.net_clip.named_parameters() if p.requires_grad})
    if model.cri_clip is not None:
        tensors.update({f'cri_clip.{k}': p for k, p in model.cri_clip.named_parameters() if p.requires_grad})
    return tensors


def largest_rank_difference(tensors):
    worst = 0.0
    for name, t in sorted(tensors.items()):
        gathered = [torch.empty_like(t) for _ in range(WORLD)]
        dist.all_gather(gathered, t.detach().contiguous())
        worst = max(worst, max((g - gathered[0]).abs().max().item() for g in gathered))
    return worst


def ranks_stay_identical():
    vl = {'type': 'VLUNet', 'de_dim': 3, 'dim': 10, 'num_blocks': [1, 1, 1, 1], 'num_refinement_blocks': 1,
          'heads': [1, 1, 1, 1]}
    o = opt(vl, clip_opt={'type': 'DegradationContrastiveLoss', 'normalize': True, 'temperature': 0.07,
                          'learnable_temperature': True}, optim_clip={'type': 'Adam', 'lr': 1e-2})
    o['network_clip'] = {'type': 'DegradationCLIP', 'clip_model': 'vlunet-tiny', 'pretrained': None,
                         'prompts': ['a', 'b', 'c'], 'freeze_backbone': False}
    torch.manual_seed(100 + RANK)  # every rank initialises differently, as BasicSR seeds manual_seed + rank
    model = build_model(o)
    for it in range(1, 4):
        data = batch(2, seed=10 * it + RANK)
        model.feed_data({k: (v.float() if v.is_floating_point() else v) for k, v in data.items()})
        model.optimize_parameters(it)
    tensors = trainable(model)
    assert any(k.startswith('cri_clip.') for k in tensors), 'no learnable temperature'
    assert any(k.startswith('net_clip.') for k in tensors), 'no CLIP adapters'
    return largest_rank_difference(tensors), len(tensors)


def accumulation_under_ddp():
    tiny = {'type': 'Restormer', 'dim': 8, 'num_blocks': [1, 1, 1, 1], 'num_refinement_blocks': 1,
            'heads': [1, 2, 2, 4]}
    torch.manual_seed(0)
    reference = build_model(opt(tiny, distributed=False))
    reference.net_g.double()
    start = {k: v.clone() for k, v in reference.net_g.state_dict().items()}
    full = batch(4, seed=7)
    reference.feed_data(full)
    reference.optimize_parameters(1)
    want = reference.net_g.state_dict()
    worst = {}
    for accumulate in (1, 2):
        torch.set_default_dtype(torch.float64)  # DDP's gradient buckets take the dtype of the wrapped network
        try:
            model = build_model(opt(tiny, accumulate_grad_batches=accumulate))
        finally:
            torch.set_default_dtype(torch.float32)
        model.get_bare_model(model.net_g).load_state_dict(start)
        model.feed_data({k: v[2 * RANK:2 * RANK + 2] for k, v in full.items()})  # this rank's half
        model.optimize_parameters(1)
        got = model.get_bare_model(model.net_g).state_dict()
        worst[accumulate] = max((got[k] - want[k]).abs().max().item() for k in want)
    return worst


def main():
    dist.init_process_group('gloo')
    identical, count = ranks_stay_identical()
    accumulated = accumulation_under_ddp()
    if RANK == 0:
        with open(sys.argv[1], 'w') as f:
            json.dump({'rank_difference': identical, 'trainable_tensors': count,
                       'ddp_vs_single_batch4': accumulated[1], 'ddp_accumulated_vs_single_batch4': accumulated[2]}, f)
    dist.destroy_process_group()


if __name__ == '__main__':
    main()
