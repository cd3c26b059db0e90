"""brainscan: brain MRI tumour classification and segmentation. Not for clinical use.

The core package holds everything that training and serving share: dataset readers, the one
preprocessing path, metrics, model architectures, model bundles and the model store.
"""

__version__ = "0.1.0"
