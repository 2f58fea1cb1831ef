"""vlunet-convert and the published-checkpoint loader (vlunet/utils/checkpoint.py).

Each published format is rebuilt from a parity fixture's state_dict (the fixtures are
float64 official weights with the official output), converted, loaded strictly into the
architecture the converter inferred, and must reproduce the official output.
"""
import argparse
import os
from collections import OrderedDict

import pytest
import torch

import vlunet  # noqa: F401  (registers the archs; must precede basicsr)
from basicsr.utils.registry import ARCH_REGISTRY
from vlunet import convert as convert_mod
from vlunet.archs.card import guess_arch
from vlunet.utils.checkpoint import ADAPTER_KEYS, CheckpointError, load_published_state_dict

import conftest
from conftest import REPO, listing_state_dict, run_cli

ATOL = 1e-9


def load_fixture(name):
    fx = conftest.load_fixture(name)
    assert fx['arch'] in ARCH_REGISTRY, f'arch {fx["arch"]} is not registered'
    return fx


def fake_adapters(seed=0):
    """The 24 published CLIP adapter tensors (ad_imageEncoder/ad_textEncoder.adapter.*), random values."""
    g = torch.Generator().manual_seed(seed)
    return OrderedDict((k, torch.randn([512, 512] if k.endswith(('0.weight', '3.weight', '6.weight')) else [512],
                                       generator=g)) for k in ADAPTER_KEYS)


# --- the published layouts, built from a plain state_dict --------------------------------------
def lightning(sd, extra=None):
    """Lightning .ckpt (PromptIR; VLU-Net with ``extra`` model_degradation entries)."""
    state = OrderedDict(('net.' + k, v) for k, v in sd.items())
    state.update(extra or {})
    return {'epoch': 3, 'global_step': 120, 'pytorch-lightning_version': '2.1.0', 'state_dict': state,
            'optimizer_states': [{'state': {0: {'step': torch.tensor(5.0)}}, 'param_groups': [{'lr': 2e-4}]}],
            'lr_schedulers': [{'last_epoch': 3}]}


def lightning_vlunet(sd):
    extra = OrderedDict(('model_degradation.' + k, v) for k, v in fake_adapters().items())
    # The frozen CLIP backbone appears twice in the published checkpoints; these entries are not converted.
    for branch in ('ad_imageEncoder', 'ad_textEncoder'):
        extra[f'model_degradation.{branch}.clip_model.positional_embedding'] = torch.zeros(77, 512)
    return lightning(sd, extra)


def dgunet_pth(sd):
    return {'epoch': 250, 'state_dict': OrderedDict(('module.' + k, v) for k, v in sd.items()),
            'optimizer': {'state': {}, 'param_groups': [{'lr': 1e-6}]}}


def dfpir_pth_tar(sd):
    """DFPIR's checkpoint_epoch_*.pth.tar: {'epoch', 'state_dict', 'optimizer', 'scheduler'}."""
    return {'epoch': 12, 'state_dict': OrderedDict(sd),
            'optimizer': {'state': {}, 'param_groups': [{'lr': 1e-4, 'params': [0, 1]}]},
            'scheduler': {'last_epoch': 11, 'base_lrs': [1e-4], '_step_count': 12}}


def restormer_pth(sd):
    return {'params': OrderedDict(sd)}


def basicsr_ema(sd):
    return {'params_ema': OrderedDict(sd)}


def bare_module(sd):
    return OrderedDict(('module.' + k, v) for k, v in sd.items())


CASES = [  # (fixture, layout, source_format the loader must report, run the forward pass)
    ('DGUNet_deraining.pt', dgunet_pth, 'state_dict', True),
    ('DGUNetPlus_deraining.pt', dgunet_pth, 'state_dict', True),
    ('VLUNet_de5_clip.pt', lightning_vlunet, 'lightning-vlunet', True),
    ('VLUNet_de7_clip.pt', lightning_vlunet, 'lightning-vlunet', True),
    ('PromptIR_decoder.pt', lightning, 'lightning', True),
    ('Restormer_withbias.pt', restormer_pth, 'params', True),
    ('Restormer_biasfree.pt', restormer_pth, 'params', True),
    ('AdaIR_A1.pt', lightning, 'lightning', True),  # AdaIR and MoCE-IR: Lightning .ckpt with net. keys
    ('AdaIR_A2.pt', lightning, 'lightning', True),
    ('MoCEIR_S_reduced.pt', lightning, 'lightning', True),
    ('MoCEIR_reduced.pt', lightning, 'lightning', True),
    ('DFPIR_withbias.pt', dfpir_pth_tar, 'state_dict', True),
    ('DFPIR_biasfree.pt', dfpir_pth_tar, 'state_dict', True),
    # Every layout also with weights whose arch is always present: converted tensors must equal the source.
    ('DGUNet_deraining.pt', lightning, 'lightning', False),
    ('DGUNetPlus_deraining.pt', lightning_vlunet, 'lightning-vlunet', False),
    ('DGUNet_deraining.pt', restormer_pth, 'params', False),
    ('DGUNetPlus_deraining.pt', basicsr_ema, 'params_ema', False),
    ('DGUNet_deraining.pt', bare_module, 'bare', False),
]


