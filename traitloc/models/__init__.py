"""Models and the two explainers that bind them to the engine.

:mod:`~traitloc.models.clip` loads open_clip models (names, local weights, ``hf-hub:``),
:mod:`~traitloc.models.text` encodes prompts (with the on-disk text cache),
:mod:`~traitloc.models.backbones` builds image classifiers and their adapters,
:mod:`~traitloc.models.probes` holds linear probes, the feature cache and the probe classifier wrapper,
:mod:`~traitloc.models.classifier` similar classes and the
:class:`~traitloc.models.classifier.ClassifierExplainer`, :mod:`~traitloc.models.localize` the
:class:`~traitloc.models.localize.ConceptLocalizer` (trait maps from text).

Imports: ``engine``, ``data`` and ``io``; never pipelines or the command line.
"""
