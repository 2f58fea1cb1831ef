"""One loader for the published checkpoint formats of VLU-Net and its peers.

:func:`load_published_state_dict` reads any of

==========================  ==================================================================
format (``source_format``)  layout
==========================  ==================================================================
``lightning-vlunet``        VLU-Net Lightning ``.ckpt``: ``{'state_dict': {'net.<key>': ...,
                            'model_degradation.<CLIP and adapter keys>': ...}, ...}``
``lightning``               PromptIR, AdaIR and MoCE-IR Lightning ``.ckpt``: ``{'state_dict':
                            {'net.<key>': ...}}``
``state_dict``              DGUNet ``.pth``: ``{'state_dict': {'module.<key>': ...}, 'epoch', ...}``;
                            DFPIR ``.pth.tar``: ``{'epoch', 'state_dict', 'optimizer', 'scheduler'}``
``params`` / ``params_ema`` Restormer ``.pth`` and BasicSR's own files: ``{'params': ...}``
                            (optionally also ``'params_ema'``)
``learnable_params``        VLU-Net's ``clip_tuned.pth`` (CLIP adapters only, no network)
``bare``                    a plain state_dict ``{'<key>': tensor}``
==========================  ==================================================================

and returns the network's state_dict with the wrapper prefixes (``net.``, ``module.``)
removed, plus the 24 CLIP adapter tensors of a VLU-Net checkpoint under their published
names (``ad_imageEncoder.adapter.*``, ``ad_textEncoder.adapter.*``), the ``learnable_params``
format of ``clip_tuned.pth``. :func:`guess_arch` names the architecture (and the constructor
arguments visible from tensor shapes) that a state_dict belongs to.

Files are opened with ``torch.load(weights_only=True)``, which cannot run code. A file that
needs full unpickling (e.g. a Lightning checkpoint whose hyper-parameters are Python
objects) is refused unless the caller passes ``trust_pickle=True``.
"""
import os
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

NET_PREFIX = 'net.'
CLIP_PREFIX = 'model_degradation.'
MODULE_PREFIX = 'module.'
# The published names of DegradationCLIP's two adapters (clip_tuned.pth 'learnable_params', and the
# 'model_degradation.' entries of a VLU-Net Lightning checkpoint) -> our attribute names.
PUBLISHED_ADAPTER_PREFIXES = OrderedDict([('ad_imageEncoder.adapter.', 'image_adapter.'),
                                          ('ad_textEncoder.adapter.', 'text_adapter.')])
ADAPTER_PREFIXES = tuple(PUBLISHED_ADAPTER_PREFIXES)
# Names of the 24 published adapter tensors (two Sequential(Linear, LayerNorm, act) x 3 stacks).
ADAPTER_KEYS = tuple(f'{prefix}{i}.{p}' for prefix in ADAPTER_PREFIXES for i in (0, 1, 3, 4, 6, 7)
                     for p in ('weight', 'bias'))

