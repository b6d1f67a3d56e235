"""Hard negatives: offline from a trained dual encoder (`offline`), and within a training batch (`in_batch`).

from mmret.mining.offline import MiningOptions, mine_hard_negatives, mine_to_file
from mmret.mining.in_batch import sample_hard_negatives
"""
