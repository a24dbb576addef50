"""Grading worker subprocess: reads JSON-line tasks on stdin, answers JSON lines on stdout.

Started by :class:`trl_opd.eval.grading.GradingPool`; it may be killed at any time (that is how a task's time
bound is enforced). Protocol: the worker first prints ``{"ready": true}``; then, for each request
``{"id": i, "task": name, "args": [...]}``, it prints ``{"id": i, "result": ...}`` or ``{"id": i, "error": "..."}``.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    protocol = sys.stdout
    sys.stdout = sys.stderr  # stray prints from libraries must not corrupt the protocol stream
    import math_verify  # noqa: F401  (import before announcing readiness: startup is not charged to tasks)

    from trl_opd.eval.grading import WORKER_TASKS, _quiet_math_verify

    _quiet_math_verify()
    sys.setrecursionlimit(10_000)  # deeply nested LaTeX; a real stack overflow just kills this worker
    protocol.write(json.dumps({"ready": True}) + "\n")
    protocol.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = {"id": request["id"], "result": WORKER_TASKS[request["task"]](*request["args"])}
        except Exception as error:  # reported to the caller, which counts the answer as wrong
            reply = {"id": request["id"], "error": f"{type(error).__name__}: {error}"[:500]}
        protocol.write(json.dumps(reply) + "\n")
        protocol.flush()


if __name__ == "__main__":
    main()
