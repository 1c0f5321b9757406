"""Thin gRPC client for the marrowdx Triton ensemble (placeholder until the client lands)."""
