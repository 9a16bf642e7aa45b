"""Every private aiohttp name the worker uses: no other module reads one (a test checks it).

aiohttp has no public way to do two things the worker needs:
- choose the connection handler of an `AppRunner`'s server, so that a request aiohttp cannot
  parse is answered in JSON (`http_errors`) and connections over the cap are refused
  (`connections`): the runner's `_make_server` is wrapped, and the server's `_loop` and
  `_kwargs` (what its handlers are made with) are read to remake it;
- tell whether a client connection is between requests (`_request_in_progress`), so that an idle
  one, and never a busy one, is closed to make room for a new client.

A release may rename any of these: so pyproject.toml caps aiohttp below the next minor release,
requirements.txt pins the version CI tested, and tests/serving/test_hostile_input.py (a JSON 400
for what aiohttp cannot parse) and test_resources.py (idle connections make room, busy ones are
kept) fail on a release that moves them, before a fleet installs it.
"""

from __future__ import annotations

from typing import Any, TypeVar

from aiohttp import web

Built = TypeVar("Built", bound=web.Server)
Handler = TypeVar("Handler", bound=web.RequestHandler)


class RemadeServerRunner(web.AppRunner):
    """An `AppRunner` whose server, once the application is set up, `remake_server` replaces."""

    async def _make_server(self) -> web.Server:
        return self.remake_server(await super()._make_server())

    def remake_server(self, server: web.Server) -> web.Server:
        return server


def remake_server(server: web.Server, server_class: type[Built], **options: Any) -> Built:
    """`server` remade as a `server_class`: the same handler and settings, plus `options`."""
    return server_class(
        server.request_handler,
        request_factory=server.request_factory,
        handler_cancellation=server.handler_cancellation,
        loop=server._loop,
        **options,
        **server._kwargs,
    )


def connection_handler(server: web.Server, handler_class: type[Handler]) -> Handler:
    """A `handler_class` for one new connection of `server`, made as aiohttp makes its own."""
    return handler_class(server, loop=server._loop, **server._kwargs)


def between_requests(handler: web.RequestHandler) -> bool:
    """Whether the connection of `handler` serves no request now (a busy one if unknown)."""
    return not getattr(handler, "_request_in_progress", True)
