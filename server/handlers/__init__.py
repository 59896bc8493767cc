"""The logic layer between the routes and storage: live fan-out, cross-instance fan-out, retention.

These run whether or not a request is being served (the hub, the Redis listener, the catch-up
tick, the purge loop), and they reach the database only through
:mod:`backchannel.server.storage`.
"""
