"""What a restoration network takes besides the image: the one place that says so.

A method's card says it (``MethodCard.condition``, :mod:`vlunet.archs.card`); an arch without a card
(BasicSR's, a user's own) may declare it with a class attribute ``condition``:

* ``None`` (default): ``net(img)``. Most methods, any BasicSR arch.
* ``'degradation_embedding'``: ``net(img, embedding)`` with the (B, CLIP_DIM) CLIP *image*
  embedding of the degraded input (VLU-Net's ``degradation``).
* ``'text_embedding'``: ``net(img, text_code)`` with a (B, CLIP_DIM) CLIP *text* embedding of the
  task prompt (DFPIR's ``text_code``).

:func:`condition_of` reads the class attribute; the package asks the card
(``vlunet.archs.card.card_for(net).condition``), which falls back to it. This module imports nothing
but BasicSR's registry.
"""
from basicsr.utils.registry import ARCH_REGISTRY

CLIP_DIM = 512  # width of the CLIP ViT-B/32 embedding that conditions VLU-Net and DFPIR
DEGRADATION_EMBEDDING = 'degradation_embedding'
TEXT_EMBEDDING = 'text_embedding'
CONDITIONS = (None, DEGRADATION_EMBEDDING, TEXT_EMBEDDING)


def bare_network(net):
    """The module inside DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(net, 'module', None) or getattr(net, '_orig_mod', None)
        if inner is None or inner is net:
            return net
        net = inner


def condition_of(arch):
    """The ``condition`` of a network, arch class, registry name or ``network_g`` option dict."""
    if isinstance(arch, dict):
        arch = arch.get('type')
    if isinstance(arch, str):
        arch = ARCH_REGISTRY.get(arch)
    if not isinstance(arch, type):
        arch = bare_network(arch)
    condition = getattr(arch, 'condition', None)
    if condition not in CONDITIONS:
        raise ValueError(f'{getattr(arch, "__name__", type(arch).__name__)}.condition = {condition!r}: '
                         f'expected one of {CONDITIONS}')
    return condition
