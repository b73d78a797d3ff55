"""A trace replayed against a scheduler in open loop: each request submitted at its arrival time whatever the
server is doing, its answer and times recorded."""

from __future__ import annotations

import time
from collections.abc import Sequence

from rich.progress import Progress

from mmtoken.staging.jobs import Job
from mmtoken.staging.load import TraceRow, prompt_inputs
from mmtoken.staging.scheduler import Overloaded, Scheduler


def replay(
    scheduler: Scheduler, processor: object, trace: Sequence[TraceRow], size: tuple[int, int], label: str = "replay"
) -> list[dict]:
    """One record per row of `trace`: its row, tokens and times, or its error ("refused" where the queue was
    full). Prompts are processed before the clock starts; a request's arrival is its scheduled time, so a late
    submission counts against the server."""
    prompts: dict[tuple, dict] = {}
    for row in trace:
        key = (row.kind, row.count, row.media, row.question)
        if key not in prompts:
            prompts[key] = prompt_inputs(processor, row, size)
    jobs: list[Job | None] = []
    ordered = sorted(trace, key=lambda row: row.at)
    records = []
    with Progress(transient=True) as progress:
        sent = progress.add_task(f"{label}: sent", total=len(ordered))
        answered = progress.add_task(f"{label}: answered", total=len(ordered))
        start = time.perf_counter()
        for row in ordered:
            time.sleep(max(0.0, start + row.at - time.perf_counter()))
            job = Job(prompts[row.kind, row.count, row.media, row.question], row.max_tokens, arrived=start + row.at)
            try:
                jobs.append(scheduler.submit(job))
            except Overloaded:
                jobs.append(None)
            progress.advance(sent)
        for row, job in zip(ordered, jobs, strict=True):
            record = {**vars(row)}
            if job is None:
                record["error"] = "refused"
            else:
                try:
                    record["tokens"] = job.future.result()
                    record["error"] = None
                except Exception as error:  # an answer too: the request failed, and says how
                    record["error"] = f"{type(error).__name__}: {error}"
                record |= job.times() | {"cache_hit": job.cache_hit, "encoder": job.encoder}
                record["token_offsets_s"] = [at - job.arrived for at in job.token_times]
            records.append(record)
            progress.advance(answered)
    return records
