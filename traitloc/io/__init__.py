"""Outputs on disk: atomic files, the results store, the review store, map files and export formats.

:mod:`~traitloc.io.files` (atomic writes, hashes, JSON, ``run.json``, map TIFF/PNG/overlays),
:mod:`~traitloc.io.store` (the Parquet results store and rendering from its grid maps),
:mod:`~traitloc.io.decisions` (the SQLite review decisions), :mod:`~traitloc.io.csvlog` (appendable CSV
summaries), :mod:`~traitloc.io.reviewkit` (the review app's data layer, no Streamlit).

Imports: ``engine`` (to render grid maps) and ``data``; never models, pipelines or the command line.
"""
