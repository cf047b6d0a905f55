"""Guest images built from Debian packages and cached by the content of their recipe.

Public API: :func:`~pytest_gondolin.image.store.ensure_image` (the cached
image for a recipe, built once under a file lock) and
:class:`~pytest_gondolin.image.store.Image`; ``gondolin image ...`` is the
command-line face (:mod:`pytest_gondolin.cli`). The cache as one archive:
:func:`~pytest_gondolin.image.archive.export_cache` and
:func:`~pytest_gondolin.image.archive_import.import_cache` (``gondolin cache
export|import``). Nothing is imported here.
"""
