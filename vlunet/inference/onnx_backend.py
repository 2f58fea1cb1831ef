"""Restoring with an exported ONNX model (``vlunet-export``) on ONNX Runtime: ``vlunet-restore --backend
onnxruntime --onnx FILE.onnx``.

:class:`OnnxEngine` has the :class:`~vlunet.inference.RestorationEngine` interface that ``vlunet-restore``
uses (``restore``, ``forward``, ``network_name``, ``prompts``, tiling and the memory budget), so the
same options give the same files and report. What the file holds and takes is written in its metadata
(:data:`META_KEY`, JSON):

* ``FILE.onnx``: the restoration network, float32, batch 1, dynamic height and width (multiples of
  ``multiple`` = 8, at least ``min_side`` pixels: this runner pads with reflection, as the PyTorch
  engine does, and crops back), inputs ``image`` and, when the network needs it, ``embedding`` (the
  CLIP image embedding; for a text-conditioned network exported for blind mode the prompt is chosen
  inside the graph from that embedding; for one exported for a task the prompt's code is a constant);
* ``FILE.clip.onnx`` (``clip_model`` in the metadata, beside it), when the model has a degradation
  CLIP: input ``clip_image``, the image resized (shorter side, bicubic, antialiased) and centre-cropped
  to ``clip_image_size`` by this runner (torchvision's functions, as ``DegradationCLIP.preprocess``),
  values in [0, 1]; outputs ``embedding`` and ``probabilities`` (the degradation report over ``prompts``).
"""
import hashlib
import json
import os
import time

import numpy as np
import torch

from vlunet.inference.engine import BudgetedTiling, Restoration
from vlunet.inference.memory import calibrate, cached_model, parse_memory
from vlunet.utils.tiling import crop_to, pad_to_multiple, tile_count, tiled_forward

META_KEY = 'vlunet'
FORMAT = 'vlunet-onnx/1'


class OnnxModelError(ValueError):
    """An ONNX file that is not a usable vlunet export (the message names the file and what is wrong)."""


def read_metadata(model, where):
    """The vlunet metadata (dict) of an ONNX model (a loaded ``onnx.ModelProto``)."""
    props = {p.key: p.value for p in model.metadata_props}
    if META_KEY not in props:
        raise OnnxModelError(f'{where}: an ONNX model without vlunet metadata; expected a file written by vlunet-export')
    try:
        meta = json.loads(props[META_KEY])
    except ValueError as err:
        raise OnnxModelError(f'{where}: its vlunet metadata is not valid JSON ({err})') from None
    if meta.get('format') != FORMAT:
        raise OnnxModelError(f'{where}: metadata format {meta.get("format")!r}; this vlunet reads {FORMAT}')
    return meta


def _load_proto(source, where):
    import onnx
    try:
        if isinstance(source, (bytes, bytearray)):
            return onnx.load_model_from_string(bytes(source))
        return onnx.load(source, load_external_data=False)
    except FileNotFoundError:
        raise FileNotFoundError(f'ONNX model not found: {where}') from None
    except Exception as err:  # noqa: BLE001  (protobuf's DecodeError and friends)
        raise OnnxModelError(f'{where}: not a readable ONNX model ({type(err).__name__}: {err})') from None


def _session(source, where, threads=None, lean=False):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.enable_mem_pattern = False  # shapes change from image to image
    if lean:  # a memory budget: freed buffers go back at once, so the resident set is what is in use
        options.enable_cpu_mem_arena = False
    try:
        return ort.InferenceSession(bytes(source) if isinstance(source, (bytes, bytearray)) else source, options,
                                    providers=['CPUExecutionProvider'])
    except Exception as err:  # noqa: BLE001
        raise OnnxModelError(f'{where}: ONNX Runtime cannot load it ({type(err).__name__}: {err})') from None


