"""``backend="dali"``: the pipeline of deblur.loading.dali_graph behind the PairLoader interface.

Epoch bookkeeping: the reader pads every rank's part to the longest part, ``ceil(N/W)`` samples,
and then to a whole batch by repeating the last sample (``pad_last_batch``), so every rank's
reader epoch is ``ceil(ceil(N/W)/B)`` batches and the next epoch starts at the part's start.

* drop_last=True: the iterator runs with ``LastBatchPolicy.FILL``, so one iterator epoch is
  exactly one reader epoch. The loader yields its first ``(N//W)//B`` batches (equal on all
  ranks) and decodes-and-discards the rest (at most one batch, which holds the remainder and
  the padding): the DROP policy of deblur.loading.contract. DALI's own DROP policy is not used because,
  with parts of unequal length whose shorter one is a multiple of the batch size, it leaves
  the padded batch in the pipeline and the next epoch would start with it.
* drop_last=False: ``LastBatchPolicy.PARTIAL``. With ``reader_name`` the iterator's epoch is
  still the whole padded reader epoch (its size is ``epoch_size_padded // num_shards``,
  base_iterator ``_extract_from_reader_and_validate``), and ``_remove_padded`` cuts each batch
  to ``batch_size - (samples counted - this shard's unpadded size)`` samples, so the padding is
  never returned. On a rank whose part is a multiple of the batch size but one sample shorter
  than another rank's, that makes the reader's last batch all padding and the iterator returns
  it with **zero** samples (DALI issue #3855). The loader yields its ``ceil(part/B)`` batches
  and drains the rest like the DROP case, so that empty batch is never handed out.

Crop mode (``DaliCropLoader``) has no reader: :func:`crop_batches`, a Python generator, feeds
the pipeline through ``fn.external_source`` one batch at a time, epoch after epoch, in the
torch backend's order (:func:`deblur.loading.contract.epoch_order`) with the windows of
:func:`deblur.loading.contract.pair_window`. Its batches are exactly the epoch's (the DROP
remainder is never read; a PARTIAL last batch is simply smaller), so there is no padding to
drain, and its position is the loader's ``(epoch, batch)``: resuming rebuilds the generator
there, with no DALI checkpoint.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import re
from collections.abc import Iterator

import numpy as np
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from deblur.loading.contract import (
    PairOptions,
    Position,
    RankPart,
    derived_seed,
    epoch_order,
    find_undecodable,
    pair_window,
    read_pair,
)
from deblur.loading.dali_graph import READER_NAME, crop_pipeline, default_hw_decoder_load, pair_pipeline
from deblur.shard.format import BLURRED, SHARP, ShardError


def dali_summary(message: str) -> str:
    """DALI's multi-line error, reduced to the operator and what it encountered."""
    operator = re.search(r"Error in \w+ operator `([^`]+)`", message)
    encountered = re.search(r"encountered:\s*\n\s*(.+)", message)
    if operator and encountered:
        return f"{operator.group(1)}: {encountered.group(1).strip()}"
    return " ".join(message.split())[:500]


class _DaliLoader(Position):
    """What both DALI loaders share: the decoder settings, the device switch, errors."""

    backend = "dali"

    def __init__(
        self,
        part: RankPart,
        pairs: PairOptions,
        *,
        decode_threads: int | None = None,
        hw_decoder_load: float | None = None,
        **runtime,
    ):
        super().__init__(part, pairs, **runtime)
        # One thread more than the cores it is given: between operators DALI's executor and
        # the iterator's copy run while the pool waits, and the spare thread keeps the cores
        # busy then (CPU loader +7 % on 2 cores, decode-only unchanged; BENCHMARKS.md).
        self.decode_threads = decode_threads or self.num_workers + 1
        self.hw_decoder_load = (
            default_hw_decoder_load(self.decode_threads) if hw_decoder_load is None else hw_decoder_load
        )
        self._iterator: DALIGenericIterator | None = None

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"  # the GPU switch: JPEG decoding on the GPU, outputs on it

    def pipeline_options(self) -> dict:
        return dict(
            gpu=self.gpu,
            hw_decoder_load=self.hw_decoder_load,
            batch_size=self.part.batch_size,
            num_threads=self.decode_threads,
            device_id=self.device.index if self.gpu else None,
            prefetch_queue_depth=2,
        )

    def _shard_error(self, error: Exception) -> ShardError:
        files = [str(s.tar) for s in self.part.shards]
        culprit = find_undecodable(self.part)
        where = culprit or f"one of the shards {files} (every member decodes cleanly with libjpeg)"
        return ShardError(f"DALI failed reading {where}: {dali_summary(str(error))}")

    def _next(self) -> dict:
        """The next batch; StopIteration at the end of the reader's (padded) epoch."""
        try:
            return next(self._iterator)[0]
        except RuntimeError as error:
            self._iterator = None  # DALI invalidates a pipeline that failed
            raise self._shard_error(error) from error

    @staticmethod
    def _pair(out: dict):
        # (B, H, W, C) -> (B, C, H, W) view: channels_last strides, no copy
        return out["blurred"].permute(0, 3, 1, 2), out["sharp"].permute(0, 3, 1, 2)


