"""vlunet-export and vlunet-restore --backend onnxruntime: a tiny VLU-Net with its CLIP stage exported once
(two models: the network and the CLIP image tower), checked against PyTorch by the exporter, then restoring
held-out photos (and odd kinds) with the same outputs as the PyTorch path: 8-bit files within 1/255, the
same report, the same tiles. Text-conditioned graphs, the matrix-inverse translation and the errors are
checked without a full export (each export of a network takes tens of seconds)."""
import json
import os
import shutil

import cv2
import numpy as np
import pytest
import torch

import vlunet  # noqa: F401
from vlunet import export as export_module
from vlunet.inference import onnx_backend

from conftest import REPO, write_yaml

pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')

TINY_VLUNET = {'type': 'VLUNet', 'de_dim': 3, 'dim': 16, 'num_blocks': [1, 1, 1, 1], 'num_refinement_blocks': 1,
               'heads': [1, 2, 4, 8]}
PROMPTS = ['image with noise', 'image with haze', 'image with rain']
TINY_CLIP = {'type': 'DegradationCLIP', 'clip_model': 'vlunet-tiny', 'pretrained': None, 'prompts': PROMPTS}
DEMO = os.path.join(REPO, 'vlunet', 'demo_data')


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """(folder, option file, FILE.onnx): a tiny VLU-Net + CLIP with fixed weights, exported by vlunet-export."""
    from basicsr.archs import build_network
    folder = tmp_path_factory.mktemp('export')
    torch.manual_seed(0)
    net = build_network(dict(TINY_VLUNET))
    clip = build_network(dict(TINY_CLIP))
    with torch.no_grad():  # adapters away from their initial identity-like values
        for p in clip.image_adapter.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    torch.save({'params': net.state_dict()}, folder / 'net_g.pth')
    clip_state = {**{f'image_adapter.{k}': v for k, v in clip.image_adapter.state_dict().items()},
                  **{f'text_adapter.{k}': v for k, v in clip.text_adapter.state_dict().items()},
                  **{f'clip.{k}': v for k, v in clip.clip.state_dict().items()}}
    torch.save({'params': clip_state}, folder / 'net_clip.pth')
    opt = write_yaml(folder / 'opt.yml', {
        'name': 'export_test', 'network_g': TINY_VLUNET, 'network_clip': {**TINY_CLIP, 'load_path': str(folder / 'net_clip.pth')},
        'path': {'pretrain_network_g': str(folder / 'net_g.pth')}})
    out = folder / 'model.onnx'
    status = export_module.main(['-opt', opt, '-o', str(out), '--check', os.path.join(DEMO, 'val', 'chelsea.png')])
    assert status == 0
    return folder, opt, out


