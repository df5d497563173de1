"""Scheduled jobs in the daemon: APScheduler 3's BackgroundScheduler, and the only apscheduler import.

Every job is a plain function that returns a report; the one-shot commands (`ckptd prune`) call the same
functions. Jobs coalesce, never overlap (max_instances 1), forgive a late start (misfire grace), and a
listener logs missed and failed runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from ckptd import log

MISFIRE_GRACE = 3600  # a job that could not start on time still runs within the hour

# What the weekday field of a crontab line may hold: "*", names and ranges of names. APScheduler 3 counts
# weekdays from Monday = 0 where crontab counts from Sunday = 0, and silently drops a step or "#n" after names,
# so "1-5", "*/2" or "sun#1" would run on other days than the user meant.
_WEEKDAYS = re.compile(r"^(\*|[a-z]+(-[a-z]+)?)(,[a-z]+(-[a-z]+)?)*$", re.IGNORECASE)
_SOME_PAST = datetime(2000, 1, 1, tzinfo=UTC)  # fixed, so a check of `cron` at load time reads no clock


def cron_trigger(line: str) -> CronTrigger:
    """The trigger for a crontab line (minute hour day month weekday, in UTC), by APScheduler's own
    `CronTrigger.from_crontab`. The config checks every `cron` with this function at load time, so a line that
    passes `check-config` is one the daemon can schedule, and one that fails never reaches a running daemon.

    Raises ValueError, its message for the user: APScheduler's own for a line it refuses, and ours for a line
    APScheduler would read otherwise than crontab does (numbered weekdays, see _WEEKDAYS; a day of the month and
    weekdays together, which crontab joins with "or" and APScheduler with "and") and for a line that never
    fires ("0 0 31 2 *").
    """
    fields = line.split()
    if len(fields) == 5 and not _WEEKDAYS.match(fields[4]):
        raise ValueError(
            f"write the weekday field ({fields[4]!r}) with names, such as 'sun', 'mon-fri' or 'sat,sun': APScheduler"
            " numbers weekdays from Monday = 0 where crontab starts at Sunday = 0, and drops steps and '#' there"
        )
    if len(fields) == 5 and fields[2] != "*" and fields[4] != "*":
        raise ValueError(
            "give a day of the month or weekdays, not both: crontab runs on days that match either, APScheduler"
            " only on days that match both"
        )
    try:
        trigger = CronTrigger.from_crontab(line, timezone="UTC")
    except ValueError as exc:
        raise ValueError(f"not a crontab line (minute hour day month weekday, in UTC): {exc}") from None
    if trigger.get_next_fire_time(None, _SOME_PAST) is None:
        raise ValueError("this crontab line never fires (no such date)")
    return trigger


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
        """Register (or replace) a job that runs on the crontab line `cron` (in UTC), or else every `every` seconds.

        Both are used as given: a line cron_trigger refuses or an interval not above zero raises ValueError
        (the config refuses both at load time), never a silent other schedule.
        """
        if cron is not None:
            trigger: CronTrigger | IntervalTrigger = cron_trigger(cron)
        elif every is not None and every > 0:
            # APScheduler itself would turn 0 into 1 s, hence the check above rather than its default.
            trigger = IntervalTrigger(seconds=every)
        else:
            raise ValueError(f"job {name!r}: needs a crontab line or an interval above 0 seconds, got {every!r}")
        self._scheduler.add_job(job, trigger, id=name, name=name, replace_existing=True)

    def run_now(self, name: str) -> None:
        """Run the job `name` as soon as the scheduler can (once; its schedule then goes on as before). A job
        still running is not started twice (APScheduler's max_instances)."""
        job = self._scheduler.get_job(name)
        if job is not None:
            job.modify(next_run_time=datetime.now(UTC))

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
