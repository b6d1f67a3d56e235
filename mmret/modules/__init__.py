"""mmret's LightningModules, one per model family; the plain nn.Modules they train live in `mmret.models`.

from mmret.modules import CrossEncoder, DualEncoder
"""

from mmret.modules.cross_encoder import CrossEncoder
from mmret.modules.dual_encoder import DualEncoder

__all__ = ["CrossEncoder", "DualEncoder"]
