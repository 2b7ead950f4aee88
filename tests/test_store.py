"""The embedded store is opened under a lock once; later runs skip that while a marker says
the same MLflow opened the same file."""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cnnlab.tracking import store


@pytest.fixture
def opened(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store.create_sqlite_store(uri, tmp_path)
    return uri, tmp_path


def _marker(folder: Path) -> Path:
    return folder / ".mlflow.db.mlflow-opened"


def _count_opens(monkeypatch) -> list[str]:
    from mlflow.store.tracking import sqlalchemy_store

    opens: list[str] = []
    real = sqlalchemy_store.SqlAlchemyStore

    def counting(*args, **kwargs):
        opens.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(sqlalchemy_store, "SqlAlchemyStore", counting)
    return opens


def test_a_new_store_is_created_and_marked(opened):
    uri, folder = opened
    assert (folder / "mlflow.db").is_file()
    assert _marker(folder).read_text() == store.store_stamp(folder / "mlflow.db")
    (default,) = MlflowClient(tracking_uri=uri).search_experiments()  # the Default experiment
    # its artifacts beside the store, not in ./mlruns of whatever folder the command ran in
    assert default.artifact_location == (folder / "mlartifacts" / "0").resolve().as_uri()


def test_a_marked_store_is_not_opened_again(opened, monkeypatch):
    uri, folder = opened
    opens = _count_opens(monkeypatch)
    store.create_sqlite_store(uri, folder)
    assert opens == []


@pytest.mark.parametrize("change", ["another mlflow", "a replaced file", "no marker"])
def test_a_stale_marker_opens_the_store_again(opened, monkeypatch, change):
    uri, folder = opened
    database, marker = folder / "mlflow.db", _marker(folder)
    if change == "another mlflow":
        marker.write_text(marker.read_text().replace("mlflow ", "mlflow 0.0.1-", 1))
    elif change == "a replaced file":
        copy = folder / "copy.db"
        copy.write_bytes(database.read_bytes())
        copy.replace(database)  # the same schema, another inode
    else:
        marker.unlink()
    opens = _count_opens(monkeypatch)
    store.create_sqlite_store(uri, folder)
    assert opens == [uri]
    assert marker.read_text() == store.store_stamp(database)


def test_a_deleted_store_is_created_again(opened):
    uri, folder = opened
    (folder / "mlflow.db").unlink()  # the marker stays behind, stale
    store.create_sqlite_store(uri, folder)
    assert MlflowClient(tracking_uri=uri).search_experiments()
