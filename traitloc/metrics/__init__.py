"""Scores of saliency maps: overlap with regions and other maps, and faithfulness to a classifier.

:mod:`~traitloc.metrics.maps` holds the plain functions (IoU/Dice of top fractions, Pearson, Spearman,
energy inside a region, pointing game, relative confidence drop, deletion/insertion AUC).

Imports: torch and numpy only.
"""

from traitloc.metrics.maps import *  # noqa: F401,F403  (``traitloc.metrics.iou`` and friends)
from traitloc.metrics.maps import __all__  # noqa: F401