EXPECTED = ("a published checkpoint: a Lightning .ckpt ({'state_dict': {'net.*': ...}}), "
            "{'params': ...} / {'params_ema': ...} (BasicSR, Restormer), {'state_dict': ...} (DGUNet, DFPIR), "
            "{'learnable_params': ...} (clip_tuned.pth) or a bare state_dict of tensors")


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or has an unexpected layout (the message names the file)."""


@dataclass
class PublishedCheckpoint:
    """What :func:`load_published_state_dict` found in a file.

    params: the network's state_dict (prefixes removed, file order); empty for a CLIP-adapter file.
    clip_adapters: published adapter tensors (``ad_*Encoder.adapter.*``) or None if the file has none.
    source_format: one of the formats in this module's docstring.
    ignored: keys that were neither network nor adapter entries (e.g. the CLIP backbone copies of
        a VLU-Net Lightning checkpoint), reported so that nothing is dropped silently.
    """
    params: 'OrderedDict[str, torch.Tensor]'
    clip_adapters: Optional[Dict[str, torch.Tensor]]
    source_format: str
    ignored: List[str] = field(default_factory=list)


def _unsafe_globals(path: str, message: str) -> List[str]:
    """Python globals (classes, functions) that ``path`` needs beyond what weights-only loading allows."""
    found = re.findall(r'Unsupported global: GLOBAL ([\w.]+)', message)
    finder = getattr(torch.serialization, 'get_unsafe_globals_in_checkpoint', None)  # torch >= 2.5
    if finder is not None:
        try:
            found += [g for g in finder(path) if g not in found]
        except Exception:  # noqa: BLE001  (not a zip checkpoint: rely on the message)
            pass
    return found


def _torch_load(path: str, trust_pickle: bool):
    if not os.path.isfile(path):
        raise CheckpointError(f'{path}: no such file (expected {EXPECTED})')
    try:
        return torch.load(path, map_location='cpu', weights_only=not trust_pickle)
    except pickle.UnpicklingError as err:
        needed = [] if trust_pickle else _unsafe_globals(path, str(err))
        if needed:
            raise CheckpointError(
                f'{path}: this file holds Python objects besides tensors and plain containers (it references '
                f'{", ".join(needed)}), so it can only be opened by full unpickling, which executes code stored '
                'in the file. If you trust where it came from, pass trust_pickle=True (command line: '
                '--trust-pickle).') from None
        raise CheckpointError(f'{path}: not a PyTorch checkpoint ({_first_line(err)}); expected {EXPECTED}') from None
    except Exception as err:  # noqa: BLE001  (zip/EOF/runtime errors of a damaged or foreign file)
        raise CheckpointError(f'{path}: not a PyTorch checkpoint ({type(err).__name__}: {_first_line(err)}); '
                              f'expected {EXPECTED}') from None


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    # torch's weights-only errors put the useful part ("Unsupported operand 0") near the end.
    detail = next((line for line in lines if line.startswith('Unsupported')), lines[0] if lines else '')
    return detail[:200]


def _check_tensors(path: str, where: str, mapping) -> None:
    if not isinstance(mapping, dict) or not mapping:
        raise CheckpointError(f'{path}: {where} should be a non-empty dict of tensors, got {type(mapping).__name__}'
                              f'{" (empty)" if isinstance(mapping, dict) else ""}; expected {EXPECTED}')
    bad = [k for k, v in mapping.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        shown = ', '.join(repr(k) for k in bad[:5]) + (' ...' if len(bad) > 5 else '')
        raise CheckpointError(f'{path}: {where} has {len(bad)} entries that are not tensors under string keys '
                              f'({shown}); expected {EXPECTED}')


def _strip_common_prefix(params: Dict[str, torch.Tensor], prefix: str) -> 'OrderedDict[str, torch.Tensor]':
    """Remove ``prefix`` from every key when all keys carry it (DataParallel's ``module.``)."""
    if params and all(k.startswith(prefix) for k in params):
        return OrderedDict((k[len(prefix):], v) for k, v in params.items())
    return OrderedDict(params)


def _split_lightning(state_dict) -> Tuple['OrderedDict[str, torch.Tensor]', Dict[str, torch.Tensor], List[str]]:
    params, adapters, ignored = OrderedDict(), {}, []
    for key, value in state_dict.items():
        if key.startswith(NET_PREFIX):
            params[key[len(NET_PREFIX):]] = value
        elif key.startswith(CLIP_PREFIX) and key[len(CLIP_PREFIX):].startswith(ADAPTER_PREFIXES):
            adapters[key[len(CLIP_PREFIX):]] = value
        else:
            ignored.append(key)
    return params, adapters, ignored


def load_published_state_dict(path: str, trust_pickle: bool = False,
                              param_key: Optional[str] = None) -> PublishedCheckpoint:
    """Read a published (or BasicSR) checkpoint; see the module docstring for the formats.

    Args:
        path: the file.
        trust_pickle: allow full unpickling (runs code from the file) when weights-only loading fails.
        param_key: for files with both ``params`` and ``params_ema``, which one to return
            (default: ``params``, as BasicSR's ``load_network``; falls back to the other one).

    Raises:
        CheckpointError: the file is missing, not a checkpoint, needs unpickling without
            ``trust_pickle``, or its layout is none of the known formats.
    """
    ckpt = _torch_load(path, trust_pickle)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'{path}: holds a {type(ckpt).__name__}, expected {EXPECTED}')
    if not ckpt:
        raise CheckpointError(f"{path}: the checkpoint is empty ({{}}). DFPIR's training writes an empty file for "
                              "every evaluation that was not the best so far; use one that holds 'state_dict'")

    if 'state_dict' in ckpt:
        state_dict = ckpt['state_dict']
        _check_tensors(path, "'state_dict'", state_dict)
        if any(k.startswith(NET_PREFIX) for k in state_dict):
            params, adapters, ignored = _split_lightning(state_dict)
            vlunet = any(k.startswith(CLIP_PREFIX) for k in state_dict)
            return PublishedCheckpoint(params, adapters or None, 'lightning-vlunet' if vlunet else 'lightning',
                                       ignored)
        return PublishedCheckpoint(_strip_common_prefix(state_dict, MODULE_PREFIX), None, 'state_dict')

    param_keys = [k for k in ('params', 'params_ema') if k in ckpt]
    if param_keys:
        if param_key is not None and param_key not in ('params', 'params_ema'):
            raise CheckpointError(f"{path}: param_key must be 'params' or 'params_ema', got {param_key!r}")
        key = param_key if param_key in param_keys else param_keys[0]
        _check_tensors(path, repr(key), ckpt[key])
        return PublishedCheckpoint(_strip_common_prefix(ckpt[key], MODULE_PREFIX), None, key)

    if 'learnable_params' in ckpt:
        adapters = ckpt['learnable_params']
        _check_tensors(path, "'learnable_params'", adapters)
        return PublishedCheckpoint(OrderedDict(), dict(adapters), 'learnable_params')

    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        _check_tensors(path, 'the state_dict', ckpt)
        return PublishedCheckpoint(_strip_common_prefix(ckpt, MODULE_PREFIX), None, 'bare')

    keys = ', '.join(repr(k) for k in list(ckpt)[:8]) + (' ...' if len(ckpt) > 8 else '')
    raise CheckpointError(f'{path}: unknown checkpoint layout (top-level keys: {keys or "none"}); expected {EXPECTED}')


