"""``vlunet-export -opt OPT [--model PATH] -o FILE.onnx [--task NAME]``: a trained model as ONNX.

Writes the restoration network of a train or test option file (its ``network_g`` at the size the file
gives, with the weights of ``path.pretrain_network_g`` or ``--model``) as ``FILE.onnx``: float32,
batch 1, dynamic height and width. ``vlunet-restore --backend onnxruntime --onnx FILE.onnx`` runs it
with the options of the PyTorch path (tiles, memory budget, report) and writes the same files.

What the network takes besides the image (its method card says) decides what is exported:

* nothing: ``FILE.onnx`` alone (input ``image``);
* a CLIP image embedding (with ``network_clip``): TWO models, ``FILE.onnx`` (inputs ``image`` and
  ``embedding``) and ``FILE.clip.onnx``, the CLIP image tower with its adapter and the degradation
  prompts' text features as constants (input ``clip_image``, the image resized and centre-cropped to
  the CLIP size by the runner, outputs ``embedding`` and ``probabilities`` for the report). Two models,
  because the CLIP tower runs once per image on a fixed-size view while the network runs once per tile;
* a CLIP text embedding of the task prompt: ``--task NAME`` bakes that task's prompt code into the
  graph (NAME: a label index, the prompt itself, or a task name such as ``noise25``); without it the
  option file's ``text_embedding.mode: blind`` is exported: the graph picks the prompt of the type the
  exported CLIP model sees (inputs ``image`` and ``embedding``).

A network whose eval draws random numbers is exported in its deterministic form (its ``for_export()``):
MoCE-IR routes without the published evaluation noise, and the check runs PyTorch the same way; the
metadata's ``note`` says so.

Height and width: the graphs take multiples of 8 of at least 16 pixels; the runner pads any image
with reflection to that (as the PyTorch engine does) and crops back. The exported networks use the
plain formulation of the shared blocks (the fused autograd Functions are for training and have no ONNX
form): :func:`plain_blocks`.

Before anything is written, the export is checked: ONNX Runtime and PyTorch restore real images
(``--check``, default the package's demo validation photos) and a random image of another size; the
largest difference of the restored images (and of the CLIP embeddings) must stay within ``--atol``
(1e-4). Files are written atomically (both or neither); an existing FILE.onnx is kept unless
``--overwrite``. Needs the ``export`` extra (``pip install -e .[export]``: onnx, onnxscript, onnxruntime).
"""
import argparse
import contextlib
import glob
import importlib.util
import io
import json
import os
import sys
import time
import warnings

FORMAT = 'vlunet-onnx/1'
MULTIPLE, MIN_SIDE = 8, 16
EXAMPLE_SIZE = (48, 64)        # (height, width) of the traced example: distinct, multiples of 8
DEFAULT_ATOL = 1e-4
DEFAULT_OPSET = 18


class ExportError(ValueError):
    """The export cannot be made or does not agree with PyTorch (the message names files and values)."""


@contextlib.contextmanager
def plain_blocks():
    """Run the shared blocks' plain formulation instead of their fused autograd Functions (which ONNX cannot
    hold): every loaded ``vlunet.archs`` module whose ``use_fused`` is the blocks' own gets one that says no,
    and gets the original back afterwards. blocks.py is not changed."""
    from vlunet.archs import blocks
    original = blocks.use_fused
    patched = [m for name, m in list(sys.modules.items())
               if m is not None and (name == 'vlunet.archs' or name.startswith('vlunet.archs.'))
               and getattr(m, 'use_fused', None) is original]
    try:
        for module in patched:
            module.use_fused = _never_fused
        yield
    finally:
        for module in patched:
            module.use_fused = original


def _never_fused(x):
    return False


