"""The commands as library functions: one module per command on one runner.

:mod:`~traitloc.pipelines.runner` runs a :class:`~traitloc.pipelines.runner.Job` over many images
(prefetch, writer thread, out-of-memory splitting, resume, ``run.json``); ``localize``, ``explain``,
``evaluate``, ``evaluate_text``, ``audit``, ``train`` and ``export`` are the commands;
:mod:`~traitloc.pipelines.distributed` runs localize and explain on Ray; :mod:`~traitloc.pipelines.options`
holds the command-line options the commands share.

Imports: everything below (engine, data, io, metrics, models); never ``traitloc.cli``.
"""
