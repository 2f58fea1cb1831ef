"""What a restoration network takes besides the image, made from the option file: one place for
training, testing and restoring.

A method's card says which kind of input its network takes (:mod:`vlunet.archs.conditioning`):

* none: ``net(img)``;
* a CLIP image embedding of the degraded input: ``net(img, network_clip(img))`` (e.g. VLU-Net), computed
  once per batch (or image) and also used for the degradation report;
* a CLIP text embedding of the task prompt: ``net(img, text_codes[k])``, the table of one code per
  label computed once by CLIP's text tower (``text_embedding`` options), ``k`` the image's known
  task (``mode: oracle``, the published tests) or the type ``network_clip`` sees (``mode: blind``).
"""
import os

import torch
from basicsr.archs import build_network
from basicsr.utils import get_root_logger

from vlunet.archs.conditioning import CLIP_DIM, DEGRADATION_EMBEDDING, TEXT_EMBEDDING
from vlunet.utils.atomic import torch_save_atomic

TEXT_PROMPT_MODES = {'oracle': "the image's known task (its label), as the method's published test",
                     'blind': 'the degradation type network_clip classifies the image as'}


def text_codes_from_options(text_opt, net_clip=None, example=''):
    """``(codes (K, CLIP_DIM) float32 on the CPU, mode)`` of the ``text_embedding`` options: CLIP's text
    tower run once over the prompts (one per label), or read from ``text_embedding.cache`` when it holds
    the same prompts and text tower (a damaged cache is recomputed and replaced).

    ``example``: an option file to point at in errors."""
    if not isinstance(text_opt, dict) or not text_opt.get('prompts'):
        raise ValueError('network_g takes a CLIP text embedding of the task prompt: set text_embedding: '
                         '{clip_model: ViT-B-32, pretrained: openai, prompts: [one per label], mode: oracle | blind}'
                         + (f' (see {example})' if example else ''))
    mode = text_opt.get('mode', 'oracle')
    if mode not in TEXT_PROMPT_MODES:
        raise ValueError(f'text_embedding.mode: expected one of {", ".join(TEXT_PROMPT_MODES)}, got {mode!r}')
    if mode == 'blind' and net_clip is None:
        raise ValueError('text_embedding.mode: blind picks the prompt of the degradation type that network_clip '
                         'classifies the image as: set network_clip (the CLIP stage), or use mode: oracle')
    prompts = [str(p) for p in text_opt['prompts']]
    if mode == 'blind' and len(prompts) != net_clip.num_types:
        raise ValueError(f'text_embedding.prompts has {len(prompts)} prompts but network_clip knows '
                         f'{net_clip.num_types} degradation types; blind mode needs one prompt per type')
    source = {'clip_model': text_opt.get('clip_model', 'ViT-B-32'), 'pretrained': text_opt.get('pretrained', 'openai')}
    cache, codes = text_opt.get('cache'), None
    if cache and os.path.isfile(cache):
        try:
            stored = torch.load(cache, map_location='cpu', weights_only=True)
        except Exception as err:  # noqa: BLE001  (a damaged cache is recomputed and replaced)
            get_root_logger().warning(f'text_embedding.cache: {cache} cannot be read ({type(err).__name__}); '
                                      'computing the text codes again')
            stored = {}
        if stored.get('prompts') == prompts and stored.get('source') == source:
            codes = stored['codes']
    if codes is None:
        clip = build_network({'type': 'DegradationCLIP', **source, 'prompts': prompts,
                              **{k: v for k, v in text_opt.items() if k in ('cache_dir', 'allow_download')}})
        with torch.no_grad():
            codes = clip.encode_text().float().cpu()
        del clip
        if cache:
            os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
            torch_save_atomic({'prompts': prompts, 'source': source, 'codes': codes}, cache)
    if tuple(codes.shape) != (len(prompts), CLIP_DIM):
        raise ValueError(f'text_embedding: expected ({len(prompts)}, {CLIP_DIM}) text codes, got {tuple(codes.shape)}')
    get_root_logger().info(f'Text codes: {len(prompts)} prompts embedded once by {source["clip_model"]} '
                           f'({source["pretrained"]}); prompt chosen by {TEXT_PROMPT_MODES[mode]}')
    return codes, mode


class Conditioner:
    """The second input of ``network_g``, as its card's ``condition`` says (see the module docstring).

    net_clip: the degradation-aware CLIP (``network_clip``) or None. text_codes/text_mode: the
    ``text_embedding`` table and how a row is chosen (text-conditioned networks only).
    """

    def __init__(self, condition=None, net_clip=None, text_codes=None, text_mode='oracle'):
        self.condition = condition
        self.net_clip = net_clip
        self.text_codes = text_codes
        self.text_mode = text_mode

    def embedding(self, lq):
        """The CLIP image embedding of ``lq`` (no_grad), or None without ``network_clip``."""
        if self.net_clip is None:
            return None
        with torch.no_grad():
            return self.net_clip(lq)

    def text_code(self, lq, label=None, embedding=None):
        """(B, CLIP_DIM) text codes: row ``label`` of the table (oracle) or of the type ``network_clip``
        classifies ``lq`` as (blind; ``embedding`` is its CLIP embedding when already computed)."""
        if self.text_mode == 'oracle':
            if label is None:
                raise ValueError("text_embedding.mode: oracle takes the prompt of each image's known task (its "
                                 'label); these images have none: use mode: blind (with network_clip)')
            index = torch.as_tensor(label, device=lq.device).long().view(-1)
        else:
            if embedding is None:
                embedding = self.embedding(lq)
            index = self.net_clip.classify_embedding(embedding).argmax(dim=1)
        return self.text_codes.to(device=lq.device, dtype=lq.dtype)[index.to(lq.device)]

    def network_input(self, lq, label=None, embedding=None):
        """What ``network_g`` takes besides ``lq``: the CLIP image embedding, a text code, or None."""
        if self.condition == TEXT_EMBEDDING:
            return self.text_code(lq, label, embedding)
        if self.condition == DEGRADATION_EMBEDDING:
            return self.embedding(lq) if embedding is None else embedding
        return None

    def report(self, embedding):
        """``{prompt: probability}`` of ``network_clip`` for the embedding of ONE image; {} without it."""
        if self.net_clip is None or embedding is None:
            return {}
        with torch.no_grad():
            probs = self.net_clip.classify_embedding(embedding)[0].tolist()
        return dict(zip(self.net_clip.prompts, probs))

    def describe(self):
        """How ``network_g`` is conditioned, for model.json and the comparison table (None: not at all)."""
        if self.condition == TEXT_EMBEDDING:
            return f'text prompt ({self.text_mode})'
        if self.condition == DEGRADATION_EMBEDDING:
            return 'CLIP image embedding' if self.net_clip is not None else 'no embedding (uniform type weights)'
        return None

    def to(self, device):
        if self.net_clip is not None:
            self.net_clip.to(device)
        if self.text_codes is not None:
            self.text_codes = self.text_codes.to(device)
        return self