# ------------------------------------------------------------------------------------------------
# the exported graphs
# ------------------------------------------------------------------------------------------------
def _graphs():
    import torch
    from torch import nn

    class RestorationGraph(nn.Module):
        """``image`` (1, 3, H, W) [+ ``embedding`` (1, D)] -> the restored image, as the engine runs the network."""

        def __init__(self, net, card, conditioning, code=None, text_features=None, codes=None):
            super().__init__()
            self.net, self.card, self.conditioning = net, card, conditioning
            if code is not None:
                # not 'code'/'codes': torch.export lifts these buffers next to the network's own names
                self.register_buffer('prompt_code', code.float().reshape(1, -1).clone())
            if codes is not None:
                self.register_buffer('prompt_codes', codes.float().clone())
                self.register_buffer('text_features', text_features.float().clone())

        def forward(self, image, embedding=None):
            if self.conditioning == 'embedding':
                out = self.net(image, embedding)
            elif self.conditioning == 'task':
                out = self.net(image, self.prompt_code.expand(image.shape[0], -1))
            elif self.conditioning == 'blind':  # the prompt of the type CLIP classifies the image as
                index = torch.argmax(embedding @ self.text_features.t(), dim=1)
                out = self.net(image, self.prompt_codes[index])
            else:
                out = self.net(image)
            return self.card.read_output(self.net, out).image

    class ClipGraph(nn.Module):
        """``clip_image`` (B, 3, S, S) in [0, 1] -> (embedding, probabilities over the prompts)."""

        def __init__(self, net_clip, text_features):
            super().__init__()
            self.clip = net_clip.clip
            self.image_adapter = net_clip.image_adapter
            self.register_buffer('mean', net_clip.mean.detach().float().clone())
            self.register_buffer('std', net_clip.std.detach().float().clone())
            self.register_buffer('text_features', text_features.float().clone())

        def forward(self, clip_image):
            x = (clip_image - self.mean) / self.std
            embedding = self.image_adapter(self.clip.encode_image(x, normalize=False))
            probabilities = torch.softmax(embedding @ self.text_features.t(), dim=-1)
            return embedding, probabilities

    return RestorationGraph, ClipGraph


def custom_translations():
    """ONNX translations of the aten operators the standard opsets lack: a matrix inverse (a subspace
    projection's (V V^T)^-1) becomes ONNX Runtime's ``com.microsoft`` Inverse (its schema is registered
    with onnx once, so the exporter can build the node)."""
    import onnx
    import onnxscript
    import torch
    from onnx.defs import OpSchema
    try:
        onnx.defs.get_schema('Inverse', 1, 'com.microsoft')
    except Exception:  # noqa: BLE001  (SchemaError: not registered yet)
        onnx.defs.register_schema(OpSchema(
            'Inverse', 'com.microsoft', 1, inputs=[OpSchema.FormalParameter('X', 'T')],
            outputs=[OpSchema.FormalParameter('Y', 'T')],
            type_constraints=[('T', ['tensor(float)', 'tensor(double)', 'tensor(float16)'], 'float tensors')]))
    microsoft = onnxscript.values.Opset('com.microsoft', 1)

    def linalg_inv(matrix):
        return microsoft.Inverse(matrix)
    return {torch.ops.aten.linalg_inv.default: linalg_inv}


def _to_onnx(module, args, input_names, output_names, dynamic, opset, what):
    """``module`` exported by torch.onnx (dynamo) -> ModelProto; ``dynamic``: {input: {axis: Dim}}."""
    import torch
    buffer = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buffer), torch.no_grad():
            warnings.simplefilter('ignore')
            program = torch.onnx.export(module, args, dynamo=True, input_names=input_names,
                                        output_names=output_names, dynamic_shapes=dynamic, opset_version=opset,
                                        optimize=True, verbose=False, report=False,
                                        custom_translation_table=custom_translations())
    except Exception as err:  # noqa: BLE001  (torch.export's many error types)
        log = buffer.getvalue().strip().splitlines()[-5:]
        raise ExportError(f'{what}: torch.onnx.export failed: {type(err).__name__}: {str(err)[:2000]}'
                          + (f'\n(last output: {" | ".join(log)})' if log else '')) from None
    return program.model_proto


def _set_metadata(proto, meta):
    from vlunet.inference.onnx_backend import META_KEY
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta, sort_keys=True)
    proto.producer_name = 'vlunet-export'


# ------------------------------------------------------------------------------------------------
# what to export
# ------------------------------------------------------------------------------------------------
def _task_names(opt, card, prompts):
    """{name: label index}: the option file's source names (any dataset) and the card's task prompts."""
    names = {}
    for dataset in (opt.get('datasets') or {}).values():
        for source in (dataset or {}).get('sources') or [] if isinstance(dataset, dict) else []:
            if isinstance(source, dict) and 'name' in source and isinstance(source.get('label'), int):
                names.setdefault(str(source['name']), source['label'])
    for name, prompt in (card.task_prompts or {}).items():
        if prompt in prompts:
            names.setdefault(name, prompts.index(prompt))
    return names


