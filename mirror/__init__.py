"""mirror: a pull-through caching mirror for container images."""
