"""The conformance suite as pytest tests: one item per (backend, op, dtype, check).

Run it through ``lmspec run`` (which sets the selection), or directly with
``LMSPEC_RUN_CONFIG='{"backends": ["torch-cpu"]}' pytest -p lmspec.conformance.pytest_plugin
--pyargs lmspec.conformance.suite``.
"""

from lmspec.conformance.pytest_plugin import check


def test_conformance(lmspec_target, record_property):
    check(lmspec_target, record_property)