def resolve_task(task, opt, card, where):
    """The label index of ``--task`` (an index, a prompt of ``text_embedding.prompts`` or a task name)."""
    prompts = [str(p) for p in ((opt.get('text_embedding') or {}).get('prompts') or [])]
    names = _task_names(opt, card, prompts)
    text = str(task).strip()
    if text.isdigit() and int(text) < len(prompts):
        return int(text)
    lowered = [p.lower() for p in prompts]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    for name, index in names.items():
        if name.lower() == text.lower() and 0 <= index < len(prompts):
            return index
    listed = '; '.join(f'{i} = {p!r}' for i, p in enumerate(prompts))
    known = ', '.join(sorted(n for n, i in names.items() if 0 <= i < len(prompts)))
    raise ExportError(f'--task {task!r}: not a task of {where} (its text_embedding.prompts: {listed}'
                      + (f'; task names: {known}' if known else '') + ')')


def conditioning_of(engine, task_index=None):
    """'none' | 'embedding' | 'task' | 'blind': what the exported restoration graph takes and does."""
    from vlunet.archs.conditioning import DEGRADATION_EMBEDDING, TEXT_EMBEDDING
    condition = engine.card.condition
    if condition == DEGRADATION_EMBEDDING:
        return 'embedding' if engine.conditioner.net_clip is not None else 'none'
    if condition == TEXT_EMBEDDING:
        if task_index is not None:
            return 'task'
        if engine.conditioner.text_mode == 'blind':
            return 'blind'
        raise ExportError('the network takes the text embedding of the task prompt: pass --task NAME to bake one '
                          "task's prompt into the model, or set text_embedding.mode: blind (with network_clip) in the "
                          'option file to export the prompt chosen from what CLIP sees')
    return 'none'


def clip_path_for(path):
    """``FILE.onnx`` -> ``FILE.clip.onnx`` (the CLIP model's file beside it)."""
    stem = path[:-len('.onnx')] if path.lower().endswith('.onnx') else path
    return stem + '.clip.onnx'


def deterministic(net):
    """Let a network whose eval draws random numbers (MoCE-IR's routing noise) switch to its deterministic
    form, which a graph can hold (the network's ``for_export()``); returns its note of what changed, or None."""
    for_export = getattr(net, 'for_export', None)
    return for_export() if callable(for_export) else None


def network_proto(net, card, conditioning='none', code=None, codes=None, text_features=None, opset=DEFAULT_OPSET):
    """The restoration graph of a bare network as a ModelProto (no metadata): ``conditioning`` 'none',
    'embedding' (input ``embedding``), 'task' (``code`` baked in) or 'blind' (``codes`` and ``text_features``).
    Its callers first make a random eval deterministic (:func:`deterministic`), keeping the note."""
    import torch

    from vlunet.archs.conditioning import CLIP_DIM
    RestorationGraph, _ = _graphs()
    graph = RestorationGraph(net.eval(), card, conditioning, code, text_features, codes).eval()
    takes_embedding = conditioning in ('embedding', 'blind')
    g = torch.Generator().manual_seed(0)
    inputs = ['image'] + (['embedding'] if takes_embedding else [])
    args = (torch.rand(1, 3, *EXAMPLE_SIZE, generator=g),) + (
        (torch.randn(1, CLIP_DIM, generator=g),) if takes_embedding else ())
    dim = torch.export.Dim.DYNAMIC
    dynamic = {'image': {2: dim, 3: dim}, **({'embedding': None} if takes_embedding else {})}
    with plain_blocks():
        return _to_onnx(graph, args, inputs, ['restored'], dynamic, opset, type(net).__name__)


