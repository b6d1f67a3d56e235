"""mmret's LightningModules, one per model family, and what training needs around them (schedules, GradCache,
checkpoint IO, callbacks, run directories and provenance, W&B). The plain nn.Modules they train live in
`mmret.models`.

    from mmret.training import CrossEncoder, DualEncoder
    dual = DualEncoder.from_checkpoint("runs/shapes_dual/checkpoints/last.ckpt")
"""

from mmret.training.cross_encoder import CrossEncoder
from mmret.training.dual_encoder import DualEncoder
from mmret.training.fsdp import FSDP2Strategy  # also makes `strategy: fsdp2` a Trainer name

__all__ = ["CrossEncoder", "DualEncoder", "FSDP2Strategy"]
