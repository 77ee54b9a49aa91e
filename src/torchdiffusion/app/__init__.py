"""The application layer: the command line, the demo, the standard trainer hooks, and input parsing."""
