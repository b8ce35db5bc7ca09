"""ADTR+: ADTR trained with labelled anomalies (You et al., ICONIP 2022, Sec. 3.4).

The same network as ADTR (frozen CNN features reconstructed by a query-based transformer). Training adds
anomalies, with pixel masks or image labels only, real or synthetic (confetti noise): a pseudo-Huber loss
pulls normal regions toward a good reconstruction and a log term pushes the anomalous ones away.

Paper: https://arxiv.org/abs/2209.01816
"""

from .lightning_model import ADTRPlus
from .loss import ADTRPlusLoss

__all__ = ["ADTRPlus", "ADTRPlusLoss"]