class DaliPairLoader(_DaliLoader):
    """Resize mode: DALI's webdataset reader, its shuffle and its checkpoints."""

    def __init__(self, part: RankPart, pairs: PairOptions, **options):
        super().__init__(part, pairs, **options)
        self._checkpoint: bytes | None = None  # restored DALI state, used by the next build

    def _build(self) -> DALIGenericIterator:
        pipe = pair_pipeline(
            self.part,
            self.pairs,
            **self.pipeline_options(),
            seed=derived_seed(self.pairs.seed, self.part.rank, 1),
            enable_checkpointing=True,
            checkpoint=self._checkpoint,
        )
        policy = LastBatchPolicy.FILL if self.part.drop_last else LastBatchPolicy.PARTIAL
        try:
            return DALIGenericIterator(
                [pipe],
                ["blurred", "sharp"],
                reader_name=READER_NAME,
                last_batch_policy=policy,
                auto_reset=True,
            )
        except RuntimeError as error:
            raise self._shard_error(error) from error

    def _finish_epoch(self) -> None:
        # Decode and discard the reader's tail batch (DROP: remainder + padding; PARTIAL: an
        # all-padding batch, returned empty), see module doc.
        while True:
            try:
                self._next()
            except StopIteration:  # auto_reset: the iterator is at the next epoch's start
                break
        self.epoch, self.batch = self.epoch + 1, 0

    def __iter__(self):
        if len(self) == 0:  # an empty part (drop_last=False, fewer samples than ranks): no reader
            self.epoch += 1
            return
        if self._iterator is None:
            self._iterator = self._build()
        if self.batch >= len(self):
            self._finish_epoch()
        while self.batch < len(self):
            out = self._next()
            self.batch += 1
            yield self._pair(out)
        self._finish_epoch()

    def state_dict(self) -> dict:
        # DALI's checkpoint is serialized protobuf bytes: base64 keeps the state JSON-able.
        checkpoint = self._iterator.checkpoints()[0] if self._iterator is not None else self._checkpoint
        encoded = None if checkpoint is None else base64.b64encode(checkpoint).decode("ascii")
        return {**self.position(), "dali_checkpoint": encoded}

    def load_state_dict(self, state: dict) -> None:
        self.restore_position(state)
        encoded = state.get("dali_checkpoint")
        self._checkpoint = None if encoded is None else base64.b64decode(encoded)
        self._iterator = None  # rebuilt from the checkpoint on the next iteration


def crop_batches(part: RankPart, pairs: PairOptions, epoch: int, batch: int) -> Iterator[tuple[list, ...]]:
    """The crop pipeline's input from batch ``batch`` of ``epoch`` on, epoch after epoch, for
    ever: per batch the blurred and the sharp members' bytes, each window's corner ``[x, y]``
    and its mirror. The batches skipped to reach ``batch`` are not read."""
    with contextlib.ExitStack() as files:
        tars: dict = {}
        while True:
            samples = epoch_order(part, pairs, epoch)
            for b in range(part.batches_per_epoch):
                chunk = list(itertools.islice(samples, part.batch_length(b)))
                if b < batch:
                    continue
                columns: tuple[list, ...] = ([], [], [], [])
                for shard, row in chunk:
                    members, where = read_pair(tars, files, shard, row)
                    window = pair_window(pairs, epoch, row, members[SHARP], where[SHARP])
                    columns[0].append(np.frombuffer(members[BLURRED], dtype=np.uint8))
                    columns[1].append(np.frombuffer(members[SHARP], dtype=np.uint8))
                    columns[2].append(np.array([window.x, window.y], dtype=np.int32))
                    columns[3].append(np.array(window.mirror, dtype=np.int32))
                yield columns
            epoch, batch = epoch + 1, 0


class DaliCropLoader(_DaliLoader):
    """Crop mode: Python's order and windows (:func:`crop_batches`), DALI's region decoding."""

    # False decodes whole images and cuts them afterwards: only python -m deblur.bench loader
    # --crop sets it, to measure what region-of-interest decoding saves.
    roi = True

    def _build(self) -> DALIGenericIterator:
        source = crop_batches(self.part, self.pairs, self.epoch, self.batch)
        pipe = crop_pipeline(source, self.pairs.image_size, roi=self.roi, **self.pipeline_options())
        try:  # no reader and an endless source: the iterator runs until the loader stops asking
            return DALIGenericIterator([pipe], ["blurred", "sharp"])
        except RuntimeError as error:
            raise self._shard_error(error) from error

    def __iter__(self):
        if len(self) == 0:  # an empty part (drop_last=False, fewer samples than ranks): no pipeline
            self.epoch += 1
            return
        if self.batch >= len(self):
            self.epoch, self.batch = self.epoch + 1, 0
        if self._iterator is None:  # starts where the loader stands: (epoch, batch)
            self._iterator = self._build()
        while self.batch < len(self):
            out = self._next()
            self.batch += 1
            yield self._pair(out)
        self.epoch, self.batch = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return self.position()

    def load_state_dict(self, state: dict) -> None:
        self.restore_position(state)
        self._iterator = None  # rebuilt at the restored position on the next iteration