def write_network_onnx(net, card, path, code=None, opset=DEFAULT_OPSET):
    """A bare network (no CLIP stage, random or any weights) as an ONNX file :class:`OnnxEngine` runs: a
    network conditioned on an image embedding takes it as input ``embedding``; a text-conditioned one gets
    ``code`` baked in (benchmarks: the same graph as vlunet-export writes). Returns the metadata."""
    import torch

    from vlunet.archs.conditioning import CLIP_DIM, DEGRADATION_EMBEDDING, TEXT_EMBEDDING
    from vlunet.inference.engine import layout_digest
    from vlunet.utils.atomic import write_atomic
    conditioning = {DEGRADATION_EMBEDDING: 'embedding', TEXT_EMBEDDING: 'task'}.get(card.condition, 'none')
    if conditioning == 'task' and code is None:
        code = torch.zeros(CLIP_DIM)
    note = deterministic(net)
    proto = network_proto(net, card, conditioning, code=code, opset=opset)
    meta = {'format': FORMAT, 'role': 'restoration', 'method': card.name, 'arch': type(net).__name__,
            'conditioning': conditioning, 'inputs': ['image'] + (['embedding'] if conditioning == 'embedding' else []),
            'outputs': ['restored'], 'multiple': MULTIPLE, 'min_side': MIN_SIDE, 'batch': 1, 'embedding_dim': CLIP_DIM,
            'layout': layout_digest(net) + f'-{conditioning}', 'precision': 'fp32', 'opset': opset,
            'torch': torch.__version__, **({'note': note} if note else {})}
    _set_metadata(proto, meta)
    data = proto.SerializeToString()
    write_atomic(path, lambda f: f.write(data))
    return meta


def export_models(engine, task_index=None, opset=DEFAULT_OPSET, describe=None, log=print):
    """``(restoration ModelProto, CLIP ModelProto or None, metadata)`` of an fp32 engine on the CPU.

    ``describe``: extra metadata (option file, weights, ...)."""
    import torch

    from vlunet.archs.conditioning import CLIP_DIM
    from vlunet.inference.engine import layout_digest
    _, ClipGraph = _graphs()
    conditioning = conditioning_of(engine, task_index)
    conditioner, net = engine.conditioner, engine.net_g.eval()
    net_clip = conditioner.net_clip
    text_features = None
    if net_clip is not None:
        net_clip.eval()
        with torch.no_grad():
            text_features = net_clip.text_features().float().cpu()
    code = codes = None
    if conditioning == 'task':
        code = conditioner.text_codes[task_index].cpu()
    elif conditioning == 'blind':
        codes = conditioner.text_codes.cpu()
    takes_embedding = conditioning in ('embedding', 'blind')
    g = torch.Generator().manual_seed(1)
    inputs = ['image'] + (['embedding'] if takes_embedding else [])
    layout = layout_digest(net) + (f'-task{task_index}' if task_index is not None else '') + f'-{conditioning}'
    meta = {'format': FORMAT, 'role': 'restoration', 'method': engine.card.name, 'arch': engine.network_name,
            'conditioning': conditioning, 'conditioning_description': engine.describe_conditioning(),
            'inputs': inputs, 'outputs': ['restored'], 'multiple': MULTIPLE, 'min_side': MIN_SIDE, 'batch': 1,
            'embedding_dim': CLIP_DIM, 'layout': layout, 'precision': 'fp32', 'opset': opset,
            'torch': torch.__version__, **(describe or {})}
    if task_index is not None:
        meta['task'] = {'index': task_index}
    note = deterministic(net)  # before the graph is traced and before the check runs PyTorch
    if note:
        meta['note'] = note
        log(note)
    start = time.perf_counter()
    log(f'exporting {engine.network_name} ({conditioning}) ...')
    main = network_proto(net, engine.card, conditioning, code, codes,
                         text_features if codes is not None else None, opset)
    log(f'  done in {time.perf_counter() - start:.0f} s')
    clip = None
    if takes_embedding:
        size = int(net_clip.image_size)
        meta.update(clip_image_size=size, prompts=list(net_clip.prompts))
        clip_graph = ClipGraph(net_clip, text_features).eval()
        start = time.perf_counter()
        log(f'exporting the CLIP image tower ({type(net_clip.clip.visual).__name__}, {size} px) ...')
        clip = _to_onnx(clip_graph, (torch.rand(1, 3, size, size, generator=g),), ['clip_image'],
                        ['embedding', 'probabilities'], None, opset, 'network_clip')
        log(f'  done in {time.perf_counter() - start:.0f} s')
        _set_metadata(clip, {'format': FORMAT, 'role': 'clip', 'clip_image_size': size, 'prompts': list(net_clip.prompts),
                             'restoration_layout': layout, 'outputs': ['embedding', 'probabilities']})
    return main, clip, meta


# ------------------------------------------------------------------------------------------------
# the check
# ------------------------------------------------------------------------------------------------
def check_images(paths):
    """Image files of ``paths`` (files or folders; default: the package's demo validation photos)."""
    from vlunet.utils.image_io import is_image_file
    if not paths:
        paths = [os.path.join(os.path.dirname(os.path.abspath(__file__)), 'demo_data', 'val')]
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(p for p in glob.glob(os.path.join(path, '*')) if is_image_file(p))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f'--check {path}: no such image or folder')
    if not files:
        raise FileNotFoundError(f'--check {" ".join(paths)}: no images found')
    return files


