"""The shared-memory engine behind :class:`polystore.SharedArrayStore`."""
