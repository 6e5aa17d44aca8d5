"""The Modelyard trainer service."""
