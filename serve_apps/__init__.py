"""Ray Serve applications (built by retrieval_platform.serving.app)."""
