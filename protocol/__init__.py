"""backchannel's pure protocol core: no network, no database, no asyncio.

Both the relay and the client import this package, so every check exists once.
Only :mod:`.primitives` touches the cryptographic libraries.
"""

PROTOCOL_VERSION = 1
