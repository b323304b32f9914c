"""The worker pool: a supervisor claiming jobs from the queue and long-lived child processes
running them (one per GPU, or N on CPU). See `supervisor` for the guarantees."""

from service.workers.supervisor import Supervisor

__all__ = ["Supervisor"]