def write(obj, path):
    torch.save(obj, str(path))
    return str(path)


def folder_listing(folder):
    return sorted(os.listdir(folder))


@pytest.mark.parametrize('name,layout,fmt,forward', CASES, ids=[f'{c[0][:-3]}-{c[1].__name__}' for c in CASES])
def test_convert_reproduces_official_output(tmp_path, name, layout, fmt, forward):
    fx = load_fixture(name)
    src = write(layout(fx['state_dict']), tmp_path / 'published.ckpt')
    dst = str(tmp_path / 'converted.pth')
    clip_out = str(tmp_path / 'clip_adapters.pth') if fmt == 'lightning-vlunet' else None
    messages = []

    assert load_published_state_dict(src).source_format == fmt
    arch, kwargs = convert_mod.convert(src, dst, clip_out=clip_out, log=messages.append)
    assert arch == fx['arch']

    saved = torch.load(dst, weights_only=True)
    assert list(saved) == ['params']
    assert list(saved['params']) == list(fx['state_dict'])
    for key, value in fx['state_dict'].items():
        assert torch.equal(saved['params'][key], value), key
    model = ARCH_REGISTRY.get(arch)(**kwargs).double().eval()  # built from the INFERRED kwargs
    model.load_state_dict(saved['params'], strict=True)
    if forward:
        if 'forward_seed' in fx:  # MoCE-IR draws its routing noise from the global RNG, as published
            torch.manual_seed(fx['forward_seed'])
        with torch.no_grad():
            out = model(*fx['inputs'].values())
        want = fx['output']
        outs, wants = (out, want) if isinstance(want, list) else ([out], [want])
        assert len(outs) == len(wants)
        for got, ref in zip(outs, wants):
            torch.testing.assert_close(got, ref, rtol=0, atol=ATOL)

    if clip_out:
        adapters = torch.load(clip_out, weights_only=True)
        assert list(adapters) == ['learnable_params']
        assert sorted(adapters['learnable_params']) == sorted(ADAPTER_KEYS)
        for key, value in fake_adapters().items():
            assert torch.equal(adapters['learnable_params'][key], value)
        assert any('24 CLIP adapter tensors' in m and clip_out in m for m in messages)
        assert any('2 other entries not converted' in m for m in messages)
    written = ['published.ckpt', 'converted.pth'] + (['clip_adapters.pth'] if clip_out else [])
    assert folder_listing(tmp_path) == sorted(written)


def test_vlunet_adapters_reported_when_not_requested(tmp_path, capsys):
    fx = load_fixture('DGUNet_deraining.pt')  # any weights: the layout is what matters here
    src = write(lightning_vlunet(fx['state_dict']), tmp_path / 'vlunet.ckpt')
    assert convert_mod.main([src, str(tmp_path / 'out.pth')]) == 0
    out = capsys.readouterr().out
    assert '24 CLIP adapter tensors' in out and '--clip-out' in out
    assert load_published_state_dict(src).clip_adapters.keys() == set(ADAPTER_KEYS)


def test_cli_module_entry_point(tmp_path):
    fx = load_fixture('DGUNet_deraining.pt')
    src = write(dgunet_pth(fx['state_dict']), tmp_path / 'model_best.pth')
    env = {'PYTHONPATH': REPO + os.pathsep + os.environ.get('PYTHONPATH', '')}
    ok = run_cli(['-m', 'vlunet.convert', src, str(tmp_path / 'ok.pth'), '--arch', 'DGUNet', '--arch-opt', 'depth=5'],
                 cwd=str(tmp_path), timeout=120, env=env)
    assert ok.returncode == 0, ok.stderr
    assert 'strict load verified' in ok.stdout
    assert list(torch.load(tmp_path / 'ok.pth', weights_only=True)['params']) == list(fx['state_dict'])


# --- refusals: message on stderr, exit code 1, nothing written ---------------------------------
def refuse(tmp_path, capsys, argv):
    before = folder_listing(tmp_path)
    assert convert_mod.main(argv) == 1
    err = capsys.readouterr().err
    assert 'nothing written' in err
    assert folder_listing(tmp_path) == before, 'a refused conversion must not leave files behind'
    return err