def compare(engine, onnx_engine, files, atol=DEFAULT_ATOL, max_pixels=None, log=print):
    """Restore each file (and a random image of another size) with both engines, whole and in tiles of 64 px
    for the first; returns rows ``{image, size, max_diff, embedding_diff}`` and raises ExportError above atol."""
    import numpy as np
    import torch

    from vlunet.utils.image_io import read_image
    rows = []
    g = np.random.default_rng(0)
    items = [(os.path.basename(f), read_image(f, max_pixels)[0]) for f in files]
    items.append(('random 37x83', g.random((37, 83, 3), dtype=np.float32)))
    for i, (name, rgb) in enumerate(items):
        for tile in ((None, 64) if i == 0 else (None,)):
            ours = engine.restore(rgb, tile=tile, tile_overlap=16)
            theirs = onnx_engine.restore(rgb, tile=tile, tile_overlap=16)
            diff = float(np.abs(ours.image - theirs.image).max())
            emb_diff = None
            if onnx_engine.clip_session is not None:
                lq = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None]
                emb = onnx_engine.clip_outputs(lq)[0]
                emb_diff = float((engine.conditioner.embedding(lq).float() - emb).abs().max())
            rows.append({'image': name + (f' (tiles of {tile} px)' if tile else ''),
                         'size': f'{rgb.shape[1]}x{rgb.shape[0]}', 'max_diff': diff, 'embedding_diff': emb_diff})
            log(f'  {rows[-1]["image"]} {rows[-1]["size"]}: max |onnxruntime - pytorch| = {diff:.2e}'
                + (f', CLIP embedding {emb_diff:.2e}' if emb_diff is not None else ''))
    worst = max(rows, key=lambda r: max(r['max_diff'], r['embedding_diff'] or 0))
    if max(worst['max_diff'], worst['embedding_diff'] or 0) > atol:
        raise ExportError(f'the ONNX model does not agree with PyTorch on {worst["image"]} ({worst["size"]}): max '
                          f'difference {max(worst["max_diff"], worst["embedding_diff"] or 0):.2e} > --atol {atol:g}; '
                          'nothing was written')
    return rows


# ------------------------------------------------------------------------------------------------
def _error(message, status=2):
    print(f'error: {message}', file=sys.stderr)
    return status


