"""The method registry: every localization method traitloc offers, in one place.

The CLI's ``--method`` choices, the review app's Query menu, :data:`traitloc.engine.cam.METHODS` and ``docs/methods.md``
read from :data:`REGISTRY`; add a method here and everywhere else follows. Every method explains the Finer query
vector ``u = v_concept - gamma * v_base`` and is linear in it up to its last ReLU, so the contrast is formed before the
ReLU; ``gamma = 0`` (or no base) gives the authors' method. Equations, notation and sources: ``docs/methods.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MethodInfo", "REGISTRY", "method_names", "get_method", "CAM_METHODS", "DENSE_METHODS", "TEXT_METHODS"]


@dataclass(frozen=True)
class MethodInfo:
    """One localization method and what it supports.

    Attributes
    ----------
    name : str
        The ``--method`` value.
    family : str
        ``cam`` (target-layer CAM, any model with an adapter), ``dense`` (forward-only patch-text similarity,
        open_clip ViTs) or ``attention-gradient`` (LeGrad, open_clip ViTs).
    title, equation, source, url : str
        What to show the user and the docs.
    signed : bool
        The map has a meaningful negative part (evidence for the base).
    cached_regamma : bool
        A new gamma or base reuses cached per-prompt results with no new forward or backward pass.
    resnet : bool
        Works with open_clip ModifiedResNet (RN50 ...) as well as ViTs.
    forward_only : bool
        Needs no gradients at all.
    classifier : bool
        Usable by ``traitloc explain`` (classifier Finer-CAM), not only for text queries.
    """

    name: str
    family: str
    title: str
    equation: str
    source: str
    url: str
    signed: bool
    cached_regamma: bool
    resnet: bool
    forward_only: bool
    classifier: bool


REGISTRY: dict[str, MethodInfo] = {
    m.name: m
    for m in (
        MethodInfo(
            "gradcam", "cam", "Grad-CAM (Finer-CAM)",
            "ReLU(sum_k mean_cells(d s_q / d A_k) A_k), A = last block's ln_1 tokens",
            "Selvaraju et al., ICCV 2017; Finer-CAM: Zhang et al., CVPR 2025", "https://arxiv.org/abs/2501.11309",
            signed=True, cached_regamma=True, resnet=True, forward_only=False, classifier=True,
        ),
        MethodInfo(
            "layercam", "cam", "Layer-CAM",
            "ReLU(sum_k ReLU(d s_q / d A_ik) A_ik)",
            "Jiang et al., IEEE TIP 2021", "https://doi.org/10.1109/TIP.2021.3089943",
            signed=True, cached_regamma=False, resnet=True, forward_only=False, classifier=True,
        ),
        MethodInfo(
            "scorecam", "cam", "Score-CAM",
            "ReLU(sum_k softmax_k(tau s_q(x * H_k)) A_k), H_k = min-max upsampled channel k",
            "Wang et al., CVPR-W 2020", "https://arxiv.org/abs/1910.01279",
            signed=True, cached_regamma=False, resnet=True, forward_only=False, classifier=True,
        ),
        MethodInfo(
            "maskclip", "dense", "MaskCLIP",
            "last block with identity attention (value path): z = x + W_o v; z + MLP(ln_2 z); per-patch cosine",
            "Zhou, Loy & Dai, ECCV 2022", "https://arxiv.org/abs/2112.01071",
            signed=True, cached_regamma=True, resnet=False, forward_only=True, classifier=False,
        ),
        MethodInfo(
            "clearclip", "dense", "ClearCLIP",
            "last block: z = W_o softmax(q q^T / sqrt d) v, no residual, no MLP; per-patch cosine",
            "Lan et al., ECCV 2024", "https://arxiv.org/abs/2407.12442",
            signed=True, cached_regamma=True, resnet=False, forward_only=True, classifier=False,
        ),
        MethodInfo(
            "sclip", "dense", "SCLIP",
            "last block: z = x + W_o (softmax(q q^T/sqrt d) + softmax(k k^T/sqrt d)) v; z + MLP(ln_2 z)",
            "Wang, Mei & Yuille, ECCV 2024", "https://arxiv.org/abs/2312.01597",
            signed=True, cached_regamma=True, resnet=False, forward_only=True, classifier=False,
        ),
        MethodInfo(
            "naclip", "dense", "NACLIP",
            "last block: z = W_o softmax(k k^T/sqrt d + Gaussian(sigma=5) neighbourhood) v, no residual, no MLP",
            "Hajimiri, Ben Ayed & Dolz, WACV 2025", "https://arxiv.org/abs/2404.08181",
            signed=True, cached_regamma=True, resnet=False, forward_only=True, classifier=False,
        ),
        MethodInfo(
            "gem", "dense", "GEM",
            "last 6 blocks: parallel self-self attention path (q-q, k-k, v-v, 1 iteration), residual, no MLP",
            "Bousselham et al., CVPR 2024", "https://arxiv.org/abs/2312.00878",
            signed=True, cached_regamma=True, resnet=False, forward_only=True, classifier=False,
        ),
        MethodInfo(
            "legrad", "attention-gradient", "LeGrad",
            "sum over last 2 layers of mean_{heads, rows} ReLU(d s_q^(l) / d Attn^(l)), patch columns",
            "Bousselham et al., 2024 (LeGrad)", "https://arxiv.org/abs/2404.03214",
            signed=False, cached_regamma=True, resnet=False, forward_only=False, classifier=False,
        ),
    )
}  # fmt: skip


def method_names(
    *, family: str | None = None, classifier: bool | None = None, resnet: bool | None = None
) -> tuple[str, ...]:
    """Method names in registry order, optionally filtered by family or capability.

    Parameters
    ----------
    family : str, optional
        Keep one family (``cam``, ``dense``, ``attention-gradient``).
    classifier, resnet : bool, optional
        Keep the methods whose :class:`MethodInfo` flag has this value.

    Returns
    -------
    tuple of str

    Examples
    --------
    >>> method_names(family="cam")
    ('gradcam', 'layercam', 'scorecam')
    >>> method_names(resnet=False, family="attention-gradient")
    ('legrad',)
    """
    return tuple(
        m.name
        for m in REGISTRY.values()
        if (family is None or m.family == family)
        and (classifier is None or m.classifier == classifier)
        and (resnet is None or m.resnet == resnet)
    )


def get_method(name: str) -> MethodInfo:
    """The registry entry of a method.

    Parameters
    ----------
    name : str
        A ``--method`` value.

    Returns
    -------
    MethodInfo

    Raises
    ------
    ValueError
        For an unknown name, listing the choices.

    Examples
    --------
    >>> get_method("naclip").forward_only
    True
    >>> get_method("gradcam++")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: unknown method 'gradcam++'; choose one of gradcam, layercam, scorecam, ...
    """
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(REGISTRY)}") from None


#: target-layer CAM methods (text queries and classifiers)
CAM_METHODS = method_names(family="cam")
#: forward-only dense patch-text similarity methods (open_clip ViTs)
DENSE_METHODS = method_names(family="dense")
#: every method usable for a text query
TEXT_METHODS = tuple(REGISTRY)
