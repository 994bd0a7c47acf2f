"""Domain exceptions. Nothing here knows HTTP: `create_app` maps each class to a status code in
one table, and the message (written for the client) becomes the body `{"error": message}`."""

from __future__ import annotations

from typing import Final, Literal, get_args

# Why a request was shed (`Overloaded.reason`; the `reason` label of
# `marginwatch_requests_shed_total`): every place taken and the waiting room full; no place or
# batch in time for its deadline; the process's budget of request body bytes spent; its model's
# queue of samples full.
ShedReason = Literal["waiting_full", "deadline", "body_bytes", "queue_full"]
SHED_REASONS: Final[tuple[ShedReason, ...]] = get_args(ShedReason)


class ServiceError(Exception):
    """Base class: `str(error)` is safe to show to the client."""


class InvalidInput(ServiceError):
    """The request is malformed: bad JSON, missing fields, wrong shape, type, values or sizes."""


class UnknownBudget(InvalidInput):
    """The request asked for a perturbation budget (`eps`) outside the served version's grid:
    well-formed, but nothing was calibrated for it (422, not 400)."""


class UnsupportedMediaType(ServiceError):
    """The request's Content-Type is not one the endpoint reads."""


class PayloadTooLarge(ServiceError):
    """The request body is larger than `max_body_bytes`."""


class RequestTimeout(ServiceError):
    """The client took longer than the service allows to send its request's body."""


class Unauthorized(ServiceError):
    """No API key, or one that is not accepted."""


class ModelNotFound(ServiceError):
    """The service does not serve a model of that name."""


class ModelNotReady(ServiceError):
    """The model is served but no verified version of it is loaded (yet)."""


class Overloaded(ServiceError):
    """The request was shed (admission control, its deadline, its model's queue): the server is
    at capacity and the client should retry later. A shed request is a 503 like a model that is
    not ready, but it is counted apart (`reason`): capacity is not a fault."""

    def __init__(self, message: str, reason: ShedReason) -> None:
        super().__init__(message)
        self.reason: ShedReason = reason
