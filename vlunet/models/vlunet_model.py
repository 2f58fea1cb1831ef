"""``VLUNetModel``: one all-in-one restoration model for VLU-Net and its peers.

Builds ``network_g`` from the registry (any method of :mod:`vlunet.archs`, or any BasicSR arch) and
reads what the package knows of it from its method card (:mod:`vlunet.archs.card`): what the network
takes besides the image (with ``network_clip`` set, the frozen degradation-aware CLIP encoder embeds
every ``lq`` batch once, no_grad; a text-conditioned network gets its ``text_embedding`` codes), what
its forward returns (the images the pixel loss supervises: every stage of a network that returns its
stages, as published; named auxiliary outputs), and its own training terms. Every ``train.<name>_opt``
besides ``pixel_opt``, ``perceptual_opt`` and ``clip_opt`` is a loss term ``l_<name>``; a term with
``after_network_step`` trains networks of its own after each optimizer step. Validation and
``vlunet-test`` restore through the one inference engine (:class:`vlunet.inference.RestorationEngine`).

Option keys beyond SRModel's (see options/train/VLUNet_*.yml)::

    network_clip:                 # optional; for networks that take a CLIP image embedding
      type: DegradationCLIP
      ...                         # its constructor kwargs
      load_path: experiments/CLIPAdapter_NHR/models/clip_adapters_latest.pth   # adapters (or whole net)
    train:
      optim_g: {type: AdamW, lr: !!float 2e-4, weight_decay: !!float 1e-4}
      scheduler: {type: LinearWarmupCosineLR, warmup_iter: ..., total_iter: ...}
      pixel_opt: {type: L1Loss, loss_weight: 1.0}
      fft_opt: {type: FFTLoss, loss_weight: 0.1}     # optional: any other loss term (a method's own: its card)
      clip_opt: {type: DegradationContrastiveLoss}   # optional: train CLIP adapters alongside
      optim_clip: {type: Adam, lr: !!float 1e-3}
    val:
      tile: ~                     # tiled inference for large images (tile side, px)
      tile_overlap: 16
      metrics: {psnr: {type: calculate_psnr, crop_border: 0, test_y_channel: false}, ...}

In test mode (``vlunet-test``) every validation also updates ``results/<name>/metrics.json``:
``{val set: {psnr, ssim, input_psnr, input_ssim, images, seconds}}``.
"""
import json
import os
import time
from collections import OrderedDict
from copy import deepcopy

import torch
from basicsr.archs import build_network
from basicsr.losses import build_loss
from basicsr.metrics import calculate_metric
from basicsr.models.base_model import BaseModel
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger, tensor2img
from basicsr.utils.registry import METRIC_REGISTRY, MODEL_REGISTRY
from tqdm import tqdm

from vlunet.archs.card import card_for
from vlunet.archs.conditioning import TEXT_EMBEDDING, bare_network
from vlunet.inference import Conditioner, RestorationEngine, text_codes_from_options
from vlunet.models.base_model import VLUNetBaseModel
from vlunet.models.train_step import TrainStep, broadcast_from_rank0, parse_amp
from vlunet.utils.atomic import write_image_atomic, write_json_atomic
from vlunet.utils.checkpoint import load_published_state_dict
from vlunet.utils.tiling import center_crop_to_multiple
from vlunet.utils.widening import count_degradation_types, widen_state_dict


def _float_hwc(tensor):
    """(C, H, W) tensor -> H x W x C float numpy array (float32 unless it was float64), unclipped."""
    tensor = tensor.detach().cpu()
    if tensor.dtype != torch.float64:
        tensor = tensor.float()
    return tensor.numpy().transpose(1, 2, 0)


# train.*_opt keys with their own place in the step; every other one is a loss term
SHARED_LOSS_KEYS = ('pixel_opt', 'perceptual_opt', 'clip_opt')


