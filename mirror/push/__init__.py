"""Local pushes: local repositories and push rules (registry), the blob upload chunk protocol (uploads)."""