def test_garbage_file_is_refused(tmp_path, capsys):
    src = tmp_path / 'weights.pth'
    src.write_bytes(b'\x00not a checkpoint\xff' * 20)
    err = refuse(tmp_path, capsys, [str(src), str(tmp_path / 'out.pth')])
    assert str(src) in err and 'not a PyTorch checkpoint' in err


def test_non_checkpoint_objects_are_refused(tmp_path, capsys):
    for i, obj in enumerate([[torch.zeros(2)], {'epoch': 3, 'note': 'hi'}, {'params': {'a': 1}}, {'state_dict': {}}]):
        src = write(obj, tmp_path / f'thing{i}.pth')
        err = refuse(tmp_path, capsys, [src, str(tmp_path / 'out.pth')])
        assert src in err and 'expected' in err


def test_missing_source_is_refused(tmp_path, capsys):
    err = refuse(tmp_path, capsys, [str(tmp_path / 'nope.ckpt'), str(tmp_path / 'out.pth')])
    assert 'nope.ckpt' in err and 'no such file' in err


def test_wrong_architecture_is_refused_and_existing_output_kept(tmp_path, capsys):
    fx = load_fixture('DGUNet_deraining.pt')
    src = write(dgunet_pth(fx['state_dict']), tmp_path / 'dgunet.pth')
    dst = tmp_path / 'out.pth'
    dst.write_bytes(b'previous contents')
    err = refuse(tmp_path, capsys, [src, str(dst), '--arch', 'DGUNetPlus'])
    assert 'missing keys' in err and 'r2' in err
    assert 'unexpected keys' in err and 'basic.r1' in err
    assert dst.read_bytes() == b'previous contents'


def test_wrong_options_are_refused_with_shape_mismatches(tmp_path, capsys):
    fx = load_fixture('DGUNet_deraining.pt')
    src = write(restormer_pth(fx['state_dict']), tmp_path / 'dgunet.pth')
    err = refuse(tmp_path, capsys, [src, str(tmp_path / 'out.pth'), '--arch-opt', 'n_feat=16'])
    assert 'shape mismatches' in err
    assert 'basic.shallow_feat2.0.weight: checkpoint [8, 3, 3, 3], DGUNet [16, 3, 3, 3]' in err


def test_unknown_arch_and_bad_options_are_refused(tmp_path, capsys):
    fx = load_fixture('DGUNet_deraining.pt')
    src = write(restormer_pth(fx['state_dict']), tmp_path / 'dgunet.pth')
    assert 'not a registered architecture' in refuse(tmp_path, capsys, [src, str(tmp_path / 'o.pth'), '--arch', 'Nope'])
    assert 'KEY=VALUE' in refuse(tmp_path, capsys, [src, str(tmp_path / 'o.pth'), '--arch-opt', 'depth'])
    assert 'cannot build DGUNet' in refuse(tmp_path, capsys, [src, str(tmp_path / 'o.pth'), '--arch-opt', 'colour=1'])


def test_unrecognised_keys_need_arch(tmp_path, capsys):
    src = write({'params': {'conv.weight': torch.zeros(1, 1, 3, 3)}}, tmp_path / 'other.pth')
    err = refuse(tmp_path, capsys, [src, str(tmp_path / 'out.pth')])
    assert 'cannot tell the architecture' in err and 'conv.weight' in err


def test_clip_out_without_adapters_is_refused(tmp_path, capsys):
    fx = load_fixture('DGUNet_deraining.pt')
    src = write(dgunet_pth(fx['state_dict']), tmp_path / 'dgunet.pth')
    err = refuse(tmp_path, capsys, [src, str(tmp_path / 'out.pth'), '--clip-out', str(tmp_path / 'clip.pth')])
    assert 'holds no CLIP adapter entries' in err


def test_adapter_only_file_is_not_a_network(tmp_path, capsys):
    src = write({'learnable_params': fake_adapters(), 'epoch': 99}, tmp_path / 'clip_tuned.pth')
    ckpt = load_published_state_dict(src)
    assert ckpt.source_format == 'learnable_params' and not ckpt.params and len(ckpt.clip_adapters) == 24
    assert 'holds no network weights' in refuse(tmp_path, capsys, [src, str(tmp_path / 'out.pth')])


