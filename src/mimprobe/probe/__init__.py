"""Probing cached tokens: the options (:mod:`.options`), a plan (heads, grids, rows; :mod:`.plan`), the trainers,
selection, records (:mod:`.run`) and saved heads (:mod:`.predict`). Import from those modules; the package itself
is :func:`mimprobe.api.probe` when called (``mimprobe.probe(train, eval, ...)``)."""

from mimprobe._callable import make_callable

make_callable(__name__)
