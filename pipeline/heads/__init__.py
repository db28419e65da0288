"""Reward heads on frozen backbone embeddings (the ArmoRM method, see docs/armorm.md in the shared docs).

Everything in this package is math on embedding matrices (numpy / torch); nothing here talks to Ray.
- regression: stage 1 ridge regression from sufficient statistics (shards accumulate and merge)
- bradley_terry: linear Bradley-Terry heads (pairwise-only objectives, single-score baseline)
- debias: verbosity debiasing matrix T
- gating: the gating MLP and its Bradley-Terry training on preference pairs
- model: ArmoHeads (W, T, gating) with score / save / load / fingerprint
- checkpoint: the released ArmoRM checkpoint layout: tensor and config names, heads from their tensors,
  the export's config and shard packing (files are read and written by pipeline/embed/checkpoint.py)
"""
