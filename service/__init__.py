"""Ray Serve service: HTTP API, deployments, config."""
