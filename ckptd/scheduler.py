"""Scheduled jobs in the daemon: APScheduler 3's BackgroundScheduler, and the only apscheduler import.

Every job is a plain function that returns a report; the one-shot commands (`ckptd prune`) call the same
functions. Jobs coalesce, never overlap (max_instances 1), forgive a late start (misfire grace), and a
listener logs missed and failed runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from ckptd import log

MISFIRE_GRACE = 3600  # a job that could not start on time still runs within the hour


class Scheduler:
    """A background scheduler whose jobs are (name, function, interval or cron) triples."""

    def __init__(self) -> None:
        self._scheduler = BackgroundScheduler(
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": MISFIRE_GRACE},
            timezone="UTC",
        )
        self._scheduler.add_listener(self._on_event, EVENT_JOB_ERROR | EVENT_JOB_MISSED)
        self._log = log.get("ckptd.scheduler")

    def _on_event(self, event: JobExecutionEvent) -> None:
        if event.code == EVENT_JOB_MISSED:
            self._log.warning("scheduled job missed", job=event.job_id, scheduled=str(event.scheduled_run_time))
        else:
            self._log.error("scheduled job failed", job=event.job_id, error=repr(event.exception))

    def add(self, name: str, job: Callable[[], Any], *, every: float | None = None, cron: str | None = None) -> None:
        """Register (or replace) a job that runs every `every` seconds or on a crontab line (in UTC)."""
        trigger = CronTrigger.from_crontab(cron, timezone="UTC") if cron else IntervalTrigger(seconds=every or 600)
        self._scheduler.add_job(job, trigger, id=name, name=name, replace_existing=True)

    def clear(self) -> None:
        """Remove every job (before registering a reloaded config's)."""
        self._scheduler.remove_all_jobs()

    def start(self) -> None:
        """Start the scheduler's thread."""
        self._scheduler.start()

    def shutdown(self) -> None:
        """Stop without waiting for a running job (the daemon is going down)."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    def jobs(self) -> list[dict[str, str]]:
        """The registered jobs and their next run times."""
        return [{"job": j.id, "next_run": str(j.next_run_time)} for j in self._scheduler.get_jobs()]
