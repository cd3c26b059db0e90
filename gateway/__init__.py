"""brainscan gateway: the public API and web page in front of the internal model services.

It never imports TensorFlow; see :mod:`gateway.app`.
"""
