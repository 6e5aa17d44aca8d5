"""The Modelyard inference service."""
