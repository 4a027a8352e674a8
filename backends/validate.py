"""What the judge accepts from a host about its backends (CONTRACT §3), checked in the judge.

A host runs plugin code, so whatever it says about a backend — the descriptor of a load,
the answer of ``available()`` and ``info()`` — is data to check, never to trust: a host
can patch the checks it runs itself. A malformed descriptor makes its entry ``failed to
load: …``, a malformed availability answer ``unavailable: …``, and nothing else.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}", re.ASCII)
"""A backend's name (CONTRACT §3), ASCII only: no look-alike or invisible characters."""

DECLARED_PRECISIONS = {("float32", "tf32")}
"""The engine modes a backend may declare as its working precision for a dtype (the
judge then judges that dtype at the mode's unit roundoff): TF32 matmuls in float32."""

_TEXT = 2000


def _text(x: Any, limit: int = _TEXT) -> str:
    s = x if isinstance(x, str) else repr(x)
    return s if len(s) <= limit else s[:limit] + " …[cut]"


def label(name: Any) -> str:
    """A printable label for a name that may be malformed."""
    if isinstance(name, str) and name.isascii() and name.isprintable():
        return name[:80]
    return ascii(name)[:80]


def descriptor(raw: Any, fallback: str) -> tuple[dict[str, Any], str]:
    """``(descriptor, status)``: the checked descriptor of one backend (malformed fields
    dropped) and ``"ok"`` or the reason it failed to load."""
    import lmspec
    from lmspec._precision import DTYPES
    from lmspec.backend import WORKING_PRECISIONS

    if not isinstance(raw, dict):
        return {"name": fallback}, "failed to load: the plugin's host sent a malformed " \
                                   "backend description"
    name = raw.get("name")
    status = raw.get("status", "ok")
    out: dict[str, Any] = {"name": label(name), "device": "", "dtypes": [], "implements": [],
                           "vjp": False, "deviations": {}, "precision": {}}
    for key in ("plugin", "distribution", "version"):
        if isinstance(raw.get(key), str):
            out[key] = _text(raw[key], 200)
    if not isinstance(status, str):
        return out, "failed to load: malformed status"
    if status != "ok":
        return out, _text(status if status.startswith(("failed to load", "unavailable"))
                          else f"failed to load: {status}")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        return out, "failed to load: backend name must match [a-z0-9][a-z0-9._-]{0,63} " \
                    f"(ASCII), got {ascii(name)[:80]}"
    problems = []
    device, dtypes, impl = raw.get("device"), raw.get("dtypes"), raw.get("implements")
    if not isinstance(device, str) or len(device) > 200:
        problems.append("backend.device must be a str")
    if not isinstance(dtypes, list) or not all(isinstance(d, str) and d in DTYPES
                                               for d in dtypes):
        problems.append(f"backend.dtypes must be a tuple of {sorted(DTYPES)}")
    from lmspec.sampling import SAMPLERS

    if not isinstance(impl, list) or not all(isinstance(o, str) and (o in lmspec.OPS or o in
                                                                     SAMPLERS) for o in impl):
        problems.append("the implemented ops must be catalogue ops or sampler methods")
    if not isinstance(raw.get("vjp", False), bool):
        problems.append("malformed vjp flag")
    precision = raw.get("precision", {})
    if not isinstance(precision, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in precision.items()):
        problems.append("malformed precision declaration")
    else:
        for d, p in precision.items():
            if (d, p) not in DECLARED_PRECISIONS and d != p:
                problems.append(
                    f"precision {{{d!r}: {p!r}}} is refused: a backend may declare only a "
                    "documented engine mode (" + ", ".join(
                        f"{{{a!r}: {b!r}}}" for a, b in sorted(DECLARED_PRECISIONS))
                    + "); a lower working precision is a deviation with a bound")
    devs = raw.get("deviations", {})
    if not isinstance(devs, dict):
        problems.append("malformed deviations")
        devs = {}
    checked = {}
    for key, d in devs.items():
        several = isinstance(d, dict) and "parts" in d  # several deviations under one key
        parts = d["parts"] if several else [d]
        if several and not (isinstance(parts, list) and 0 < len(parts) <= MAX_PARTS):
            problems.append(f"deviation {_text(key, 100)!r}: malformed list of deviations")
            break
        why = next((w for p in parts
                    if (w := _deviation_problem(key, p, lmspec.OPS, DTYPES, WORKING_PRECISIONS))),
                   "")
        if why:
            problems.append(why)
            break
        clean = [{"reason": _text(p["reason"]), "predicate": p["predicate"],
                  "bound": p.get("bound")} for p in parts]
        checked[key] = ({"reason": _text("; ".join(p["reason"] for p in clean)),
                         "parts": clean} if several else clean[0])
    if problems:
        return out, "failed to load: " + "; ".join(problems[:3])
    out.update(device=device, dtypes=list(dtypes), implements=list(impl),
               vjp=bool(raw.get("vjp", False)), deviations=checked,
               precision={d: p for d, p in precision.items() if d != p})
    return out, "ok"


MAX_PARTS = 16
"""The most deviations one key may hold."""


def _deviation_problem(key: Any, d: Any, ops: Any, dtypes: Any, precisions: Any) -> str:
    """Why a deviation's description is refused ('' when it is well-formed)."""
    if not isinstance(key, str) or not isinstance(d, dict):
        return "malformed deviation"
    parts = key.split("/")
    if parts[0] not in ops or len(parts) > 3 or (len(parts) == 3 and parts[2] not in dtypes) \
            or (len(parts) >= 2 and not parts[1]) or (parts[1:2] == ["*"] and len(parts) != 3):
        return f"deviation key {_text(key, 100)!r} is malformed"
    bound = d.get("bound")
    if not isinstance(d.get("reason"), str) or not isinstance(d.get("predicate"), bool):
        return f"deviation {key!r} is malformed"
    if isinstance(bound, str):
        ok = bound in precisions
    elif isinstance(bound, (int, float)) and not isinstance(bound, bool):
        ok = math.isfinite(bound) and bound > 1
    else:
        ok = bound is None
    if not ok:
        return f"deviation {key!r}: malformed bound"
    if bound is None and not d["predicate"]:
        return f"deviation {key!r} has neither a predicate nor a bound (CONTRACT §3)"
    return ""


def availability(raw: Any) -> tuple[bool, str] | None:
    """A well-formed ``available()`` answer, or None."""
    if isinstance(raw, (tuple, list)) and len(raw) == 2 and isinstance(raw[0], bool) \
            and isinstance(raw[1], str):
        return raw[0], _text(raw[1])
    return None


def info(raw: Any) -> dict[str, Any]:
    """An ``info()`` answer as JSON-safe data (a malformed one says so)."""
    if not isinstance(raw, dict):
        return {"error": "info() returned a malformed answer"}
    try:
        text = json.dumps(raw, default=str, allow_nan=True)
    except (TypeError, ValueError, RecursionError):
        return {"error": "info() returned a malformed answer"}
    if len(text) > 100_000:
        return {"error": "info() returned more than 100000 characters"}
    return json.loads(text)
