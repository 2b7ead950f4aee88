"""cnnlab's own process keeps the garbage collector out of start-up and exit; callers' don't change."""

import gc

import pytest

from cnnlab.training import collector


@pytest.fixture(autouse=True)
def collector_as_it_was():
    enabled = gc.isenabled()
    yield
    gc.unfreeze()
    collector._deferred = False
    (gc.enable if enabled else gc.disable)()


def test_start_up_without_collections_then_frozen_and_on_again():
    gc.enable()
    collector.defer()
    assert not gc.isenabled()
    before = gc.get_freeze_count()
    kept = [object() for _ in range(10)]  # start-up's long-lived objects
    collector.resume()
    assert gc.isenabled() and gc.get_freeze_count() > before
    assert kept
    collector.resume()  # a second run in the same process changes nothing
    assert gc.isenabled()


def test_a_collector_the_caller_switched_off_stays_off():
    gc.disable()
    collector.defer()
    collector.resume()
    assert not gc.isenabled()


def test_train_in_a_callers_process_leaves_the_collector_alone():
    gc.enable()
    collector.resume()  # what train() calls before fitting, with nothing deferred
    assert gc.isenabled() and gc.get_freeze_count() == 0
