"""Ray Serve app: Ingress (REST + OpenAI-compatible API + web UI) -> Composer (model) and Renderer.

``build_app`` (:mod:`chatmusician.serve.app`) is the ``import_path`` of serve_config.yaml; the pure helpers
live in :mod:`~chatmusician.serve.requests`, :mod:`~chatmusician.serve.engines` and :mod:`~chatmusician.serve.openai_api`.
"""
