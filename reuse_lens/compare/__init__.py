"""Comparisons: which heads and MLPs circuits share, and what fine-tuning changed.

- ``overlap``: node overlap of circuits (``compare``) with its chance statistics
  (``_sets``, ``_stats``, ``_rows``);
- ``edges``: edge overlap of edge circuits (``compare_edges``);
- ``reuse``: functional reuse (a circuit evaluated on another task or in another model);
- ``answer``: the plain sentences a report opens with.

Each is re-exported by ``reuse_lens`` itself; this package only groups them.
"""

import sys
import types
from typing import Any


class _Package(types.ModuleType):
    """This package, callable as ``rl.compare``.

    ``rl.compare`` is the function ``reuse_lens.compare.overlap.compare``. Importing any
    module of this package makes Python set ``reuse_lens.compare`` to the package itself,
    over the function the lazy facade had put there; calling the package calls the
    function, so ``rl.compare(circuits)`` works whichever came first.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from reuse_lens.compare.overlap import compare

        return compare(*args, **kwargs)


sys.modules[__name__].__class__ = _Package
