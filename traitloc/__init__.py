"""traitloc: localize visual traits in images and audit species classifiers with Finer-CAM.

Finer-CAM (Zhang, Gu et al., CVPR 2025, arXiv:2501.11309) explains the *difference* between a target and
similar references: the explained score is ``s = s_target - gamma * mean_t s_ref_t``, aggregated before the
ReLU of Grad-CAM.

The public API is importable from here; each name is loaded on first use (PEP 562), so ``import traitloc``
stays light (no torch, no open_clip) and the command line starts fast::

    from traitloc import load_clip, ConceptLocalizer

    loc = ConceptLocalizer(load_clip("ViT-B-16", "/path/to/weights.safetensors"), method="gradcam")
    res = loc.explain([photo], ["red epaulets"], base="bird", gamma=1.0)

The names, by stage of the data path (``docs/architecture.md``):

- inputs: :func:`find_images`, :func:`load_image`, :class:`LoadedImage`, :func:`load_trait_list`,
  :class:`Trait`, :class:`CUB`;
- the engine: :class:`FinerCAM`, :class:`CamOutput`, :func:`finer_coefficients`, the :class:`Adapter` protocol,
  :func:`clip_adapter` (open_clip models), :class:`HookAdapter` (any PyTorch model);
- models: :func:`load_clip`, :class:`ClipBundle`, :class:`TextEncoder`, :class:`ConceptLocalizer`,
  :class:`ConceptMaps`, :class:`QueryCache`, :class:`ClassifierExplainer`, :class:`Explanation`, the
  :class:`ClassifierBundle` protocol, :func:`load_probe_classifier`;
- scores of maps: :func:`iou`, :func:`dice`, :func:`iou_top`, :func:`dice_top`, :func:`pearson`,
  :func:`spearman`, :func:`energy_inside`, :func:`pointing_hit`, :func:`relative_confidence_drop`,
  :func:`deletion_auc`, :func:`insertion_auc`;
- results: :class:`ResultStore`, :func:`read_results`, :func:`render_map`, :func:`render_mask`,
  :func:`render_overlay`, :func:`rows_of`, :class:`ReviewStore`;
- the commands as functions: :func:`run_localize` (with :class:`LocalizeSettings`), :func:`run_explain`
  (with :class:`ExplainSpec` and :func:`build_explain_job`), :func:`run_audit`, :func:`export_results`.

>>> import traitloc
>>> sorted(set(traitloc.__all__) - set(dir(traitloc)))
[]
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it (imported on first access)
_LAZY: dict[str, str] = {
    # inputs
    "find_images": "traitloc.data.images",
    "load_image": "traitloc.data.images",
    "LoadedImage": "traitloc.data.images",
    "load_trait_list": "traitloc.data.traits",
    "Trait": "traitloc.data.traits",
    "CUB": "traitloc.data.cub",
    # the engine
    "FinerCAM": "traitloc.engine.cam",
    "CamOutput": "traitloc.engine.cam",
    "finer_coefficients": "traitloc.engine.cam",
    "clip_adapter": "traitloc.engine.adapters",
    "Adapter": "traitloc.engine.adapters",
    "HookAdapter": "traitloc.engine.hooks",
    # models
    "load_clip": "traitloc.models.clip",
    "ClipBundle": "traitloc.models.clip",
    "TextEncoder": "traitloc.models.text",
    "ConceptLocalizer": "traitloc.models.localize",
    "ConceptMaps": "traitloc.models.localize",
    "QueryCache": "traitloc.models.localize",
    "ClassifierExplainer": "traitloc.models.classifier",
    "Explanation": "traitloc.models.classifier",
    "ClassifierBundle": "traitloc.models.classifier",
    "load_probe_classifier": "traitloc.models.probes",
    # scores of maps
    "iou": "traitloc.metrics.maps",
    "dice": "traitloc.metrics.maps",
    "iou_top": "traitloc.metrics.maps",
    "dice_top": "traitloc.metrics.maps",
    "pearson": "traitloc.metrics.maps",
    "spearman": "traitloc.metrics.maps",
    "energy_inside": "traitloc.metrics.maps",
    "pointing_hit": "traitloc.metrics.maps",
    "relative_confidence_drop": "traitloc.metrics.maps",
    "deletion_auc": "traitloc.metrics.maps",
    "insertion_auc": "traitloc.metrics.maps",
    # results
    "ResultStore": "traitloc.io.store",
    "read_results": "traitloc.io.store",
    "render_map": "traitloc.io.store",
    "render_mask": "traitloc.io.store",
    "render_overlay": "traitloc.io.store",
    "rows_of": "traitloc.io.store",
    "ReviewStore": "traitloc.io.decisions",
    # the commands as functions
    "LocalizeSettings": "traitloc.pipelines.localize",
    "run_localize": "traitloc.pipelines.localize",
    "ExplainSpec": "traitloc.pipelines.explain",
    "build_explain_job": "traitloc.pipelines.explain",
    "run_explain": "traitloc.pipelines.explain",
    "run_audit": "traitloc.pipelines.audit",
    "export_results": "traitloc.pipelines.export",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time :func:`__getattr__` imports on first use
    from traitloc.data.cub import CUB as CUB
    from traitloc.data.images import LoadedImage as LoadedImage
    from traitloc.data.images import find_images as find_images
    from traitloc.data.images import load_image as load_image
    from traitloc.data.traits import Trait as Trait
    from traitloc.data.traits import load_trait_list as load_trait_list
    from traitloc.engine.adapters import Adapter as Adapter
    from traitloc.engine.adapters import clip_adapter as clip_adapter
    from traitloc.engine.cam import CamOutput as CamOutput
    from traitloc.engine.cam import FinerCAM as FinerCAM
    from traitloc.engine.cam import finer_coefficients as finer_coefficients
    from traitloc.engine.hooks import HookAdapter as HookAdapter
    from traitloc.io.decisions import ReviewStore as ReviewStore
    from traitloc.io.store import ResultStore as ResultStore
    from traitloc.io.store import read_results as read_results
    from traitloc.io.store import render_map as render_map
    from traitloc.io.store import render_mask as render_mask
    from traitloc.io.store import render_overlay as render_overlay
    from traitloc.io.store import rows_of as rows_of
    from traitloc.metrics.maps import deletion_auc as deletion_auc
    from traitloc.metrics.maps import dice as dice
    from traitloc.metrics.maps import dice_top as dice_top
    from traitloc.metrics.maps import energy_inside as energy_inside
    from traitloc.metrics.maps import insertion_auc as insertion_auc
    from traitloc.metrics.maps import iou as iou
    from traitloc.metrics.maps import iou_top as iou_top
    from traitloc.metrics.maps import pearson as pearson
    from traitloc.metrics.maps import pointing_hit as pointing_hit
    from traitloc.metrics.maps import relative_confidence_drop as relative_confidence_drop
    from traitloc.metrics.maps import spearman as spearman
    from traitloc.models.classifier import ClassifierBundle as ClassifierBundle
    from traitloc.models.classifier import ClassifierExplainer as ClassifierExplainer
    from traitloc.models.classifier import Explanation as Explanation
    from traitloc.models.clip import ClipBundle as ClipBundle
    from traitloc.models.clip import load_clip as load_clip
    from traitloc.models.localize import ConceptLocalizer as ConceptLocalizer
    from traitloc.models.localize import ConceptMaps as ConceptMaps
    from traitloc.models.localize import QueryCache as QueryCache
    from traitloc.models.probes import load_probe_classifier as load_probe_classifier
    from traitloc.models.text import TextEncoder as TextEncoder
    from traitloc.pipelines.audit import run_audit as run_audit
    from traitloc.pipelines.explain import ExplainSpec as ExplainSpec
    from traitloc.pipelines.explain import build_explain_job as build_explain_job
    from traitloc.pipelines.explain import run_explain as run_explain
    from traitloc.pipelines.export import export_results as export_results
    from traitloc.pipelines.localize import LocalizeSettings as LocalizeSettings
    from traitloc.pipelines.localize import run_localize as run_localize


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access (PEP 562) and cache the name here."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's names with the lazily imported public API (for ``dir()`` and tab completion)."""
    return sorted(set(globals()) | set(__all__))
