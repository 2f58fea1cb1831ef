"""The one inference engine: ``vlunet-restore``, ``vlunet-app`` and ``vlunet-test``'s forward use it.

Like Real-ESRGAN's ``RealESRGANer``, a :class:`RestorationEngine` holds a restoration network and
what it takes besides the image (:class:`~vlunet.inference.conditioning.Conditioner`), with a
device, a precision and tiling::

    engine = RestorationEngine.from_options('options/test/VLUNet_demo.yml', device='cpu')
    result = engine.restore(rgb)            # float32 HxWx3 RGB in [0, 1] -> Restoration
    batch = engine.forward(lq, label=...)   # (B, 3, H, W) in [0, 1] -> (B, 3, H, W)
    engine = RestorationEngine.from_options(opt, precision='bf16', max_memory='3G')

Restoring one image embeds it with CLIP once and runs the network once (once per tile), giving the
restored image, the degradation report computed from that same embedding and, on request, the
stages that same forward recorded. What a network returns, takes and records is read from its
method card (:mod:`vlunet.archs.card`); nothing here names a method.

Precision: ``'fp32'``, ``'bf16'`` or ``'fp16'`` autocast (the weights stay float32); a precision the
device has no arithmetic for is refused (:func:`check_precision`). Memory: with ``max_memory`` (bytes
or '3G'), an image that would not fit is tiled automatically, the tile chosen from the network's
measured memory model (:mod:`vlunet.inference.memory`); :class:`Restoration` says whether and why.
"""
import contextlib
import copy
import os
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from vlunet.archs.card import card_for
from vlunet.archs.conditioning import CLIP_DIM, TEXT_EMBEDDING, bare_network
from vlunet.inference.conditioning import Conditioner, text_codes_from_options
from vlunet.inference.memory import (MemoryBudgetError, MemoryMeter, calibrate, cached_model,  # noqa: F401
                                     format_bytes, parse_memory, plan_tiles)
from vlunet.utils.checkpoint import load_published_state_dict
from vlunet.utils.tiling import crop_to, describe_tiles, pad_to_multiple, tile_count, tiled_forward

PRECISIONS = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def parse_precision(value, where='precision'):
    """'fp32' | 'bf16' | 'fp16' (also False/None/'float32' for full precision) -> autocast dtype or None."""
    aliases = {None: 'fp32', False: 'fp32', 'false': 'fp32', 'float32': 'fp32', 'no': 'fp32', 'off': 'fp32',
               'bfloat16': 'bf16', 'float16': 'fp16', 'half': 'fp16'}
    key = aliases.get(value.lower() if isinstance(value, str) else value, value)
    if key not in PRECISIONS:
        raise ValueError(f'{where}: {value!r} is not a precision; expected one of {", ".join(PRECISIONS)}')
    return PRECISIONS[key]


def precision_name(dtype):
    """The name of an autocast dtype (None: 'fp32')."""
    return next(name for name, d in PRECISIONS.items() if d == dtype) if dtype in PRECISIONS.values() else str(dtype)


def precision_problem(precision, device):
    """None when ``device`` computes in ``precision`` ('fp32' | 'bf16' | 'fp16' or its dtype), else why not.

    fp16 on a CPU needs float16 arithmetic units (AMX-FP16); without them PyTorch emulates float16
    several times slower than float32. bf16 on a CUDA device needs one that computes in bfloat16
    (compute capability 8.0 or later)."""
    dtype = parse_precision(precision) if not isinstance(precision, torch.dtype) else precision
    if dtype is None:
        return None
    device = torch.device(device)
    name = precision_name(dtype)
    if not torch.amp.is_autocast_available(device.type):
        return f'--precision {name}: PyTorch has no autocast on {device.type}; use --precision fp32'
    if device.type == 'cpu' and dtype == torch.float16:
        amx_fp16 = getattr(torch.cpu, '_is_amx_fp16_supported', lambda: False)()
        if not amx_fp16:
            bf16 = getattr(torch.cpu, '_is_avx512_bf16_supported', lambda: False)() or \
                getattr(torch.cpu, '_is_amx_tile_supported', lambda: False)()
            return ('--precision fp16: this CPU has no float16 arithmetic (AMX-FP16), so PyTorch would emulate it, '
                    'several times slower than fp32; use --precision bf16' + (' (this CPU computes in bfloat16)'
                                                                              if bf16 else '') + ' or fp32')
    if device.type == 'cuda' and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        gpu = torch.cuda.get_device_name(index)
        if dtype == torch.bfloat16 and major < 8:
            return (f'--precision bf16: {gpu} (compute capability {major}.{minor}) has no bfloat16 arithmetic; use '
                    '--precision fp16 or fp32')
        if dtype == torch.float16 and (major, minor) < (5, 3):
            return f'--precision fp16: {gpu} (compute capability {major}.{minor}) has no float16 arithmetic'
    return None


