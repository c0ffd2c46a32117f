"""Thin kopf handlers: each decorator in slm_operator.main delegates to one function here."""
