"""Fault injection (alert tests, the demo): off unless the server was started with it opted in."""

from __future__ import annotations

from dataclasses import dataclass

from slm_server.settings import Settings


@dataclass
class Faults:
    """Fault injection, mutable at run time only through the opt-in admin API."""

    enabled: bool = False
    error_rate: float = 0.0
    latency_seconds: float = 0.0
    degraded_rate: float = 0.0

    @classmethod
    def from_settings(cls, s: Settings) -> Faults:
        return cls(s.fault_injection, s.fault_error_rate, s.fault_latency_seconds, s.fault_degraded_rate)


class InjectedFault(RuntimeError):
    """A failure made on purpose by fault injection."""
