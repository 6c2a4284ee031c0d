"""MLflow: tracking URI, reachability check, experiments, parent/child runs, params, metrics, artifacts.

Only the driver's machine talks to MLflow (Tune callbacks run there and hand their writes to ``Writer``'s process),
so cluster workers need no route to the tracking server. Studies started at once may share one SQLite store: its
setup runs under a file lock (``sqlite_lock``).
"""

from __future__ import annotations

import atexit
import math
import os
import queue
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from fisher_scale.config import ConfigError, ExperimentConfig
from fisher_scale.errors import RunFailed

DEFAULT_URI = "sqlite:///mlflow.db"
#: tag that ties a child run to its Ray Tune trial (a resumed trial finds its run by it)
TRIAL_TAG = "ray_trial_id"
#: tag naming the study (parent) a run belongs to, and what kind of run it is
STUDY_TAG = "fisher_scale.study"
KIND_TAG = "fisher_scale.kind"
PARENT_TAG = "mlflow.parentRunId"
#: on a study's parent run: the arm every other is compared with (the first listed optimizer and arm)
REFERENCE_TAG = "fisher_scale.reference"
#: on a trial run under ``tune.seeds``: its replicate (``seed<n>``), one repeated study for the statistics
REPLICATE_TAG = "fisher_scale.replicate"
#: the dotted keys a study (parent run) or trial searched, comma-separated
SEARCHED_TAG = "searched"
#: on a trial run its scheduler stopped early: which scheduler, and at which step
STOPPED_BY_TAG, STOPPED_AT_TAG = "stopped_by", "stopped_at_step"


class RunKinds(NamedTuple):
    """The ``KIND_TAG`` of a study command's parent run and of its child runs."""

    parent: str
    child: str


#: per study command; ``compare`` logs runs of its own kind
RUN_KINDS = {"tune": RunKinds("study", "trial"), "scale": RunKinds("scale", "point")}
COMPARE_KIND = "compare"
#: the kind of a ``fisher-scale train`` run (standalone, in the experiment its config names)
TRAIN_KIND = "train"


def sqlite_url(url: str, *, create: bool = True) -> str:
    """A SQLite database URL (MLflow's or Optuna's) with an absolute path, so that every process and a
    later ``--resume`` from another directory agree on the file; its folder is created unless ``create`` is false
    (commands that only read). Others unchanged."""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        return url
    path = Path(url.removeprefix(prefix)).resolve()
    if not create:
        return prefix + str(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"{url}: cannot create the database's folder {path.parent}: {error}") from None
    return prefix + str(path)


def tracking_uri(cfg: ExperimentConfig, *, create: bool = True) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite file in the working directory; without
    credentials (:func:`move_credentials`). ``create=False``: a SQLite file's folder is not created."""
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    return sqlite_url(move_credentials(uri), create=create)


def _netloc_without_credentials(parts: urllib.parse.SplitResult) -> str:
    return parts.netloc.rsplit("@", 1)[-1]


