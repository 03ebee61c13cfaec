"""Weight writers: the least-squares (or fine-tuning) step that stores the chunk targets in the MLPs."""

from .alphaedit import AlphaEditWrite
from .base import WeightWriter, atomic_update, collect_keys
from .memit import MemitWrite
from .unke import UnkeWrite

__all__ = ["AlphaEditWrite", "MemitWrite", "UnkeWrite", "WeightWriter", "atomic_update", "collect_keys"]
