"""The DALI graphs. Resize mode: shard reader -> JPEG decode -> resize -> normalize + shared
flip. Crop mode: Python's batches (members, windows, mirrors) -> region-of-interest decode ->
normalize + the window's flip.

Kept apart from the iterator code (as in DALI's efficientnet example) so the graph reads on
its own. The only device-dependent line is the decoder's ``device``: "mixed" decodes on the
GPU (nvJPEG) and leaves the images there; "cpu" decodes with libjpeg-turbo on DALI's threads.
Images leave the graph as HWC: the loader permutes the iterator's (B, H, W, C) tensors to
(B, C, H, W) views with channels_last strides, the models' layout, without a copy.
"""

from __future__ import annotations

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from deblur.loading.contract import PairOptions, RankPart, derived_seed
from deblur.norm import channel_stats
from deblur.shard.format import PAIR_MEMBERS

READER_NAME = "Reader"


def reader_shard(part: RankPart) -> tuple[int, int]:
    """The reader's ``(shard_id, num_shards)`` that select exactly the rank's part.

    Normally ``(rank, world_size)``. DALI refuses more shards than samples, though; with fewer
    samples than ranks (possible only for drop_last=False) every non-empty part is the single
    sample ``start``, which is DALI's shard ``start`` of ``total`` (its start index is
    ``floor(total * k / total) = k``). Empty parts never build a pipeline.
    """
    if part.total >= part.world_size:
        return part.rank, part.world_size
    return part.start, part.total


def default_hw_decoder_load(decode_threads: int) -> float:
    """Share of JPEGs for the GPU's hardware decoder, from the decode-only rates measured on one
    H200 (BENCHMARKS.md, 178x218 JPEGs, pairs/s for load 0 / 0.65 / 1.0): 16 threads 18.3k / 16.1k /
    11.7k, 4 threads 5.8k / 14.5k / 15.3k. With many threads the CPU-assisted CUDA decoder
    alone is fastest; with few, the hardware engine should take everything; in between (not
    measured) DALI's own default split."""
    if decode_threads >= 12:
        return 0.0
    return 1.0 if decode_threads <= 4 else 0.65


@pipeline_def
def pair_pipeline(part: RankPart, pairs: PairOptions, *, gpu: bool, hw_decoder_load: float = 0.65):
    shard_id, num_shards = reader_shard(part)
    blurred, sharp = fn.readers.webdataset(
        paths=[str(s.tar) for s in part.shards],
        index_paths=[str(s.idx) for s in part.shards],
        ext=list(PAIR_MEMBERS),
        # An undecodable or missing member must fail loudly, never be skipped.
        missing_component_behavior="error",
        shard_id=shard_id,
        num_shards=num_shards,
        # Every rank keeps its own contiguous part each epoch (see deblur.loading.contract); padding makes
        # all parts the same whole number of batches, so every epoch starts at the start of the
        # part instead of wrapping into the next epoch's samples.
        stick_to_shard=True,
        pad_last_batch=True,
        random_shuffle=pairs.shuffle,
        # The builder shuffled globally; the buffer only decorrelates neighbouring batches.
        initial_fill=1024,
        seed=derived_seed(pairs.seed, part.rank, 0),
        prefetch_queue_depth=2,
        name=READER_NAME,
    )
    mirror = fn.random.coin_flip(probability=0.5) if pairs.flip else 0  # one coin for both members
    return tuple(_prepare(jpegs, pairs.image_size, gpu, hw_decoder_load, mirror) for jpegs in (blurred, sharp))


def _decoder(gpu: bool, hw_decoder_load: float) -> dict:
    # hw_decoder_load only exists for the mixed decoder (the GPU's JPEG engine vs CUDA).
    return dict(device="mixed", hw_decoder_load=hw_decoder_load) if gpu else dict(device="cpu")


def _prepare(jpegs, image_size: int, gpu: bool, hw_decoder_load: float, mirror):
    images = fn.decoders.image(jpegs, output_type=types.RGB, **_decoder(gpu, hw_decoder_load))
    # Triangular (linear + antialias) filter: the same as PIL's BILINEAR when downscaling, so
    # the torch backend matches it within JPEG-decoder tolerance.
    images = fn.resize(
        images, resize_x=image_size, resize_y=image_size, interp_type=types.INTERP_LINEAR, antialias=True
    )
    return _normalize(images, mirror)


@pipeline_def
def crop_pipeline(source, image_size: int, *, gpu: bool, hw_decoder_load: float = 0.65, roi: bool = True):
    """Crop mode (deblur.loading.crops): ``source`` yields batches of (blurred JPEGs, sharp JPEGs,
    window corners [x, y], mirrors), deblur.loading.dali_backend.crop_batches, so the order and
    the windows are the Python functions the torch backend uses too.

    ``roi=True``: ``fn.decoders.image_slice`` decodes only the window (libjpeg-turbo skips the
    rows below it and the IDCT outside it; nvJPEG likewise on the GPU), with the same pixels as
    a full decode cut afterwards. ``roi=False`` is that full decode + ``fn.slice``, kept only for
    ``python -m deblur.bench loader --crop`` to measure the difference."""
    blurred, sharp, corner, mirror = fn.external_source(source=source, num_outputs=4, batch=True)
    shape = np.array([image_size, image_size], dtype=np.int32)  # integers: absolute pixels, "WH" order
    decoder = _decoder(gpu, hw_decoder_load)
    outputs = []
    for jpegs in (blurred, sharp):
        if roi:
            images = fn.decoders.image_slice(jpegs, corner, shape, output_type=types.RGB, **decoder)
        else:
            images = fn.decoders.image(jpegs, output_type=types.RGB, **decoder)
            images = fn.slice(images, corner, shape, axis_names="WH")
        outputs.append(_normalize(images, mirror))
    return tuple(outputs)


def _normalize(images, mirror):
    mean, std = channel_stats(max_value=255)  # deblur.norm's definition, for uint8 pixels
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="HWC", mean=mean, std=std, mirror=mirror)
