"""Comparisons: which heads and MLPs circuits share, and what fine-tuning changed.

- ``overlap``: node overlap of circuits (``compare``) with its chance statistics
  (``_sets``, ``_stats``, ``_rows``);
- ``edges``: edge overlap of edge circuits (``compare_edges``);
- ``reuse``: functional reuse (a circuit evaluated on another task or in another model);
- ``drift``: what fine-tuning changed, node by node (``component_drift``);
- ``cross_model``: which changes carry a fine-tune's gain (``cross_model_patching``);
- ``answer``: the plain sentences a report opens with.

Each is re-exported by ``reuse_lens`` itself; this package only groups them. (``rl.compare``
is the function ``overlap.compare``: ``reuse_lens/__init__.py`` keeps this package from
shadowing it.)
"""
