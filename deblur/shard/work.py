"""The per-sample work of a build (decode, blur or pair, encode) and the worker processes that do it.

Workers only compute: they return each sample's tar members (or a reason to skip it) to the
builder, which alone writes files. So a worker that dies loses nothing on disk, and the builder
decides how a build ends:

- Ctrl-C and SIGTERM may reach the whole process group; workers ignore both, and the builder,
  which answers them, stops its workers (SIGKILL: they hold nothing worth saving).
- After a ``kill -9`` of the builder, each worker finds its pipe to the builder closed (at once
  when idle, at its next result when busy) and exits without a word.
- A worker that dies (the out-of-memory killer, a signal) is end-of-file on its own pipe: one
  line, instead of the hang of ``multiprocessing.Pool`` and ``concurrent.futures`` (they share
  one result pipe among all workers and wait forever for the rest of a result a dead worker
  was halfway through sending).
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection

import numpy as np
from PIL import Image

from deblur.errors import Fault, debug_enabled
from deblur.images import Decoded, ImageError, decode_rgb
from deblur.shard.blur import REAL_BLUR, apply_blur, draw_params
from deblur.shard.check import check_jpeg
from deblur.shard.format import BLURRED, META, SHARP, ShardError, stored_size
from deblur.shard.settings import JPEG_QUALITY, BuildSettings
from deblur.shard.sources import Item, not_regular

# --store-size: PIL's antialiased bilinear (triangle) filter, the loaders' own resize filter, so
# a stored-small image reaches 64x64 through the same kind of filter as a full-size one.
STORE_FILTER = Image.Resampling.BILINEAR

Members = list[tuple[str, bytes]]  # (tar member name, data) of one sample
Result = tuple[str, "Members | str"]  # ("ok", members) or ("skip", reason)


def keep_freed_heap() -> None:
    """Stop glibc from handing freed heap back to the OS after every image.

    Each blur allocates and frees a few MB of FFT buffers; with glibc's defaults the freed top
    of the heap is trimmed and the next image page-faults the same memory back in. Measured on
    178x218 crops: ~1.6 ms of kernel time per image, a third of all CPU time. 64 MB of top pad
    (kept, not returned) removes it. A no-op where there is no glibc ``mallopt``.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_top_pad = -2  # from glibc's malloc.h
    mallopt(m_top_pad, 64 << 20)