def redacted(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***``: what messages show of a store's URL."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=f"{parts.username}:***@{_netloc_without_credentials(parts)}").geturl()


def move_credentials(uri: str) -> str:
    """An MLflow server URI with its ``user:password@`` moved to ``$MLFLOW_TRACKING_USERNAME`` and
    ``$MLFLOW_TRACKING_PASSWORD`` (MLflow's own way to pass them), so that no message, ``study.json`` or run
    param holds the password; a resumed study takes them from those variables."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None:
        return uri
    os.environ["MLFLOW_TRACKING_USERNAME"] = urllib.parse.unquote(parts.username)
    if parts.password is not None:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = urllib.parse.unquote(parts.password)
    return parts._replace(netloc=_netloc_without_credentials(parts)).geturl()


def move_database_password(url: str) -> str:
    """``tune.storage`` without a password, as the study stores it: PostgreSQL's goes to ``$PGPASSWORD``, which
    libpq reads (a resumed study takes it from there); another database with a password in its URL is refused."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    if not parts.scheme.startswith("postgresql"):
        raise ConfigError(
            f"tune.storage: {redacted(url)}: the password would be stored with the study (study.json); give it to "
            "the database driver another way (PostgreSQL: $PGPASSWORD)"
        )
    os.environ["PGPASSWORD"] = urllib.parse.unquote(parts.password)
    return parts._replace(netloc=f"{parts.username}@{_netloc_without_credentials(parts)}").geturl()


def artifact_root(uri: str) -> str | None:
    """For a SQLite store, artifacts go in ``mlartifacts/`` beside the database file (a server picks its own)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None


@contextmanager
def _no_retries() -> Iterator[None]:
    """MLflow retries HTTP requests for minutes by default; a reachability check must answer in seconds."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def client(uri: str) -> Any:
    from mlflow import MlflowClient

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with sqlite_lock(uri):  # a new SQLite store gets its tables here
        return MlflowClient(tracking_uri=uri)


def check_reachable(uri: str) -> None:
    """Fail before any trial starts when the tracking store cannot be reached or written."""
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not os.access(folder, os.W_OK):
            raise ConfigError(f"tracking.uri: {uri}: folder {folder} is not writable")
        return
    try:
        with _no_retries():
            client(uri).search_experiments(max_results=1)
    except Exception as error:  # any transport or auth failure means the same to the user
        raise ConfigError(
            f"tracking.uri: cannot reach the MLflow tracking server at {redacted(uri)} ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200]}); start it, fix the URI, or set MLFLOW_TRACKING_USERNAME/PASSWORD"
        ) from None


@contextmanager
def sqlite_lock(url: str) -> Iterator[None]:
    """Hold an exclusive lock on ``<database>.lock`` beside a SQLite database (no lock for other URLs): MLflow's
    and Optuna's first contact creates the tables, and two processes doing it at once fail ("table ... already
    exists"). The lock goes with the process, however it ends."""
    database = Path(url.removeprefix("sqlite:///"))
    if not url.startswith("sqlite:///") or not database.parent.is_dir():
        yield
        return
    import fcntl

    with database.with_name(database.name + ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


#: the experiment tag the MLflow 3 UI reads to choose its view: training runs, not the GenAI (traces) view
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def experiment_id(mlflow_client: Any, name: str, uri: str) -> str:
    """The experiment's id, creating it (artifacts beside a SQLite store, opening in the UI's runs view) when new
    (under :func:`sqlite_lock`: two studies may create it at once)."""
    with sqlite_lock(uri):
        found = mlflow_client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        root = artifact_root(uri)
        location = f"{root}/{name}" if root else None
        return mlflow_client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))


def runs_view(uri: str, experiment: str) -> str:
    """How to open the experiment's runs in the MLflow UI: the server's page, or the command that serves a
    local store and the page it serves."""
    page = f"#/experiments/{experiment}/runs"
    if uri.startswith(("http://", "https://")):
        return f"{redacted(uri).rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {uri}   then http://127.0.0.1:5000/{page}"


def all_runs(
    mlflow_client: Any, experiment: str, query: str, order_by: list[str] | None = None, page_size: int = 1000
) -> list[Any]:
    """Every run matching ``query``, page by page (one search returns at most one page)."""
    runs, token = [], None
    while True:
        page = mlflow_client.search_runs(
            [experiment], filter_string=query, order_by=order_by, max_results=page_size, page_token=token
        )
        runs += list(page)
        token = page.token
        if not token:
            return runs


def find_run(mlflow_client: Any, experiment: str, **tags: str) -> str | None:
    """The id of the run carrying all these tags, if there is one."""
    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    runs = mlflow_client.search_runs([experiment], filter_string=query, max_results=1)
    return runs[0].info.run_id if runs else None


def log_params(mlflow_client: Any, run_id: str, params: Mapping[str, Any]) -> None:
    """Params in batches of MLflow's limit of 100 per request; values as strings (floats to 6 significant digits,
    as a reader compares them; ``config.json`` keeps them exact), passwords in URLs redacted."""
    from mlflow.entities import Param

    def text(value: Any) -> str:
        return f"{value:.6g}" if isinstance(value, float) else redacted(str(value))[:6000]

    items = [Param(key, text(value)) for key, value in params.items()]
    for start in range(0, len(items), 100):
        mlflow_client.log_batch(run_id, params=items[start : start + 100])


