"""The engine: Finer-CAM and the text-localization methods as exact, batched tensor maths.

Holds the method registry (:mod:`~traitloc.engine.methods`), the model adapters that expose a backbone's
activations and the closed-form derivative of its head (:mod:`~traitloc.engine.adapters`), the generic
hook adapter for any PyTorch model (:mod:`~traitloc.engine.hooks`), the CAM
family with its shared-forward fast paths (:mod:`~traitloc.engine.cam`), the forward-only dense CLIP
methods and batched LeGrad (:mod:`~traitloc.engine.dense`) and the plain full-autograd definition every
fast path is tested against (:mod:`~traitloc.engine.reference`). The derivations are in ``docs/engine.md``.

Imports: torch and numpy only; nothing else from traitloc. No files, no text, no command line.
"""
