"""Find finished files in the machines' watch folders and queue them in the spool.

Local folders are watched with inotify (IN_CLOSE_WRITE and IN_MOVED_TO, on every
folder below each watch folder) and fully rescanned at start and every
rescan_interval_s. Polled folders are network shares, where inotify misses
writes made by other hosts, so they are scanned often. A file found by a scan
counts as finished once its size and mtime stayed unchanged for quiet_time_s.
Temporary names (``*.part``, ``*.tmp``), dot files, dot folders and DICOMDIR
files are ignored, and symbolic links to folders are not followed.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat as stat_module
import threading
import time
from typing import Callable

from inotify_simple import INotify, flags

from dicomfleet.agent.config import AgentConfig, MachineConfig
from dicomfleet.agent.repeats import RepeatedProblems
from dicomfleet.agent.spool import Spool

log = logging.getLogger(__name__)

TEMPORARY_SUFFIXES = (".part", ".tmp")
IGNORED_NAMES = frozenset({"dicomdir"})

WATCH_MASK = (flags.CLOSE_WRITE | flags.MOVED_TO | flags.MOVED_FROM | flags.CREATE
              | flags.DELETE_SELF | flags.MOVE_SELF | flags.ONLYDIR | flags.DONT_FOLLOW | flags.EXCL_UNLINK)

# The watcher loop wakes at least this often to check files waiting for their quiet time.
TICK_S = 0.2
# Sent records of files that no longer exist are pruned this often, once this old.
PRUNE_INTERVAL_S = 3600.0
PRUNE_AGE_S = 2 * 86400.0


def is_ignored_name(name: str) -> bool:
    """Return True for names the agent never sends: temporary names, dot files and DICOMDIR."""
    if name.startswith("."):
        return True
    lower = name.lower()
    return lower.endswith(TEMPORARY_SUFFIXES) or lower in IGNORED_NAMES


@dataclasses.dataclass(frozen=True)
class WatchRoot:
    """One watch folder of one machine."""

    folder: str
    machine: MachineConfig


@dataclasses.dataclass
class _Candidate:
    """A file seen by a scan, waiting until its size and mtime stay unchanged for the quiet time."""

    root: WatchRoot
    size: int
    mtime_ns: int
    since: float


def poll_interval(quiet_time_s: float) -> float:
    """Return the seconds between scans of a polled folder: half the quiet time, from 0.5 s to 5 s."""
    return min(5.0, max(0.5, quiet_time_s / 2))


class FolderWatcher:
    """Watch every machine's folders and add finished files to the spool; run in its own thread."""

    def __init__(self, config: AgentConfig, spool: Spool, on_queued: Callable[[], None],
                 stop: threading.Event):
        self.config = config
        self.spool = spool
        self.on_queued = on_queued
        self.stop = stop
        self.problems = RepeatedProblems(log)

        self.roots = [WatchRoot(os.path.normpath(folder), machine)
                      for machine in config.machines for folder in machine.watch_folders]
        self.root_folders = {root.folder for root in self.roots}
        self.inotify_roots = [root for root in self.roots if not root.machine.polling]
        self.polled_roots = [root for root in self.roots if root.machine.polling]

        self.inotify: INotify | None = INotify() if self.inotify_roots else None
        self.watches: dict[int, tuple[str, WatchRoot]] = {}
        self.watch_of_folder: dict[str, int] = {}
        self.candidates: dict[str, _Candidate] = {}
        # path -> (size, mtime_ns) of files known to have a spool record; saves spool lookups on rescans.
        self.known: dict[str, tuple[int, int]] = {}

        self.rescan_due = 0.0
        self.poll_due = 0.0
        self.prune_due = time.monotonic() + PRUNE_INTERVAL_S

    def run(self) -> None:
        """Watch until STOP is set."""
        for root in self.roots:
            kind = "polled" if root.machine.polling else "inotify"
            log.info("Watching %s for machine %s (%s).", root.folder, root.machine.id, kind)

        try:
            while not self.stop.is_set():
                self._step()
        finally:
            if self.inotify is not None:
                self.inotify.close()
        log.info("Folder watcher stopped.")

    def _step(self) -> None:
        now = time.monotonic()
        if now >= self.rescan_due:
            self.rescan_due = now + self.config.rescan_interval_s
            self.poll_due = now + poll_interval(self.config.quiet_time_s)
            self.rescan(self.roots, full=True)
            # Files that settled before the scan are queued at once, so a backlog found at start
            # does not wait for the inotify read below, which blocks for up to TICK_S.
            self._check_candidates()
        elif self.polled_roots and now >= self.poll_due:
            self.poll_due = now + poll_interval(self.config.quiet_time_s)
            self.rescan(self.polled_roots, full=False)

        if self.inotify is not None:
            events = self.inotify.read(timeout=int(TICK_S * 1000))
            self._handle_events(events)
        else:
            self.stop.wait(TICK_S)

        self._check_candidates()

        if now >= self.prune_due:
            self.prune_due = now + PRUNE_INTERVAL_S
            removed = self.spool.prune_sent(time.time() - PRUNE_AGE_S)
            if removed:
                log.info("Pruned %d spool records of sent files that no longer exist.", removed)

    # Scanning

    def rescan(self, roots: list[WatchRoot], full: bool) -> None:
        """Scan ROOTS for files without a spool record; inotify roots also get any missing watches."""
        seen: set[str] = set()
        started = time.monotonic()
        for root in roots:
            if not os.path.isdir(root.folder):
                self.problems.report(
                    ("missing", root.folder),
                    f"The watch folder {root.folder} of machine {root.machine.id} does not exist or is not a "
                    "folder; the agent watches it as soon as it appears.")
                continue
            self.problems.clear(("missing", root.folder), f"The watch folder {root.folder} exists again.")
            self._scan_tree(root, root.folder, seen)

        if full:
            self.known = {path: identity for path, identity in self.known.items() if path in seen}
            log.debug("Rescanned %d watch folders in %.2f s: %d files, %d waiting to settle.",
                      len(roots), time.monotonic() - started, len(seen), len(self.candidates))

    def _scan_tree(self, root: WatchRoot, top: str, seen: set[str] | None = None) -> None:
        """Walk TOP without following symbolic links to folders; observe every file found."""
        stack = [top]
        while stack and not self.stop.is_set():
            folder = stack.pop()
            if self.inotify is not None and not root.machine.polling:
                self._watch(folder, root)

            try:
                with os.scandir(folder) as listing:
                    entries = list(listing)
            except FileNotFoundError:
                continue
            except OSError as error:
                self.problems.report(
                    ("list", folder),
                    f"Cannot list folder {folder} of machine {root.machine.id}: {error.strerror or error}; "
                    "its files are sent once it is readable.")
                continue
            self.problems.clear(("list", folder), f"Folder {folder} is readable again.")

            for entry in entries:
                if is_ignored_name(entry.name):
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if entry.path not in self.root_folders:
                            stack.append(entry.path)
                        continue
                    # A symbolic link to a folder is skipped, one to a file is sent like the file.
                    if not entry.is_file(follow_symlinks=True):
                        continue
                    stat = entry.stat(follow_symlinks=True)
                except OSError:
                    continue
                if seen is not None:
                    seen.add(entry.path)
                self._observe(entry.path, root, stat)

    def _observe(self, path: str, root: WatchRoot, stat: os.stat_result) -> None:
        """Note a file found by a scan; it is queued once unchanged for the quiet time."""
        identity = (stat.st_size, stat.st_mtime_ns)
        if self._is_known(path, identity):
            self.candidates.pop(path, None)
            return

        candidate = self.candidates.get(path)
        if candidate is None or (candidate.size, candidate.mtime_ns) != identity:
            since = time.monotonic()
            if not root.machine.polling:
                # A local file's mtime comes from this host's clock, so a file last
                # written long ago has been unchanged that long and need not wait again.
                since -= max(0.0, time.time() - stat.st_mtime_ns / 1e9)
            self.candidates[path] = _Candidate(root, stat.st_size, stat.st_mtime_ns, since)

    def _check_candidates(self) -> None:
        """Queue the candidates whose size and mtime stayed unchanged for the quiet time."""
        now = time.monotonic()
        quiet = self.config.quiet_time_s
        settled: list[tuple[str, WatchRoot, os.stat_result]] = []
        for path, candidate in list(self.candidates.items()):
            if now - candidate.since < quiet:
                continue
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                del self.candidates[path]
                log.debug("File %s of machine %s disappeared before it settled.", path, candidate.root.machine.id)
                continue
            except OSError as error:
                del self.candidates[path]
                log.debug("Cannot stat %s: %s; the next rescan looks again.", path, error)
                continue

            if (stat.st_size, stat.st_mtime_ns) != (candidate.size, candidate.mtime_ns):
                candidate.size, candidate.mtime_ns, candidate.since = stat.st_size, stat.st_mtime_ns, now
                continue

            del self.candidates[path]
            settled.append((path, candidate.root, stat))
        if settled:
            self._queue_many(settled)

    # inotify

    def _watch(self, folder: str, root: WatchRoot) -> None:
        try:
            descriptor = self.inotify.add_watch(folder, WATCH_MASK)
        except OSError as error:
            if error.errno == errno.ENOSPC:
                self.problems.report(
                    "watch-limit",
                    f"The inotify watch limit is reached (fs.inotify.max_user_watches), so folder {folder} is not "
                    f"watched; its files are found by the rescan every {self.config.rescan_interval_s:.0f} s. "
                    "Raise the limit with sysctl.")
            elif error.errno not in (errno.ENOENT, errno.ENOTDIR):
                self.problems.report(("watch", folder), f"Cannot watch folder {folder}: {error.strerror or error}.")
            return

        old = self.watches.get(descriptor)
        if old is not None and old[0] != folder:
            self.watch_of_folder.pop(old[0], None)
        self.watches[descriptor] = (folder, root)
        self.watch_of_folder[folder] = descriptor

    def _unwatch_tree(self, folder: str) -> None:
        """Remove the watches of FOLDER and everything below it, after it moved away."""
        prefix = folder.rstrip("/") + "/"
        for path in [p for p in self.watch_of_folder if p == folder or p.startswith(prefix)]:
            descriptor = self.watch_of_folder.pop(path)
            self.watches.pop(descriptor, None)
            try:
                self.inotify.rm_watch(descriptor)
            except OSError:
                pass

    def _handle_events(self, events) -> None:
        for event in events:
            if event.mask & flags.Q_OVERFLOW:
                log.warning("The inotify event queue overflowed; rescanning every watch folder now.")
                self.rescan_due = 0.0
                continue

            entry = self.watches.get(event.wd)
            if entry is None:
                continue
            folder, root = entry

            if event.mask & flags.IGNORED:
                self.watches.pop(event.wd, None)
                if self.watch_of_folder.get(folder) == event.wd:
                    del self.watch_of_folder[folder]
                continue
            if event.mask & (flags.DELETE_SELF | flags.MOVE_SELF):
                if folder in self.root_folders:
                    log.warning("The watch folder %s of machine %s was deleted or moved; the agent watches it "
                                "again when it reappears.", folder, root.machine.id)
                continue

            name = event.name
            if not name or is_ignored_name(name):
                continue
            path = os.path.join(folder, name)

            if event.mask & flags.ISDIR:
                if event.mask & flags.MOVED_FROM:
                    self._unwatch_tree(path)
                elif event.mask & (flags.CREATE | flags.MOVED_TO):
                    self._folder_appeared(path, root)
                continue

            if event.mask & (flags.CLOSE_WRITE | flags.MOVED_TO):
                self._file_finished(path, root)

    def _folder_appeared(self, path: str, parent_root: WatchRoot) -> None:
        """Watch a folder created or moved below a watch folder and look at the files already in it."""
        root = next((r for r in self.roots if r.folder == path), parent_root)
        if root.machine.polling:
            return
        log.debug("New folder %s of machine %s; watching it.", path, root.machine.id)
        self._scan_tree(root, path)

    def _file_finished(self, path: str, root: WatchRoot) -> None:
        """Queue a file that was closed after writing or moved in."""
        try:
            stat = os.stat(path)
        except OSError as error:
            log.debug("File %s vanished or cannot be read right after it was written: %s.", path, error)
            return
        if not stat_module.S_ISREG(stat.st_mode):
            return
        self.candidates.pop(path, None)
        self._queue(path, root, stat)

    # Spool

    def _is_known(self, path: str, identity: tuple[int, int]) -> bool:
        if self.known.get(path) == identity:
            return True
        if self.spool.contains(path, *identity):
            self.known[path] = identity
            return True
        return False

    def _queue(self, path: str, root: WatchRoot, stat: os.stat_result) -> None:
        self._queue_many([(path, root, stat)])

    def _queue_many(self, files: list[tuple[str, WatchRoot, os.stat_result]]) -> None:
        """Queue FILES that have no spool record yet, in one spool transaction.

        The spool itself ignores a file it has a record of, so only this run's memory is looked up here.
        """
        new = [(path, root, stat) for path, root, stat in files
               if self.known.get(path) != (stat.st_size, stat.st_mtime_ns)]
        if not new:
            return
        record_ids = self.spool.add_many([(root.machine.id, path, stat.st_size, stat.st_mtime_ns)
                                          for path, root, stat in new])
        queued = 0
        for (path, root, stat), record_id in zip(new, record_ids):
            self.known[path] = (stat.st_size, stat.st_mtime_ns)
            if record_id is None:
                continue
            queued += 1
            log.debug("Queued file %s of machine %s (%d bytes) as spool record %d.",
                      path, root.machine.id, stat.st_size, record_id)
        if queued:
            self.on_queued()
