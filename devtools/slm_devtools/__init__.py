"""Local development environment: a real control plane and data plane built from pinned binaries.

Used by the test suite (tests/plugins) and by `make demo`; nothing here runs in a cluster.
"""
