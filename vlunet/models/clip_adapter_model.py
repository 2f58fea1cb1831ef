"""``CLIPAdapterModel``: the CLIP fine-tuning stage of VLU-Net, trained with ``vlunet-train -opt``.

Trains the adapters of a ``DegradationCLIP`` (``network_g``) to recognise the degradation type of
an image: the image embedding must be closest to the text embedding of its type's prompt
(``train.contrastive_opt``, e.g. ``DegradationContrastiveLoss``). Published recipe: ViT-B-32
``laion2b_s34b_b79k`` frozen, Adam lr 1e-5, batch 32, 100 epochs.

Batches are BasicSR dicts with ``lq`` (B, 3, H, W) in [0, 1] (the degraded image) and the type
index: ``prompt_index`` when present (AllInOneDataset), otherwise ``label``; ``gt`` and paths are
ignored. Validation reports ``accuracy`` (fraction of images whose most similar prompt is their
own) through BasicSR's metric machinery and logs a confusion matrix (rows = true type,
columns = predicted type). Checkpoints: ``net_g_{iter}.pth`` (BasicSR ``params``) and the adapters
in the published format ``clip_adapters_{iter}.pth`` (``{'learnable_params': ...}``).
"""
import os
from collections import OrderedDict

import torch
from basicsr.archs import build_network
from basicsr.losses import build_loss
from basicsr.utils import get_root_logger
from basicsr.utils.dist_util import master_only
from basicsr.utils.registry import MODEL_REGISTRY

from vlunet.models.base_model import VLUNetBaseModel
from vlunet.models.train_step import TrainStep, broadcast_from_rank0
from vlunet.utils.atomic import torch_save_atomic

METRICS = {'accuracy': 'higher'}  # metric name -> which direction is better