def test_pickle_needing_file_requires_trust(tmp_path, capsys):
    fx = load_fixture('DGUNet_deraining.pt')
    ckpt = lightning(fx['state_dict'])
    ckpt['hyper_parameters'] = argparse.Namespace(lr=2e-4, de_dim=5)  # a Python object: needs full unpickling
    src = write(ckpt, tmp_path / 'hparams.ckpt')
    err = refuse(tmp_path, capsys, [src, str(tmp_path / 'out.pth')])
    assert src in err and '--trust-pickle' in err and 'argparse.Namespace' in err
    with pytest.raises(CheckpointError, match='trust_pickle=True'):
        load_published_state_dict(src)
    assert convert_mod.main([src, str(tmp_path / 'out.pth'), '--trust-pickle']) == 0
    assert list(torch.load(tmp_path / 'out.pth', weights_only=True)['params']) == list(fx['state_dict'])


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    fx = load_fixture('DGUNet_deraining.pt')
    src = write(lightning_vlunet(fx['state_dict']), tmp_path / 'vlunet.ckpt')
    real_save, calls = torch.save, []

    def save_then_fail(obj, f, *args, **kwargs):  # first output written, the second one fails
        calls.append(1)
        if len(calls) == 2:
            f.write(b'partial')
            raise OSError('disk full')
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, 'save', save_then_fail)
    with pytest.raises(OSError, match='disk full'):
        convert_mod.convert(src, str(tmp_path / 'out.pth'), clip_out=str(tmp_path / 'clip.pth'), log=lambda m: None)
    assert folder_listing(tmp_path) == ['vlunet.ckpt']


# --- the loader and the architecture guess -------------------------------------------------------
def test_params_key_choice(tmp_path):
    a = OrderedDict(w=torch.zeros(2))
    b = OrderedDict(w=torch.ones(2))
    src = write({'params': a, 'params_ema': b}, tmp_path / 'both.pth')
    assert load_published_state_dict(src).source_format == 'params'
    ema = load_published_state_dict(src, param_key='params_ema')
    assert ema.source_format == 'params_ema' and torch.equal(ema.params['w'], b['w'])
    with pytest.raises(CheckpointError, match="param_key must be 'params' or 'params_ema'"):
        load_published_state_dict(src, param_key='state_dict')


EXPECTED_GUESS = {  # full-size published listings -> what must be inferred
    'keys_DGUNet_deraining.tsv': ('DGUNet', dict(n_feat=40, scale_unetfeats=20, scale_orsnetfeats=16)),
    'keys_DGUNet_deblurring_denoising.tsv': ('DGUNet', dict(n_feat=80, scale_unetfeats=48, scale_orsnetfeats=32)),
    'keys_DGUNetPlus_deraining.tsv': ('DGUNetPlus', dict(n_feat=40, scale_unetfeats=20)),
    'keys_DGUNetPlus_deblurring.tsv': ('DGUNetPlus', dict(n_feat=96, scale_unetfeats=48)),
    'keys_DGUNetPlus_denoising.tsv': ('DGUNetPlus', dict(n_feat=80, scale_unetfeats=40)),
    'keys_VLUNet_de5.tsv': ('VLUNet', dict(de_dim=5, dim=48, num_blocks=[4, 6, 6, 8], num_refinement_blocks=4,
                                           heads=[1, 2, 4, 8], ffn_expansion_factor=2.66, bias=False)),
    'keys_VLUNet_de7.tsv': ('VLUNet', dict(de_dim=7, dim=48)),
    'keys_PromptIR_decoder.tsv': ('PromptIR', dict(dim=48, num_blocks=[4, 6, 6, 8], decoder=True,
                                                   LayerNorm_type='WithBias')),
    'keys_Restormer.tsv': ('Restormer', dict(dim=48, num_blocks=[4, 6, 6, 8], num_refinement_blocks=4,
                                             heads=[1, 2, 4, 8], LayerNorm_type='WithBias', bias=False)),
}


@pytest.mark.parametrize('listing', sorted(EXPECTED_GUESS))
def test_guess_arch_on_published_listings(listing):
    arch, kwargs = guess_arch(listing_state_dict(listing))
    want_arch, want = EXPECTED_GUESS[listing]
    assert arch == want_arch
    assert {k: kwargs.get(k) for k in want} == want


PARITY_FIXTURES = sorted({case[0] for case in CASES})


@pytest.mark.parametrize('name', PARITY_FIXTURES)
def test_guess_arch_on_fixtures_matches_config(name):
    fx = load_fixture(name)
    arch, kwargs = guess_arch(fx['state_dict'])
    assert arch == fx['arch']
    # Every inferred kwarg agrees with the fixture's config where the config sets it.
    assert {k: v for k, v in kwargs.items() if k in fx['config']} == \
        {k: fx['config'][k] for k in kwargs if k in fx['config']}


def test_dfpir_empty_checkpoint_is_explained(tmp_path, capsys):
    src = write({}, tmp_path / 'checkpoint_epoch_V1_0003.pth.tar')
    assert convert_mod.main([src, str(tmp_path / 'out.pth')]) == 1
    err = capsys.readouterr().err
    assert 'empty' in err and "'state_dict'" in err and not (tmp_path / 'out.pth').exists()


def test_guess_arch_unknown():
    assert guess_arch({'conv.weight': torch.zeros(1)}) is None
