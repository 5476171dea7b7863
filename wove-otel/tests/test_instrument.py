"""instrument()/uninstrument(), the opentelemetry-instrument entry point, the launcher's errors."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import pytest

import wove_otel
from wove.observe import observers
from wove_otel.testing import traced_command


def test_instrument_installs_one_observer_until_uninstrument() -> None:
    first = wove_otel.instrument()
    try:
        assert wove_otel.instrument() is first and wove_otel.is_instrumented()
        assert observers().count(first) == 1
    finally:
        wove_otel.uninstrument()
    assert not wove_otel.is_instrumented() and first not in observers()
    wove_otel.uninstrument()  # twice is harmless


def test_instrument_refuses_what_is_not_a_provider() -> None:
    with pytest.raises(TypeError, match="needs an opentelemetry TracerProvider, got str"):
        wove_otel.instrument(tracer_provider="console")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="needs an opentelemetry MeterProvider, got int"):
        wove_otel.instrument(meter_provider=3)  # type: ignore[arg-type]
    assert not wove_otel.is_instrumented()


def test_the_opentelemetry_instrument_entry_point_loads_the_instrumentor() -> None:
    (entry_point,) = [ep for ep in metadata.entry_points(group="opentelemetry_instrumentor") if ep.name == "wove"]
    instrumentor = entry_point.load()()
    assert instrumentor.instrumentation_dependencies() == ()
    # what opentelemetry-instrument's loader does: instantiate, then instrument(**kwargs)
    instrumentor.instrument(raise_exception_on_conflict=True)
    try:
        assert instrumentor.is_instrumented_by_opentelemetry
    finally:
        instrumentor.uninstrument()
    assert not wove_otel.is_instrumented()


def test_importing_wove_otel_does_not_instrument() -> None:
    code = "import wove_otel, wove.observe; print(wove_otel.is_instrumented(), len(wove.observe.observers()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["False", "0"]


def test_traced_command_needs_a_module(tmp_path: object) -> None:
    with pytest.raises(ValueError, match="needs the module to run"):
        traced_command("/tmp/spans")
    assert traced_command("/tmp/spans", "wove_executor_stdio")[-2:] == ["-m", "wove_executor_stdio"]