def read_input(path: str) -> bytes | str:
    """A source file's bytes, or why it cannot be read. Opened without blocking and checked to
    be a regular file, so a named pipe put there after the listing cannot hang the build."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        return f"cannot read: {e.strerror or e}"
    with open(fd, "rb") as f:
        if reason := not_regular(os.fstat(fd).st_mode):
            return reason
        try:
            return f.read()
        except OSError as e:
            return f"cannot read: {e.strerror or e}"


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality, subsampling="4:2:0")
    return buf.getvalue()


def make_sample(item: Item, settings: BuildSettings) -> Result:
    """Decode, blur (or pair) and encode one sample (runs in a worker process).

    Returns ``("ok", members)`` with the three tar members, or ``("skip", reason)`` for an
    unusable input. Anything else is a bug, raised with the file's name attached.
    """
    try:
        return _make_sample(item, settings)
    except Exception as e:
        raise RuntimeError(f"{item.rel}: unexpected failure: {type(e).__name__}: {e}") from e


def read_image(path: str, rel: str, settings: BuildSettings) -> tuple[bytes, Decoded] | str:
    """(the file's bytes, its decoded image), or the reason it cannot be a member."""
    data = read_input(path)
    if isinstance(data, str):
        return data
    try:
        decoded = decode_rgb(data, rel, min_size=settings.min_size, max_pixels=settings.max_pixels)
        if decoded.format == "JPEG":
            # PIL decodes "Corrupt JPEG data" into garbage with no more than a libjpeg warning;
            # the readers refuse such members (deblur.shard.check), so the builder does too.
            check_jpeg(data, "source")
    except ImageError as e:
        return str(e).removeprefix(f"{rel}: ")
    except ShardError as e:
        return str(e).replace("cannot decode source: ", "corrupt JPEG data: ", 1)
    return data, decoded


def member_bytes(image: Image.Image, size: tuple[int, int], source: tuple[bytes, Decoded] | None) -> tuple[bytes, bool]:
    """(JPEG bytes of a member stored at ``size``, whether it was re-encoded): a source that is a
    baseline RGB JPEG stored at its own size keeps its bytes (no second lossy encode)."""
    if source is not None and source[1].reusable_jpeg and image.size == size:
        return source[0], False
    if image.size != size:
        image = image.resize(size, STORE_FILTER)
    return _jpeg(image, JPEG_QUALITY), True


def _make_sample(item: Item, settings: BuildSettings) -> Result:
    sharp = read_image(item.path, item.rel, settings)
    if isinstance(sharp, str):
        return "skip", sharp
    w, h = sharp[1].image.size
    if item.blurred_path is None:
        # Blur at the source resolution, then downscale both members alike (the original
        # pipeline's blur-then-resize): the blur stays the one the json describes at source size.
        blur = draw_params(settings.seed, item.key, (w, h), settings.blur)
        blurred, blurred_image = None, Image.fromarray(apply_blur(np.asarray(sharp[1].image), blur))
    else:
        blurred = read_image(item.blurred_path, item.blurred_rel, settings)
        if isinstance(blurred, str):
            return "skip", f"{blurred} (the blurred image {item.blurred_rel})"
        blur, blurred_image = dict(REAL_BLUR), blurred[1].image
        if blurred_image.size != (w, h):
            bw, bh = blurred_image.size
            return "skip", f"sizes differ: sharp {w}x{h}, blurred {bw}x{bh} (the blurred image {item.blurred_rel})"
    size = stored_size((w, h), settings.store_size)
    sharp_member, sharp_reencoded = member_bytes(sharp[1].image, size, sharp)
    blurred_member, blurred_reencoded = member_bytes(blurred_image, size, blurred)
    meta = {
        "key": item.key,
        "source": item.rel,
        "split": item.split,
        "size": list(size),
        "source_size": [w, h],
        "blur": blur,
        "sharp_reencoded": sharp_reencoded,
    }
    if item.blurred_rel is not None:  # a photographed pair: both source files, no kernel
        meta |= {"blurred_source": item.blurred_rel, "blurred_reencoded": blurred_reencoded}
    members = [
        (f"{item.key}.{SHARP}", sharp_member),
        (f"{item.key}.{BLURRED}", blurred_member),
        (f"{item.key}.{META}", json.dumps(meta, sort_keys=True).encode()),
    ]
    return "ok", members


# ----------------------------------------------------------------------------- worker processes

MapFn = Callable[[list, int], Iterator]  # map(items, chunksize): the work over items, results in order
AHEAD = 2  # chunks queued at each worker: none waits for work
WINDOW = 8  # per worker: how many chunks the feed may run ahead of the builder


def _serve(conn: Connection, work: Callable) -> None:
    """A worker: run ``work`` over each chunk the builder sends, send the results back; stop at
    ``None`` or when the builder is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the builder answers Ctrl-C and SIGTERM for all
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    keep_freed_heap()
    try:
        while (chunk := conn.recv()) is not None:
            try:
                reply = ("ok", [work(item) for item in chunk])
            except Exception as error:  # a bug: the builder reports it (the traceback with DEBLUR_DEBUG=1)
                reply = ("error", f"{type(error).__name__}: {error}", traceback.format_exc())
            conn.send(reply)
    except (EOFError, OSError):  # the builder is gone (even after kill -9): no one to tell
        pass


class _Worker:
    def __init__(self, ctx, work: Callable) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, work), daemon=True, name="deblur-shard-worker")
        self.process.start()
        child.close()  # the worker now holds the only other end: its death is end-of-file here

    def send(self, chunk: list | None) -> None:
        try:
            self.conn.send(chunk)
        except OSError:
            raise self._died() from None

    def receive(self) -> list:
        try:
            reply = self.conn.recv()
        except (EOFError, OSError):
            raise self._died() from None
        if reply[0] == "error":
            if debug_enabled():
                print(reply[2], file=sys.stderr)
            raise RuntimeError(f"in a worker: {reply[1]}")
        return reply[1]

    def _died(self) -> Fault:
        self.process.join(timeout=5)
        code = self.process.exitcode
        how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit status {code}"
        return Fault(
            f"a worker process died ({how}; SIGKILL is often the out-of-memory killer); finished shards are kept: "
            "rerun the same command to resume, with fewer --workers if memory ran out"
        )

    def stop(self, at_once: bool) -> None:
        """End the process: when its work is done, by asking; otherwise at once."""
        if not at_once:
            with contextlib.suppress(OSError):
                self.conn.send(None)
            self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


class _Feed:
    """The workers' results over ``items`` in order.

    A thread keeps ``AHEAD`` chunks queued at every worker and reads each result the moment it
    is sent, so workers never wait on the builder while it writes a tar (a pipe holds less than
    one chunk's result); it sends no chunk more than ``WINDOW`` ahead of the one the builder is
    reading, so memory stays bounded on any dataset.
    """

    def __init__(self, workers: list[_Worker], items: list, chunksize: int) -> None:
        self.workers = workers
        self.chunks = [items[i : i + chunksize] for i in range(0, len(items), chunksize)]
        self.window = WINDOW * len(workers)
        self.done: dict[int, list] = {}
        self.failure: BaseException | None = None
        self.taken = 0  # chunks handed to the builder
        self.state = threading.Condition()
        self.thread = threading.Thread(target=self._feed, daemon=True, name="deblur-shard-feed")
        self.thread.start()

    def _feed(self) -> None:
        queued: dict[_Worker, deque[int]] = {w: deque() for w in self.workers}
        by_conn = {w.conn: w for w in self.workers}
        sent = answered = 0
        try:
            while answered < len(self.chunks):
                for worker in self.workers:
                    while len(queued[worker]) < AHEAD and sent < len(self.chunks) and sent - self.taken < self.window:
                        worker.send(self.chunks[sent])
                        queued[worker].append(sent)
                        sent += 1
                busy = [w.conn for w in self.workers if queued[w]]
                if not busy:  # the window is full: wait for the builder to take a chunk
                    with self.state:
                        self.state.wait(timeout=0.1)
                    continue
                for conn in multiprocessing.connection.wait(busy):
                    worker = by_conn[conn]
                    results = worker.receive()
                    with self.state:
                        self.done[queued[worker].popleft()] = results
                        self.state.notify_all()
                    answered += 1
        except BaseException as error:  # a worker died or a bug in one: the builder raises it
            with self.state:
                self.failure = error
                self.state.notify_all()

    def __iter__(self) -> Iterator:
        for c in range(len(self.chunks)):
            with self.state:
                while c not in self.done and self.failure is None:
                    self.state.wait()
                if c not in self.done:
                    raise self.failure
                results, self.taken = self.done.pop(c), c + 1
                self.state.notify_all()
            yield from results


@contextlib.contextmanager
def worker_pool(work: Callable, workers: int, tasks: int) -> Iterator[MapFn]:
    """``map(items, chunksize)``: ``work`` over items on ``workers`` processes (in this process
    when one is enough), results in order. Leaving the block by an exception or a signal stops
    the workers at once; a worker that dies is a :class:`Fault` saying so."""
    if workers <= 1 or tasks < 2:
        yield lambda items, chunksize: map(work, items)
        return
    # Not fork: the parent may hold threads (tqdm) whose locks fork would copy. The forkserver
    # imports this module once and forks workers from it, so N workers do not pay N times for
    # numpy/scipy/PIL imports the way spawn would.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    started: list[_Worker] = []
    feeds: list[_Feed] = []

    def run(items: list, chunksize: int) -> Iterator:
        feeds.append(feed := _Feed(started, items, chunksize))
        return iter(feed)

    at_once = True
    try:
        for _ in range(min(workers, tasks)):
            started.append(_Worker(ctx, work))
        yield run
        at_once = False
    finally:
        for worker in started:
            worker.stop(at_once)
        for feed in feeds:  # ends once its workers are gone: end-of-file on every pipe
            feed.thread.join(timeout=10)
        for worker in started:
            worker.conn.close()
