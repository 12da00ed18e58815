"""Kubernetes prerequisites and examples; Python here is only the example generator and its tests."""
