"""Method cards: everything vlunet knows of one published method, declared beside its network.

Each ``*_arch.py`` that implements a published restoration method ends with a :class:`MethodCard`
passed to :func:`register_card`. The card holds the facts of the method that the rest of the
package needs; the model, ``vlunet-convert``, ``vlunet-compare``, ``vlunet-restore``, the app,
the benchmarks, the leaderboard and the conformance tests read cards and never test a method's
name:

* names: the method (``name``), its ``ARCH_REGISTRY`` entry (``arch``), the paper and the code
  it follows, and its released configurations (:class:`Variant`: display name, option-file stem,
  full-size kwargs, published parameter count, published key listing);
* what the network takes besides the image (``condition``, see :mod:`vlunet.archs.conditioning`)
  and whether it records its stages (``records_stages``: ``forward(..., return_stages=True)``);
* how to read its forward's result (``read_output`` -> :class:`NetworkOutput`: the restored
  image, the images the pixel loss supervises, and named auxiliary outputs);
* its own training terms as option keys (:class:`TrainingTerm`, e.g. ``train.balance_opt``) and
  extra networks (:class:`ExtraNetwork`, e.g. ``network_potentials``);
* how to recognise its state_dict (``signature`` keys) and read its constructor kwargs from it
  (``kwargs_from_state_dict``); :func:`identify` checks the guess by building the network on the
  meta device and comparing every key and shape, so recognition never depends on the order of
  the cards;
* for a network conditioned on a text embedding, the published prompt of each task
  (``task_prompts``, keyed by the training sources' names: noise15, rain, haze, ...);
* the published checkpoint formats it reads, its published training recipe where it differs from
  the shared one, its published results per setting and task (:class:`PublishedResults`, with
  their source), a tiny configuration for tests and benchmarks, and how benchmarks build the
  authors' own class from a checkout (:class:`ReferenceCode`).

This module imports torch and BasicSR's registry only (archs are leaves).
"""
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from basicsr.utils.registry import ARCH_REGISTRY

from vlunet.archs.conditioning import CLIP_DIM, CONDITIONS, bare_network


# ------------------------------------------------------------------------------------------------
# what a forward returns
# ------------------------------------------------------------------------------------------------
@dataclass
class NetworkOutput:
    """A network's forward result, read through its card.

    image: the restored image (B, C, H, W).
    supervised: the images the pixel loss compares with the target (DGUNet: every stage).
    aux: named auxiliary outputs (a loss the network computed, latents, ...), for training terms.
    """
    image: torch.Tensor
    supervised: List[torch.Tensor]
    aux: Dict[str, torch.Tensor] = field(default_factory=dict)


def image_output(net, output) -> NetworkOutput:
    """A network that returns the restored image (most)."""
    return NetworkOutput(output, [output])


def stage_list_output(net, output) -> NetworkOutput:
    """A network that returns a list of stage images, the final one first; every one is supervised."""
    stages = list(output)
    return NetworkOutput(stages[0], stages)


