"""Fleet what-if on Dask: each session's replay (``record.whatif.replay_unit``) runs as a task on a cluster.

The cluster is a running scheduler (``dask scheduler`` with ``dask worker`` processes, given by address) or a
local cluster of worker processes started for the run. Results come back in session order, so the caller
folds them exactly as it does in-process. Recordings must be where the workers can read them: a shared
folder or an fsspec URL (``s3://``, ``gs://``...).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence

from distributed import Client, LocalCluster, as_completed

from cabin_monitor.errors import RuntimeFault
from cabin_monitor.record.files import Session
from cabin_monitor.record.replay import RulesChoice
from cabin_monitor.record.whatif import Outcome, replay_unit

CONNECT_TIMEOUT_S = 30


def replay_on_dask(
    sessions: Sequence[Session],
    choices: Sequence[RulesChoice],
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    events: bool = False,
    keep_alerts: bool = False,
    on_done: Callable[[Session], None] | None = None,
) -> list[list[Outcome]]:
    """Every session under every choice, as tasks: ``result[session][choice]``, sessions in the given order."""
    with cluster_client(scheduler, workers) as client:
        return replay_with(client, sessions, choices, events=events, keep_alerts=keep_alerts, on_done=on_done)


def replay_with(
    client: Client,
    sessions: Sequence[Session],
    choices: Sequence[RulesChoice],
    *,
    events: bool = False,
    keep_alerts: bool = False,
    on_done: Callable[[Session], None] | None = None,
) -> list[list[Outcome]]:
    """``replay_on_dask`` on the cluster of ``client``."""
    futures = client.map(
        replay_unit, list(sessions), choices=list(choices), events=events, keep_alerts=keep_alerts, pure=False
    )
    position = {future.key: i for i, future in enumerate(futures)}
    results: list[list[Outcome] | None] = [None] * len(futures)
    for future in as_completed(futures):
        i = position[future.key]
        results[i] = future.result()
        future.release()
        if on_done is not None:
            on_done(sessions[i])
    return [r for r in results if r is not None]


@contextlib.contextmanager
def cluster_client(scheduler: str | None, workers: int | None) -> Iterator[Client]:
    """A client of the scheduler at ``scheduler``, or of a local cluster of ``workers`` processes."""
    if scheduler is not None:
        try:
            client = Client(scheduler, timeout=CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            raise RuntimeFault(f"--scheduler {scheduler}: cannot connect ({exc})") from None
        with client:
            yield client
        return
    cluster = LocalCluster(
        n_workers=workers or 1,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",  # any free port: no clash with another cluster on this machine
        silence_logs=logging.ERROR,
    )
    with cluster, Client(cluster) as client:
        yield client