@MODEL_REGISTRY.register()
class CLIPAdapterModel(VLUNetBaseModel):
    """Fine-tunes DegradationCLIP on degradation-type labels (see the module docstring)."""

    def __init__(self, opt):
        super().__init__(opt)
        self.net_g = build_network(opt['network_g'])
        if not all(hasattr(self.net_g, name) for name in ('text_features', 'load_adapters', 'prompts')):
            raise TypeError(f'CLIPAdapterModel: network_g must be a DegradationCLIP-like network (with prompts, '
                            f'text_features, load_adapters), got type {opt["network_g"].get("type")!r}')
        self.net_g = self.model_to_device(self.net_g)
        self.print_network(self.net_g)

        load_path = opt['path'].get('pretrain_network_g')
        if load_path is not None:
            keys = self.get_bare_model(self.net_g).load_adapters(load_path)
            get_root_logger().info(f'Loaded {len(keys)} DegradationCLIP tensors (adapters) from {load_path}')

        train_opt = opt.get('train') or {}
        # Predictions use the similarity the loss trains: cosine if the loss normalises.
        self.normalize = bool((train_opt.get('contrastive_opt') or {}).get('normalize',
                                                                           (opt.get('val') or {}).get('normalize', False)))
        if self.is_train:
            self.init_training_settings()

    @property
    def prompts(self):
        return list(self.get_bare_model(self.net_g).prompts)

    # ------------------------------------------------------------------ training
    def init_training_settings(self):
        self.net_g.train()
        train_opt = self.opt['train']
        if not train_opt.get('contrastive_opt'):
            raise ValueError('CLIPAdapterModel: option train.contrastive_opt is missing '
                             '(e.g. {type: DegradationContrastiveLoss})')
        self.cri_contrastive = build_loss(train_opt['contrastive_opt']).to(self.device)
        broadcast_from_rank0(list(self.cri_contrastive.parameters()) + list(self.cri_contrastive.buffers()))
        self.setup_optimizers()
        self.setup_schedulers()
        self.train_step = TrainStep(train_opt, self.device, get_root_logger())
        batch = (self.opt.get('datasets') or {}).get('train', {}).get('batch_size_per_gpu')
        if batch:
            get_root_logger().info(self.train_step.describe(batch, self.opt.get('world_size', 1)))

    def setup_optimizers(self):
        """One optimizer over the trainable tensors: the adapters (and the backbone when it is not
        frozen), plus a learnable loss temperature."""
        train_opt = self.opt['train']
        params = [p for p in self.net_g.parameters() if p.requires_grad]
        params += [p for p in self.cri_contrastive.parameters() if p.requires_grad]
        if not params:
            raise ValueError('CLIPAdapterModel: network_g has no trainable parameters')
        optim_opt = dict(train_opt['optim_g'])
        optim_type = optim_opt.pop('type')
        self.optimizer_g = self.get_optimizer(optim_type, params, **optim_opt)
        self.optimizers.append(self.optimizer_g)
        n_train = sum(p.numel() for p in params)
        get_root_logger().info(f'CLIPAdapterModel: optimising {n_train:,d} parameters with {optim_type}')

    def feed_data(self, data):
        """Take ``lq`` and the degradation-type index (``prompt_index``, else ``label``) of a batch."""
        self.lq = data['lq'].to(self.device)
        key = 'prompt_index' if 'prompt_index' in data else 'label'
        if key not in data:
            raise KeyError("CLIPAdapterModel.feed_data: batch has no 'label' (expected a LongTensor (B,) of "
                           'indices into network_g.prompts)')
        label = torch.as_tensor(data[key]).long().view(-1)
        num_types = len(self.prompts)
        if label.numel() != self.lq.shape[0]:
            raise ValueError(f'CLIPAdapterModel.feed_data: {self.lq.shape[0]} images but {label.numel()} {key}s')
        bad = sorted({v for v in label.tolist() if not 0 <= v < num_types})
        if bad:
            raise ValueError(f'CLIPAdapterModel.feed_data: {key} values {bad} out of range; '
                             f'expected indices into the {num_types} prompts of network_g: {self.prompts}')
        self.label = label.to(self.device)

    def _losses(self, chunks):
        lq, label = chunks
        image_features, text_features = self.net_g(lq, return_text_features=True)
        with torch.no_grad():
            pred = self.cri_contrastive.logits(image_features, text_features).argmax(dim=1)
            self._correct += int((pred == label).sum())
        return OrderedDict(l_contrastive=self.cri_contrastive(image_features, text_features, label))

    def optimize_parameters(self, current_iter):
        self._correct = 0
        extra = [p for p in self.cri_contrastive.parameters() if p.requires_grad]  # outside DDP: averaged
        log, _ = self.train_step.run([self.lq, self.label], self._losses, self.optimizers, ddp_nets=[self.net_g],
                                     extra_params=extra, current_iter=current_iter)
        log['acc'] = torch.tensor(self._correct / self.lq.shape[0], device=self.device)
        if self.train_step.skipped:
            log['skipped_steps'] = torch.tensor(float(self.train_step.skipped), device=self.device)
        self.log_dict = self.reduce_loss_dict(log)

    def training_state_extras(self):
        """Saved in the training state beside optimizers and schedulers (fp16 gradient scaler)."""
        return {'train_step': self.train_step.state_dict()} if hasattr(self, 'train_step') else {}

    # ------------------------------------------------------------------ inference
    def test(self):
        """Probabilities ``self.output`` (B, K) and predicted types ``self.pred`` (B,) for ``self.lq``."""
        net = self.get_bare_model(self.net_g)
        was_training = net.training
        net.eval()
        with torch.no_grad():
            self.output = net.classify(self.lq, normalize=self.normalize)
        net.train(was_training)
        self.pred = self.output.argmax(dim=1)

    def get_current_visuals(self):
        out = OrderedDict(lq=self.lq.detach().cpu(), result=self.output.detach().cpu())
        if hasattr(self, 'label'):
            out['label'] = self.label.detach().cpu()
        return out

    def dist_validation(self, dataloader, current_iter, tb_logger, save_img):
        # BasicSR's validation loader has no distributed sampler: rank 0 sees the whole set.
        if self.opt['rank'] == 0:
            self.nondist_validation(dataloader, current_iter, tb_logger, save_img)

    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img):
        """Degradation-type accuracy and confusion matrix on one validation set (images are not saved)."""
        dataset_name = dataloader.dataset.opt['name']
        metric_opts = (self.opt.get('val') or {}).get('metrics') or {'accuracy': {}}
        unknown = sorted(set(metric_opts) - set(METRICS))
        if unknown:
            raise ValueError(f'CLIPAdapterModel: val.metrics {unknown} are not supported; available: {sorted(METRICS)}')
        self._init_best_metrics(dataset_name, metric_opts)

        num_types = len(self.prompts)
        confusion = torch.zeros(num_types, num_types, dtype=torch.long)
        for val_data in dataloader:
            self.feed_data(val_data)
            self.test()
            flat = self.label.cpu() * num_types + self.pred.cpu()
            confusion += torch.bincount(flat, minlength=num_types * num_types).view(num_types, num_types)
            del self.lq, self.output

        total = int(confusion.sum())
        self.confusion_matrix = confusion
        self.metric_results = {'accuracy': float(confusion.trace()) / total if total else 0.0}
        for metric in metric_opts:
            self._update_best_metric_result(dataset_name, metric, self.metric_results[metric], current_iter)
        self._log_validation_metric_values(current_iter, dataset_name, tb_logger)

    def _init_best_metrics(self, dataset_name, metric_opts):
        if not hasattr(self, 'best_metric_results'):
            self.best_metric_results = {}
        if dataset_name not in self.best_metric_results:
            record = {}
            for metric, content in metric_opts.items():
                better = (content or {}).get('better', METRICS[metric])
                record[metric] = dict(better=better, val=float('-inf') if better == 'higher' else float('inf'), iter=-1)
            self.best_metric_results[dataset_name] = record

    def confusion_table(self, confusion=None):
        """Text table of a confusion matrix: one row per true type (prompt text), columns = predicted
        type index, then the row's recall."""
        confusion = self.confusion_matrix if confusion is None else confusion
        names = [f'[{i}] {p}' for i, p in enumerate(self.prompts)]
        width = max(len(n) for n in names + ['true \\ predicted'])
        cell = max(5, len(str(int(confusion.max()))) + 1 if confusion.numel() else 5)
        lines = ['true \\ predicted'.ljust(width) + ''.join(f'[{j}]'.rjust(cell) for j in range(len(names))) +
                 'recall'.rjust(8)]
        for i, name in enumerate(names):
            row = confusion[i]
            recall = f'{float(row[i]) / float(row.sum()):.3f}' if row.sum() else '-'
            lines.append(name.ljust(width) + ''.join(str(int(v)).rjust(cell) for v in row) + recall.rjust(8))
        return '\n'.join(lines)

    def _log_validation_metric_values(self, current_iter, dataset_name, tb_logger):
        log_str = f'Validation {dataset_name}\n'
        for metric, value in self.metric_results.items():
            log_str += f'\t # {metric}: {value:.4f}'
            best = self.best_metric_results[dataset_name].get(metric)
            if best is not None:
                log_str += f'\tBest: {best["val"]:.4f} @ {best["iter"]} iter'
            log_str += '\n'
        table = self.confusion_table()
        log_str += f'Confusion matrix (rows: true type, columns: predicted type, counts)\n{table}\n'
        get_root_logger().info(log_str)
        if tb_logger:
            for metric, value in self.metric_results.items():
                tb_logger.add_scalar(f'metrics/{dataset_name}/{metric}', value, current_iter)
            tb_logger.add_text(f'confusion/{dataset_name}', '    ' + table.replace('\n', '\n    '), current_iter)

    # ------------------------------------------------------------------ checkpoints
    def save(self, epoch, current_iter):
        """``net_g_{iter}.pth`` (BasicSR), ``clip_adapters_{iter}.pth`` (published format) and the
        training state; a learnable loss temperature goes to ``contrastive_loss_{iter}.pth``."""
        self.save_network(self.net_g, 'net_g', current_iter)
        self.save_adapters(current_iter)
        if any(True for _ in self.cri_contrastive.parameters()):
            self.save_network(self.cri_contrastive, 'contrastive_loss', current_iter)
        self.save_training_state(epoch, current_iter)

    @master_only
    def save_adapters(self, current_iter):
        name = 'latest' if current_iter == -1 else current_iter
        path = os.path.join(self.opt['path']['models'], f'clip_adapters_{name}.pth')
        torch_save_atomic({'learnable_params': self.get_bare_model(self.net_g).adapter_state_dict()}, path)
        return path

    def resume_training(self, resume_state):
        super().resume_training(resume_state)
        if hasattr(self, 'train_step'):
            self.train_step.load_state_dict(resume_state.get('train_step') or {})
        params = list(self.cri_contrastive.parameters())
        if params:
            path = os.path.join(self.opt['path']['models'], f'contrastive_loss_{resume_state["iter"]}.pth')
            if os.path.isfile(path):
                self.load_network(self.cri_contrastive, path)
            else:
                get_root_logger().warning(f'CLIPAdapterModel: {path} not found; the learnable temperature restarts '
                                          'from its initial value')
