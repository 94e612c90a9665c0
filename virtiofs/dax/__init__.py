"""The DAX cache window: the device-side window (``window``) and the driver-side range
allocator (``allocator``). See each module's docstring for the rules they follow."""

from .allocator import (
    FUSE_DAX_RECLAIM_CHUNK,
    FUSE_DAX_RECLAIM_THRESHOLD,
    FUSE_DAX_SHIFT,
    FUSE_DAX_SZ,
    DaxRangeAllocator,
    GrantKind,
    RangeGrant,
    RemoveMapping,
    SetupMapping,
    reclaim_count,
    removemapping_batches,
)
from .window import DaxMapping, DaxWindow, OverlapPolicy

__all__ = [
    "FUSE_DAX_RECLAIM_CHUNK",
    "FUSE_DAX_RECLAIM_THRESHOLD",
    "FUSE_DAX_SHIFT",
    "FUSE_DAX_SZ",
    "DaxMapping",
    "DaxRangeAllocator",
    "DaxWindow",
    "GrantKind",
    "OverlapPolicy",
    "RangeGrant",
    "RemoveMapping",
    "SetupMapping",
    "reclaim_count",
    "removemapping_batches",
]
