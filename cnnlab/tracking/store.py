"""Where the tracking store is, and whether it can be used: URIs, the embedded SQLite store,
tracking servers' reachability, and MLflow's transient errors.

cnnlab creates MLflow runs itself (cnnlab.tracking.writer) rather than through Lightning's
MLFlowLogger: that keeps run naming, nesting under a sweep's parent run, resuming the same run
and failure status in one place, and lets epochs outlive a tracking outage
(cnnlab.training.epoch_log). Results read the store through cnnlab.tracking.reader.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

from cnnlab.config.compose import slug
from cnnlab.config.schema import DATABASE_SCHEMES, SERVER_SCHEMES
from cnnlab.errors import ConfigError

T = TypeVar("T")

# MLflow's own HTTP retries, bounded. Its defaults (7 retries with exponential backoff, 120 s
# per request) spend about 4 minutes on one call to a dead server, which would stall an epoch;
# cnnlab rides out outages itself (it keeps what it could not send), so 2 quick retries are
# enough: they cover a connection dropped by a server restart. Values a user exported win.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def tracking_uri(uri: str | None, runs: Path) -> str:
    """The configured URI, or the embedded SQLite store under the runs root."""
    return uri if uri else f"sqlite:///{(runs / 'mlflow.db').resolve()}"


def existing_store(runs: str | Path, uri: str | None = None) -> str:
    """The store results are read from (`compare`, `report`, `reproduce`): `uri`, else the embedded
    store under `runs`, which must exist already (reading must not create an empty one)."""
    found = tracking_uri(uri, Path(runs))
    if is_embedded(found) and not sqlite_path(found).is_file():
        raise ConfigError(f"no MLflow store at {sqlite_path(found)}; train something first "
                          f"or point --runs/--uri at a store")
    return found


def is_embedded(uri: str) -> bool:
    """The embedded SQLite store, which keeps artifacts beside it; a server decides for itself."""
    return uri.startswith("sqlite:")


def artifact_location(uri: str, runs: Path, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: under the runs root for the embedded store."""
    return (runs / "mlartifacts" / slug(experiment)).as_uri() if is_embedded(uri) else None


def sqlite_path(uri: str) -> Path:
    return Path(uri[len("sqlite:///"):])


def bound_http_retries() -> None:
    """Cap MLflow's HTTP retries and timeout for this process (see HTTP_ENV)."""
    for name, value in HTTP_ENV.items():
        os.environ.setdefault(name, value)


def is_unreachable(error: BaseException) -> bool:
    """True when a tracking call failed because the server could not be reached (refused or
    dropped connection, timeout, retries exhausted on 5xx answers), not because it refused
    the request: MLflow wraps the transport error, so follow the chain of causes."""
    import requests

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, requests.HTTPError):
            # An answer: a 4xx is the request's fault; only a 5xx means the server is not serving.
            return current.response is None or current.response.status_code >= 500
        if isinstance(current, requests.RequestException):
            return True
        current = current.__cause__ or current.__context__
    return False


def server_answers(uri: str, timeout_s: float) -> bool:
    """One /health request: does the server at `uri` serve now?"""
    import requests

    try:
        return requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s).ok
    except requests.RequestException:
        return False  # the caller's whole question: an error here is the answer "no"


def check_tracking(uri: str, timeout_s: float) -> None:
    """Fail within seconds, before training, when the store cannot be used."""
    parsed = urlparse(uri)
    if parsed.scheme in SERVER_SCHEMES:
        import requests

        bound_http_retries()
        try:
            requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s).raise_for_status()
        except requests.RequestException as error:
            raise ConfigError(f"the MLflow tracking server at {uri} did not answer within "
                              f"{timeout_s:g} s ({type(error).__name__}); start it, or use the "
                              f"embedded store (tracking=mlflow tracking.uri=null)") from None
        check_is_mlflow(uri, timeout_s)
    elif parsed.scheme == "sqlite":
        folder = sqlite_path(uri).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"cannot create the MLflow store folder {folder}: "
                              f"{error.strerror}") from None
        create_sqlite_store(uri, folder)
    elif parsed.scheme.split("+")[0] in DATABASE_SCHEMES:
        check_database_driver(uri)
    elif parsed.scheme not in ("file", "databricks", ""):
        raise ConfigError(f"tracking.uri scheme '{parsed.scheme}' is not one MLflow serves; use "
                          f"sqlite:///PATH, http://HOST:PORT or a database URI")


