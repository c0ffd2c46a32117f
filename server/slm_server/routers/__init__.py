"""Thin HTTP routers, one per API; the serving logic is in slm_server.service."""
