"""Scores of saliency maps: overlap with regions and other maps, and faithfulness to a classifier.

:mod:`~traitloc.metrics.maps` holds the plain functions (IoU/Dice of top fractions, Pearson, Spearman,
energy inside a region, pointing game, all of them at once with :func:`~traitloc.metrics.maps.overlap_scores`,
relative confidence drop, deletion/insertion AUC). :mod:`~traitloc.metrics.attributes` builds the reference maps
they are compared with in ``traitloc audit`` and ``traitloc evaluate-text``: CUB attribute differences and maps of
the attributes from the part keypoints.

Imports: torch and numpy only.
"""

from traitloc.metrics.maps import *  # noqa: F401,F403  (``traitloc.metrics.iou`` and friends)
from traitloc.metrics.maps import __all__  # noqa: F401