def check_precision(precision, device):
    """Raise ValueError with :func:`precision_problem`'s reason when ``device`` cannot compute in ``precision``."""
    problem = precision_problem(precision, device)
    if problem:
        raise ValueError(problem)


@dataclass
class Restoration:
    """What one forward pass gave for one image (see :meth:`RestorationEngine.restore`)."""

    image: np.ndarray                 # float32 HxWx3 RGB in [0, 1], the input's size
    report: dict                      # {prompt: CLIP probability}; empty without network_clip
    seconds: float                    # CLIP embedding + network forward (+ drawing the stages)
    stage_grid: Optional[np.ndarray] = None   # BGR uint8 picture of the unfolding stages, on request
    note: str = ''                    # why there is no stage grid although one was asked for
    tiles: int = 1                    # forwards the image took (1: the whole image at once)
    tile: Optional[int] = None        # the tile side (px) it ran in, None: the whole image
    tiling: str = ''                  # how and why: 'whole image', 'tiles of 256 px (--tile)', the budget's reason
    precision: str = 'fp32'           # the autocast precision of the forward
    backend: str = 'pytorch'          # 'pytorch' or 'onnxruntime'

    @property
    def top_type(self):
        return max(self.report, key=self.report.get) if self.report else ''


class WeightsError(ValueError):
    """A weights file does not fit the network (the message names the file and says how)."""


def _short(keys, limit=3):
    keys = [k if len(k) <= 60 else k[:28] + '...' + k[-28:] for k in keys]
    return ', '.join(keys[:limit]) + (', ...' if len(keys) > limit else '')


def describe_mismatch(net, params):
    """One line saying how ``params`` differs from ``net``'s state_dict (counts and examples of missing,
    unexpected and mis-shaped keys, and which method the weights look like)."""
    from vlunet.archs.card import identify, state_dict_differences
    layout = net.state_dict()
    missing, unexpected, mismatched = state_dict_differences(layout, params)
    shapes = [f'{k} {list(params[k].shape)} vs {list(layout[k].shape)}' for k in mismatched]
    parts = []
    if missing:
        parts.append(f'{len(missing)} of its {len(layout)} keys missing ({_short(missing)})')
    if unexpected:
        parts.append(f'{len(unexpected)} unexpected keys ({_short(unexpected)})')
    if shapes:
        parts.append(f'{len(shapes)} shape mismatches (checkpoint vs network: {_short(shapes, 2)})')
    try:
        found = identify(params)
    except ValueError:
        found = None
    if found is not None and found.card.arch != type(bare_network(net)).__name__:
        parts.append(f'the weights look like {found.card.name} ({found.card.arch})')
    return '; '.join(parts) or 'the keys match but loading failed'


def load_weights(net, path, trust_pickle=False, param_key='params', what=None):
    """Load any published or BasicSR checkpoint format into ``net`` strictly; returns the
    :class:`~vlunet.utils.checkpoint.PublishedCheckpoint` (its CLIP adapters, format, ...).

    Raises CheckpointError (unreadable file) or WeightsError (weights that do not fit, saying how);
    ``what`` names the network in that message."""
    ckpt = load_published_state_dict(path, trust_pickle=trust_pickle, param_key=param_key,
                                     expect_keys=bare_network(net).state_dict().keys())
    if not ckpt.params:
        raise WeightsError(f'{path}: holds no network weights (format {ckpt.source_format})')
    try:
        bare_network(net).load_state_dict(ckpt.params, strict=True)
    except RuntimeError:
        raise WeightsError(f'{path}: does not fit {what or type(bare_network(net)).__name__}: '
                           f'{describe_mismatch(bare_network(net), ckpt.params)}') from None
    return ckpt


