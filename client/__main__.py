"""``python -m backchannel.client`` runs the ``backchannel`` command."""

from .main import main

main()
