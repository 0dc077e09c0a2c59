"""Statistics and storage: exact sums, their files, merges and null spaces, without torch.

Owns :class:`.moments.Moments` (count and float64 sums, exact merges), the null-space rule
(:mod:`.projection`), the HDF5 format (:mod:`.store`), the merge of shard files (:mod:`.merge`)
and the merge and projection jobs (:mod:`.jobs`).

May import: the top-level modules and :mod:`nullcov.models`.
"""
