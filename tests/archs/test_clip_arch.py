"""DegradationCLIP (vision-language half of VLU-Net) and DegradationContrastiveLoss, on the tiny
``vlunet-tiny`` open_clip config (random init, CPU, no downloads)."""
import time

import vlunet  # noqa: F401  (before basicsr)
import open_clip
import pytest
import torch
from basicsr.archs import build_network
from basicsr.losses import build_loss
from torch import nn
from torch.nn import functional as F
from torchvision import transforms as T

from vlunet.archs.clip_arch import NHR_PROMPTS, NHRBL_PROMPTS, DegradationCLIP

PUBLISHED_NAMES = [f'{enc}.adapter.{i}.{kind}' for enc in ('ad_imageEncoder', 'ad_textEncoder')
                   for i in (0, 1, 3, 4, 6, 7) for kind in ('weight', 'bias')]


def tiny(**kwargs):
    torch.manual_seed(kwargs.pop('seed', 0))
    kwargs.setdefault('prompts', 'NHR')
    return DegradationCLIP(clip_model='vlunet-tiny', pretrained=None, **kwargs)


def published_params(seed=1):
    """A stand-in for the published clip_tuned.pth 'learnable_params': 24 nn.Parameters, names/shapes as published."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in PUBLISHED_NAMES:
        idx = int(name.split('.')[2])
        shape = (512, 512) if idx in (0, 3, 6) and name.endswith('weight') else (512, )
        out[name] = nn.Parameter(torch.randn(shape, generator=g))
    return out


def test_vlunet_tiny_config_is_registered():
    assert 'vlunet-tiny' in open_clip.list_models()
    cfg = open_clip.get_model_config('vlunet-tiny')
    assert cfg['embed_dim'] == 512 and cfg['text_cfg']['vocab_size'] == 49408 and cfg['text_cfg']['context_length'] == 77


def test_vlunet_tiny_rn_config_builds_and_embeds():
    assert open_clip.get_model_config('vlunet-tiny-rn')['embed_dim'] == 512
    torch.manual_seed(0)
    model = DegradationCLIP(clip_model='vlunet-tiny-rn', pretrained=None, prompts='NHR', freeze_backbone=False)
    assert model(torch.rand(2, 3, 40, 56)).shape == (2, 512)


def test_published_prompts_and_tokens():
    assert NHR_PROMPTS == ('image with noise', 'image with many noise', 'image with large amount of noise',
                           'image with haze', 'image with rain')
    assert NHRBL_PROMPTS == NHR_PROMPTS + ('image with blur', 'image with low light')
    assert tiny(prompts='NHRBL').prompts == list(NHRBL_PROMPTS)
    model = tiny(prompts='NHR')
    assert model.prompt_tokens.shape == (5, 77)
    assert model.prompt_tokens[0, :6].tolist() == [49406, 2867, 593, 9307, 49407, 0]


def test_built_through_registry_and_rejects_bad_options():
    net = build_network({'type': 'DegradationCLIP', 'clip_model': 'vlunet-tiny', 'pretrained': None,
                         'prompts': ['a', 'b']})
    assert isinstance(net, DegradationCLIP) and net.num_types == 2
    with pytest.raises(ValueError, match='adapter_act'):
        tiny(adapter_act='relu')
    with pytest.raises(ValueError, match='NHRBL'):
        tiny(prompts='NHX')
    with pytest.raises(ValueError, match='distinct'):
        tiny(prompts=['a', 'a'])
    with pytest.raises(ValueError, match='unknown clip_model'):
        DegradationCLIP(clip_model='no-such-model', pretrained=None)


def test_adapter_layout_and_activations():
    gelu, leaky = tiny(), tiny(adapter_act='leaky_relu')
    for model in (gelu, leaky):
        for adapter in (model.image_adapter, model.text_adapter):
            act = 'GELU' if model is gelu else 'LeakyReLU'
            assert [type(m).__name__ for m in adapter] == ['Linear', 'LayerNorm', act, 'Linear', 'LayerNorm', act,
                                                           'Linear', 'LayerNorm']
            assert all(isinstance(adapter[i], nn.Linear) and adapter[i].in_features == 512 for i in (0, 3, 6))
            assert all(isinstance(adapter[i], nn.LayerNorm) and adapter[i].eps == 1e-5 for i in (1, 4, 7))
    assert gelu.image_adapter[2].approximate == 'none'
    assert leaky.text_adapter[5].negative_slope == 0.01


def test_only_adapters_train_and_backbone_stays_in_eval():
    model = tiny()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 24
    assert all(n.startswith(('image_adapter.', 'text_adapter.')) for n in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 1_582_080
    model.train()
    assert model.image_adapter.training and model.text_adapter.training
    assert not model.clip.training and not any(m.training for m in model.clip.modules())
    free = tiny(freeze_backbone=False).train()
    assert free.clip.training and all(p.requires_grad for p in free.clip.parameters())


@pytest.mark.parametrize('size', [(100, 140), (140, 100), (300, 260)])  # up- and downsampling
def test_preprocess_equals_torchvision_pipeline(size):
    model = tiny()
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(3))
    ref_tf = T.Compose([
        T.Resize(224, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(224),
        T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ])
    ref = torch.stack([ref_tf(img) for img in x])
    out = model.preprocess(x)
    assert out.shape == (2, 3, 224, 224)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\)'):
        model.preprocess(x[0])


def test_forward_is_adapter_of_unnormalised_image_embedding_and_classify_sums_to_one():
    model = tiny().eval()
    x = torch.rand(3, 3, 64, 80)
    with torch.no_grad():
        feats = model(x)
        ref = model.image_adapter(model.clip.encode_image(model.preprocess(x), normalize=False))
        probs = model.classify(x)
    assert feats.shape == (3, 512)
    torch.testing.assert_close(feats, ref, rtol=0, atol=0)
    assert model.text_features().shape == (5, 512)
    assert probs.shape == (3, 5) and (probs >= 0).all()
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(3))
    logits = feats @ model.text_features().t()
    torch.testing.assert_close(probs, logits.softmax(dim=1))


def test_text_features_follow_training_adapter():
    model = tiny().train()
    first = model.encode_text()
    assert model.encode_text() is first  # frozen backbone: prompt embeddings cached
    before = model.text_features().detach().clone()
    loss = model.text_features().sum()
    loss.backward()
    assert model.text_adapter[0].weight.grad is not None
    with torch.no_grad():
        model.text_adapter[6].bias.add_(1.0)
    assert not torch.allclose(model.text_features(), before)
    free = tiny(freeze_backbone=False)
    free.text_features().sum().backward()
    assert free.clip.token_embedding.weight.grad is not None


def test_published_learnable_params_load(tmp_path):
    params = published_params()
    path = tmp_path / 'clip_tuned.pth'
    opt = torch.optim.Adam(params.values(), lr=1e-5)
    sum(p.sum() for p in params.values()).backward()
    opt.step()
    torch.save({'epoch': 90, 'learnable_params': params, 'optimizer': opt.state_dict()}, path)
    model = tiny(prompts='NHRBL')
    keys = model.load_adapters(str(path))
    assert len(keys) == 24
    own = dict(model.named_parameters())
    for name, value in params.items():
        ours = name.replace('ad_imageEncoder.adapter.', 'image_adapter.').replace('ad_textEncoder.adapter.',
                                                                                 'text_adapter.')
        assert torch.equal(own[ours].detach(), value.detach()), name
    published = model.adapter_state_dict()
    assert list(published) == PUBLISHED_NAMES
    assert all(torch.equal(published[k], params[k].detach()) for k in PUBLISHED_NAMES)
    assert all(p.requires_grad for n, p in model.named_parameters() if 'adapter' in n)


def test_load_adapters_reports_missing_unexpected_and_bad_shapes(tmp_path):
    model = tiny()
    params = {k: v.detach() for k, v in published_params().items()}
    missing = dict(params)
    del missing['ad_textEncoder.adapter.7.bias']
    torch.save({'learnable_params': missing}, tmp_path / 'missing.pth')
    with pytest.raises(KeyError, match=r'missing\.pth.*missing: \[.text_adapter\.7\.bias.\]'):
        model.load_adapters(str(tmp_path / 'missing.pth'))
    extra = dict(params, **{'ad_imageEncoder.adapter.9.weight': torch.zeros(3)})
    torch.save({'learnable_params': extra}, tmp_path / 'extra.pth')
    with pytest.raises(KeyError, match=r'extra\.pth.*unexpected: \[.image_adapter\.9\.weight.\]'):
        model.load_adapters(str(tmp_path / 'extra.pth'))
    bad = dict(params, **{'ad_imageEncoder.adapter.0.bias': torch.zeros(256)})
    torch.save({'learnable_params': bad}, tmp_path / 'bad.pth')
    with pytest.raises(ValueError, match=r'bad\.pth.*image_adapter\.0\.bias.*\(256,\).*\(512,\)'):
        model.load_adapters(str(tmp_path / 'bad.pth'))
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        model.load_adapters(str(tmp_path / 'nope.pth'))


def test_basicsr_checkpoints_round_trip_with_and_without_backbone(tmp_path):
    trained = tiny(seed=5, freeze_backbone=False)  # a backbone that is not reproducible: saved
    assert trained.save_backbone and any(k.startswith('clip.') for k in trained.state_dict())
    torch.save({'params': trained.state_dict()}, tmp_path / 'net_g_10.pth')
    fresh = tiny(seed=6, freeze_backbone=False)
    keys = fresh.load_adapters(str(tmp_path / 'net_g_10.pth'))
    assert any(k.startswith('clip.') for k in keys)
    x = torch.rand(2, 3, 40, 48)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), trained.eval()(x), rtol=0, atol=0)
        torch.testing.assert_close(fresh.text_features(), trained.text_features(), rtol=0, atol=0)

    slim = tiny(seed=7, save_backbone=False)
    state = slim.state_dict()
    assert sorted(state) == sorted(k for k, _ in slim.named_parameters() if 'adapter' in k)
    other = tiny(seed=8, save_backbone=False)
    backbone = {k: v.clone() for k, v in other.clip.state_dict().items()}
    other.load_state_dict(state, strict=True)  # keeps its own backbone
    assert all(torch.equal(v, backbone[k]) for k, v in other.clip.state_dict().items())
    assert torch.equal(other.image_adapter[0].weight, slim.image_adapter[0].weight)
    torch.save({'params': state}, tmp_path / 'adapters_only.pth')
    assert len(tiny(seed=9).load_adapters(str(tmp_path / 'adapters_only.pth'))) == 24


def test_adding_a_prompt_keeps_adapters(tmp_path):
    torch.save({'learnable_params': published_params()}, tmp_path / 'clip_tuned.pth')
    model = tiny(prompts='NHR').eval()
    model.load_adapters(str(tmp_path / 'clip_tuned.pth'))
    old = model.text_features().detach()
    assert model.add_prompt('image with snow') == 5
    assert model.prompts[-1] == 'image with snow' and model.prompt_tokens.shape == (6, 77)
    new = model.text_features().detach()
    assert new.shape == (6, 512)
    torch.testing.assert_close(new[:5], old)
    assert model.classify(torch.rand(2, 3, 32, 32)).shape == (2, 6)
    wide = tiny(prompts=list(NHRBL_PROMPTS) + ['image with snow'])
    assert len(wide.load_adapters(str(tmp_path / 'clip_tuned.pth'))) == 24 and wide.num_types == 8


def test_offline_pretrained_tag_fails_fast_with_instructions(tmp_path):
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as info:
        DegradationCLIP(clip_model='ViT-B-32', pretrained='laion2b_s34b_b79k', cache_dir=str(tmp_path))
    assert time.monotonic() - start < 5
    msg = str(info.value)
    assert 'laion2b_s34b_b79k' in msg and 'ViT-B-32' in msg
    assert 'huggingface.co/laion/CLIP-ViT-B-32-laion2B-s34B-b79K' in msg
    assert 'pretrained: /path/to/file' in msg and 'allow_download' in msg and str(tmp_path) in msg
    with pytest.raises(FileNotFoundError, match='neither an existing file nor an open_clip tag'):
        DegradationCLIP(clip_model='vlunet-tiny', pretrained='no_such_tag')


def test_loss_default_is_published_cross_entropy():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(6, 512, generator=g), torch.randn(5, 512, generator=g)
    label = torch.tensor([0, 1, 2, 3, 4, 0])
    loss = build_loss({'type': 'DegradationContrastiveLoss'})
    assert list(loss.parameters()) == []
    torch.testing.assert_close(loss(img, txt, label), F.cross_entropy(img @ txt.T, label), rtol=0, atol=0)
    weighted = build_loss({'type': 'DegradationContrastiveLoss', 'loss_weight': 0.5})
    torch.testing.assert_close(weighted(img, txt, label), 0.5 * F.cross_entropy(img @ txt.T, label))
    with pytest.raises(ValueError, match=r'labels must lie in \[0, 5\)'):
        loss(img, txt, torch.tensor([0, 1, 2, 3, 4, 5]))


def test_loss_normalisation_and_temperature():
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(4, 512, generator=g), torch.randn(3, 512, generator=g)
    label = torch.tensor([2, 0, 1, 1])
    cos = F.normalize(img, dim=1) @ F.normalize(txt, dim=1).T
    loss = build_loss({'type': 'DegradationContrastiveLoss', 'normalize': True, 'temperature': 0.07})
    torch.testing.assert_close(loss(img, txt, label), F.cross_entropy(cos / 0.07, label))
    learn = build_loss({'type': 'DegradationContrastiveLoss', 'normalize': True, 'temperature': 0.07,
                        'learnable_temperature': True})
    (scale, ) = list(learn.parameters())
    torch.testing.assert_close(learn(img, txt, label), F.cross_entropy(cos / 0.07, label))
    learn(img, txt, label).backward()
    assert scale.grad is not None and scale.grad.abs() > 0
    with torch.no_grad():
        scale.fill_(10.0)  # clamped at log(100), as CLIP does
    torch.testing.assert_close(learn(img, txt, label), F.cross_entropy(cos * 100, label))