def clip_input(lq, size):
    """(B, 3, H, W) in [0, 1] -> the CLIP input in [0, 1]: shorter side to ``size`` (bicubic, antialiased),
    centre crop ``size`` x ``size``, as :meth:`vlunet.archs.clip_arch.DegradationCLIP.preprocess` before its
    normalisation (which the exported CLIP graph holds)."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode
    img = TF.resize(lq, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    return TF.center_crop(img, [size, size])


class OnnxEngine(BudgetedTiling):
    """An exported model on ONNX Runtime's CPU provider (see the module docstring).

    Args:
        model: the restoration model, a path or the file's bytes. clip: the CLIP model (path or bytes);
            default: the file the metadata names, beside ``model``. threads: intra-op threads (default:
            torch's). tile, tile_overlap, max_memory: as :class:`~vlunet.inference.RestorationEngine`.
    """
    backend = 'onnxruntime'

    def __init__(self, model, clip=None, threads=None, tile=None, tile_overlap=32, max_memory=None, where=None):
        self.where = where or (model if isinstance(model, str) else '<onnx bytes>')
        proto = _load_proto(model, self.where)
        self.meta = read_metadata(proto, self.where)
        if self.meta.get('role') != 'restoration':
            raise OnnxModelError(f'{self.where}: the {self.meta.get("role")} part of an export; pass the restoration '
                                 'model (FILE.onnx, not FILE.clip.onnx) to --onnx')
        self.max_memory = parse_memory(max_memory)
        self.device = torch.device('cpu')
        self.precision = None
        self.tile, self.tile_overlap = tile, tile_overlap
        self.threads = threads
        self.multiple = int(self.meta.get('multiple', 8))
        self.min_side = int(self.meta.get('min_side', 16))
        self._digest = self.meta.get('layout') or hashlib.sha1(proto.SerializeToString()).hexdigest()[:16]
        del proto
        self.session = _session(model, self.where, threads, lean=bool(self.max_memory))
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.clip_session, self.clip_where = None, None
        # a network graph written without its CLIP model (write_network_onnx: benchmarks) takes the embedding
        # from the caller (forward(lq, embedding)); vlunet-export always writes both and names the CLIP file
        if clip is not None or self.meta.get('clip_model'):
            if clip is None:
                if not isinstance(model, str):
                    raise OnnxModelError(f'{self.where}: pass the CLIP model ({self.meta["clip_model"]}) as well')
                clip = os.path.join(os.path.dirname(os.path.abspath(model)), self.meta['clip_model'])
                if not os.path.isfile(clip):
                    raise FileNotFoundError(f'{self.where}: its CLIP model {clip} is missing (vlunet-export writes it '
                                            'beside the restoration model; keep both files together)')
            self.clip_where = clip if isinstance(clip, str) else '<clip onnx bytes>'
            clip_meta = read_metadata(_load_proto(clip, self.clip_where), self.clip_where)
            if clip_meta.get('restoration_layout') not in (None, self.meta.get('layout')):
                raise OnnxModelError(f'{self.clip_where}: this CLIP model was exported with another restoration model '
                                     f'than {self.where}')
            self.clip_session = _session(clip, self.clip_where, threads)

    @classmethod
    def from_file(cls, path, **kwargs):
        """The engine of ``FILE.onnx`` (and its ``FILE.clip.onnx`` beside it, when it has one)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f'ONNX model not found: {path}')
        return cls(path, **kwargs)

    # ---------------------------------------------------------------- what it is
    @property
    def network_name(self):
        return self.meta.get('arch', 'onnx')

    @property
    def prompts(self):
        return list(self.meta.get('prompts') or []) if self.clip_session is not None else []

    records_stages = False

    def describe_conditioning(self):
        return self.meta.get('conditioning_description')

    # ---------------------------------------------------------------- memory
    def memory_description(self, net=None):
        import onnxruntime as ort
        return {'backend': self.backend, 'layout': self._digest, 'onnxruntime': ort.__version__, 'precision': 'fp32',
                'device': 'cpu', 'threads': int(self.threads or torch.get_num_threads())}

    def memory_model(self, net=None):
        description = self.memory_description()
        dim = int(self.meta.get('embedding_dim', 512))

        def measure():
            embedding = torch.randn(1, dim, generator=torch.Generator().manual_seed(0))
            return calibrate(lambda x: self._run(x, embedding), self.device, what=f'{self.network_name} onnxruntime')
        return cached_model(description, measure)

    # ---------------------------------------------------------------- running
    def _run(self, x, embedding=None):
        """The graph on a (B, 3, h, w) batch (h, w multiples of 8, at least min_side), one image at a time."""
        outs = []
        for i in range(x.shape[0]):
            feeds = {'image': np.ascontiguousarray(x[i:i + 1].numpy(), dtype=np.float32)}
            if 'embedding' in self.inputs:
                feeds['embedding'] = np.ascontiguousarray(embedding[i:i + 1].numpy(), dtype=np.float32)
            outs.append(torch.from_numpy(self.session.run(['restored'], feeds)[0]))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def clip_outputs(self, lq):
        """``(embedding, probabilities)`` (torch, float32) of a (B, 3, H, W) batch; (None, None) without CLIP."""
        if self.clip_session is None:
            return None, None
        size = int(self.meta['clip_image_size'])
        views = clip_input(lq, size)
        outs = [self.clip_session.run(['embedding', 'probabilities'],
                                      {'clip_image': np.ascontiguousarray(views[i:i + 1].numpy(), dtype=np.float32)})
                for i in range(views.shape[0])]  # the CLIP graph takes one image
        return tuple(torch.from_numpy(np.concatenate([o[k] for o in outs])) for k in (0, 1))

    def forward(self, lq, embedding=None, tile=..., tile_overlap=..., max_memory=..., what='the image', **_):
        """Restore a (B, 3, H, W) float32 batch in [0, 1] (CPU tensors): ``(image, tile used or None, how)``."""
        tile = self.tile if tile is ... else tile
        tile_overlap = self.tile_overlap if tile_overlap is ... else tile_overlap
        max_memory = self.max_memory if max_memory is ... else parse_memory(max_memory)
        if 'embedding' in self.inputs and embedding is None:
            if self.clip_session is None:
                raise OnnxModelError(f'{self.where}: takes a CLIP embedding, and its metadata names no CLIP model to '
                                     'compute it (export with vlunet-export, which writes both)')
            embedding = self.clip_outputs(lq)[0]
        tile, how = self.tiling_for(lq.shape[0], lq.shape[-2], lq.shape[-1], tile, tile_overlap, max_memory, None, what)

        def run(x):
            padded, size = pad_to_multiple(x, self.multiple, minimum=self.min_side)
            return crop_to(self._run(padded, embedding), size)

        out = tiled_forward(run, lq, tile, tile_overlap) if tile else run(lq)
        return out, tile, how

    def restore(self, rgb, tile=..., tile_overlap=..., stages=False, max_memory=..., name='the image'):
        """Restore one float32 HxWx3 RGB image in [0, 1]; a :class:`~vlunet.inference.Restoration` as the
        PyTorch engine gives it (no stage grid: the exported graph returns the restored image only)."""
        tile_overlap = self.tile_overlap if tile_overlap is ... else tile_overlap
        start = time.perf_counter()
        lq = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).unsqueeze(0)
        embedding, probabilities = self.clip_outputs(lq)
        report = dict(zip(self.prompts, probabilities[0].tolist())) if probabilities is not None else {}
        out, tile, how = self.forward(lq, embedding, tile, tile_overlap, max_memory, what=name)
        del lq
        restored = out[0].clamp_(0, 1)
        note = (f'no stage grid: the ONNX model ({os.path.basename(self.where)}) returns the restored image only'
                if stages else '')
        tiles = tile_count(rgb.shape[0], rgb.shape[1], tile, tile_overlap) if tile else 1
        return Restoration(restored.permute(1, 2, 0).numpy(), report, time.perf_counter() - start, None, note, tiles,
                           tile if tiles > 1 else None, how, 'fp32', self.backend)
