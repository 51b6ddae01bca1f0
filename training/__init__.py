"""Training package for serstream's emotion model (needs the ``train`` extra: torch and friends).

Modules: ``datasets`` (corpus readers by file naming), ``folds`` (speaker-independent
splits), ``targets`` (derived arousal/valence/dominance targets), ``augment``
(batch-level waveform and SpecAugment augmentations), ``metrics`` (numpy-only
evaluation), ``baseline`` (classical features + scikit-learn on the same folds),
plus the front end, model, training loop, cross-validation and ONNX export.
``python -m training --help`` lists the commands. The monitor (``serstream``)
never imports this package.
"""
