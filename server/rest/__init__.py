"""The route layer: what clients talk to (REST routes, the WebSocket endpoint, signed requests).

It parses and authenticates, then calls :mod:`backchannel.server.storage` to decide and
:mod:`backchannel.server.handlers` to tell live connections; it holds no rules of its own.
"""
