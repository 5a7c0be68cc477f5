"""Test-only reference implementations of published localization methods (see :mod:`tests.refs.authors`)."""
