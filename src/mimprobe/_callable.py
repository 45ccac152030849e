"""``mimprobe.probe`` and ``mimprobe.extract`` are packages *and* the API's functions: calling the package runs
:func:`mimprobe.api.probe` / :func:`mimprobe.api.extract`, so ``mimprobe.probe(...)`` works whether or not the
package was imported before (an import binds the package to that name, whatever stood there)."""

from __future__ import annotations

import sys
import types


class CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from mimprobe import api

        return getattr(api, self.__name__.rpartition(".")[2])(*args, **kwargs)


def make_callable(name: str) -> None:
    """Make the package ``name`` (``mimprobe.probe``, ``mimprobe.extract``) call the API function of its name."""
    sys.modules[name].__class__ = CallablePackage