def _read_options(opt):
    """An option dict from a dict or an option file (safe YAML)."""
    if isinstance(opt, dict):
        return opt, '<options>'
    import yaml

    from basicsr.utils.options import ordered_yaml  # vlunet.compat made it a safe loader
    if not os.path.isfile(opt):
        raise FileNotFoundError(f'option file not found: {opt}')
    try:
        with open(opt) as f:
            data = yaml.load(f, Loader=ordered_yaml()[0])
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ValueError(f'{opt}: cannot read the option file ({err})') from None
    return data, opt


class BudgetedTiling:
    """What both engines (PyTorch here, ONNX Runtime in :mod:`vlunet.inference.onnx_backend`) share: how an
    image of a given size runs (asked-for tiles, the memory budget's tiles, or whole). Needs ``device``,
    ``max_memory``, ``tile_overlap`` and ``memory_model(net)``."""

    def plan(self, batch, height, width, tile_overlap=..., net=None, max_memory=..., what='the image'):
        """How a (batch, 3, height, width) input runs within the memory budget: a
        :class:`~vlunet.inference.memory.TilePlan` (tile None: whole). Raises MemoryBudgetError when even small
        tiles do not fit."""
        budget = self.max_memory if max_memory is ... else parse_memory(max_memory)
        tile_overlap = self.tile_overlap if tile_overlap is ... else tile_overlap
        if not budget:
            raise ValueError('plan: no memory budget (max_memory) is set')
        model = self.memory_model(net)  # measured first: the calibration's own memory is gone by then
        return plan_tiles(model, budget, MemoryMeter(self.device).in_use(), batch, height, width, tile_overlap,
                          what=what)

    def tiling_for(self, batch, height, width, tile, tile_overlap, max_memory, net=None, what='the image'):
        """``(tile or None, how it runs)``: the tile asked for, else the memory budget's choice, else whole."""
        if tile:
            if tile_count(height, width, tile, tile_overlap) == 1:
                return tile, f'whole image (it fits one {tile} px tile)'
            return tile, f'{describe_tiles(height, width, tile, tile_overlap)}, as asked (--tile)'
        if max_memory:
            plan = self.plan(batch, height, width, tile_overlap, net, max_memory, what)
            if plan.tile:
                return plan.tile, f'{describe_tiles(height, width, plan.tile, tile_overlap)}, {plan.reason}'
            return None, plan.reason
        return None, 'whole image'


