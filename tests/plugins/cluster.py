"""pytest plugin: the `cluster` fixture (a real control plane). Filled in by the foundation work."""
