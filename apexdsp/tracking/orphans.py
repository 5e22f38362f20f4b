"""Runs whose process was killed: found and ended as KILLED by the next command that opens a run beside them.

A process that is killed (SIGKILL, out of memory, a machine that stops) cannot end its MLflow run, which then
shows as RUNNING for ever. Every run :func:`~apexdsp.tracking.tracked_run` opens records the host and the
process that opened it (:func:`owner_tags`); before a top-level run is opened, :func:`end_orphaned_runs`
ends as KILLED the RUNNING runs of that experiment opened on this host by a process that is gone, and the
RUNNING runs nested below them. A run of a live process, or of another host, is never touched.

Runs opened under an ``apexdsp run`` ledger (tag ``apexdsp.ledger``) are left to the ledger: its rerun ends
them itself and resumes a killed step in the run it was logging to, so their recorded process may be an
earlier one while a live process logs to them.
"""

from __future__ import annotations

import os
import socket

from apexdsp.locks import process_alive

HOST_TAG = "apexdsp.host"
PID_TAG = "apexdsp.pid"
LEDGER_TAG = "apexdsp.ledger"


def owner_tags() -> dict[str, str]:
    """The tags that say which process opened a run."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def end_orphaned_runs(experiment_id: str) -> list[str]:
    """End as KILLED the RUNNING runs of ``experiment_id`` whose process on this host is gone, and the
    RUNNING runs nested below them; returns their ids."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    running = "attributes.status = 'RUNNING'"
    found = client.search_runs([experiment_id], f"tags.`{HOST_TAG}` = '{socket.gethostname()}' and {running}",
                               max_results=1000)
    pending = [run.info.run_id for run in found
               if LEDGER_TAG not in run.data.tags and not process_alive(int(run.data.tags.get(PID_TAG) or 0))]
    ended: list[str] = []
    while pending:
        run_id = pending.pop()
        if run_id in ended:
            continue
        client.set_terminated(run_id, status="KILLED")
        ended.append(run_id)
        children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}' and {running}",
                                      max_results=1000)
        pending += [child.info.run_id for child in children]
    return ended
