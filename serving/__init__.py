"""The one shared serving layer of brainscan's HTTP services: FastAPI plumbing (JSON logs, request
ids, JSON error bodies, bounded uploads; :mod:`serving.web`) and the trust boundary between the
gateway and the services (internal token, Redis password, secret redaction; :mod:`serving.internal_auth`).

``services/`` and ``gateway/`` import it and the core; the core, ``training/`` and this package
itself never import ``services``, ``gateway`` or ``training`` (docs/ARCHITECTURE.md). It needs only
the ``gateway`` extra (FastAPI, pydantic-settings), so the gateway's image stays light.
"""
