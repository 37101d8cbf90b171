"""Architecture adapters: how each model family's weights become the functional forward's.

``ArchSpec`` describes a family; ``registry.extract(bridge)`` picks the family's adapter
by the ``transformers`` ``model_type`` and returns ``patching._forward.Weights``. See
README.md in this folder for how to add an architecture.
"""

from reuse_lens.arch.spec import ArchSpec

__all__ = ["ArchSpec"]
