"""The classifier service: ``POST /v1/classify`` for one 2D MRI slice, with micro-batched inference
and a Grad-CAM / gradient-weighted attention-rollout heatmap. Build it with
:func:`services.classifier.app.create_app`; run it with
``uvicorn services.classifier.app:app --port 8101`` (see ``docs/CONTRACTS.md`` for the contract).
"""
