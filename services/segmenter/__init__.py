"""The segmenter service: a job API (``POST /v1/jobs``) that validates 4-modality MRI uploads and
queues them, and a Celery worker that segments them with the current 3D U-Net bundle. Build the
API with :func:`services.segmenter.app.create_app` and run it with
``uvicorn services.segmenter.app:app --port 8102``; run the worker with
``celery -A services.segmenter.worker worker -Q segmentation`` (see ``README.md`` here and
``docs/CONTRACTS.md``, "Segmenter contract").
"""
