"""Training code for the four brainscan models. Entry points: ``brainscan train classifier|segmenter``.

Everything a model sees (readers, preprocessing, architectures) comes from the core package
``brainscan``; this package only adds the training loops, augmentation and bookkeeping.
"""
