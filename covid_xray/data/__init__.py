"""Data: SIIM folders in, a split manifest and torch datasets out.

Owns study tables, patient and repeated-film grouping, class selection, splits by patient,
the training dataset and its augmentation, the Kaggle download and the synthetic SIIM trees.
It imports imaging and the top-level modules.
"""
