"""The retrieval Serve application: ``import_path: serve_apps.retrieval_app:build_app``.

    serve run serve_apps/config.yaml          # foreground, local
    serve deploy serve_apps/config.yaml       # onto a running cluster (ray start --head)
"""

from retrieval_platform.serving.app import AppArgs, build_app

__all__ = ["AppArgs", "build_app"]
