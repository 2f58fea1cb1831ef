"""``BalanceLoss``: the auxiliary loss a network reports after its forward (MoCE-IR's expert balance)."""
from basicsr.utils.registry import LOSS_REGISTRY
from torch import nn


@LOSS_REGISTRY.register()
class BalanceLoss(nn.Module):
    """``loss_weight * net.total_loss``: MoCE-IR's routers add their load-balancing losses into the
    network's ``total_loss`` during each training forward, and the published training adds
    ``balance_loss_weight`` (0.01) times it to the L1 loss. Option file::

        train: {balance_opt: {type: BalanceLoss, loss_weight: 0.01}}

    ``forward(net)`` takes the bare network that has just run its forward.
    """

    def __init__(self, loss_weight=0.01, attribute='total_loss'):
        super().__init__()
        self.loss_weight = loss_weight
        self.attribute = attribute

    def forward(self, net):
        value = getattr(net, self.attribute, None)
        if value is None:
            raise AttributeError(f'BalanceLoss: {type(net).__name__} has no attribute {self.attribute!r} after its '
                                 'forward (train.balance_opt is for networks that report an auxiliary loss, '
                                 'e.g. MoCEIR)')
        return self.loss_weight * value
