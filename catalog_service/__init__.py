"""The Modelyard catalog service: typed model entries, workers and compatibility routing."""
