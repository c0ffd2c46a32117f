"""`python -m slm_operator` runs the operator (same as the `slm-operator` console script)."""

from slm_operator.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