# ------------------------------------------------------------------------------------------------
# the facts of a card
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One released configuration of a method.

    name: as the authors call it ('MoCE-IR-S'). options: stem of its option files
    (``options/{train,test}/<options>_<SETTING>.yml``; None: no option files). kwargs: full-size ``network_g`` kwargs
    (without ``type``). params: the published parameter count. listing: the published full-size
    state_dict listing (``keys_*.tsv``, kept in ``tests/fixtures``). settings: the settings this
    configuration was released for (empty: every setting), e.g. VLU-Net's 5 degradation types for
    NHR and 7 for NHRBL.
    """
    name: str
    options: Optional[str] = None
    kwargs: Mapping = field(default_factory=dict)
    params: Optional[int] = None
    listing: Optional[str] = None
    settings: Tuple[str, ...] = ()

    def released_for(self, setting) -> bool:
        return not self.settings or setting in self.settings


@dataclass(frozen=True)
class PublishedResults:
    """PSNR/SSIM of one variant in one setting as printed, with the source.

    tasks: ``{task: (psnr, ssim)}`` (ssim None where not printed); task keys are the validation-set
    names of the setting's test files (e.g. 'CBSD68_sigma25', 'Rain100L', 'SOTS_outdoor').
    average: the printed average (None if not printed). source: paper and table, or repository
    figure and commit. quoted_in: None for the method's own paper, else the paper whose quote
    this is (another paper can print the method differently). measurement: how the source measured,
    where it differs from the setting's shared protocol (``{'psnr': 'uint8', 'ssim': 'uint8_uniform7',
    'crop': 'multiple of 8'}``, the variant names of :mod:`vlunet.metrics.published_metric`); None: as
    the setting's test files measure. The leaderboard recomputes the average from ``tasks`` and
    flags a printed one that differs.
    """
    setting: str
    variant: str
    tasks: Mapping[str, Tuple[float, Optional[float]]]
    source: str
    average: Optional[Tuple[float, Optional[float]]] = None
    quoted_in: Optional[str] = None
    measurement: Optional[Mapping[str, str]] = None


@dataclass(frozen=True)
class TrainingTerm:
    """A method's own loss term: ``train.<key>: {type: <loss>, ...}``; ``published`` holds the option
    values of the published recipe. A loss with ``takes_network_output = True`` is called as
    ``loss(output, gt, label)`` with the :class:`NetworkOutput` of the forward, other losses as
    ``loss(image, gt)``; one with ``after_network_step(forward, lq, gt, label)`` updates networks of its
    own after each optimizer step (its ``state_dict`` is kept in the training state)."""
    key: str
    loss: str
    published: Mapping = field(default_factory=dict)
    what: str = ''


@dataclass(frozen=True)
class ExtraNetwork:
    """A network the method trains beside ``network_g`` (option key ``key``, e.g. ``network_potentials``)."""
    key: str
    arch: str
    what: str = ''


@dataclass(frozen=True)
class CheckpointFormat:
    """A published checkpoint layout the method's authors distribute.

    description: how the file looks (shown by ``vlunet-convert --help``). layout: ``f(network) -> the
    object the authors' code would ``torch.save`` for this network`` (tests and the re-measuring of
    released weights build files of this format with it). pickled: the file holds pickled module
    objects (read without running their code, see :mod:`vlunet.utils.pickled_modules`).
    """
    description: str
    layout: Optional[Callable[[torch.nn.Module], object]]
    pickled: bool = False


def state_dict_of(net):
    return OrderedDict((k, v.detach().cpu().clone()) for k, v in net.state_dict().items())


def lightning_layout(net, prefix='net.'):
    """A Lightning ``.ckpt`` whose LightningModule holds the network as ``self.net``."""
    return {'epoch': 0, 'global_step': 0, 'pytorch-lightning_version': '2.0.0',
            'state_dict': OrderedDict((prefix + k, v) for k, v in state_dict_of(net).items())}


def params_layout(net):
    """BasicSR's ``{'params': state_dict}``."""
    return {'params': state_dict_of(net)}


def data_parallel_layout(net):
    """``{'state_dict': {'module.<key>': ...}, 'epoch': ...}`` of a DataParallel training."""
    return {'epoch': 1, 'state_dict': OrderedDict(('module.' + k, v) for k, v in state_dict_of(net).items())}


LIGHTNING = CheckpointFormat("Lightning .ckpt: {'state_dict': {'net.<key>': ...}}", lightning_layout)
PARAMS = CheckpointFormat("{'params': state_dict} (BasicSR layout)", params_layout)


@dataclass(frozen=True)
class ReferenceCode:
    """How the benchmarks build the authors' own class from a checkout of their repository.

    cls: the published class name. kwargs: ``f(our kwargs) -> (args, kwargs)`` for its constructor.
    stubs: modules the published file imports but that the network does not need (stood in when
    missing). seed_forward: draw the same random numbers before each forward (random routing).
    """
    cls: str
    kwargs: Callable[[dict], Tuple[tuple, dict]] = staticmethod(lambda kw: ((), dict(kw)))
    stubs: Tuple[str, ...] = ()
    seed_forward: bool = False


@dataclass(frozen=True)
class MethodCard:
    """What the package knows of one method (see the module docstring)."""
    name: str
    arch: str
    paper: str = ''
    code: str = ''
    variants: Tuple[Variant, ...] = ()
    tiny: Mapping = field(default_factory=dict)
    condition: Optional[str] = None
    records_stages: bool = False
    read_output: Callable[[torch.nn.Module, object], NetworkOutput] = staticmethod(image_output)
    signature: Tuple[str, ...] = ()
    kwargs_from_state_dict: Optional[Callable[[Mapping], dict]] = None
    checkpoint_formats: Tuple[CheckpointFormat, ...] = ()
    training_terms: Tuple[TrainingTerm, ...] = ()
    extra_networks: Tuple[ExtraNetwork, ...] = ()
    recipe: Mapping[str, str] = field(default_factory=dict)
    results: Tuple[PublishedResults, ...] = ()
    reference: Optional[ReferenceCode] = None
    aliases: Tuple[str, ...] = ()
    task_prompts: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.condition not in CONDITIONS:
            raise ValueError(f'card {self.name}: condition {self.condition!r} is not one of {CONDITIONS}')
        formats = tuple(CheckpointFormat(f, None) if isinstance(f, str) else f for f in self.checkpoint_formats)
        object.__setattr__(self, 'checkpoint_formats', formats)  # a plain description: a format without a layout
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f'card {self.name}: variant names repeat: {names}')

    @property
    def arch_class(self):
        return ARCH_REGISTRY.get(self.arch)

    def variant(self, name=None) -> Variant:
        """A variant by its name or option stem (default: the first, the main release)."""
        if name is None:
            return self.variants[0]
        for v in self.variants:
            if name in (v.name, v.options):
                return v
        raise KeyError(f'{self.name} has no variant {name!r} (known: {", ".join(v.name for v in self.variants)})')

    def network_opt(self, variant=None, **overrides) -> dict:
        """A ``network_g`` option dict of a variant (full size unless overridden)."""
        return {'type': self.arch, **dict(self.variant(variant).kwargs), **overrides}

    def tiny_opt(self, **overrides) -> dict:
        """A ``network_g`` option dict of the tiny configuration (tests, benchmarks' --quick)."""
        return {'type': self.arch, **dict(self.tiny), **overrides}

    def variants_for(self, setting) -> List[Variant]:
        """The variants released for ``setting``."""
        return [v for v in self.variants if v.released_for(setting)]

    def results_for(self, setting, variant=None) -> List[PublishedResults]:
        variant = self.variant(variant).name if self.variants else variant
        return [r for r in self.results if r.setting == setting and (variant is None or r.variant == variant)]


