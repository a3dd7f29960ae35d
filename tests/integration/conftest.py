"""Fixtures of the integration suite: a private daemon and fake clients."""

from tests.support.clients import clients, loose_clients  # noqa: F401
from tests.support.daemon import daemon, daemon_factory  # noqa: F401
