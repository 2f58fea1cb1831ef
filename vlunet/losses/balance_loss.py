"""``BalanceLoss``: the expert load-balancing loss a mixture-of-experts network reports in its forward."""
from basicsr.utils.registry import LOSS_REGISTRY

from vlunet.losses.network_loss import NetworkLoss


@LOSS_REGISTRY.register()
class BalanceLoss(NetworkLoss):
    """``loss_weight * output.aux['balance']``: the routers' load-balancing loss of this forward (MoCE-IR
    reports it; its published training adds ``balance_loss_weight`` (0.01) times it to the L1 loss).
    Option file::

        train: {balance_opt: {type: BalanceLoss, loss_weight: 0.01}}
    """

    def __init__(self, loss_weight=0.01, name='balance'):
        super().__init__(name=name, loss_weight=loss_weight)
