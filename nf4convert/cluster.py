"""Shard tasks on Dask: a local cluster of worker processes (``--workers N``) or an existing cluster
(``--scheduler ADDRESS``) whose workers see the source and the output folder (a shared filesystem).

Dask is an optional extra (``pip install 'nf4convert[distributed]'``), imported here only. The tasks
are :func:`nf4convert.task.run_task`, the function a single-process conversion runs; the driver
journals each record as it comes back and writes the index and manifest itself. A worker that dies
mid-task (killed, out of memory, its machine lost) has its task rerun elsewhere, up to Dask's
``distributed.scheduler.allowed-failures`` times; a task that raises (bad input) fails the conversion
at once, since running it again would fail the same way.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING, Any

from .errors import ClusterError, MissingDependencyError
from .task import Progress, ShardTask, run_task

if TYPE_CHECKING:
    from collections.abc import Callable

def check_cluster_options(workers: int | None, scheduler: str | None) -> None:
    """Refuse both at once, a worker count below one, or either without Dask installed.

    Raises:
        ClusterError, MissingDependencyError: with the reason.
    """
    if workers is not None and scheduler is not None:
        raise ClusterError("--workers starts a local cluster and --scheduler uses an existing one: give one of them")
    if workers is not None and workers < 1:
        raise ClusterError(f"--workers must be at least 1, not {workers}")
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise MissingDependencyError("--workers and --scheduler need Dask: pip install 'nf4convert[distributed]'") from None


def run_on_dask(
    tasks: list[ShardTask], finished: Callable[[dict[str, Any]], None], progress: Progress | None = None, *, workers: int | None = None, scheduler: str | None = None
) -> None:
    """Run ``tasks`` on a new local cluster of ``workers`` processes, or on the cluster at ``scheduler``;
    call ``finished`` with each record in this process as it comes back, in any order.

    Raises:
        ClusterError: the scheduler cannot be reached, or a task's workers kept dying.
        NF4ConvertError: a task's own error (bad input), as raised on the worker.
    """
    check_cluster_options(workers, scheduler)
    from distributed import Client, LocalCluster, as_completed
    from distributed.scheduler import KilledWorker

    cluster = None
    try:
        if workers is not None:
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR)
        client = Client(cluster or scheduler)  # waits distributed.comm.timeouts.connect (30 s by default)
    except (OSError, TimeoutError) as e:
        if cluster is not None:
            cluster.close()
        raise ClusterError(f"{scheduler or 'local cluster'}: cannot reach the Dask scheduler ({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else 'no answer'})") from None
    run = uuid.uuid4().hex[:8]  # keys unique to this run: a resumed run never reuses a finished one's results
    futures: dict[Any, ShardTask] = {}
    try:
        futures = {client.submit(run_task, task, key=f"nf4convert-{run}-{task.name}", pure=False): task for task in tasks}
        for future in as_completed(futures):
            try:
                record = future.result()
            except KilledWorker as e:  # a task's own error (bad input) is raised as it is
                raise ClusterError(f"{futures[future].name}: its workers kept dying ({e}); see the workers' logs (memory?)") from None
            finished(record)
            if progress:
                progress(futures[future].source_bytes)
    finally:
        client.cancel(list(futures))
        client.close()
        if cluster is not None:
            cluster.close()
