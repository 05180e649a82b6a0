"""Replacing workers with no capacity dip (memory recycles, ``ctl recycle``) and
rolling restarts, one child at a time. A part of ``Arbiter``."""

from __future__ import annotations

import logging
import signal
import time

from ringserve.ipc.control import send_command
from ringserve.ipc.layout import Command
from ringserve.supervisor.children import Child, Phase
from ringserve.supervisor.positions import Replacement, WorkerSlot

log = logging.getLogger("ringserve.supervisor")


class Replacing:
    def replace_worker(self, ws: WorkerSlot, reason: str) -> bool:
        """Recycle one worker with no capacity dip: the new one is ready before the old stops."""
        if ws.child is None or ws.retired or any(r.old is ws.child for r in self.replacements):
            return False
        if not self.free_controls:  # every record in use: recycle when one is free again
            log.warning("cannot recycle %s now: no free control record", ws.child.name)
            return False
        r = Replacement(old=ws.child, reason=reason)
        r.new = self._spawn_worker(ws)
        r.deadline = time.monotonic() + self.settings.worker.start_timeout_s
        self.replacements.append(r)
        ws.last_recycle_reason = reason
        log.info("recycling %s (%s): replacement pid %d starting", ws.child.name, reason, r.new.pid)
        return True

    def _advance_replacements(self, now: float) -> None:
        for r in list(self.replacements):
            assert r.new is not None
            ws = self._worker_slot(r.old)
            if ws is None or ws.retired or ws.child is not r.old:
                # Drained or scaled away while its replacement started: the drain wins.
                self.cancel_replacement(r, "the position was drained")
            elif r.new.phase == Phase.READY:
                self.replacements.remove(r)
                ws.child = r.new
                self.stop_child(r.old, r.reason)
                self.stats.recycled(self.settings.models[r.old.model_index].name, r.reason)
            elif now > r.deadline:
                log.error(
                    "replacement for %s not ready in %.0f s: raise worker.start_timeout_s "
                    "if the model needs longer to load",
                    r.old.name,
                    self.settings.worker.start_timeout_s,
                )
                r.new.kill("start_timeout")

    def cancel_replacement(self, r: Replacement, why: str) -> None:
        """Stop a replacement that has no position to take over any more."""
        assert r.new is not None
        self.replacements.remove(r)
        log.info("recycling %s cancelled (%s): stopping pid %d", r.old.name, why, r.new.pid)
        self.stop_child(r.new, "cancelled")

    def stop_child(self, child: Child, reason: str) -> None:
        """Ask a child to finish what it is doing and exit; killed after stop_timeout_s."""
        if child.phase in (Phase.STOPPING, Phase.EXITED):
            return
        assert self.arena is not None
        if child not in self.all_children():
            self.leaving.append(child)
        child.phase = Phase.STOPPING
        child.stop_reason = reason
        child.stop_deadline = time.monotonic() + self.settings.worker.stop_timeout_s
        if child.role == "worker":
            send_command(self.arena, child.control_index, Command.STOP)
        child.signal(signal.SIGTERM)

    def rolling_restart(self, include_frontends: bool) -> None:
        names = [f"worker-{ws.ident}" for ws in self.workers if ws.child and not ws.retired]
        if include_frontends:
            names += [f"frontend-{fs.ident}" for fs in self.frontends]
        self.rolling = names

    def stop_rolling_for(self, model_index: int) -> None:
        """A reload's replacement failed: the model's other workers would load the same
        broken model, so the rolling restart leaves them serving as they are, as a
        rollout pauses on its first failure. Other models' workers and the frontends,
        which do not load that model, are still restarted."""
        skipped = [
            n
            for n in self.rolling
            if (ws := self._rolling_worker(n)) and ws.model_index == model_index
        ]
        kept = [n for n in self.rolling if n not in skipped]
        name = self.settings.models[model_index].name
        log.error(
            "rolling restart stopped for model %s; not restarted: %s",
            name,
            ", ".join(skipped) or "none",
        )
        self.rolling = kept
        if not kept:
            self.ready_notified = False  # READY=1 again ends systemd's reload

    def _rolling_worker(self, name: str) -> WorkerSlot | None:
        """The worker position a rolling restart's ``name`` stands for (None: a frontend,
        or a position scaled away since)."""
        return next((w for w in self.workers if f"worker-{w.ident}" == name), None)

    def _advance_rolling(self) -> None:
        """One at a time: start the next step only when nothing is being replaced."""
        if not self.rolling or self.phase != "running" or self.replacements:
            return
        if any(
            fs.child is None or fs.child.phase != Phase.READY or fs.rolling for fs in self.frontends
        ):
            return
        name = self.rolling.pop(0)
        if name.startswith("worker-"):
            ws = self._rolling_worker(name)
            if ws is not None and ws.child is not None:
                self.replace_worker(ws, "reload")
        else:
            fs = self.frontends[int(name.rsplit("-", 1)[1])]
            if fs.child is not None:
                fs.rolling = True
                self.stop_child(fs.child, "reload")
        if not self.rolling:
            self.ready_notified = False
