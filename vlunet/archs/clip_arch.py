"""``DegradationCLIP``: the vision-language half of VLU-Net (degradation-aware CLIP).

An open_clip model (frozen by default) with two small trainable adapters on top, as published
with VLU-Net (CVPR 2025):

* image branch: ``forward(img) = image_adapter(clip.encode_image(preprocess(img)))``, a (B, 512)
  vector, not L2-normalised. This is the ``degradation`` input of ``VLUNet``.
* text branch: ``text_features() = text_adapter(clip.encode_text(tokens(prompts)))``, (K, 512),
  one row per degradation type. ``classify(img)`` is the softmax over image @ text.T.

Each adapter is ``Sequential(Linear, LayerNorm, act, Linear, LayerNorm, act, Linear, LayerNorm)``
(indices 0..7, width = CLIP embed_dim = 512), so the published ``clip_tuned.pth`` loads into it.

Importing this module also registers the open_clip model configs of ``clip_configs/`` (no weights;
512-d embedding and the standard CLIP tokenizer, so adapters, VLUNet and prompts fit):
``vlunet-tiny`` (two-layer 64-wide ViT and text towers; fast, for tests) and ``vlunet-tiny-rn`` (the
same text tower with a small ResNet image tower, which learns to tell noise levels apart when trained
from scratch; for the CPU demo).
"""
import logging
import os
from collections import OrderedDict

import open_clip
import torch
from basicsr.utils.registry import ARCH_REGISTRY
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from vlunet.utils.checkpoint import (PUBLISHED_ADAPTER_PREFIXES, CheckpointError, adapters_to_our_names,
                                     load_published_state_dict)

CLIP_CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'clip_configs')

# Degradation prompts of the published CLIP fine-tuning; the index of a prompt is the class label.
NHR_PROMPTS = (
    'image with noise',  # 0: Gaussian noise sigma 15
    'image with many noise',  # 1: sigma 25
    'image with large amount of noise',  # 2: sigma 50
    'image with haze',  # 3
    'image with rain',  # 4
)
NHRBL_PROMPTS = NHR_PROMPTS + (
    'image with blur',  # 5
    'image with low light',  # 6
)
PROMPT_SETS = {'NHR': NHR_PROMPTS, 'NHRBL': NHRBL_PROMPTS}

BACKBONE_PREFIX = 'clip.'


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record):
        return 'Model initialized randomly' not in record.getMessage()


def register_clip_configs(folder=CLIP_CONFIG_DIR):
    """Make the model configs in ``folder`` (``vlunet-tiny``, ...) known to ``open_clip.create_model``."""
    names = [os.path.splitext(f)[0] for f in os.listdir(folder) if f.endswith('.json')]
    if any(name not in open_clip.list_models() for name in names):
        open_clip.add_model_config(folder)


register_clip_configs()


def make_adapter(dim, act='gelu'):
    """Three Linear+LayerNorm pairs with ``act`` in between (indices 0..7, as published)."""
    acts = {'gelu': nn.GELU, 'leaky_relu': lambda: nn.LeakyReLU(0.01)}
    if act not in acts:
        raise ValueError(f'DegradationCLIP: adapter_act must be one of {sorted(acts)}, got {act!r}')
    return nn.Sequential(
        nn.Linear(dim, dim), nn.LayerNorm(dim), acts[act](),
        nn.Linear(dim, dim), nn.LayerNorm(dim), acts[act](),
        nn.Linear(dim, dim), nn.LayerNorm(dim))


def resolve_prompts(prompts):
    """``'NHR'`` / ``'NHRBL'`` or a list of texts -> list of texts (one per degradation type)."""
    if isinstance(prompts, str):
        if prompts not in PROMPT_SETS:
            raise ValueError(f'DegradationCLIP: prompts must be a list of texts or one of {sorted(PROMPT_SETS)}, '
                             f'got {prompts!r}')
        return list(PROMPT_SETS[prompts])
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f'DegradationCLIP: prompts must be a non-empty list of non-empty texts, got {prompts!r}')
    if len(set(prompts)) != len(prompts):
        raise ValueError(f'DegradationCLIP: prompts must be distinct, got {prompts!r}')
    return prompts


