"""Training code for the four brainscan models. Entry points: ``brainscan train classifier|segmenter``.

Everything a model sees (readers, preprocessing, architectures) comes from the core package
``brainscan``; this package only adds the training loops, augmentation and bookkeeping.
"""

import brainscan  # noqa: F401  (its import sets the TensorFlow environment, oneDNN on, before TensorFlow loads)