@MODEL_REGISTRY.register()
class VLUNetModel(VLUNetBaseModel, SRModel):
    """All-in-one restoration model (see the module docstring for its options)."""

    def __init__(self, opt):
        BaseModel.__init__(self, opt)
        net = build_network(opt['network_g'])
        compile_opt = (opt.get('train') or {}).get('compile') if self.is_train else None
        if compile_opt:  # train.compile: true (or a dict of torch.compile kwargs, e.g. {mode: max-autotune})
            net = torch.compile(net, **(dict(compile_opt) if isinstance(compile_opt, dict) else {}))
        self.net_g = self.model_to_device(net)
        self.print_network(self.net_g)
        self.net_clip = None
        self.cri_clip = None
        self.card = card_for(opt['network_g'])  # what the package knows of this method (vlunet.archs.card)
        self.condition = self.card.condition
        if opt.get('network_clip'):
            self._build_clip(opt['network_clip'])
        self.conditioner = Conditioner(self.condition, self.net_clip)
        if self.condition == TEXT_EMBEDDING:
            self._build_text_codes(opt.get('text_embedding'))
        load_path = opt['path'].get('pretrain_network_g')
        if load_path is not None:
            self.load_network(self.net_g, load_path, opt['path'].get('strict_load_g', True),
                              opt['path'].get('param_key_g', 'params'))
        if self.is_train:
            self.init_training_settings()
        elif self.opt['path'].get('results_root'):
            self._write_model_json()

    def _write_model_json(self):
        """``results/<name>/model.json``: what vlunet-compare needs to describe this method."""
        net = self.get_bare_model(self.net_g)
        info = {'name': self.opt['name'], 'network_g': dict(self.opt['network_g']),
                'params': sum(p.numel() for p in net.parameters()),
                'network_clip': self.opt['network_clip'].get('type') if self.opt.get('network_clip') else None,
                'conditioning': self.describe_conditioning(),
                'pretrain_network_g': self.opt['path'].get('pretrain_network_g')}
        os.makedirs(self.opt['path']['results_root'], exist_ok=True)
        write_json_atomic(os.path.join(self.opt['path']['results_root'], 'model.json'), info, sort_keys=True)

    # ------------------------------------------------------------------ networks
    def _build_clip(self, clip_opt):
        clip_opt = deepcopy(clip_opt)
        load_path = clip_opt.pop('load_path', None)
        net = build_network(clip_opt).to(self.device)
        logger = get_root_logger()
        if load_path is not None:
            if not os.path.isfile(load_path):
                raise FileNotFoundError(
                    f'network_clip.load_path: file not found: {load_path} (expected the CLIP stage\'s output: '
                    'train it first with a CLIPAdapterModel option file, e.g. options/train/CLIPAdapter_demo.yml '
                    'or CLIPAdapter_NHR.yml, or point it at the published clip_tuned.pth)')
            net.load_adapters(load_path)
            logger.info(f'Loaded CLIP weights from {load_path}')
        trained_alongside = self.is_train and self.opt['train'].get('clip_opt') is not None
        resume_path = self.opt['path'].get('pretrain_network_clip')
        if resume_path is not None:
            if os.path.isfile(resume_path):
                net.load_adapters(resume_path)
                logger.info(f'Loaded CLIP weights from {resume_path}')
            elif not (self.opt['path'].get('resume_state') and not trained_alongside):
                raise FileNotFoundError(f'path.pretrain_network_clip: file not found: {resume_path}')
        if not trained_alongside:
            net.eval()
            for p in net.parameters():
                p.requires_grad_(False)
        if self.opt.get('dist'):  # ranks initialise with different seeds: every rank uses rank 0's CLIP
            broadcast_from_rank0(list(net.parameters()) + list(net.buffers()))
        self.net_clip = net

    def _build_text_codes(self, text_opt):
        """The text-code table of a text-conditioned network (``text_embedding``), computed once per run."""
        example = f'options/train/{self.card.variant().options}_NHR.yml' if self.card.variants else ''
        self.conditioner.text_codes, self.conditioner.text_mode = text_codes_from_options(text_opt, self.net_clip,
                                                                                          example)
        self.conditioner.text_codes = self.conditioner.text_codes.to(self.device)

    # what network_g takes besides the image: the conditioner's (vlunet.inference.conditioning)
    @property
    def text_codes(self):
        return self.conditioner.text_codes

    @property
    def text_mode(self):
        return self.conditioner.text_mode

    def degradation_embedding(self, lq):
        """CLIP embedding of ``lq`` for ``network_g`` (None without ``network_clip``)."""
        return self.conditioner.embedding(lq)

    def text_code(self, lq, label=None, embedding=None):
        return self.conditioner.text_code(lq, label, embedding)

    def network_input(self, lq, label=None, embedding=None):
        return self.conditioner.network_input(lq, label, embedding)

    def run_network(self, net, lq, extra=None):
        return net(lq) if self.condition is None else net(lq, extra)

    def describe_conditioning(self):
        return self.conditioner.describe()

    @property
    def engine(self):
        """The inference engine over this model's networks (validation, vlunet-test)."""
        return RestorationEngine(self.net_g, self.conditioner, self.device, prepare=False)

    def load_network(self, net, load_path, strict=True, param_key='params'):
        """Load ``path.pretrain_network_g``: BasicSR files and the published formats alike.

        Accepts everything :func:`vlunet.utils.checkpoint.load_published_state_dict` reads
        (VLU-Net/PromptIR Lightning ``.ckpt``, Restormer ``.pth``, DGUNet ``.pth``, BasicSR
        ``{'params'}``); weights-only unless ``path.trust_pickle: true``. CLIP adapters stored in
        a VLU-Net checkpoint go to ``network_clip`` when its ``load_path`` is not set.
        """
        logger = get_root_logger()
        ckpt = load_published_state_dict(load_path, trust_pickle=bool(self.opt['path'].get('trust_pickle', False)),
                                         param_key=param_key, expect_keys=self.get_bare_model(net).state_dict().keys())
        if not ckpt.params:
            raise ValueError(f'{load_path}: holds no network weights (format {ckpt.source_format})')
        net = self.get_bare_model(net)
        logger.info(f'Loading {type(net).__name__} from {load_path} ({ckpt.source_format}).')
        params = self._match_degradation_types(net, ckpt.params, load_path)
        self._print_different_keys_loading(net, params, strict)
        net.load_state_dict(params, strict=strict)
        if ckpt.clip_adapters and self.net_clip is not None and not self.opt['network_clip'].get('load_path'):
            self.net_clip.load_adapter_state(ckpt.clip_adapters, load_path)
            get_root_logger().info(f'Loaded the CLIP adapters stored in {load_path}.')

    def _match_degradation_types(self, net, params, load_path):
        """Widen a K-type VLU-Net checkpoint to the network's K' types when ``path.widen_degradation_types``."""
        have, want = count_degradation_types(params), count_degradation_types(net.state_dict())
        if have is None or want is None or have == want:
            return params
        if not self.opt['path'].get('widen_degradation_types', False):
            raise ValueError(
                f'{load_path} was trained for {have} degradation types (its D-GDM prompt banks have {have} '
                f'components) but the options ask for {want} (network_g.de_dim: {want}). To add '
                f'{want - have} new type(s) to the trained model, set `widen_degradation_types: true` under '
                '`path:` (existing components are kept, new ones start as their mean; see docs/extending.md); '
                f'otherwise set network_g.de_dim: {have}.')
        if want < have:
            raise ValueError(f'{load_path}: cannot narrow a model from {have} to {want} degradation types')
        params, grown = widen_state_dict(params, want)
        get_root_logger().info(f'Widened {load_path} from {have} to {want} degradation types: '
                               f'{len(grown)} prompt-bank/projection tensors grew, the rest is unchanged.')
        return params

    # ------------------------------------------------------------------ training
    def init_training_settings(self):
        super().init_training_settings()  # EMA, pixel/perceptual losses, optimizers, schedulers
        train_opt = self.opt['train']
        # every other train.<name>_opt is a loss term l_<name>: an image loss (loss(image, gt), e.g. FFTLoss) or a
        # loss of the whole network output (loss(output, gt, label), e.g. a method's own term on its card)
        self.loss_terms = OrderedDict(
            (key[:-len('_opt')], build_loss(value).to(self.device)) for key, value in train_opt.items()
            if key.endswith('_opt') and key not in SHARED_LOSS_KEYS and isinstance(value, dict) and value.get('type'))
        logger = get_root_logger()
        self.train_step = TrainStep(self.opt['train'], self.device, logger)
        batch = (self.opt.get('datasets') or {}).get('train', {}).get('batch_size_per_gpu')
        if batch:
            logger.info(self.train_step.describe(batch, self.opt.get('world_size', 1)))
        logger.info(f'Degradation embedding: {"CLIP " + type(self.net_clip).__name__ if self.net_clip else "none"}'
                    f'{" (trained alongside)" if self.cri_clip is not None else ""}')

    def setup_optimizers(self):
        super().setup_optimizers()
        train_opt = self.opt['train']
        self.clip_params = []
        if train_opt.get('clip_opt') is not None:
            if self.net_clip is None:
                raise ValueError('train.clip_opt is set but there is no network_clip to train')
            self.cri_clip = build_loss(train_opt['clip_opt']).to(self.device)
            optim_opt = dict(train_opt.get('optim_clip') or {'type': 'Adam', 'lr': 1e-4})
            optim_type = optim_opt.pop('type')
            params = [p for p in self.net_clip.parameters() if p.requires_grad]
            params += [p for p in self.cri_clip.parameters() if p.requires_grad]
            broadcast_from_rank0(list(self.cri_clip.parameters()) + list(self.cri_clip.buffers()))
            self.clip_params = params  # outside DDP: averaged across ranks by the train step
            self.optimizer_clip = self.get_optimizer(optim_type, params, **optim_opt)
            self.optimizers.append(self.optimizer_clip)
            self.net_clip.train()

    def feed_data(self, data):
        self.lq = data['lq'].to(self.device)
        if 'gt' in data:
            self.gt = data['gt'].to(self.device)
        # the CLIP class of an item is its prompt index (AllInOneDataset: defaults to its label)
        label = data.get('prompt_index', data.get('label'))
        self.label = torch.as_tensor(label).to(self.device) if label is not None else None

    def _losses(self, chunks):
        """The weighted loss terms of one micro-batch ``(lq, gt, label)``; keeps its restored image."""
        lq, gt, label = chunks
        losses = OrderedDict()
        embedding = None
        if self.cri_clip is not None:  # CLIP adapters trained alongside: contrastive loss, detached embedding
            image_features = self.net_clip(lq)
            losses['l_clip'] = self.cri_clip(image_features, self.net_clip.text_features(), label)
            embedding = image_features.detach()
        output = self.card.read_output(self.get_bare_model(self.net_g),
                                       self.run_network(self.net_g, lq, self.network_input(lq, label, embedding)))
        self._outputs.append(output.image.detach())
        if self.cri_pix:  # every supervised image (DGUNet: every stage), as published
            losses['l_pix'] = sum(self.cri_pix(image, gt) for image in output.supervised)
        for name, term in self.loss_terms.items():
            losses[f'l_{name}'] = (term(output, gt, label) if getattr(term, 'takes_network_output', False)
                                   else term(output.image, gt))
        if self.cri_perceptual:
            l_percep, l_style = self.cri_perceptual(output.image, gt)
            for name, value in (('l_percep', l_percep), ('l_style', l_style)):
                if value is not None:
                    losses[name] = value
        if not losses:
            raise ValueError('VLUNetModel: no loss to train with (set train.pixel_opt and/or perceptual_opt)')
        return losses

    def optimize_parameters(self, current_iter):
        self._outputs = []
        loss_dict, stepped = self.train_step.run(
            [self.lq, self.gt, self.label], self._losses, self.optimizers, ddp_nets=[self.net_g],
            extra_params=self.clip_params, current_iter=current_iter)
        self.output = torch.cat(self._outputs) if len(self._outputs) > 1 else self._outputs[0]
        del self._outputs
        if self.train_step.skipped:
            loss_dict['skipped_steps'] = torch.tensor(float(self.train_step.skipped), device=self.device)
        if stepped:  # terms that train networks of their own (e.g. potentials) update them now
            for term in self.loss_terms.values():
                after = getattr(term, 'after_network_step', None)
                if callable(after):
                    values = after(self._forward_output, self.lq, self.gt, self.label)
                    loss_dict.update((k, torch.as_tensor(v, dtype=torch.float32, device=self.device))
                                     for k, v in (values or {}).items())
        self.log_dict = self.reduce_loss_dict(loss_dict)
        if stepped and self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)

    def _forward_output(self, lq, label=None):
        """The :class:`NetworkOutput` of the bare ``network_g`` on ``lq`` (for terms updating their own networks)."""
        net = self.get_bare_model(self.net_g)
        return self.card.read_output(net, self.run_network(net, lq, self.network_input(lq, label)))

    def training_state_extras(self):
        """Saved in the training state beside optimizers and schedulers: the fp16 gradient scaler and the
        state of loss terms that train networks of their own."""
        if not hasattr(self, 'train_step'):
            return {}
        terms = {name: term.state_dict() for name, term in self.loss_terms.items()
                 if callable(getattr(term, 'after_network_step', None))}
        return {'train_step': self.train_step.state_dict(), **({'loss_terms': terms} if terms else {})}

    def resume_training(self, resume_state):
        super().resume_training(resume_state)
        if hasattr(self, 'train_step'):
            self.train_step.load_state_dict(resume_state.get('train_step') or {})
            for name, state in (resume_state.get('loss_terms') or {}).items():
                if name in self.loss_terms:
                    self.loss_terms[name].load_state_dict(state)

    def get_bare_model(self, net):
        """The network inside DataParallel / DDP / ``torch.compile`` wrappers (checkpoints keep its keys)."""
        return bare_network(net)

    # ------------------------------------------------------------------ inference
    def records_stages(self, net=None):
        """Whether the network records its unfolding stages (``forward(..., return_stages=True)``; its card says)."""
        return card_for(self.get_bare_model(net or self.net_g)).records_stages

    def restore(self, lq, net=None, tile=None, tile_overlap=16, embedding=None, return_stages=False, label=None):
        """Restore a (B,3,H,W) batch in [0,1] through the inference engine (see
        :meth:`vlunet.inference.RestorationEngine.forward`); ``net`` defaults to the EMA network if any."""
        net = net or (self.net_g_ema if hasattr(self, 'net_g_ema') else self.net_g)
        return self.engine.forward(lq, label=label, embedding=embedding, return_stages=return_stages, net=net,
                                   tile=tile, tile_overlap=tile_overlap)

    def test(self):
        """Restore ``self.lq`` with the bare network (EMA if any; not its DDP / compiled wrapper) through the
        inference engine, under ``val.amp`` autocast when set."""
        net = self.get_bare_model(self.net_g_ema if hasattr(self, 'net_g_ema') else self.net_g)
        was_training = net.training
        net.eval()
        val_opt = self.opt.get('val') or {}
        engine = self.engine
        engine.precision = parse_amp(val_opt.get('amp', False), 'val.amp')
        self.output = engine.forward(self.lq, label=self.label, net=net, tile=val_opt.get('tile'),
                                     tile_overlap=val_opt.get('tile_overlap', 16),
                                     max_memory=val_opt.get('max_memory')).float()  # a budget tiles what won't fit
        if was_training:
            net.train()

    def validation_protocol(self, dataset):
        """How this model measures ``dataset`` (recorded per val set in ``metrics.json``): the metric
        types with their options, the crop rule and the noise/synthetic degradations with their seed."""
        val_opt = self.opt.get('val') or {}
        crop = val_opt.get('center_crop_multiple')
        protocol = {'metrics': {name: dict(opt) for name, opt in (val_opt.get('metrics') or {}).items()},
                    'crop': f'center crop to a multiple of {crop}' if crop else 'none'}
        describe = getattr(dataset, 'protocol', None)
        protocol.update(describe() if callable(describe) else {'noise': None, 'synthetic': None})
        return protocol

    def _evaluation_inputs(self, val_data):
        """Feed a validation batch; with ``val.center_crop_multiple`` crop input and target first (the
        published test crops both to a multiple of 16 before the network and measures the crops)."""
        self.feed_data(val_data)
        multiple = (self.opt.get('val') or {}).get('center_crop_multiple')
        if multiple:
            self.lq = center_crop_to_multiple(self.lq, int(multiple))
            if hasattr(self, 'gt'):
                self.gt = center_crop_to_multiple(self.gt, int(multiple))

    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img):
        dataset_name = dataloader.dataset.opt['name']
        metrics_opt = self.opt['val'].get('metrics') or {}
        if metrics_opt:
            self._initialize_best_metric_results(dataset_name)
        # metrics marked float_input (vlunet.metrics) see the float images, BasicSR's the 8-bit ones
        float_input = {name: getattr(METRIC_REGISTRY.get(opt['type']), 'float_input', False)
                       for name, opt in metrics_opt.items()}
        sums = {name: 0.0 for name in metrics_opt}
        sums.update({f'input_{name}': 0.0 for name in metrics_opt})
        seconds, count = 0.0, 0
        pbar = tqdm(total=len(dataloader), unit='image', desc=f'Val {dataset_name}') if self.opt['val'].get(
            'pbar', True) else None
        for val_data in dataloader:
            self._evaluation_inputs(val_data)
            start = time.perf_counter()
            self.test()
            seconds += time.perf_counter() - start
            for i in range(self.lq.shape[0]):
                name = os.path.splitext(os.path.basename(val_data['lq_path'][i]))[0]
                images = {'restored': self.output[i], 'degraded': self.lq[i]}
                if hasattr(self, 'gt'):
                    images['gt'] = self.gt[i]
                u8 = {k: tensor2img([v.detach().cpu()]) for k, v in images.items()}
                as_float = {k: _float_hwc(v) for k, v in images.items()} if any(float_input.values()) else {}
                if 'gt' in images:
                    for metric, opt_ in metrics_opt.items():
                        imgs = as_float if float_input[metric] else u8
                        sums[metric] += calculate_metric({'img': imgs['restored'], 'img2': imgs['gt']}, opt_)
                        sums[f'input_{metric}'] += calculate_metric({'img': imgs['degraded'], 'img2': imgs['gt']},
                                                                    opt_)
                if save_img:
                    self._save_image(u8['restored'], dataset_name, name, current_iter)
                    if not self.opt['is_train'] and 'gt' in images:  # for side-by-side grids
                        self._save_image(u8['degraded'], dataset_name, name, current_iter, suffix='lq')
                        self._save_image(u8['gt'], dataset_name, name, current_iter, suffix='gt')
                count += 1
            if pbar:
                pbar.update(1)
        if pbar:
            pbar.close()
        for attr in ('lq', 'gt', 'output'):
            if hasattr(self, attr):
                delattr(self, attr)
        averages = {k: v / max(count, 1) for k, v in sums.items()}
        self.metric_results = {k: averages[k] for k in metrics_opt}
        for metric, value in self.metric_results.items():
            self._update_best_metric_result(dataset_name, metric, value, current_iter)
        if metrics_opt:
            self._log_validation_metric_values(current_iter, dataset_name, tb_logger)
            get_root_logger().info('\t degraded input: ' + ', '.join(
                f'{k}: {averages["input_" + k]:.4f}' for k in metrics_opt))
        if not self.opt['is_train']:
            self._update_metrics_json(dataset_name, averages, count, seconds,
                                      self.validation_protocol(dataloader.dataset), dataloader.dataset)
        return averages

    def _save_image(self, img, dataset_name, name, current_iter, suffix=None):
        vis = self.opt['path']['visualization']
        if self.opt['is_train']:
            path = os.path.join(vis, dataset_name, f'{name}_{current_iter}.png')
        else:
            suffix = suffix or self.opt['val'].get('suffix') or self.opt['name']
            path = os.path.join(vis, dataset_name, f'{name}_{suffix}.png')
        write_image_atomic(path, img)

    def _update_metrics_json(self, dataset_name, averages, count, seconds, protocol, dataset=None):
        """``metrics.json[dataset_name]``: the averages, ``images``, ``seconds``, the ``protocol``; the test set's
        ``fingerprint`` (count, sizes, content hash, files) with ``test_set``, its check against the canonical
        set (:mod:`vlunet.metrics.fingerprint`; a set that differs is logged); and the ``environment``
        (package versions, device, precision, tiling: :mod:`vlunet.metrics.environment`)."""
        from vlunet.metrics.environment import environment
        from vlunet.metrics.fingerprint import check_fingerprint, dataset_fingerprint
        path = os.path.join(self.opt['path']['results_root'], 'metrics.json')
        data = {}
        if os.path.isfile(path):
            with open(path) as f:
                data = json.load(f)
        entry = {k: round(v, 6) for k, v in averages.items()}
        entry.update(images=count, seconds=round(seconds, 3), protocol=protocol)
        if dataset is not None:
            entry['fingerprint'] = dataset_fingerprint(dataset)
            entry['test_set'] = check_fingerprint(dataset_name, entry['fingerprint'])
            if entry['test_set']['status'] == 'differs':
                get_root_logger().warning(f'{dataset_name} differs from the canonical {entry["test_set"]["canonical"]} '
                                          f'({entry["test_set"]["checked"]}): '
                                          + '; '.join(entry['test_set']['differences']))
        val_opt = self.opt.get('val') or {}
        entry['environment'] = environment(self.device, parse_amp(val_opt.get('amp', False), 'val.amp'),
                                           val_opt.get('tile'), val_opt.get('tile_overlap', 16))
        data[dataset_name] = entry
        write_json_atomic(path, data, sort_keys=True)

    # ------------------------------------------------------------------ saving
    def save(self, epoch, current_iter):
        """Every network of the iteration first, the training state last (the state marks the
        iteration complete for ``--auto_resume``)."""
        if hasattr(self, 'net_g_ema'):
            self.save_network([self.net_g, self.net_g_ema], 'net_g', current_iter, param_key=['params', 'params_ema'])
        else:
            self.save_network(self.net_g, 'net_g', current_iter)
        if self.cri_clip is not None:
            self.save_network(self.net_clip, 'net_clip', current_iter)
        self.save_training_state(epoch, current_iter)
