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
"""

from __future__ import annotations

import base64
import re

from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from deblur.loading.contract import PairOptions, Position, RankPart, derived_seed, find_undecodable
from deblur.loading.dali_graph import READER_NAME, default_hw_decoder_load, pair_pipeline
from deblur.shard.format import ShardError


def dali_summary(message: str) -> str:
    """DALI's multi-line error, reduced to the operator and what it encountered."""
    operator = re.search(r"Error in \w+ operator `([^`]+)`", message)
    encountered = re.search(r"encountered:\s*\n\s*(.+)", message)
    if operator and encountered:
        return f"{operator.group(1)}: {encountered.group(1).strip()}"
    return " ".join(message.split())[:500]


class DaliPairLoader(Position):
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
        self._checkpoint: bytes | None = None  # restored DALI state, used by the next build
        self._iterator: DALIGenericIterator | None = None

    def _build(self) -> DALIGenericIterator:
        gpu = self.device.type == "cuda"  # the GPU switch: JPEG decoding on the GPU, outputs on it
        pipe = pair_pipeline(
            self.part,
            self.pairs,
            gpu=gpu,
            hw_decoder_load=self.hw_decoder_load,
            batch_size=self.part.batch_size,
            num_threads=self.decode_threads,
            device_id=self.device.index if gpu else None,
            seed=derived_seed(self.pairs.seed, self.part.rank, 1),
            prefetch_queue_depth=2,
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
            # (B, H, W, C) -> (B, C, H, W) view: channels_last strides, no copy
            yield out["blurred"].permute(0, 3, 1, 2), out["sharp"].permute(0, 3, 1, 2)
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
