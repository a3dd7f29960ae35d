"""Fixtures of the integration suite: a private daemon and fake clients."""

from tests.support.clients import clients  # noqa: F401
from tests.support.daemon import daemon  # noqa: F401