def _photos(folder):
    folder.mkdir()
    for name in ('astronaut.png', 'rocket.png'):  # held out: not the exporter's check images
        shutil.copy(os.path.join(DEMO, 'train', name), folder / name)
    rng = np.random.default_rng(0)
    cv2.imwrite(str(folder / 'odd.png'), rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    cv2.imwrite(str(folder / 'gray.png'), rng.integers(0, 256, (30, 41), dtype=np.uint8))
    cv2.imwrite(str(folder / 'deep.png'), rng.integers(0, 65536, (24, 37, 3), dtype=np.uint16))
    return folder


def _restore(args, capsys):
    from vlunet.restore import main
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def test_two_models_with_their_metadata(exported):
    import onnx
    folder, _, out = exported
    assert out.is_file() and (folder / 'model.clip.onnx').is_file()
    main = onnx.load(str(out))
    meta = onnx_backend.read_metadata(main, str(out))
    assert meta['role'] == 'restoration' and meta['conditioning'] == 'embedding' and meta['arch'] == 'VLUNet'
    assert meta['clip_model'] == 'model.clip.onnx' and meta['prompts'] == PROMPTS and meta['multiple'] == 8
    assert [i.name for i in main.graph.input] == ['image', 'embedding']
    dims = main.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 1 and not dims[2].dim_value and not dims[3].dim_value  # dynamic height and width
    clip = onnx.load(str(folder / 'model.clip.onnx'))
    assert [i.name for i in clip.graph.input] == ['clip_image']
    assert [o.name for o in clip.graph.output] == ['embedding', 'probabilities']
    assert not [f for f in os.listdir(folder) if f.endswith('.tmp')]


def test_onnxruntime_restores_like_pytorch_within_one_level(exported, tmp_path, capsys):
    folder, opt, out = exported
    photos = _photos(tmp_path / 'in')
    status, _, err = _restore(['-opt', opt, '-i', photos, '-o', tmp_path / 'torch', '--device', 'cpu'], capsys)
    assert status == 0, err
    status, _, err = _restore(['--backend', 'onnxruntime', '--onnx', out, '-i', photos, '-o', tmp_path / 'ort'], capsys)
    assert status == 0, err
    for name in sorted(os.listdir(photos)):
        a = cv2.imread(str(tmp_path / 'torch' / name), cv2.IMREAD_UNCHANGED)
        b = cv2.imread(str(tmp_path / 'ort' / name), cv2.IMREAD_UNCHANGED)
        assert a.shape == b.shape and a.dtype == b.dtype, name
        levels = 1 if a.dtype == np.uint8 else 257  # 1/255 of the range
        assert np.abs(a.astype(np.int64) - b.astype(np.int64)).max() <= levels, name
    torch_rows = {r['image']: r for r in json.load(open(tmp_path / 'torch' / 'report.json'))['images']}
    ort_report = json.load(open(tmp_path / 'ort' / 'report.json'))
    assert ort_report['backend'] == 'onnxruntime' and ort_report['model'] == str(out)
    for row in ort_report['images']:
        mine = torch_rows[row['image']]
        assert row['top_type'] == mine['top_type']
        for prompt in PROMPTS:
            assert abs(row[f'p({prompt})'] - mine[f'p({prompt})']) < 1e-4


def test_the_same_tiles_and_budget_through_onnxruntime(exported, tmp_path, capsys, monkeypatch):
    from vlunet.inference.memory import MemoryModel, resident_bytes
    folder, opt, out = exported
    photos = tmp_path / 'in'
    photos.mkdir()
    shutil.copy(os.path.join(DEMO, 'train', 'coffee.png'), photos / 'coffee.png')
    args = ['-i', photos, '--tile', 48, '--tile-overlap', 16]
    assert _restore(['-opt', opt, *args, '-o', tmp_path / 'torch', '--device', 'cpu'], capsys)[0] == 0
    assert _restore(['--onnx', out, *args, '-o', tmp_path / 'ort'], capsys)[0] == 0
    a, b = (cv2.imread(str(tmp_path / d / 'coffee.png')).astype(int) for d in ('torch', 'ort'))
    assert np.abs(a - b).max() <= 1
    rows = [json.load(open(tmp_path / d / 'report.json'))['images'][0] for d in ('torch', 'ort')]
    assert rows[0]['tiles'] == rows[1]['tiles'] > 1 and rows[0]['tiling'] == rows[1]['tiling']
    # a budget: the ONNX Runtime engine tiles from its own memory model (stood in here)
    monkeypatch.setattr(onnx_backend, 'cached_model', lambda description, measure: MemoryModel(0.0, 50_000.0))
    budget = (resident_bytes() + 300 * 2**20) // 2**20
    status, out_text, err = _restore(['--onnx', out, '-i', photos, '-o', tmp_path / 'budget', '--max-memory',
                                      f'{budget}M'], capsys)
    assert status == 0, err
    row = json.load(open(tmp_path / 'budget' / 'report.json'))['images'][0]
    assert row['tiles'] > 1 and 'tiled by the memory budget' in row['tiling']


def test_the_onnxruntime_memory_model_is_measured(exported, tmp_path, monkeypatch):
    monkeypatch.setenv('VLUNET_CACHE_DIR', str(tmp_path))
    engine = onnx_backend.OnnxEngine.from_file(str(exported[2]), max_memory='8G')
    model = engine.memory_model()
    assert model.per_pixel > 0 and model.samples[1][1] > model.samples[0][1]


def test_onnx_mistakes_are_one_clear_error(exported, tmp_path, capsys):
    folder, opt, out = exported
    (tmp_path / 'in').mkdir()
    base = ['-i', tmp_path / 'in', '-o', tmp_path / 'o']
    cases = [(['--onnx', out, '-opt', opt], '-opt/--model describe a PyTorch model'),
             (['--onnx', out, '--precision', 'bf16'], 'computes in fp32'),
             (['--onnx', tmp_path / 'missing.onnx'], 'ONNX model not found'),
             (['--onnx', folder / 'model.clip.onnx'], 'pass the restoration model')]
    (tmp_path / 'junk.onnx').write_bytes(b'not a model')
    cases.append((['--onnx', tmp_path / 'junk.onnx'], 'not a readable ONNX model'))
    lonely = tmp_path / 'lonely'
    lonely.mkdir()
    shutil.copy(out, lonely / 'model.onnx')  # without its CLIP model beside it
    cases.append((['--onnx', lonely / 'model.onnx'], 'model.clip.onnx is missing'))
    for extra, message in cases:
        status, _, err = _restore([*extra, *base], capsys)
        assert status == 2 and message in err, (extra, err)


def test_export_refuses_to_replace_and_a_failed_check_writes_nothing(exported, tmp_path, capsys):
    folder, opt, out = exported
    status = export_module.main(['-opt', opt, '-o', str(out)])
    assert status == 2 and '--overwrite' in capsys.readouterr().err
    from vlunet.inference import RestorationEngine
    engine = RestorationEngine.from_options(opt)
    ort = onnx_backend.OnnxEngine.from_file(str(out))
    with pytest.raises(export_module.ExportError, match='does not agree with PyTorch'):
        export_module.compare(engine, ort, [os.path.join(DEMO, 'val', 'chelsea.png')], atol=1e-12, log=lambda *_: None)


def test_export_uses_the_plain_blocks_and_gives_the_fused_ones_back():
    from vlunet.archs import blocks
    fused = blocks.use_fused
    x = torch.zeros(1)
    with export_module.plain_blocks():
        assert not blocks.use_fused(x)
    assert blocks.use_fused is fused and blocks.use_fused(x)


def test_a_matrix_inverse_exports_as_onnxruntime_inverse():
    import onnxruntime as ort

    class Projection(torch.nn.Module):
        def forward(self, x):
            v = x.reshape(1, 4, -1)
            return torch.inverse(v @ v.transpose(1, 2)) @ v

    dim = torch.export.Dim.DYNAMIC
    proto = export_module._to_onnx(Projection(), (torch.rand(1, 4, 8, 8),), ['x'], ['y'], {'x': {2: dim, 3: dim}},
                                   export_module.DEFAULT_OPSET, 'projection')
    session = ort.InferenceSession(proto.SerializeToString(), providers=['CPUExecutionProvider'])
    x = torch.rand(1, 4, 16, 24)
    np.testing.assert_allclose(session.run(None, {'x': x.numpy()})[0], Projection()(x).numpy(), atol=1e-4)


# ------------------------------------------------------------------------------------------------ text prompts
def _text_engine(mode):
    from vlunet.inference import Conditioner, RestorationEngine
    from vlunet.archs.card import get_card
    card = get_card('DFPIR')
    torch.manual_seed(0)
    net = card.arch_class(**card.tiny)
    clip = None
    if mode == 'blind':
        from basicsr.archs import build_network
        clip = build_network(dict(TINY_CLIP))
    codes = torch.randn(3, 512, generator=torch.Generator().manual_seed(1))
    return RestorationEngine(net, Conditioner(card.condition, clip, codes, mode))


def test_a_task_is_named_by_index_prompt_or_task_name():
    from vlunet.archs.card import get_card
    card = get_card('DFPIR')
    opt = {'text_embedding': {'prompts': ['Gaussian noise with a standard deviation of 15', 'Rain degradation with '
                                          'rain lines']},
           'datasets': {'test_1': {'sources': [{'name': 'rain', 'label': 1}]}}}
    assert export_module.resolve_task('1', opt, card, 'x.yml') == 1
    assert export_module.resolve_task('rain degradation with rain lines', opt, card, 'x.yml') == 1
    assert export_module.resolve_task('noise15', opt, card, 'x.yml') == 0  # the card's task prompts
    assert export_module.resolve_task('rain', opt, card, 'x.yml') == 1     # a source name of the option file
    with pytest.raises(export_module.ExportError, match=r"--task 'snow': not a task of x.yml .*0 = 'Gaussian"):
        export_module.resolve_task('snow', opt, card, 'x.yml')


def test_text_graphs_give_the_engine_s_prompt_choice():
    """The exported graph's conditioning (task baked in, or chosen from the CLIP embedding) is the engine's."""
    RestorationGraph, _ = export_module._graphs()
    x = torch.rand(1, 3, 24, 32)
    oracle = _text_engine('oracle')
    assert export_module.conditioning_of(oracle, 2) == 'task'
    with pytest.raises(export_module.ExportError, match='--task NAME'):
        export_module.conditioning_of(oracle)
    graph = RestorationGraph(oracle.net_g, oracle.card, 'task', code=oracle.conditioner.text_codes[2]).eval()
    with torch.no_grad(), export_module.plain_blocks():
        torch.testing.assert_close(graph(x), oracle.forward(x, label=[2]), atol=1e-5, rtol=0)
    blind = _text_engine('blind')
    assert export_module.conditioning_of(blind) == 'blind'
    clip = blind.conditioner.net_clip
    with torch.no_grad():
        emb = clip(x)
        graph = RestorationGraph(blind.net_g, blind.card, 'blind', codes=blind.conditioner.text_codes,
                                 text_features=clip.text_features()).eval()
        with export_module.plain_blocks():
            torch.testing.assert_close(graph(x, emb), blind.forward(x, embedding=emb), atol=1e-5, rtol=0)


@pytest.mark.parametrize('method', ['MIRAGE', 'DFPIR'])
def test_networks_whose_graphs_once_failed_to_export_restore_like_pytorch(method, tmp_path):
    """MIRAGE (an in-place add on a diagonal view) and DFPIR (a baked prompt code named like a lifted constant)
    did not export; every other card's tiny network exports the same way (scripts: vlunet-export's graph)."""
    import onnxruntime as ort
    from vlunet.archs.card import example_inputs, get_card
    card = get_card(method)
    torch.manual_seed(0)
    net = card.arch_class(**card.tiny).eval()
    code = torch.randn(512) if card.condition == 'text_embedding' else None
    meta = export_module.write_network_onnx(net, card, str(tmp_path / 'net.onnx'), code=code)
    session = ort.InferenceSession(str(tmp_path / 'net.onnx'), providers=['CPUExecutionProvider'])
    assert [i.name for i in session.get_inputs()] == meta['inputs'] == ['image']
    for height, width in ((48, 64), (40, 24)):  # dynamic height and width
        image = example_inputs(card, 1, height, width, generator=torch.Generator().manual_seed(height))[0]
        with torch.no_grad():
            ref = card.read_output(net, net(image) if code is None else net(image, code[None])).image
        out = session.run(None, {'image': image.numpy()})[0]
        assert out.shape == tuple(ref.shape) and np.abs(out - ref.numpy()).max() < 1e-4


def test_moceir_exports_its_expert_routing_as_conditionals(tmp_path, capsys):
    """MoCE-IR's experts are chosen per image: the graph holds each expert in a conditional (ONNX If) and routes
    without the published eval noise (a graph has no PyTorch RNG), which the exporter says and checks against."""
    import onnxruntime as ort
    from vlunet.archs import moceir_arch
    from vlunet.archs.card import example_inputs, get_card
    card = get_card('MoCE-IR')
    net_opt = {'type': 'MoCEIR', 'dim': 8, 'levels': 2, 'num_blocks': [1, 1], 'num_dec_blocks': [1],
               'num_refinement_blocks': 1, 'heads': [1, 2], 'num_experts': 2}
    torch.manual_seed(0)
    net = card.arch_class(**{k: v for k, v in net_opt.items() if k != 'type'})
    torch.save({'params': net.state_dict()}, tmp_path / 'net_g.pth')
    opt = write_yaml(tmp_path / 'opt.yml', {'name': 'moce_export', 'network_g': net_opt,
                                            'path': {'pretrain_network_g': str(tmp_path / 'net_g.pth')}})
    status = export_module.main(['-opt', opt, '-o', str(tmp_path / 'moce.onnx'),
                                 '--check', os.path.join(DEMO, 'val', 'chelsea.png')])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert 'routing without the evaluation noise' in out
    import onnx
    meta = onnx_backend.read_metadata(onnx.load(str(tmp_path / 'moce.onnx')), 'moce.onnx')
    assert 'eval_routing_noise=False' in meta['note']

    net.eval()
    assert export_module.deterministic(net) is not None and export_module.deterministic(net) is None
    session = ort.InferenceSession(str(tmp_path / 'moce.onnx'), providers=['CPUExecutionProvider'])
    mixture = next(m for m in net.modules() if isinstance(m, moceir_arch.ExpertMixture))
    routed = {}
    for k in range(16):  # images of rising contrast, until the router has chosen each expert
        image = example_inputs(card, 1, 40, 56, generator=torch.Generator().manual_seed(k))[0] * (0.2 + 0.15 * k)
        with torch.no_grad():
            ref = net(image)
        routed.setdefault(int(mixture.routing.last_routing['top_k_indices']), (image, ref))
    assert len(routed) == 2, f'the router chose only expert(s) {sorted(routed)}: the test needs images routed apart'
    for expert, (image, ref) in routed.items():
        got = session.run(None, {'image': image.numpy()})[0]
        assert np.abs(got - ref.numpy()).max() < 1e-4, f'expert {expert}'

    # vlunet-restore: the ONNX file says what the export changed, and with the option file routing the same way
    # the PyTorch path writes the same files
    quiet = write_yaml(tmp_path / 'quiet.yml', {'name': 'moce_export', 'network_g': {**net_opt, 'eval_routing_noise': False},
                                                'path': {'pretrain_network_g': str(tmp_path / 'net_g.pth')}})
    photos = tmp_path / 'in'
    photos.mkdir()
    for name in ('astronaut.png', 'rocket.png'):
        shutil.copy(os.path.join(DEMO, 'train', name), photos / name)
    status, out, err = _restore(['--backend', 'onnxruntime', '--onnx', tmp_path / 'moce.onnx', '-i', photos,
                                 '-o', tmp_path / 'ort'], capsys)
    assert status == 0 and 'routing without the evaluation noise' in out, err
    status, _, err = _restore(['-opt', quiet, '-i', photos, '-o', tmp_path / 'torch', '--device', 'cpu'], capsys)
    assert status == 0, err
    for name in ('astronaut.png', 'rocket.png'):
        a, b = (cv2.imread(str(tmp_path / d / name)).astype(np.int64) for d in ('torch', 'ort'))
        assert a.shape == b.shape and np.abs(a - b).max() <= 1, name
