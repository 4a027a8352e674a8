"""The conformance suite as pytest tests: one item per planned (backend, op, dtype, check).

Run it through ``lmspec run`` (which plans the run), or directly with a plan file written
by :meth:`lmspec.conformance.plan.RunPlan.write`:
``LMSPEC_RUN_PLAN_FILE=plan.json pytest -p lmspec.conformance.pytest_plugin
--pyargs lmspec.conformance.suite``.
"""

from lmspec.conformance.pytest_plugin import check


def test_conformance(lmspec_judge, lmspec_target, record_property):
    check(lmspec_judge, lmspec_target, record_property)