def metric_points(metrics: Mapping[str, Any], step: int) -> list[Any]:
    """MLflow points of the finite numbers among ``metrics`` at ``step`` (strings, lists and NaN are left out)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [
        Metric(key, float(value), now, step)
        for key, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ]


#: the most entities (metrics, tags) one MLflow ``log_batch`` request takes
BATCH_LIMIT = 1000


def log_batch(mlflow_client: Any, run_id: str, points: list[Any], tags: Mapping[str, str] | None = None) -> None:
    """Metric points and tags in as few ``log_batch`` requests as MLflow allows (none for nothing)."""
    from mlflow.entities import RunTag

    tag_entities = [RunTag(key, value) for key, value in (tags or {}).items()]
    for start in range(0, len(points) or len(tag_entities), BATCH_LIMIT):
        mlflow_client.log_batch(run_id, metrics=points[start : start + BATCH_LIMIT], tags=tag_entities)
        tag_entities = []


def log_metrics(mlflow_client: Any, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
    """The finite numbers among ``metrics`` at ``step``, now."""
    log_batch(mlflow_client, run_id, metric_points(metrics, step))


def create_run(mlflow_client: Any, experiment: str, name: str, tags: Mapping[str, str], cfg: ExperimentConfig) -> str:
    """A new run of one training job (a trial, a grid point, ``fisher-scale train``): the params it used
    (:func:`run_params`) and its whole resolved config as the ``config.json`` artifact; returns its id."""
    run_id = mlflow_client.create_run(experiment, run_name=name, tags=dict(tags)).info.run_id
    log_params(mlflow_client, run_id, run_params(cfg))
    mlflow_client.log_dict(run_id, cfg.model_dump(mode="json"), "config.json")
    return run_id


class RunLog:
    """A training job's reports for its MLflow run at their step (MLflow's step; not a metric itself), each step
    once: a resumed job reports its checkpoint's step again, which is kept only when the run has nothing at that
    step yet. Metrics named (or prefixed) by ``unchanging`` are kept only when their value changes, and tags only
    when theirs does. Reports and tags wait in the log until :meth:`send` writes them in one request, so that a
    writer that fell behind catches up with one request per run, not one per report."""

    def __init__(
        self, mlflow_client: Any, run_id: str, *, step: str, unchanging: tuple[str, ...] = (), logged_step: int = -1
    ) -> None:
        self.client, self.run_id, self.step, self.unchanging = mlflow_client, run_id, step, unchanging
        self.logged_step = logged_step
        self._last: dict[str, Any] = {}
        self._tags: dict[str, str] = {}
        self._points: list[Any] = []
        self._pending_tags: dict[str, str] = {}

    @classmethod
    def reopened(cls, mlflow_client: Any, run_id: str, *, progress: str, **settings: Any) -> RunLog:
        """The log of a run that a resumed job continues: marked running again, its last logged step read back
        from ``progress`` (a metric every report carries)."""
        mlflow_client.update_run(run_id, status="RUNNING")
        steps = [m.step for m in mlflow_client.get_metric_history(run_id, progress)]
        return cls(mlflow_client, run_id, logged_step=max(steps, default=-1), **settings)

    def log(self, report: Mapping[str, Any]) -> bool:
        """Keep one report for the next :meth:`send` (False: its step was logged already)."""
        step = int(report.get(self.step, 0))
        if step <= self.logged_step:
            return False
        self.logged_step = step
        metrics = {
            k: v
            for k, v in report.items()
            if k != self.step and not (k.startswith(self.unchanging) and self._last.get(k) == v)
        }
        self._last.update({k: v for k, v in metrics.items() if k.startswith(self.unchanging)})
        self._points += metric_points(metrics, step)
        return True

    def tag(self, key: str, value: str) -> None:
        if self._tags.get(key) != value:
            self._pending_tags[key] = value
            self._tags[key] = value

    def send(self) -> None:
        """Write what was kept since the last send (nothing: no request)."""
        points, tags, self._points, self._pending_tags = self._points, self._pending_tags, [], {}
        log_batch(self.client, self.run_id, points, tags)

    def end(self, status: str) -> None:
        self.send()
        self.client.set_terminated(self.run_id, status=status)


class Writer:
    """Calls of ``target``'s methods, run in order in one child process at a lower priority, so that the caller (a
    Tune callback: Tune's event loop waits for each) returns at once and the writes' CPU work holds neither the
    caller's GIL nor its event loop (what a thread of the driver cost: the README's Benchmarks). ``target`` is
    pickled to the child, which runs every call queued so far at most once every ``every_s`` seconds (at once when
    :meth:`flush` waits for them), then ``target.send()``: a request per run and batch, however many reports it
    holds (:meth:`RunLog.send`). :meth:`flush` waits for every call submitted so far and raises what failed; the
    child ignores Ctrl+C (the driver flushes on it), ends when its parent does, and what is still queued when the
    driver exits is written first (``atexit``)."""

    def __init__(self, target: Any, every_s: float = 0.0) -> None:
        self._target, self._every_s = target, every_s
        self._process: Any = None

    def submit(self, method: str, *args: Any) -> None:
        if self._process is None:
            import multiprocessing

            context = multiprocessing.get_context("spawn")  # a fork of a driver running Ray's threads is unsafe
            self._calls, self._replies = context.Queue(), context.Queue()
            self._process = context.Process(
                target=_write_calls,
                args=(self._target, self._every_s, self._calls, self._replies),
                name="fisher-scale-mlflow",
                daemon=True,
            )
            self._process.start()
            atexit.register(self.close)  # after multiprocessing's exit handler, so it runs first: the child is alive
        self._calls.put((method, args))

    def flush(self) -> None:
        if self._process is None:
            return
        self._calls.put(_FLUSH)
        while True:
            try:
                errors = self._replies.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._process.is_alive():
                    code, self._process = self._process.exitcode, None  # the next submit starts another
                    raise RunFailed(
                        f"the MLflow writer process ended (exit code {code}): what it had not written is lost"
                    ) from None
        if errors:
            raise errors[0] if len(errors) == 1 else RunFailed("; ".join(f"{type(e).__name__}: {e}" for e in errors))

    def close(self) -> None:
        """Flush, then end the child (a later :meth:`submit` starts another; also run at exit)."""
        if self._process is None:
            return
        try:
            self.flush()
        finally:
            if self._process is not None:  # a flush that found the child dead has let it go
                self._calls.put(_CLOSE)
                self._process.join()
                self._process = None


#: the writer process's scheduling niceness: the trials and Tune's loop go first, the writes take the CPU they leave
NICENESS = 10

#: what the parent sends the writer process besides calls: answer with the errors since the last flush, or end
_FLUSH, _CLOSE = "flush", "close"


def _write_calls(target: Any, every_s: float, calls: Any, replies: Any) -> None:
    """The writer process (:class:`Writer`): batches of calls, each followed by ``target.send()``."""
    import multiprocessing
    import pickle
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the whole process group: the driver flushes
    os.nice(NICENESS)
    errors: list[Exception] = []
    last = 0.0
    while True:
        try:
            batch = [calls.get(timeout=1.0)]
        except queue.Empty:
            if multiprocessing.parent_process().is_alive():
                continue
            return
        while batch[-1] not in (_FLUSH, _CLOSE):
            wait = last + every_s - time.monotonic()
            try:
                batch.append(calls.get(timeout=wait) if wait > 0 else calls.get_nowait())
            except queue.Empty:
                break
        last = time.monotonic()
        for method, args in [item for item in batch if item not in (_FLUSH, _CLOSE)] + [("send", ())]:
            try:
                getattr(target, method)(*args)
            except Exception as error:
                try:  # the parent raises it: as itself when it survives pickling, else by its name and message
                    errors.append(pickle.loads(pickle.dumps(error)))
                except Exception:
                    errors.append(RunFailed(f"{type(error).__name__}: {error}"))
        if batch[-1] == _FLUSH:
            replies.put(errors)
            errors = []
        elif batch[-1] == _CLOSE:
            return


def run_params(cfg: ExperimentConfig) -> dict[str, Any]:
    """A trial's params: the flattened resolved config without the study's own sections, without the
    ``optimizer.*`` keys its optimizer does not take (an AdamW run used no damping) and without the base
    config's ``train.output_dir`` (a trial writes to its own folder; its adapter is the run's artifact)."""
    from fisher_scale.config import flatten

    taken = {f"optimizer.{key}" for key in cfg.optimizer.hyperparameters(cfg.lr)} | {"optimizer.name"}
    return {
        k: v
        for k, v in flatten(cfg).items()
        if not k.startswith(("tune.", "scale.", "tracking.", "train.output_dir"))
        and (not k.startswith("optimizer.") or k in taken)
    }
