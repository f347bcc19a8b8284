"""Server interceptors: domain errors to status codes in one place, and the optional bearer token."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from grpc_status import rpc_status

from cryostack.runtime.status import rpc_status_for

HEALTH_SERVICE = "grpc.health.v1.Health"


def _replace_behavior(
    handler: grpc.RpcMethodHandler, wrap: Callable[[Callable[..., Any], bool], Callable[..., Any]]
) -> grpc.RpcMethodHandler:
    """The same method handler with its behaviour wrapped; `wrap(behavior, response_streaming)`."""
    if handler.request_streaming and handler.response_streaming:
        factory, behavior = grpc.stream_stream_rpc_method_handler, handler.stream_stream
    elif handler.request_streaming:
        factory, behavior = grpc.stream_unary_rpc_method_handler, handler.stream_unary
    elif handler.response_streaming:
        factory, behavior = grpc.unary_stream_rpc_method_handler, handler.unary_stream
    else:
        factory, behavior = grpc.unary_unary_rpc_method_handler, handler.unary_unary
    return factory(
        wrap(behavior, handler.response_streaming),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class ErrorMappingInterceptor(grpc.ServerInterceptor):
    """Maps exceptions escaping a handler to a status: domain errors to their code (INVALID_ARGUMENT carries a
    google.rpc.BadRequest field violation), anything else to INTERNAL with a generic message and the traceback
    only in the server log."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger or logging.getLogger("cryostack.runtime")

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """Wrap the method's handler so that its exceptions become statuses."""
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        def wrap(behavior: Callable[..., Any], response_streaming: bool) -> Callable[..., Any]:
            if response_streaming:

                def streaming(request_or_iterator: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                    try:
                        yield from behavior(request_or_iterator, context)
                    except Exception as error:  # noqa: BLE001  (the one place errors become statuses)
                        self._abort(context, error, method)

                return streaming

            def unary(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
                try:
                    return behavior(request_or_iterator, context)
                except Exception as error:  # noqa: BLE001  (the one place errors become statuses)
                    self._abort(context, error, method)

            return unary

        return _replace_behavior(handler, wrap)

    def _abort(self, context: grpc.ServicerContext, error: Exception, method: str) -> None:
        if context.code() not in (None, grpc.StatusCode.OK):
            raise error  # the handler already aborted with a status of its own
        context.abort_with_status(rpc_status.to_status(rpc_status_for(error, self._logger, method)))


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Rejects calls without 'authorization: Bearer <token>' as UNAUTHENTICATED; health checks stay open so
    that orchestrators' probes work without the secret."""

    def __init__(self, token: str, exempt_services: tuple[str, ...] = (HEALTH_SERVICE,)) -> None:
        self._expected = f"Bearer {token}".encode()
        self._exempt = exempt_services

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """Pass authorised (and exempt) calls through; answer the rest with UNAUTHENTICATED."""
        handler = continuation(handler_call_details)
        service = handler_call_details.method.lstrip("/").split("/", 1)[0]
        if handler is None or service in self._exempt:
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        presented = metadata.get("authorization", "")
        presented_bytes = presented.encode() if isinstance(presented, str) else bytes(presented)
        if hmac.compare_digest(presented_bytes, self._expected):
            return handler

        def deny(behavior: Callable[..., Any], response_streaming: bool) -> Callable[..., Any]:
            def unauthenticated(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

            return unauthenticated

        return _replace_behavior(handler, deny)
