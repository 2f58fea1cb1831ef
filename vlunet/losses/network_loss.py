"""``NetworkLoss``: a loss term the network computed in its own forward (an auxiliary output)."""
from basicsr.utils.registry import LOSS_REGISTRY
from torch import nn


@LOSS_REGISTRY.register()
class NetworkLoss(nn.Module):
    """``loss_weight * output.aux[name]``: a scalar that the network's forward produced, read through its
    method card (``read_output`` names the auxiliary outputs). Option file::

        train: {contrastive_opt: {type: NetworkLoss, name: spd_contrastive, loss_weight: 1.0}}

    Losses with ``takes_network_output = True`` are called as ``loss(output, gt, label)`` with the
    :class:`vlunet.archs.card.NetworkOutput` of the forward; other losses as ``loss(image, gt)``.
    """
    takes_network_output = True

    def __init__(self, name, loss_weight=1.0):
        super().__init__()
        self.name = name
        self.loss_weight = loss_weight

    def forward(self, output, gt=None, label=None):
        value = output.aux.get(self.name)
        if value is None:
            known = ', '.join(sorted(output.aux)) or 'none'
            raise ValueError(f'{type(self).__name__}: the network reported no auxiliary output {self.name!r} in this '
                           f'forward (it reports: {known}); check the loss option "name"')
        return self.loss_weight * value