def adapters_to_our_names(state: Dict[str, torch.Tensor]) -> 'OrderedDict[str, torch.Tensor]':
    """Rename published adapter keys (``ad_imageEncoder.adapter.*``) to ours (``image_adapter.*``);
    other keys are kept as they are."""
    out = OrderedDict()
    for key, value in state.items():
        for theirs, ours in PUBLISHED_ADAPTER_PREFIXES.items():
            if key.startswith(theirs):
                key = ours + key[len(theirs):]
                break
        out[key] = value
    return out


def check_clip_adapters(adapters: Dict[str, torch.Tensor]) -> Tuple[List[str], List[str]]:
    """(missing, unexpected) adapter names compared with the 24 published ones."""
    return ([k for k in ADAPTER_KEYS if k not in adapters], [k for k in adapters if k not in ADAPTER_KEYS])


# ----------------------------------------------------------------------------------------
# Which architecture is this?
# ----------------------------------------------------------------------------------------
def _count_blocks(params, prefix: str) -> int:
    """Number of consecutive ``prefix<i>.`` indices present (0, 1, ...)."""
    n = 0
    while any(k.startswith(f'{prefix}{n}.') for k in params):
        n += 1
    return n


def _ffn_expansion_factor(dims, hiddens, default=2.66) -> Optional[float]:
    """A factor f with int(d * f) == h for every level (the published formula); the default if it fits."""
    def fits(f):
        return all(int(d * f) == h for d, h in zip(dims, hiddens))

    if fits(default):
        return default
    lo = max(h / d for d, h in zip(dims, hiddens))
    hi = min((h + 1) / d for d, h in zip(dims, hiddens))
    for digits in range(1, 8):
        f = round((lo + hi) / 2, digits)
        if fits(f):
            return f
    return None