def _cached_weight_files(pcfg, cache_dir):
    """Local files that open_clip would load for the pretrained config ``pcfg`` (no network)."""
    found, wanted = [], []
    hub = pcfg.get('hf_hub', '')
    if hub:
        from huggingface_hub import try_to_load_from_cache
        repo_id, filename = os.path.split(hub)
        filename = filename or HF_WEIGHTS_NAME
        names = ([HF_SAFE_WEIGHTS_NAME] if filename == HF_WEIGHTS_NAME else []) + [filename]
        for name in names:
            hit = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
            if isinstance(hit, str):
                found.append(hit)
            wanted.append(f'https://huggingface.co/{repo_id}/resolve/main/{name}')
    url = pcfg.get('url', '')
    if url:
        path = os.path.join(cache_dir or os.path.expanduser('~/.cache/clip'), os.path.basename(url))
        if os.path.isfile(path):
            found.append(path)
        wanted.append(url)
    return found, wanted


def _offline_message(clip_model, pretrained, wanted, cache_dir):
    from huggingface_hub.constants import HF_HUB_CACHE
    return (f'DegradationCLIP: pretrained weights {pretrained!r} for {clip_model!r} are not on this machine '
            f'(looked in the Hugging Face cache {cache_dir or HF_HUB_CACHE}'
            f"{'' if cache_dir else ' and ~/.cache/clip'}). Download one of {wanted} and pass its local path as "
            f'`pretrained: /path/to/file`, or fill the cache once on a machine with internet (e.g. '
            f'`python -c "import open_clip; open_clip.create_model({clip_model!r}, pretrained={pretrained!r})"`), '
            f'or set `allow_download: true` to let open_clip download it now.')


def create_backbone(clip_model, pretrained, allow_download=False, cache_dir=None):
    """Build the open_clip model; ``pretrained`` is None, an open_clip tag or a local weights file.

    A tag is looked up in the local caches first; without ``allow_download`` a missing file raises
    ``FileNotFoundError`` at once (no network call), naming what to download and where it goes.
    """
    if clip_model not in open_clip.list_models():
        raise ValueError(f'DegradationCLIP: unknown clip_model {clip_model!r}; open_clip knows '
                         f'{open_clip.list_models()}')
    if pretrained in (None, '', 'none', 'None'):
        # random initialisation is what was asked for (weights usually follow from a checkpoint):
        # drop open_clip's root-logger warning about it
        quiet = _DropRandomInitWarning()
        logging.getLogger().addFilter(quiet)
        try:
            return open_clip.create_model(clip_model, pretrained=None)
        finally:
            logging.getLogger().removeFilter(quiet)
    pretrained = os.path.expanduser(str(pretrained))
    if os.path.isfile(pretrained):
        return open_clip.create_model(clip_model, pretrained=pretrained)
    pcfg = open_clip.get_pretrained_cfg(clip_model, pretrained)
    if not pcfg:
        raise FileNotFoundError(
            f'DegradationCLIP: pretrained={pretrained!r} is neither an existing file nor an open_clip tag of '
            f'{clip_model!r} (tags: {open_clip.list_pretrained_tags_by_model(clip_model)})')
    found, wanted = _cached_weight_files(pcfg, cache_dir)
    if found:
        return open_clip.create_model(clip_model, pretrained=found[0])
    if not allow_download:
        raise FileNotFoundError(_offline_message(clip_model, pretrained, wanted, cache_dir))
    try:
        return open_clip.create_model(clip_model, pretrained=pretrained, cache_dir=cache_dir)
    except Exception as err:
        raise RuntimeError(f'{_offline_message(clip_model, pretrained, wanted, cache_dir)} Download error: {err}') \
            from err


