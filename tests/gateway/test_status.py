"""The one status table (services/gateway/status.py): every gateway error class has a row, the
rows are valid codes of each protocol, and the HTTP edges answer what the table says."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping

import grpc
import pytest
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

import services.gateway
from services.gateway import status
from services.gateway.edges import dicomweb, oip_rest, rest
from services.gateway.errors import (
    GatewayError,
    InferenceFailed,
    Overloaded,
    RateLimited,
    Unauthenticated,
    Unavailable,
)
from services.gateway.status import TABLE, RetryAfter


def _import_every_gateway_module() -> None:
    """An error class defined anywhere in the gateway exists only once its module is imported."""
    for info in pkgutil.walk_packages(services.gateway.__path__, "services.gateway."):
        importlib.import_module(info.name)


def _subclasses(root: type) -> set[type]:
    found: set[type] = {root}
    for sub in root.__subclasses__():
        found |= _subclasses(sub)
    return found


def unmapped(root: type, table: Mapping[type, object]) -> list[str]:
    """Names of ``root`` and its subclasses that have no row of their own in ``table``."""
    return sorted(cls.__name__ for cls in _subclasses(root) if cls not in table)


def _instance(cls: type[GatewayError], retry_after_s: float = 1.2) -> GatewayError:
    if issubclass(cls, RateLimited):
        return cls("message", "reason", retry_after_s)
    return cls("message", "reason")


def test_every_gateway_error_class_has_a_row() -> None:
    _import_every_gateway_module()
    assert unmapped(GatewayError, TABLE) == []
    assert len(_subclasses(GatewayError)) >= 19  # the classes of errors.py, found


def test_unmapped_finds_a_class_without_a_row() -> None:
    class Root(Exception):
        pass

    class Child(Root):
        pass

    class Grandchild(Child):
        pass

    assert unmapped(Root, {Root: 1, Child: 2}) == ["Grandchild"]
    assert unmapped(Root, {Root: 1, Child: 2, Grandchild: 3}) == []


def test_lookup_takes_the_nearest_row_for_a_class_without_one() -> None:
    class Newcomer(Unavailable):
        pass

    assert status.row(Newcomer) is TABLE[Unavailable]
    with pytest.raises(TypeError):
        status.row(ValueError)  # type: ignore[arg-type]


@pytest.mark.parametrize("cls", sorted(TABLE, key=lambda c: c.__name__),
                         ids=lambda c: c.__name__)
def test_every_row_holds_valid_codes_and_a_consistent_retry_after(
        cls: type[GatewayError]) -> None:
    row = TABLE[cls]
    assert 400 <= row.http <= 599
    assert isinstance(row.grpc, grpc.StatusCode) and row.grpc is not grpc.StatusCode.OK
    for code in (row.dimse, row.stow):
        assert STORAGE_SERVICE_CLASS_STATUS[code][0] == "Failure", hex(code)
    # a Retry-After exactly where the status tells the caller to come back
    assert (row.retry_after is not RetryAfter.NO) == (row.http in (429, 503))
    if row.retry_after is RetryAfter.FROM_ERROR:
        assert issubclass(cls, RateLimited)


def test_the_drift_the_issue_found_is_resolved() -> None:
    assert status.http_status(_instance(InferenceFailed)) == 502
    assert status.grpc_code(_instance(InferenceFailed)) is grpc.StatusCode.INTERNAL
    assert status.http_headers(_instance(Unavailable)) == {"Retry-After": "5"}
    assert status.http_headers(_instance(RateLimited, 1.2)) == {"Retry-After": "2"}
    assert status.http_headers(_instance(Overloaded, 0.01)) == {"Retry-After": "1"}
    assert status.http_headers(_instance(InferenceFailed)) == {}


@pytest.mark.parametrize("cls", sorted(TABLE, key=lambda c: c.__name__),
                         ids=lambda c: c.__name__)
def test_every_http_edge_answers_the_tables_status_and_retry_after(
        cls: type[GatewayError]) -> None:
    exc = _instance(cls)
    expected = TABLE[cls].http
    retry = status.http_headers(exc).get("Retry-After")
    for edge_error in (rest.error_response, oip_rest.error_response, dicomweb._request_error):
        response = edge_error(exc)
        assert response.status_code == expected, (edge_error.__module__, cls.__name__)
        assert response.headers.get("retry-after") == retry, edge_error.__module__
    assert ("www-authenticate" in rest.error_response(exc).headers) == (cls is Unauthenticated)