def _restormer_family(params, blocks: str, bias_key: Optional[str]) -> dict:
    """Constructor kwargs shared by Restormer, PromptIR and VLUNet; ``blocks`` formats the key
    prefix of a level's transformer blocks from the level name (block i is ``<prefix><i>.``)."""
    levels = ('encoder_level1', 'encoder_level2', 'encoder_level3', 'latent')
    first = {level: f'{blocks.format(level)}0.' for level in levels}
    stem = params['patch_embed.proj.weight']
    dim = stem.shape[0]
    kwargs = dict(inp_channels=stem.shape[1], out_channels=params['output.weight'].shape[0], dim=dim,
                  num_blocks=[_count_blocks(params, blocks.format(level)) for level in levels],
                  num_refinement_blocks=_count_blocks(params, blocks.format('refinement')),
                  heads=[params[first[level] + 'attn.temperature'].shape[0] for level in levels])
    hiddens = [params[first[level] + 'ffn.project_out.weight'].shape[1] for level in levels]
    factor = _ffn_expansion_factor([dim, dim * 2, dim * 4, dim * 8], hiddens)
    if factor is not None:
        kwargs['ffn_expansion_factor'] = factor
    kwargs['bias'] = (bias_key or first['encoder_level1'] + 'attn.qkv.bias') in params
    return kwargs


def _layer_norm_type(params):
    return 'WithBias' if 'encoder_level1.0.norm1.body.bias' in params else 'BiasFree'


def _guess_vlunet(params):
    kwargs = _restormer_family(params, '{}.denoiser.blocks.', bias_key='output.bias')
    # TransformerBlocks inside VLU-Net ignore the model's LayerNorm_type: not visible in the keys.
    return dict(de_dim=params['encoder_level1.gradient_descent.prompt_param'].shape[1], **kwargs)


def _guess_promptir(params):
    return dict(_restormer_family(params, '{}.', bias_key=None), LayerNorm_type=_layer_norm_type(params), decoder=True)


def _guess_restormer(params):
    return dict(_restormer_family(params, '{}.', bias_key=None), LayerNorm_type=_layer_norm_type(params),
                dual_pixel_task='skip_conv.weight' in params)


def _guess_adair(params):
    # Restormer's kwargs plus the frequency blocks (fre1-3); AdaIR(decoder=False) is Restormer's keys exactly.
    return dict(_restormer_family(params, '{}.', bias_key=None), LayerNorm_type=_layer_norm_type(params), decoder=True)


def _guess_dfpir(params):
    # ``device`` and ``dual_pixel_task`` change nothing in the published network: not in the weights.
    return dict(_restormer_family(params, '{}.', bias_key=None), LayerNorm_type=_layer_norm_type(params))