def check_is_mlflow(uri: str, timeout_s: float) -> None:
    """A server that answers /health may still be something else on that port (another web app,
    a proxy's default page): then every MLflow call failed with a traceback once training began.
    One read-only MLflow request tells: an MLflow server answers it with JSON."""
    import requests

    endpoint = "/api/2.0/mlflow/experiments/search"
    try:
        answer = requests.get(f"{uri.rstrip('/')}{endpoint}", params={"max_results": 1}, timeout=timeout_s)
    except requests.RequestException as error:
        raise ConfigError(f"the MLflow tracking server at {uri} answered /health but not {endpoint} "
                          f"({type(error).__name__}); is it an MLflow server?") from None
    if answer.status_code in (401, 403):
        return  # a server that wants credentials: MLflow's client sends the ones configured
    try:
        is_mlflow = answer.ok and isinstance(answer.json(), dict)
    except ValueError:  # not JSON
        is_mlflow = False
    if not is_mlflow:
        kind = answer.headers.get("content-type", "?").split(";")[0]
        raise ConfigError(f"{uri} answers /health but is not an MLflow tracking server (GET {endpoint} "
                          f"gave HTTP {answer.status_code}, {kind}); check the host and port, or start "
                          f"`mlflow server` there")


# The Python package that provides each DB-API module SQLAlchemy's dialects import.
DRIVER_PACKAGES = {"psycopg2": "psycopg2-binary", "psycopg": "psycopg[binary]", "pg8000": "pg8000",
                   "asyncpg": "asyncpg", "MySQLdb": "mysqlclient", "pymysql": "PyMySQL",
                   "mysql": "mysql-connector-python", "pyodbc": "pyodbc", "pymssql": "pymssql"}


def check_database_driver(uri: str) -> None:
    """A database URI needs its DB-API driver installed; without one, SQLAlchemy raised
    ModuleNotFoundError from inside MLflow after the job had started. The password is not echoed."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        url = make_url(uri)
        shown = url.render_as_string(hide_password=True)
        dialect = url.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as error:
        raise ConfigError(f"tracking.uri is not a database URI SQLAlchemy knows ({root_cause(error)}); "
                          f"write postgresql://USER@HOST/DB, mysql+pymysql://USER@HOST/DB ...") from None
    try:
        dialect.import_dbapi()
    except ImportError as error:
        module = (error.name or "").split(".")[0] or "?"
        package = DRIVER_PACKAGES.get(module, module)
        raise ConfigError(f"tracking.uri={shown} needs the database driver {module!r} ({url.drivername}), "
                          f"which is not installed: pip install '{package}'") from None


def create_sqlite_store(uri: str, folder: Path) -> None:
    """Open the SQLite store once under a file lock. MLflow creates (or upgrades) a store's
    schema when it first opens it; parallel jobs doing that at once on a new file corrupt the
    migration (seen with 8 jobs: alembic's CircularDependencyError), so only one does it.

    After a successful open, a marker beside the store records the MLflow version and the
    store file's identity; while both still match, later runs skip the locked open (MLflow's
    own open, in the run's client, still checks the schema and refuses an out-of-date one)."""
    database = sqlite_path(uri)
    marker = folder / f".{database.name}.mlflow-opened"
    if store_stamp(database) is not None and _read(marker) == store_stamp(database):
        return
    from filelock import FileLock
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    with FileLock(str(folder / ".mlflow-store.lock"), timeout=300):
        # A new store gets MLflow's "Default" experiment (id 0), whose artifacts go under the
        # store's default artifact root: './mlruns' in the current folder, unless told otherwise
        # (a run in it, tracking.experiment=Default, wrote ./mlruns outside paths.runs). cnnlab's
        # own experiments name their artifact folder (artifact_location); this one is made beside them.
        SqlAlchemyStore(uri, (folder / "mlartifacts").resolve().as_uri()).search_experiments(max_results=1)
        stamp = store_stamp(database)
        if stamp is not None:
            try:
                _write_atomically(marker, stamp)
            except OSError:
                pass  # only a saving: the next run opens the store under the lock again


def store_stamp(database: Path) -> str | None:
    """MLflow's version and the store file's identity (device, inode): a new MLflow (whose
    schema may be newer) or a replaced file invalidates a marker. None: no store file yet."""
    from importlib.metadata import version

    try:
        stat = database.stat()
    except OSError:
        return None
    return f"mlflow {version('mlflow')} file {stat.st_dev}:{stat.st_ino}"


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _write_atomically(path: Path, text: str) -> None:
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def with_retries(action: Callable[[], T], attempts: int = 8, delay_s: float = 0.25) -> T:
    """Retry SQLite's transient 'database is locked' (parallel sweep jobs share one file)."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts - 1):
        try:
            return action()
        except MlflowException as error:
            if "database is locked" not in str(error):
                raise
            time.sleep(delay_s * (2 ** attempt))
    return action()  # the last try's error, if any, is the caller's


def root_cause(error: BaseException) -> str:
    """The innermost cause's type and first line: enough to tell a refused connection from a timeout."""
    seen: set[int] = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = error.__cause__ or error.__context__
        if inner is None:
            break
        error = inner
    first = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {first[:200]}" if first else type(error).__name__
