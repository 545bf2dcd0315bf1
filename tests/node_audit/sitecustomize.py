"""Loaded by every Python process of one test-cluster node (PYTHONPATH of its `ray start`):
records each file it opens that only another machine would have (another node's private
folders, or the submitter's own artefacts, <checkout>/runs) in this node's audit log. The
multi-node test asserts the logs stay empty: on real machines those opens would fail.

Private folders follow the test's layout: node NAME's temp dir is /tmp/rpn-NAME-*, its cache
<RP_AUDIT_ROOT>/NAME/."""

from __future__ import annotations

import os
import re
import sys

_NODE = os.environ.get("RP_AUDIT_NODE")
_ROOT = os.environ.get("RP_AUDIT_ROOT", "")
_SUBMITTER = os.environ.get("RP_AUDIT_SUBMITTER", "")  # <checkout>/runs


def _install() -> None:
    private = re.compile(rf"^(?:/tmp/rpn-([A-Za-z0-9_]+)-|{re.escape(_ROOT)}/([A-Za-z0-9_]+)/)")
    log_path = os.path.join(_ROOT, _NODE, "audit.log")
    seen: set[str] = set()

    def hook(event: str, args: tuple) -> None:
        if event != "open" or not args or not isinstance(args[0], str | bytes | os.PathLike):
            return
        path = os.fsdecode(args[0])
        if not path.startswith("/"):
            path = os.path.abspath(path)
        m = private.match(path)
        foreign = m is not None and (m.group(1) or m.group(2)) != _NODE
        submitter = bool(_SUBMITTER) and path.startswith(_SUBMITTER + os.sep)
        if (foreign or submitter) and path not in seen:
            seen.add(path)
            with open(log_path, "a") as log:  # our own open: not foreign, no recursion
                log.write(f"{os.getpid()} {' '.join(sys.argv)[:120]!r} {path}\n")

    sys.addaudithook(hook)


if _NODE and _ROOT:
    _install()
