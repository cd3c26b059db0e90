"""Model architectures (Keras 3), the architecture registry, bundles and the model store.

Importing this package does not import TensorFlow; the architecture modules do, lazily.
"""
