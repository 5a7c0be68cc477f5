"""Inputs: photos on disk, the CUB-200-2011 dataset and trait lists.

:mod:`~traitloc.data.images` finds and decodes photos (odd modes, EXIF rotation, stable keys),
:mod:`~traitloc.data.cub` reads CUB-200-2011, :mod:`~traitloc.data.traits` loads trait lists.

Imports: nothing from traitloc outside ``data``.
"""