class RestorationEngine(BudgetedTiling):
    """A restoration network ready to restore images (see the module docstring).

    Args:
        net_g: the restoration network (any registered arch; its card says what it takes and returns).
        conditioner: what the network takes besides the image (default: nothing / uniform weights).
        device: where it runs. precision: 'fp32', 'bf16' or 'fp16' (autocast; weights stay fp32; a
            precision the device cannot compute in is refused, see :func:`check_precision`).
        tile, tile_overlap: default tiling of :meth:`forward` and :meth:`restore` (None: whole images).
        max_memory: a memory budget (bytes, or '3G'): images that would not fit run in tiles chosen from
            the network's measured memory model (see :mod:`vlunet.inference.memory`); None: no budget.
    """
    backend = 'pytorch'

    def __init__(self, net_g, conditioner=None, device='cpu', precision='fp32', tile=None, tile_overlap=32,
                 prepare=True, max_memory=None):
        self.device = torch.device(device)
        self.net_g = bare_network(net_g)
        self.card = card_for(self.net_g)
        self.conditioner = conditioner or Conditioner(self.card.condition)
        if prepare:  # a model's own networks (training) are left as they are: the model moves and switches them
            self.net_g.to(self.device).eval()
            self.conditioner.to(self.device)
            if self.conditioner.net_clip is not None:
                self.conditioner.net_clip.eval()
        self.precision = parse_precision(precision)
        if prepare:
            check_precision(self.precision, self.device)
        self.tile, self.tile_overlap = tile, tile_overlap
        self.max_memory = parse_memory(max_memory)

    # ---------------------------------------------------------------- building
    @classmethod
    def from_options(cls, opt, model_path=None, device='cpu', precision='fp32', tile=None, tile_overlap=32,
                     trust_pickle=False, known_task=False, max_memory=None):
        """The engine of a train or test option file: its ``network_g``, the weights of
        ``path.pretrain_network_g`` (or ``model_path``), its ``network_clip`` and ``text_embedding``.

        ``known_task``: the images come with their task (labels); otherwise a text-conditioned network
        must pick its prompt blindly (``text_embedding.mode: blind``). ``trust_pickle``: allow full
        unpickling of a checkpoint that holds more than tensors (as ``path.trust_pickle: true``).

        Raises FileNotFoundError / KeyError / ValueError naming the option file or the weights file."""
        import vlunet  # noqa: F401  (fixes basicsr, registers the archs)  # isort: skip
        from basicsr.archs import build_network
        opt, where = _read_options(opt)
        if not isinstance(opt, dict) or not isinstance(opt.get('network_g'), dict):
            raise KeyError(f'{where}: missing "network_g" (expected a vlunet train or test option file)')
        card = card_for(opt['network_g'])
        text_opt = opt.get('text_embedding') if isinstance(opt.get('text_embedding'), dict) else {}
        if card.condition == TEXT_EMBEDDING and not known_task and text_opt.get('mode', 'oracle') != 'blind':
            raise ValueError(f"{where}: network_g {opt['network_g'].get('type')} takes a CLIP text embedding of the "
                             "task prompt (condition 'text_embedding'); your photos have no known task, so set "
                             'text_embedding.mode: blind (the prompt of the type network_clip sees) in the option '
                             'file.')
        path_opt = opt.get('path') or {}
        weights = model_path or path_opt.get('pretrain_network_g')
        if not weights:
            raise KeyError(f'{where}: no weights: set path.pretrain_network_g or pass --model')
        if not os.path.isfile(weights):
            raise FileNotFoundError(f'model weights not found: {weights}')
        net_g = build_network(copy.deepcopy(dict(opt['network_g'])))
        ckpt = load_weights(net_g, weights, trust_pickle or bool(path_opt.get('trust_pickle')),
                            path_opt.get('param_key_g', 'params'),
                            what=f"network_g ({opt['network_g'].get('type')}) of {where}")
        net_clip = None
        if opt.get('network_clip'):
            clip_opt = copy.deepcopy(dict(opt['network_clip']))
            load_path = clip_opt.pop('load_path', None)
            net_clip = build_network(clip_opt)
            if load_path:
                if not os.path.isfile(load_path):
                    raise FileNotFoundError(f'network_clip.load_path: file not found: {load_path}')
                net_clip.load_adapters(load_path)
            elif ckpt.clip_adapters:  # a published checkpoint holding the CLIP adapters too
                net_clip.load_adapter_state(ckpt.clip_adapters, weights)
            for p in net_clip.parameters():
                p.requires_grad_(False)
        codes, mode = (text_codes_from_options(text_opt, net_clip) if card.condition == TEXT_EMBEDDING
                       else (None, 'oracle'))
        for p in net_g.parameters():
            p.requires_grad_(False)
        return cls(net_g, Conditioner(card.condition, net_clip, codes, mode), device, precision, tile, tile_overlap,
                   max_memory=max_memory)

    @classmethod
    def from_checkpoint(cls, path, device='cpu', precision='fp32', tile=None, tile_overlap=32, trust_pickle=False,
                        max_memory=None):
        """The engine of a checkpoint alone: its method and size recognised from the weights (method
        cards). Networks that need a CLIP stage or text prompts need an option file instead (a network
        conditioned on a CLIP image embedding runs with uniform degradation weights)."""
        import vlunet  # noqa: F401
        from vlunet.archs.card import identify, network_entry
        ckpt = load_published_state_dict(path, trust_pickle=trust_pickle)
        if len(ckpt.entries) > 1 and network_entry(ckpt.entries) is not None:
            ckpt.params = ckpt.entries[network_entry(ckpt.entries)]
        found = identify(ckpt.params) if ckpt.params else None
        if found is None or not found.exact:
            raise WeightsError(f'{path}: the method cannot be recognised from its weights; use an option file '
                               '(-opt) whose network_g fits them')
        if found.card.condition == TEXT_EMBEDDING:
            raise ValueError(f'{path}: {found.card.name} takes a text prompt; restore it through an option file '
                             'with text_embedding (mode: blind) and network_clip')
        net_g = found.card.arch_class(**found.kwargs)
        net_g.load_state_dict(ckpt.params, strict=True)
        return cls(net_g, None, device, precision, tile, tile_overlap, max_memory=max_memory)

    # ---------------------------------------------------------------- what it is
    @property
    def network_name(self):
        return type(self.net_g).__name__

    @property
    def prompts(self):
        """The degradation prompts of its CLIP (empty without ``network_clip``)."""
        clip = self.conditioner.net_clip
        return list(clip.prompts) if clip is not None else []

    @property
    def records_stages(self):
        return self.card.records_stages

    def describe_conditioning(self):
        return self.conditioner.describe()

    def autocast(self):
        if self.precision is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.precision)

    # ---------------------------------------------------------------- memory
    def memory_description(self, net=None):
        """What a memory model depends on: the network (class and every key's shape), precision, device, threads."""
        net = bare_network(net if net is not None else self.net_g)
        return {'backend': self.backend, 'arch': type(net).__name__, 'layout': layout_digest(net),
                'precision': precision_name(self.precision), 'device': device_description(self.device),
                'threads': torch.get_num_threads()}

    def memory_model(self, net=None):
        """The :class:`~vlunet.inference.memory.MemoryModel` of one forward of ``net`` (default ``net_g``) at this
        precision on this device: measured once by a calibration (a few small forwards), then cached."""
        net = net if net is not None else self.net_g
        bare = bare_network(net)
        card = card_for(bare)
        description = self.memory_description(net)

        def measure():
            extra = () if card.condition is None else (torch.randn(1, CLIP_DIM, generator=torch.Generator().manual_seed(0))
                                                      .to(self.device),)

            def run(x):
                with self.autocast():
                    return card.read_output(bare, net(x, *extra)).image
            return calibrate(run, self.device, what=f'{description["arch"]} {description["precision"]} on '
                                                    f'{description["device"]}')
        return cached_model(description, measure)

    # ---------------------------------------------------------------- restoring
    def forward(self, lq, label=None, embedding=None, return_stages=False, net=None, tile=..., tile_overlap=...,
                max_memory=...):
        """Restore a (B, 3, H, W) batch in [0, 1]: pad to a multiple of 8 (or tile), run, crop back;
        returns the float32 image, or ``(image, stages)`` with ``return_stages``.

        ``label``: the images' task indices (a text-conditioned network's oracle prompt). ``embedding``: the
        CLIP embedding of ``lq`` when the caller has it (computed here otherwise: once for the whole
        image, all tiles). ``net``: another network of the same kind (e.g. a model's EMA copy).
        ``stages``: the unfolding stages this same forward recorded (cards with ``records_stages``), or
        None when the network records none or the image ran as several tiles (no second forward).
        ``max_memory``: the budget (default the engine's): without ``tile``, a batch that would not fit
        runs in tiles chosen from the network's memory model."""
        out, stages, _, _ = self._forward(lq, label, embedding, return_stages, net, tile, tile_overlap, max_memory)
        return (out, stages) if return_stages else out

    def _forward(self, lq, label=None, embedding=None, return_stages=False, net=None, tile=..., tile_overlap=...,
                 max_memory=..., what='the image'):
        """:meth:`forward`'s work: ``(image, stages, tile used or None, how it ran)``."""
        net = net if net is not None else self.net_g
        tile = self.tile if tile is ... else tile
        tile_overlap = self.tile_overlap if tile_overlap is ... else tile_overlap
        max_memory = self.max_memory if max_memory is ... else parse_memory(max_memory)
        card = card_for(net)
        bare = bare_network(net)
        record = return_stages and card.records_stages
        recorded = []
        with torch.no_grad():
            extra = self.conditioner.network_input(lq, label, embedding)
            args = () if extra is None else (extra,)
            tile, how = self.tiling_for(lq.shape[0], lq.shape[-2], lq.shape[-1], tile, tile_overlap, max_memory,
                                        net, what)

            def run(x):
                with self.autocast():
                    if record:
                        out, stages = net(x, *args, return_stages=True)
                        recorded.append(stages)
                    else:
                        out = net(x, *args)
                    return card.read_output(bare, out).image.float()

            if tile:
                out = tiled_forward(run, lq, tile, tile_overlap)
            else:
                padded, size = pad_to_multiple(lq, 8)
                out = crop_to(run(padded), size)
                del padded
        return out, (recorded[0] if len(recorded) == 1 else None), tile, how

    def restore(self, rgb, tile=..., tile_overlap=..., stages=False, max_memory=..., name='the image'):
        """Restore one image (float32 HxWx3 RGB in [0, 1], as :func:`vlunet.utils.image_io.read_image`
        gives it): one CLIP embedding and one forward (one per tile) give the restored image, the
        degradation report from that embedding and, with ``stages``, the stage grid of that forward.
        With a memory budget (``max_memory``, default the engine's) and no ``tile``, an image that would
        not fit runs in tiles; :attr:`Restoration.tiling` says how it ran and why. ``name`` names the
        image in a MemoryBudgetError."""
        from vlunet.stage_grid import stage_grid, type_names
        tile_overlap = self.tile_overlap if tile_overlap is ... else tile_overlap
        start = time.perf_counter()
        lq = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).unsqueeze(0).to(self.device)
        embedding = self.conditioner.embedding(lq)
        report = self.conditioner.report(embedding)
        out, recorded, tile, how = self._forward(lq, embedding=embedding, return_stages=stages, tile=tile,
                                                 tile_overlap=tile_overlap, max_memory=max_memory, what=name)
        restored = out[0].clamp_(0, 1)
        grid, note = None, ''
        if stages and recorded:
            k = recorded[0]['weights'].shape[1]
            grid = stage_grid(lq[0], restored, recorded, type_names(self.conditioner.net_clip, k))
        elif stages and not self.records_stages:
            note = f'no stage grid: {self.network_name} does not record its unfolding stages'
        elif stages:
            note = (f'no stage grid: the image ({rgb.shape[1]}x{rgb.shape[0]}) ran as several {tile} px tiles and '
                    'the stages come from one whole-image forward; restore it without tiling, or with a tile at '
                    'least as large as the image, to see them')
        del lq
        image = restored.permute(1, 2, 0).float().cpu().numpy()
        tiles = tile_count(rgb.shape[0], rgb.shape[1], tile, tile_overlap) if tile else 1
        return Restoration(image, report, time.perf_counter() - start, grid, note, tiles, tile if tiles > 1 else None,
                           how, precision_name(self.precision), self.backend)


def layout_digest(net):
    """A short digest of a network's state_dict keys and shapes (what its memory model depends on)."""
    import hashlib
    text = ';'.join(f'{k}:{tuple(v.shape)}' for k, v in bare_network(net).state_dict().items())
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def device_description(device):
    """The device as a memory model depends on it: 'cpu (AVX512)', 'cuda (NVIDIA H100 80GB HBM3)'."""
    device = torch.device(device)
    if device.type == 'cuda' and torch.cuda.is_available():
        return f'cuda ({torch.cuda.get_device_name(device.index if device.index is not None else None)})'
    if device.type == 'cpu':
        return f'cpu ({torch.backends.cpu.get_cpu_capability()})'
    return device.type