@ARCH_REGISTRY.register()
class DegradationCLIP(nn.Module):
    """open_clip backbone + image/text adapters that map an image to its degradation embedding.

    Args:
        clip_model (str): open_clip model name ('ViT-B-32' as published; 'vlunet-tiny' for tests/demo).
        pretrained (str | None): open_clip tag ('laion2b_s34b_b79k' as published), a local weights
            file, or None (random init).
        prompts (str | list[str]): one text per degradation type ('NHR', 'NHRBL' or a list); the
            position of a prompt is its class label.
        adapter_act (str): 'gelu' (published restoration scripts) or 'leaky_relu' (slope 0.01, the
            published fine-tuning notebook). Same parameter names either way.
        freeze_backbone (bool): keep the CLIP model frozen (requires_grad False, always in eval mode),
            so only the adapters train, as published. Set False to train a backbone from scratch.
        save_backbone (bool | None): whether ``state_dict()`` holds the CLIP backbone (``clip.*``).
            None (default) = only when it cannot be rebuilt from ``pretrained``, i.e. when the backbone
            trains or has no pretrained weights. Without it a ViT-B-32 checkpoint is ~6 MB instead of
            ~600 MB; loading such a state_dict keeps the current backbone.
        allow_download (bool): let open_clip download a ``pretrained`` tag that is not cached yet.
        cache_dir (str | None): download/cache folder for ``pretrained`` tags (open_clip's default if None).
    """

    def __init__(self, clip_model='ViT-B-32', pretrained='laion2b_s34b_b79k', prompts='NHRBL', adapter_act='gelu',
                 freeze_backbone=True, save_backbone=None, allow_download=False, cache_dir=None):
        super().__init__()
        self.clip_model_name = clip_model
        self.clip = create_backbone(clip_model, pretrained, allow_download, cache_dir)
        self.freeze_backbone = bool(freeze_backbone)
        if self.freeze_backbone:
            self.clip.requires_grad_(False)
            self.clip.eval()
        if save_backbone is None:
            save_backbone = not self.freeze_backbone or pretrained in (None, '', 'none', 'None')
        self.save_backbone = bool(save_backbone)

        self.embed_dim = self.clip.text_projection.shape[1]
        self.image_adapter = make_adapter(self.embed_dim, adapter_act)
        self.text_adapter = make_adapter(self.embed_dim, adapter_act)

        size = self.clip.visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else int(size)
        self.register_buffer('mean', torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1), persistent=False)

        self.tokenizer = open_clip.get_tokenizer(clip_model)
        self.prompts = []
        self.register_buffer('prompt_tokens', torch.zeros(0, 0, dtype=torch.long), persistent=False)
        self._text_cache = None  # frozen-backbone text embeddings of the prompts
        self.set_prompts(resolve_prompts(prompts))

        self.register_state_dict_post_hook(_drop_backbone_from_state_dict)
        self.register_load_state_dict_pre_hook(_keep_backbone_when_absent)
        self.register_load_state_dict_post_hook(lambda module, keys: module._clear_text_cache())

    # ---------------------------------------------------------------- prompts
    def set_prompts(self, prompts):
        """Replace the degradation prompts (the adapters are kept; labels are positions in the list)."""
        prompts = resolve_prompts(prompts)
        tokens = self.tokenizer(prompts).to(self.prompt_tokens.device)
        self.prompts = prompts
        self.prompt_tokens = tokens
        self._clear_text_cache()

    def add_prompt(self, text):
        """Append one degradation type (e.g. widening K -> K+1 types); returns its label."""
        self.set_prompts(self.prompts + [text])
        return len(self.prompts) - 1

    @property
    def num_types(self):
        return len(self.prompts)

    def _clear_text_cache(self):
        self._text_cache = None

    # ---------------------------------------------------------------- train mode
    def train(self, mode=True):
        """Like nn.Module.train, but a frozen backbone always stays in eval mode."""
        super().train(mode)
        if self.freeze_backbone:
            self.clip.eval()
        return self

    def backbone_trainable(self):
        return any(p.requires_grad for p in self.clip.parameters())

    # ---------------------------------------------------------------- image side
    def preprocess(self, img):
        """(B, 3, H, W) in [0, 1] -> CLIP input: shorter side to 224 (bicubic, antialiased), centre
        crop 224, OpenAI mean/std; batched on ``img``'s device (the published tensor pipeline)."""
        if not torch.is_tensor(img) or img.dim() != 4 or img.shape[1] != 3 or not img.is_floating_point():
            got = f'{tuple(img.shape)} {img.dtype}' if torch.is_tensor(img) else type(img).__name__
            raise ValueError(f'DegradationCLIP: expected a float tensor (B, 3, H, W) with values in [0, 1], got {got}')
        size = self.image_size
        img = TF.resize(img, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
        img = TF.center_crop(img, [size, size])
        return (img - self.mean.to(img)) / self.std.to(img)

    def encode_image(self, img):
        """Backbone image embedding (B, D) of images in [0, 1], unnormalised, before the adapter."""
        x = self.preprocess(img)
        with torch.set_grad_enabled(torch.is_grad_enabled() and (self.backbone_trainable() or x.requires_grad)):
            return self.clip.encode_image(x, normalize=False)

    def forward(self, img, return_text_features=False):
        """Adapted image embedding (B, 512) of ``img`` (B, 3, H, W) in [0, 1]: VLUNet's degradation vector.

        With ``return_text_features`` also returns ``text_features()``, so one forward call (e.g.
        under DistributedDataParallel) runs both adapters.
        """
        feats = self.image_adapter(self.encode_image(img))
        return (feats, self.text_features()) if return_text_features else feats

    # ---------------------------------------------------------------- text side
    def encode_text(self):
        """Backbone text embeddings (K, D) of the prompts, before the adapter.

        With a frozen backbone they are computed once and cached (cleared on new prompts or
        weights, recomputed on a new device/dtype).
        """
        if self.backbone_trainable():
            return self.clip.encode_text(self.prompt_tokens, normalize=False)
        dtype = self.clip.text_projection.dtype
        cache = self._text_cache
        if cache is None or cache.device != self.prompt_tokens.device or cache.dtype != dtype:
            with torch.no_grad():
                cache = self.clip.encode_text(self.prompt_tokens, normalize=False)
            self._text_cache = cache
        return cache

    def text_features(self):
        """Adapted text embeddings (K, 512), row k for ``prompts[k]`` (recomputed through the adapter
        at every call, so they follow the training adapter)."""
        return self.text_adapter(self.encode_text())

    @staticmethod
    def similarities(img_feats, txt_feats, normalize=False):
        """(B, K) = img_feats @ txt_feats.T (cosine if ``normalize``)."""
        if normalize:
            img_feats = nn.functional.normalize(img_feats, dim=-1)
            txt_feats = nn.functional.normalize(txt_feats, dim=-1)
        return img_feats @ txt_feats.t()

    def logits(self, img, normalize=False):
        """Image-text similarities (B, K): image_features @ text_features.T (cosine if ``normalize``)."""
        return self.similarities(*self(img, return_text_features=True), normalize)

    def classify_embedding(self, embedding, normalize=False):
        """Probabilities (B, K) of each degradation type for image embeddings (B, 512) that
        ``forward`` already returned (e.g. the one VLU-Net was given): no second image encoding."""
        return self.similarities(embedding, self.text_features(), normalize).softmax(dim=-1)

    def classify(self, img, normalize=False):
        """Probabilities (B, K) of each degradation type of ``img``; rows sum to 1."""
        return self.classify_embedding(self(img), normalize)

    # ---------------------------------------------------------------- checkpoints
    def adapter_state_dict(self):
        """The 24 adapter tensors under the published names (``ad_imageEncoder.adapter.0.weight``, ...),
        i.e. the ``learnable_params`` dict of the published ``clip_tuned.pth``."""
        out = OrderedDict()
        for theirs, ours in PUBLISHED_ADAPTER_PREFIXES.items():
            module = getattr(self, ours[:-1])
            for key, value in module.state_dict().items():
                out[theirs + key] = value.detach().cpu().clone()
        return out

    def load_adapters(self, path):
        """Load adapters from a checkpoint file; returns the list of loaded keys (our naming).

        Accepts every layout :func:`vlunet.utils.checkpoint.load_published_state_dict` reads: the
        published ``clip_tuned.pth`` (``{'learnable_params': {ad_imageEncoder.adapter.N.*,
        ad_textEncoder.adapter.N.*}}``), a VLU-Net Lightning checkpoint (its ``model_degradation``
        adapters), BasicSR checkpoints (``{'params': state_dict}``) of a whole DegradationCLIP or of
        its adapters only, or a bare state_dict. See :meth:`load_adapter_state`.
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(f'DegradationCLIP.load_adapters: no such file: {path}')
        try:
            ckpt = load_published_state_dict(path)
        except CheckpointError as err:
            raise ValueError(f'DegradationCLIP.load_adapters: {err}') from None
        state = ckpt.clip_adapters if ckpt.clip_adapters is not None else ckpt.params
        return self.load_adapter_state(state, path)

    def load_adapter_state(self, state, source='state_dict'):
        """Load the 24 adapter tensors (published or our names) and, when present, a stored backbone
        (``clip.*``, e.g. a demo model trained from scratch); ``source`` names them in errors.
        All 24 adapter tensors must be present; anything else is an error."""
        path = source
        state = adapters_to_our_names(state)
        own = {k: v for k, v in super().state_dict().items() if not k.startswith(BACKBONE_PREFIX)}
        own_backbone = self.clip.state_dict()
        adapters = {k: v for k, v in state.items() if not k.startswith(BACKBONE_PREFIX)}
        backbone = {k[len(BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
        missing = sorted(set(own) - set(adapters))
        unexpected = sorted(set(adapters) - set(own))
        if missing or unexpected:
            raise KeyError(f'DegradationCLIP.load_adapters({path}): adapter keys do not match; missing: {missing}; '
                           f'unexpected: {unexpected} (expected the 24 tensors ad_imageEncoder.adapter.N.* / '
                           f'ad_textEncoder.adapter.N.* or image_adapter.N.* / text_adapter.N.*)')
        for key, value in adapters.items():
            if value.shape != own[key].shape:
                raise ValueError(f'DegradationCLIP.load_adapters({path}): {key} has shape {tuple(value.shape)}, '
                                 f'expected {tuple(own[key].shape)}')
        if backbone:
            bad = sorted(set(own_backbone) ^ set(backbone))
            if bad:
                raise KeyError(f'DegradationCLIP.load_adapters({path}): the stored clip backbone does not match '
                               f'{self.clip_model_name!r}; differing keys: {bad[:10]}')
            for key, value in backbone.items():
                if value.shape != own_backbone[key].shape:
                    raise ValueError(f'DegradationCLIP.load_adapters({path}): clip.{key} has shape '
                                     f'{tuple(value.shape)}, expected {tuple(own_backbone[key].shape)} '
                                     f'({self.clip_model_name!r})')
            self.clip.load_state_dict(backbone, strict=True)
        for name in ('image_adapter', 'text_adapter'):
            prefix = name + '.'
            getattr(self, name).load_state_dict(
                {k[len(prefix):]: v for k, v in adapters.items() if k.startswith(prefix)}, strict=True)
        self._clear_text_cache()
        return sorted(adapters) + sorted(BACKBONE_PREFIX + k for k in backbone)


def _drop_backbone_from_state_dict(module, state_dict, prefix, local_metadata):
    """state_dict post-hook: leave out ``clip.*`` unless ``save_backbone``."""
    if not module.save_backbone:
        for key in [k for k in state_dict if k.startswith(prefix + BACKBONE_PREFIX)]:
            del state_dict[key]


def _keep_backbone_when_absent(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                               error_msgs):
    """load_state_dict pre-hook: a state_dict without any ``clip.*`` key (as written with
    ``save_backbone`` False) keeps the current backbone instead of failing a strict load."""
    full = prefix + BACKBONE_PREFIX
    if not module.save_backbone and not any(k.startswith(full) for k in state_dict):
        for key, value in module.clip.state_dict().items():
            state_dict[full + key] = value
