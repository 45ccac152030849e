"""Backbone loading (:mod:`.backbone`), the options (:mod:`.options`) and the token extraction loop
(:mod:`.runner`). Import from those modules; the package itself is :func:`mimprobe.api.extract` when called
(``mimprobe.extract(model, data, store, ...)``)."""

from mimprobe._callable import make_callable

make_callable(__name__)
