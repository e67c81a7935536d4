"""Run a test body in a forked child process with a hard timeout.

Process-group tests are the ones that can hang (a gloo destructor joining a worker thread, a rank
waiting for a peer that died), and a hang inside C++ cannot be interrupted from Python.  Running
the body in a child bounds it: the parent waits at most ``timeout`` seconds, then kills the child
and fails with what it knows.  The child tears down in a safe order (its objects are collected
before the process group is destroyed) and leaves with ``os._exit``, so no destructor runs at
interpreter shutdown.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import traceback

import pytest

__all__ = ["run_isolated", "join_or_kill"]


def _child(conn, fn, args):
    try:
        result = fn(*args)
        gc.collect()  # objects holding process-group state die before the group does
        _teardown_process_group()
        conn.send(("ok", result))
    except BaseException:  # noqa: BLE001 - report anything, including assertion failures
        try:
            _teardown_process_group()
        finally:
            conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()
        os._exit(0)


def _teardown_process_group():
    import torch.distributed as dist

    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_isolated(fn, *args, timeout: float = 120.0):
    """``fn(*args)`` in a forked child; returns its (picklable) result.

    Raises:
        pytest.fail: ``fn`` raised (the child's traceback is shown), the child died without a
            result, or it ran past ``timeout`` seconds (it is killed).
    """
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("needs the fork start method")
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, args), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout):
            proc.kill()
            proc.join(5)
            pytest.fail(f"{getattr(fn, '__name__', fn)} ran past {timeout:.0f} s in its child process and was killed")
        try:
            status, payload = parent.recv()
        except EOFError:
            proc.join(5)
            pytest.fail(f"{getattr(fn, '__name__', fn)}: child process died (exit code {proc.exitcode}) without a result")
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        parent.close()
    if status == "error":
        pytest.fail(f"{getattr(fn, '__name__', fn)} failed in its child process:\n{payload}", pytrace=False)
    return payload


def join_or_kill(context, timeout: float) -> None:
    """Join a ``torch.multiprocessing.start_processes(..., join=False)`` context within ``timeout``
    seconds; on timeout kill every rank and fail (a rank waiting on a dead peer never returns)."""
    import time

    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            for p in context.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"process group ranks ran past {timeout:.0f} s and were killed")
