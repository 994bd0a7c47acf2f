"""Domain exceptions. Nothing here knows HTTP: `create_app` maps each class to a status code in
one table, and the message (written for the client) becomes the body `{"error": message}`."""

from __future__ import annotations


class ServiceError(Exception):
    """Base class: `str(error)` is safe to show to the client."""


class InvalidInput(ServiceError):
    """The request is malformed: bad JSON, missing fields, wrong shape, type, values or sizes."""


class UnsupportedMediaType(ServiceError):
    """The request's Content-Type is not one the endpoint reads."""


class PayloadTooLarge(ServiceError):
    """The request body is larger than `max_body_bytes`."""


class Unauthorized(ServiceError):
    """No API key, or one that is not accepted."""


class ModelNotFound(ServiceError):
    """The service does not serve a model of that name."""


class ModelNotReady(ServiceError):
    """The model is served but no verified version of it is loaded (yet)."""


class Overloaded(ServiceError):
    """The model's queue is full; the client should retry later."""