# ------------------------------------------------------------------------------------------------
# the registry of cards
# ------------------------------------------------------------------------------------------------
_CARDS: 'OrderedDict[str, MethodCard]' = OrderedDict()   # arch name -> card


def register_card(card: MethodCard) -> MethodCard:
    """Register ``card`` (once per arch); returns it so a module can write ``CARD = register_card(...)``."""
    if card.arch in _CARDS and _CARDS[card.arch] is not card:
        raise ValueError(f'a card for {card.arch} is registered already')
    _CARDS[card.arch] = card
    return card


def list_methods() -> List[MethodCard]:
    """Every registered card, in the order the arch modules were imported (alphabetical by file)."""
    return list(_CARDS.values())


def list_variants() -> List[Tuple[MethodCard, Variant]]:
    """Every (card, variant) pair: one per released configuration."""
    return [(card, v) for card in _CARDS.values() for v in card.variants]


def _key(name):
    return re.sub(r'[^a-z0-9]', '', str(name).lower().replace('+', 'plus'))


def get_card(name) -> MethodCard:
    """A card by method name, arch name, alias, variant name or option stem ('MoCE-IR-S', 'MoCEIR_S',
    'moceir' ...; case, '-' and '_' ignored). KeyError names the known methods."""
    wanted = _key(name)
    found = [card for card in _CARDS.values()
             if wanted in {_key(n) for n in [card.name, card.arch, *card.aliases]
                           + [n for v in card.variants for n in (v.name, v.options) if n]}]
    if len(found) > 1:
        raise KeyError(f'{name!r} names several methods: {", ".join(c.name for c in found)}')
    if not found:
        raise KeyError(f'no method card for {name!r} (known: {", ".join(c.name for c in _CARDS.values())})')
    return found[0]


def find_variant(name) -> Tuple[MethodCard, Variant]:
    """(card, variant) by variant name or option stem; a method name gives its first variant."""
    card = get_card(name)
    wanted = _key(name)
    for v in card.variants:
        if wanted in (_key(v.name), _key(v.options)):
            return card, v
    return card, card.variant()


def generic_card(arch: str) -> MethodCard:
    """The card of an arch that has none (e.g. BasicSR's own): the image in, the image out."""
    cls = ARCH_REGISTRY.get(arch) if arch in ARCH_REGISTRY else None
    return MethodCard(name=arch, arch=arch, condition=getattr(cls, 'condition', None))


def card_for(arch) -> MethodCard:
    """The card of a network, arch class, registry name or ``network_g`` option dict; archs without a
    card (BasicSR's own) get :func:`generic_card`."""
    if isinstance(arch, Mapping):
        arch = arch.get('type')
    if not isinstance(arch, str):
        arch = (arch if isinstance(arch, type) else type(bare_network(arch))).__name__
    return _CARDS.get(arch) or generic_card(arch)


def example_inputs(card, batch=1, height=32, width=32, dtype=torch.float32, generator=None, device='cpu'):
    """Arguments of ``card``'s forward for a random batch (tests, benchmarks, export): the image in [0, 1)
    and, when the network takes one, a random (B, CLIP_DIM) embedding."""
    image = torch.rand(batch, 3, height, width, dtype=dtype, generator=generator).to(device)
    if card.condition is None:
        return (image,)
    return image, torch.randn(batch, CLIP_DIM, dtype=dtype, generator=generator).to(device)