def _dgunet_common(params):
    first = params['shallow_feat1.0.weight']
    n_feat = first.shape[0]
    squeezed = params['shallow_feat1.1.CA.conv_du.0.weight'].shape[0]
    return dict(in_c=first.shape[1], out_c=params['tail.weight'].shape[0], n_feat=n_feat,
                scale_unetfeats=params['stage1_encoder.body.0.conv_1.weight'].shape[0] - n_feat,
                kernel_size=first.shape[-1], reduction=n_feat // squeezed, bias='shallow_feat1.0.bias' in params)


def _guess_dgunet(params):
    # The middle stage is weight-tied: its number of iterations (depth) is not in the weights.
    kwargs = _dgunet_common(params)
    return dict(kwargs, scale_orsnetfeats=params['concat67.weight'].shape[0] - kwargs['n_feat'])


def _guess_moceir(params):
    """MoCEIR kwargs from shapes. Not in the weights: topk, depth_type/stage_depth (they change no
    shape nor, as published, any output), with_complexity, and rank when rank_type is 'spread'.
    complexity_scale is read from the ``complexity`` buffer values when they are there."""
    from vlunet.archs.moceir_arch import expert_ranks  # the published rank schedules

    stem = params['patch_embed.proj.weight']
    dim, levels = stem.shape[0], _count_blocks(params, 'enc.') + 1
    enc = [f'enc.{i}.0.layers.' for i in range(levels - 1)] + ['latent.layers.']
    dec = [f'dec.{i}.2.layers.' for i in range(levels - 1)]  # deepest first: width dim * 2**(levels - 2 - i)
    kwargs = dict(inp_channels=stem.shape[1], out_channels=params['output.weight'].shape[0], dim=dim, levels=levels,
                  num_blocks=[_count_blocks(params, p) for p in enc],
                  num_dec_blocks=[_count_blocks(params, p) for p in dec][::-1],
                  num_refinement_blocks=_count_blocks(params, 'refinement.layers.'), bias='output.bias' in params)
    heads = []  # heads[j]: encoder level j, else the decoder level of that width, else (j = 0) the refinement
    for j in range(levels):
        where = [enc[j] + '0.mixer.temperature'] + [dec[levels - 2 - j] + '0.shared.temperature'] * (j < levels - 1)
        where += ['refinement.layers.0.mixer.temperature'] * (j == 0)
        # a level without blocks has no heads to read (nor to use): continue the released doubling
        heads.append(next((params[k].shape[0] for k in where if k in params), 2 * heads[-1] if heads else 1))
    kwargs['heads'] = heads
    ffn = [params[k].shape for k in params if k.endswith('.ffn.project_out.weight')]
    factor = _ffn_expansion_factor([s[0] for s in ffn], [s[1] for s in ffn], default=2)
    if factor is not None:
        kwargs['ffn_expansion_factor'] = factor
    norm = next((k for k in params if k.endswith('.norms.0.body.weight')), None)
    if norm is not None:
        kwargs['LayerNorm_type'] = 'WithBias' if norm[:-len('weight')] + 'bias' in params else 'BiasFree'
    adapters = [(dim * 2 ** (levels - 2 - i), f'{dec[i]}0.adapter.') for i in range(levels - 1)
                if f'{dec[i]}0.adapter.experts.0.0.proj.0.weight' in params]
    if adapters:
        n = kwargs['num_experts'] = _count_blocks(params, adapters[0][1] + 'experts.')
        seen = [(width, [params[f'{a}experts.{e}.0.proj.0.weight'].shape[0] for e in range(n)])
                for width, a in adapters]
        for rank_type in ('spread', 'constant', 'lin', 'double', 'exp', 'fact'):
            rank = next((r for r in (range(1, 13) if rank_type == 'fact' else [seen[0][1][0]])
                         if all(expert_ranks(rank_type, r, w, n) == ranks for w, ranks in seen)), None)
            if rank is not None:
                kwargs.update(rank_type=rank_type, **({} if rank_type == 'spread' else {'rank': rank}))
                break
        complexity = params.get(adapters[0][1] + 'routing.complexity')
        if complexity is not None and complexity.device.type != 'meta':  # parameter counts / max or / min
            if not complexity.is_floating_point():
                kwargs['complexity_scale'] = None  # neither: the raw counts
            elif float(complexity.max()) == 1 or float(complexity.min()) == 1:
                kwargs['complexity_scale'] = 'max' if float(complexity.max()) == 1 else 'min'
    return kwargs


# (arch name, keys that identify it, kwargs from shapes); the first match wins.
_SIGNATURES = (
    ('VLUNet', ('patch_embed_i.proj.weight', 'encoder_level1.gradient_descent.prompt_param'), _guess_vlunet),
    ('DFPIR', ('patch_embed.proj.weight', 'latent_shuffle_channel.linear_layer3.weight'), _guess_dfpir),  # < Restormer
    ('AdaIR', ('patch_embed.proj.weight', 'fre1.conv1.weight', 'fre3.rate_conv.0.weight'), _guess_adair),  # < Restormer
    ('PromptIR', ('prompt1.prompt_param', 'patch_embed.proj.weight'), _guess_promptir),
    ('Restormer', ('patch_embed.proj.weight', 'encoder_level1.0.attn.qkv.weight'), _guess_restormer),
    ('DGUNet', ('basic.r1', 'shallow_feat1.0.weight', 'concat67.weight'), _guess_dgunet),
    ('DGUNetPlus', ('r1', 'r6', 'shallow_feat1.0.weight', 'stage6_encoder.body.0.conv_1.weight'), _dgunet_common),
    ('MoCEIR', ('patch_embed.proj.weight', 'freq_embed.high_conv.0.conv.weight', 'enc.0.1.body.0.weight'),
     _guess_moceir),
)


def guess_arch(params: Dict[str, torch.Tensor]) -> Optional[Tuple[str, dict]]:
    """``(arch name, constructor kwargs)`` for a state_dict of VLUNet, PromptIR, Restormer,
    DGUNet or DGUNetPlus (kwargs that cannot be seen in the weights keep their defaults,
    e.g. DGUNet ``depth``), or None when the keys match none of them."""
    for name, keys, kwargs_from_shapes in _SIGNATURES:
        if all(k in params for k in keys):
            try:
                return name, kwargs_from_shapes(params)
            except (KeyError, IndexError, ZeroDivisionError):
                return name, {}  # recognisable but incomplete: the strict load will name what is missing
    return None