def main(argv=None):
    parser = argparse.ArgumentParser(prog='vlunet-export', description=__doc__.split('\n\n')[0])
    parser.add_argument('-opt', required=True, help='train or test option file (network_g, network_clip, weights)')
    parser.add_argument('--model', help='network_g weights (overrides path.pretrain_network_g)')
    parser.add_argument('-o', '--output', required=True, help='the ONNX file to write (FILE.onnx; a CLIP stage goes '
                        'to FILE.clip.onnx beside it)')
    parser.add_argument('--task', help='text-conditioned networks: the task whose prompt is baked in (label index, '
                        'prompt or task name such as noise25); default: text_embedding.mode blind')
    parser.add_argument('--check', nargs='+', default=None, metavar='IMAGE',
                        help='images or folders restored by both ONNX Runtime and PyTorch before writing (default: '
                             'the package demo validation photos)')
    parser.add_argument('--atol', type=float, default=DEFAULT_ATOL,
                        help=f'largest allowed difference of the restored images in [0, 1] (default {DEFAULT_ATOL:g})')
    parser.add_argument('--opset', type=int, default=DEFAULT_OPSET, help=f'ONNX opset (default {DEFAULT_OPSET})')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing FILE.onnx (and FILE.clip.onnx)')
    parser.add_argument('--trust-pickle', action='store_true',
                        help='allow full unpickling of a checkpoint that holds more than tensors (runs code stored '
                             'in the file: only for files from a source you trust)')
    args = parser.parse_args(argv)

    missing = [m for m in ('onnx', 'onnxscript', 'onnxruntime') if importlib.util.find_spec(m) is None]
    if missing:
        return _error(f'vlunet-export needs the export extra (missing: {", ".join(missing)}); install it with: '
                      'pip install -e ".[export]"')
    output = args.output
    clip_output = clip_path_for(output)
    folder = os.path.dirname(os.path.abspath(output))
    if os.path.isdir(output):
        return _error(f'-o {output}: is a folder; expected the ONNX file to write (e.g. {output}/model.onnx)')
    if not os.path.isdir(folder):
        return _error(f'-o {output}: the folder {folder} does not exist')
    if args.atol <= 0:
        return _error(f'--atol {args.atol}: expected a positive tolerance')
    try:
        files = check_images(args.check)
    except FileNotFoundError as err:
        return _error(err.args[0])
    existing = [p for p in (output, clip_output) if os.path.lexists(p)]
    if existing and not args.overwrite:
        return _error(f'{", ".join(existing)} exist(s); pass --overwrite to replace, or choose another -o. Nothing '
                      'was written.')

    from vlunet.inference import RestorationEngine
    from vlunet.inference.engine import _read_options
    from vlunet.inference.onnx_backend import OnnxEngine
    from vlunet.utils.atomic import write_all_atomic
    from vlunet.utils.checkpoint import CheckpointError
    try:
        opt, where = _read_options(args.opt)
        from vlunet.archs.card import card_for
        card = card_for(opt['network_g']) if isinstance(opt, dict) and isinstance(opt.get('network_g'), dict) else None
        task_index = resolve_task(args.task, opt, card, where) if args.task is not None and card else None
        engine = RestorationEngine.from_options(args.opt, args.model, device='cpu', precision='fp32',
                                                trust_pickle=args.trust_pickle, known_task=task_index is not None)
        if task_index is None and args.task is not None:
            raise ExportError(f'--task: {where} has no network_g')
        describe = {'option_file': os.path.abspath(args.opt), 'weights': os.path.abspath(
            args.model or (opt.get('path') or {}).get('pretrain_network_g'))}
        if task_index is not None:
            describe['task'] = {'index': task_index,
                                'prompt': str(opt['text_embedding']['prompts'][task_index])}
        main_proto, clip_proto, meta = export_models(engine, task_index, args.opset, describe)
        if task_index is not None:
            meta['task'] = describe['task']
        if clip_proto is not None:
            meta['clip_model'] = os.path.basename(clip_output)
        _set_metadata(main_proto, meta)
        main_bytes = main_proto.SerializeToString()
        clip_bytes = clip_proto.SerializeToString() if clip_proto is not None else None
        print(f'checking against PyTorch on {len(files)} image(s) and a random one (--atol {args.atol:g}):')
        onnx_engine = OnnxEngine(main_bytes, clip_bytes, where=output)
        rows = compare(engine if task_index is None else _TaskEngine(engine, task_index), onnx_engine, files,
                       args.atol)
    except CheckpointError as err:
        return _error(str(err))
    except (FileNotFoundError, KeyError, ValueError) as err:
        return _error(err.args[0] if err.args else err)
    items = [(output, lambda f: f.write(main_bytes))]
    if clip_bytes is not None:
        items.append((clip_output, lambda f: f.write(clip_bytes)))
    try:
        write_all_atomic(items)
    except OSError as err:
        return _error(f'cannot write {output}: {err}; nothing was written', 1)
    worst = max(r['max_diff'] for r in rows)
    written = f'{output}' + (f' and {clip_output}' if clip_bytes is not None else '')
    print(f'wrote {written} ({meta["arch"]}, {meta["conditioning"]}; max difference to PyTorch {worst:.1e} over '
          f'{len(rows)} checks); restore with: vlunet-restore --backend onnxruntime --onnx {output} -i IN -o OUT')
    return 0


class _TaskEngine:
    """The PyTorch side of a ``--task`` export's check: every image gets that task's prompt (oracle mode)."""

    def __init__(self, engine, task_index):
        from vlunet.inference import Conditioner, RestorationEngine
        c = engine.conditioner
        self.conditioner = Conditioner(c.condition, c.net_clip, c.text_codes, 'oracle')
        self.engine = RestorationEngine(engine.net_g, self.conditioner, engine.device, prepare=False)
        self.task_index = task_index

    def restore(self, rgb, tile=None, tile_overlap=16):
        import numpy as np
        import torch

        from vlunet.inference import Restoration
        lq = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None]
        out = self.engine.forward(lq, label=[self.task_index], tile=tile, tile_overlap=tile_overlap)
        return Restoration(out[0].clamp(0, 1).permute(1, 2, 0).numpy(), {}, 0.0)


if __name__ == '__main__':
    sys.exit(main())