# ------------------------------------------------------------------------------------------------
# reading state_dicts: shared helpers for the cards' kwargs_from_state_dict
# ------------------------------------------------------------------------------------------------
def count_blocks(params: Mapping, prefix: str) -> int:
    """Number of consecutive ``prefix<i>.`` indices present (0, 1, ...)."""
    n = 0
    while any(k.startswith(f'{prefix}{n}.') for k in params):
        n += 1
    return n


def expansion_factor(dims: Sequence[int], hiddens: Sequence[int], default=2.66) -> Optional[float]:
    """A factor f with ``int(d * f) == h`` for every (width d, hidden h) (the published formula);
    ``default`` when it fits, else the shortest decimal that does, else None."""
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


def layer_norm_type(params: Mapping, weight_key: str) -> str:
    """'WithBias' when the LayerNorm whose weight is ``weight_key`` has a bias, else 'BiasFree'."""
    return 'WithBias' if weight_key[:-len('weight')] + 'bias' in params else 'BiasFree'


# ------------------------------------------------------------------------------------------------
# which method is this state_dict?
# ------------------------------------------------------------------------------------------------
@dataclass
class Recognition:
    """What :func:`identify` found: the card, the constructor kwargs read from the shapes, and whether a
    network built with them has exactly the state_dict's keys and shapes (``exact``); otherwise
    ``missing``/``unexpected``/``mismatched`` say how it differs (the closest candidate)."""
    card: MethodCard
    kwargs: dict
    exact: bool
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[str] = field(default_factory=list)


def state_dict_differences(expected: Mapping, params: Mapping):
    """``(missing, unexpected, mismatched)`` keys of ``params`` against the state_dict ``expected`` (any
    tensors, meta ones included): absent keys, extra keys, and keys whose shapes differ."""
    missing = [k for k in expected if k not in params]
    unexpected = [k for k in params if k not in expected]
    mismatched = [k for k in expected if k in params and tuple(expected[k].shape) != tuple(params[k].shape)]
    return missing, unexpected, mismatched


def _compare_with_built(card, kwargs, params) -> Recognition:
    try:
        with torch.device('meta'):
            built = card.arch_class(**kwargs).state_dict()
    except Exception:  # noqa: BLE001  (kwargs the shapes suggested but the class refuses: not this method)
        return Recognition(card, kwargs, False, missing=['<the network cannot be built with these kwargs>'])
    missing, unexpected, mismatched = state_dict_differences(built, params)
    return Recognition(card, kwargs, not (missing or unexpected or mismatched), missing, unexpected, mismatched)


def identify_all(params: Mapping) -> List[Recognition]:
    """Every card whose signature keys ``params`` holds, each checked against a network built (on the
    meta device) with the kwargs read from the shapes; exact matches first, then by fewest differences."""
    found = []
    for card in _CARDS.values():
        if not card.signature or not all(k in params for k in card.signature):
            continue
        try:
            kwargs = dict(card.kwargs_from_state_dict(params)) if card.kwargs_from_state_dict else {}
        except (KeyError, IndexError, ValueError, ZeroDivisionError, TypeError):
            found.append(Recognition(card, {}, False, missing=['<kwargs could not be read from the shapes>']))
            continue
        found.append(_compare_with_built(card, kwargs, params))
    return sorted(found, key=lambda r: (not r.exact, len(r.missing) + len(r.unexpected) + len(r.mismatched)))


class AmbiguousCheckpoint(ValueError):
    """Several methods build a network with exactly these keys and shapes."""


def identify(params: Mapping) -> Optional[Recognition]:
    """The method of a state_dict: the one card whose network, built with the kwargs read from the
    shapes, has exactly these keys and shapes; else the closest candidate (``exact`` False) so a
    strict load can name what differs; None when no card's signature keys are present.

    Raises AmbiguousCheckpoint when two cards match exactly (their cards must then be told apart)."""
    found = identify_all(params)
    exact = [r for r in found if r.exact]
    if len(exact) > 1:
        raise AmbiguousCheckpoint('these weights fit several methods exactly: '
                                  + ', '.join(f'{r.card.name} {r.kwargs}' for r in exact))
    return found[0] if found else None


def guess_arch(params: Mapping) -> Optional[Tuple[str, dict]]:
    """``(arch name, constructor kwargs)`` of a state_dict (see :func:`identify`), or None."""
    found = identify(params)
    return (found.card.arch, found.kwargs) if found else None


def network_entry(entries: Mapping) -> Optional[str]:
    """Of several state_dicts (a file of pickled modules: the network, an auxiliary network, ...), the name of
    the one a card recognises exactly as a method's network; None when not exactly one is."""
    found = [name for name, params in entries.items() if (lambda r: r is not None and r.exact)(identify(params))]
    return found[0] if len(found) == 1 else None
