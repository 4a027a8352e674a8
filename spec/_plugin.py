"""The pluggy markers of the ``lmspec`` project (CONTRACT §3).

Kept in the spec package so that a plugin module needs nothing but ``import lmspec``,
which imports NumPy and pluggy and never torch.
"""

import pluggy

PROJECT = "lmspec"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)
