"""The published training of the peers through VLUNetModel: MoCE-IR's balance loss and FFT loss,
DFPIR's text codes (computed once, cached; oracle and blind prompt choice), the comparison label."""
import json

import pytest
import torch

import vlunet  # noqa: F401
from basicsr.models import build_model
from basicsr.utils.registry import LOSS_REGISTRY
from vlunet.archs.clip_arch import DegradationCLIP
from vlunet.compare import build_table

MOCEIR = {'type': 'MoCEIR', 'dim': 8, 'num_blocks': [1, 1, 1, 1], 'num_dec_blocks': [1, 1, 1],
          'num_refinement_blocks': 1, 'heads': [1, 2, 4, 8]}
DFPIR = {'type': 'DFPIR', 'dim': 8, 'num_blocks': [1, 1, 1, 1], 'num_refinement_blocks': 1, 'heads': [1, 2, 2, 4],
         'device': 'cpu'}
PROMPTS = ['Gaussian noise with a standard deviation of 15', 'Hazy degradation with normal haze',
           'Rain degradation with rain lines']


def _opt(tmp_path, network_g, is_train=True, **train):
    train_opt = {'ema_decay': 0, 'optim_g': {'type': 'AdamW', 'lr': 1e-3}, 'total_iter': 10,
                 'scheduler': {'type': 'LinearWarmupCosineLR', 'warmup_iter': 0},
                 'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0}}
    train_opt.update(train)
    return {'name': 'm', 'model_type': 'VLUNetModel', 'num_gpu': 0, 'dist': False, 'is_train': is_train, 'rank': 0,
            'world_size': 1, 'network_g': dict(network_g), 'train': train_opt, 'val': {},
            'path': {'pretrain_network_g': None, 'strict_load_g': True, 'results_root': str(tmp_path / 'results')}}


def _batch(n=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {'lq': torch.rand(n, 3, size, size, generator=g), 'gt': torch.rand(n, 3, size, size, generator=g),
            'label': torch.tensor([0, 2][:n])}


def test_fft_loss_is_l1_of_the_spectra():
    loss = LOSS_REGISTRY.get('FFTLoss')(loss_weight=0.5)
    a, b = torch.rand(2, 3, 8, 10, dtype=torch.float64), torch.rand(2, 3, 8, 10, dtype=torch.float64)
    fa, fb = torch.fft.rfft2(a), torch.fft.rfft2(b)
    expected = 0.5 * torch.cat([(fa.real - fb.real).abs().flatten(), (fa.imag - fb.imag).abs().flatten()]).mean()
    assert loss(a, b).item() == pytest.approx(expected.item(), rel=1e-12)
    with pytest.raises(ValueError, match='differ'):
        loss(a, b[..., :8])


def test_moceir_trains_with_its_balance_loss_and_fft_loss(tmp_path):
    torch.manual_seed(0)
    model = build_model(_opt(tmp_path, MOCEIR, balance_opt={'type': 'BalanceLoss', 'loss_weight': 0.01},
                             fft_opt={'type': 'FFTLoss', 'loss_weight': 0.1}))
    before = {k: v.clone() for k, v in model.net_g.state_dict().items()}
    model.feed_data(_batch())
    model.optimize_parameters(1)
    log = model.get_current_log()
    assert {'l_pix', 'l_fft', 'l_balance'} <= set(log)
    net_loss = float(model.get_bare_model(model.net_g).total_loss.detach())
    assert net_loss > 0 and log['l_balance'] == pytest.approx(0.01 * net_loss, rel=1e-5)
    assert any(not torch.equal(before[k], v) for k, v in model.net_g.state_dict().items())
    plain = build_model(_opt(tmp_path, {'type': 'Restormer', 'dim': 8, 'num_blocks': [1, 1, 1, 1],
                                        'num_refinement_blocks': 1}, balance_opt={'type': 'BalanceLoss'}))
    plain.feed_data(_batch())
    with pytest.raises(ValueError, match="no auxiliary output 'balance'"):
        plain.optimize_parameters(1)


@pytest.fixture
def count_text_encodings(monkeypatch):
    calls = []
    original = DegradationCLIP.encode_text

    def counted(self):
        calls.append(list(self.prompts))
        return original(self)

    monkeypatch.setattr(DegradationCLIP, 'encode_text', counted)
    return calls


def _dfpir_opt(tmp_path, mode='oracle', cache=True, clip=False, **kwargs):
    opt = _opt(tmp_path, DFPIR, **kwargs)
    opt['text_embedding'] = {'clip_model': 'vlunet-tiny', 'pretrained': None, 'prompts': PROMPTS, 'mode': mode}
    if cache:
        opt['text_embedding']['cache'] = str(tmp_path / 'codes' / 'text_codes.pth')
    if clip:
        opt['network_clip'] = {'type': 'DegradationCLIP', 'clip_model': 'vlunet-tiny', 'pretrained': None,
                               'prompts': ['image with noise', 'image with haze', 'image with rain']}
    return opt


def test_dfpir_text_codes_are_computed_once_cached_and_chosen_by_label(tmp_path, count_text_encodings):
    torch.manual_seed(0)
    model = build_model(_dfpir_opt(tmp_path))
    assert count_text_encodings == [PROMPTS]  # the prompts' embeddings, once
    codes = model.text_codes
    assert codes.shape == (3, 512)
    for it in (1, 2, 3):
        model.feed_data(_batch(seed=it))
        model.optimize_parameters(it)
    assert len(count_text_encodings) == 1  # never per batch
    lq = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(model.text_code(lq, torch.tensor([2, 0])), codes[[2, 0]], rtol=0, atol=0)
    # a second run reads the cache instead of running the text tower again
    again = build_model(_dfpir_opt(tmp_path))
    assert len(count_text_encodings) == 1
    torch.testing.assert_close(again.text_codes, codes, rtol=0, atol=0)
    # other prompts do not reuse a stale cache
    other = _dfpir_opt(tmp_path)
    other['text_embedding']['prompts'] = PROMPTS[::-1]
    build_model(other)
    assert len(count_text_encodings) == 2
    with pytest.raises(ValueError, match='oracle takes the prompt'):
        model.text_code(lq, None)


def test_dfpir_blind_mode_takes_the_prompt_of_the_type_our_clip_sees(tmp_path, count_text_encodings):
    torch.manual_seed(0)
    model = build_model(_dfpir_opt(tmp_path, mode='blind', cache=False, clip=True, is_train=False))
    lq = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        seen = model.net_clip.classify(lq).argmax(dim=1)
        got = model.text_code(lq, label=torch.tensor([0, 0, 0, 0]))  # the label is not used
    torch.testing.assert_close(got, model.text_codes[seen], rtol=0, atol=0)
    json_model = json.loads((tmp_path / 'results' / 'model.json').read_text())
    assert json_model['conditioning'] == 'text prompt (blind)'
    with pytest.raises(ValueError, match='blind picks the prompt'):
        build_model(_dfpir_opt(tmp_path, mode='blind', cache=False))
    with pytest.raises(ValueError, match='text_embedding'):
        opt = _opt(tmp_path, DFPIR)
        build_model(opt)


def test_comparison_rows_say_which_prompt_mode_produced_them():
    results = [{'name': f'DFPIR_{mode}', 'dir': mode, 'model': {'network_g': {'type': 'DFPIR'}, 'params': 10,
                                                                 'conditioning': f'text prompt ({mode})'},
                'metrics': {'rain': {'psnr': 30.0, 'ssim': 0.9, 'input_psnr': 20.0, 'input_ssim': 0.5}}}
               for mode in ('oracle', 'blind')]
    rows, _ = build_table(results, with_gmacs=False)
    assert [r['method'] for r in rows[1:]] == ['DFPIR_oracle (DFPIR, text prompt (oracle))',
                                               'DFPIR_blind (DFPIR, text prompt (blind))']
