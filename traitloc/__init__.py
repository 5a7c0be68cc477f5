"""traitloc: localize visual traits in images and audit species classifiers with Finer-CAM.

Finer-CAM (Zhang, Gu et al., CVPR 2025, arXiv:2501.11309) explains the *difference* between a target and
similar references: the explained score is ``s = s_target - gamma * mean_t s_ref_t``, aggregated before the
ReLU of Grad-CAM.
"""

__version__ = "0.1.0"
