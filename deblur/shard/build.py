"""Build training shards from sharp photographs (blurred here) or from sharp/blurred pairs.

    python -m deblur.shard --src ~/data/celeba/img_align_celeba --out shards/celeba
    python -m deblur.shard --demo --out shards/demo
    python -m deblur.shard --sharp data/original --blurred data/blurred --out shards/pairs
    python -m deblur.shard --gopro ~/data/GOPRO_Large --out shards/gopro
    python -m deblur.shard --pairs RealBlur/train_list.txt --test-pairs RealBlur/test_list.txt --out shards/realblur
    python -m deblur.shard --verify shards/celeba

:func:`build_shards` is four steps. **Plan**: list the inputs, give each a key and a split,
shuffle and cut them into shards (no image is decoded). **Claim** the output folder: only a new,
empty or own folder (deblur/shard/folder.py). **Build what is missing**: workers decode, blur and
encode each image (deblur/shard/work.py); this process writes each shard's record, index and tar.
**Publish**: once every shard (of every ``--part``) is there, ``manifest.json``, last. A rerun
keeps finished shards, so a killed or failed build resumes where it stopped. The settings and
the CLI generated from them: deblur/shard/settings.py.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from deblur.errors import InputError, run_main
from deblur.shard import demo as demo_data
from deblur.shard.folder import (
    check_apart,
    claim_folder,
    finished_record,
    os_error,
    publish,
    read_record,
    refuse_foreign,
    remove_partials,
    remove_stale,
    shard_files,
    write_record,
)
from deblur.shard.format import FORMAT, MANIFEST, SAMPLE_MEMBERS, SPLITS
from deblur.shard.pairs import discover_pairs
from deblur.shard.settings import BuildSettings, describe_change, make_parser, option_name, settings_from_options
from deblur.shard.sources import Inputs, Shard, discover, plan_shards
from deblur.shard.tario import build_tar
from deblur.shard.work import keep_freed_heap, make_sample, worker_pool

DEMO_SOURCE = ".demo-src"  # where --demo materializes its CelebA-shaped folder inside --out
DEMO_DESCRIPTION = "demo: scikit-image photographs"
INTERRUPTED = "interrupted; rerun the same command to resume"


@dataclass(frozen=True)
class Plan:
    source: str  # the manifest's "source"
    inputs: Inputs
    shards: list[Shard]  # every shard of the dataset, in order
    fingerprints: dict[str, str]  # shard name -> what it must be built from to be kept
    mine: list[Shard]  # the shards this run (its --part) builds


def build_shards(settings: BuildSettings) -> dict:
    """Build (or finish building) the dataset ``settings`` describes; return its manifest.

    A ``--part`` run that leaves other parts' shards unbuilt returns ``{"complete": False,
    "part": [I, N], "missing": [...]}`` instead (the last part to finish writes the manifest).
    """
    plan = make_plan(settings)
    claim_folder(settings.out)
    records = build_missing(plan, settings)
    return publish_dataset(plan, records, settings)


# ----------------------------------------------------------------------------- plan


def find_inputs(settings: BuildSettings) -> tuple[Inputs, str]:
    """(the candidates, the manifest's "source") of the one source ``settings`` names."""
    out = settings.out
    fractions = dict(seed=settings.seed, val_fraction=settings.val_fraction, test_fraction=settings.test_fraction)
    if settings.paired:
        lists = {"--pairs": settings.pairs, "--test-pairs": settings.test_pairs}
        folders = {"--sharp": settings.sharp, "--blurred": settings.blurred, "--gopro": settings.gopro}
        folders |= {option: file.parent for option, file in lists.items() if file is not None}
        for option, folder in folders.items():
            if folder is not None:
                check_apart(folder, out, option)
        paths = dict(sharp=settings.sharp, blurred=settings.blurred, gopro=settings.gopro, pairs=settings.pairs)
        inputs = discover_pairs(**paths, test_pairs=settings.test_pairs, exclude=out, limit=settings.limit, **fractions)
        what = "pairs"
    else:
        if settings.demo:
            claim_folder(out)  # the demo's photographs are generated inside the dataset folder
            try:
                src = demo_data.materialize(out / DEMO_SOURCE)
            except OSError as error:
                raise os_error(error, out / DEMO_SOURCE, "writing the demo photographs into") from error
        else:
            src = settings.src
            check_apart(src, out)
        inputs = discover(src, out, limit=settings.limit, **fractions)
        what = "images"
    if not inputs.items:
        found = f" ({skip_summary(inputs.skipped)})" if inputs.skipped else ""
        raise InputError(f"{source_option(settings)}: no {what} found{found}")
    return inputs, source_description(settings)


def source_option(settings: BuildSettings) -> str:
    """The source as the command line gave it, for messages: "--sharp a --blurred b"."""
    if settings.demo:
        return f"--src {settings.out / DEMO_SOURCE}"
    given = [(name, getattr(settings, name)) for name in ("src", "sharp", "blurred", "gopro", "pairs", "test_pairs")]
    return " ".join(f"{option_name((name,))} {value}" for name, value in given if value is not None)


def source_description(settings: BuildSettings) -> str:
    """The manifest's "source": what the dataset was built from, with absolute paths."""
    if settings.demo:
        return DEMO_DESCRIPTION
    if settings.src is not None:
        return str(settings.src.resolve())
    if settings.gopro is not None:
        return f"GoPro {settings.gopro.resolve()}"
    if settings.sharp is not None:
        return f"pairs: sharp {settings.sharp.resolve()}, blurred {settings.blurred.resolve()}"
    tests = f", test list {settings.test_pairs.resolve()}" if settings.test_pairs else ""
    return f"pairs list {settings.pairs.resolve()}{tests}"


def make_plan(settings: BuildSettings) -> Plan:
    inputs, source = find_inputs(settings)
    shards = plan_shards(inputs.items, settings.seed, settings.shard_size)
    content = settings.content()
    i, n = settings.part_of
    return Plan(source, inputs, shards, {s.name: fingerprint(s, content) for s in shards}, shards[i::n])


def fingerprint(shard: Shard, content: dict) -> str:
    """What a finished shard must have been built from for a rerun to keep it."""
    # A pair's blurred partner counts too; a sharp-only item hashes as it always did (earlier
    # versions' builds resume without rebuilding).
    items = [
        [it.key, it.rel, it.split, it.size] + ([it.blurred_rel, it.blurred_size] if it.blurred_rel else [])
        for it in shard.items
    ]
    payload = json.dumps({"settings": content, "name": shard.name, "items": items}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


# ----------------------------------------------------------------------------- build what is missing


def build_missing(plan: Plan, settings: BuildSettings) -> dict[str, dict]:
    """Build this run's shards that are not finished; return the records of all of them."""
    out, names = settings.out, [s.name for s in plan.mine]
    refuse_foreign(out, names)
    remove_partials(out, names)
    records = {name: r for name in names if (r := finished_record(out, name, plan.fingerprints[name]))}
    todo = [s for s in plan.mine if s.name not in records]
    if records:
        print(f"resuming: {len(records)} of {n_shards(len(plan.mine))} already built", file=sys.stderr)
    if changed := other_settings(out, todo, plan, settings):
        print(
            f"rebuilding {n_shards(sum(changed.values()))} built with other settings ({'; '.join(changed)})",
            file=sys.stderr,
        )
    if todo:  # the folder is about to change: an old manifest must not vouch for it meanwhile
        (out / MANIFEST).unlink(missing_ok=True)
    return records | make_shards(out, todo, plan.fingerprints, settings)


def other_settings(out: Path, shards: list[Shard], plan: Plan, settings: BuildSettings) -> Counter:
    """{what differs: count} over those of ``shards`` that a build with other settings or inputs
    finished; shards never built (or damaged) are not counted."""
    changed, content = Counter(), settings.content()
    for shard in shards:
        record = read_record(out, shard.name)
        if record is not None and record.get("fingerprint") != plan.fingerprints[shard.name]:
            changed[describe_change(record.get("settings"), content)] += 1
    return changed


def make_shards(out: Path, todo: list[Shard], fingerprints: dict[str, str], settings: BuildSettings) -> dict:
    """Decode, blur and encode every image of ``todo`` (in worker processes) and write the shards."""
    n_items, workers, content, records = sum(len(s.items) for s in todo), settings.processes, settings.content(), {}
    t0 = time.perf_counter()
    keep_freed_heap()  # for the work done in this process (workers=1); workers call it too
    work = functools.partial(make_sample, settings=settings)
    chunk = max(1, min(16, n_items // (8 * workers)))  # small enough to keep every worker busy to the end
    bar = tqdm(total=n_items, unit="img", desc=f"building {out.name}", disable=not settings.progress)
    with worker_pool(work, workers, n_items) as pool_map, bar:
        results = pool_map([it for s in todo for it in s.items], chunk)
        for shard in todo:  # results come in order, so shard by shard
            got = []
            for _ in shard.items:
                got.append(next(results))
                bar.update()
            records[shard.name] = write_shard(out, shard, fingerprints[shard.name], content, got)
    elapsed = time.perf_counter() - t0
    samples = sum(r["samples"] for r in records.values())
    print(
        f"built {len(todo)} shards, {samples} samples from {n_items} images in {elapsed:.1f} s: "
        f"{n_items / max(elapsed, 1e-9):.1f} images/s with {workers} workers",
        file=sys.stderr,
    )
    return records


def write_shard(out: Path, shard: Shard, fp: str, content: dict, results: list) -> dict:
    """Write one shard: its record first (so every file written here has a record naming its
    bytes), then the index, then the tar."""
    samples = [payload for (status, payload) in results if status == "ok"]
    skipped = [
        {"path": it.rel, "reason": payload} for it, (status, payload) in zip(shard.items, results) if status == "skip"
    ]
    record = {
        "name": shard.name,
        "split": shard.split,
        "fingerprint": fp,
        "settings": content,
        "samples": len(samples),
        "sha256": None,
        "index_sha256": None,
        "skipped": skipped,
    }
    tar, idx = shard_files(out, shard.name)
    if not samples:  # every input of this shard was unusable: no tar (DALI cannot read an empty one)
        tar.unlink(missing_ok=True)
        idx.unlink(missing_ok=True)
        write_record(out, record)
        return record
    tar_bytes, index = build_tar(samples)
    index_bytes = index.encode()
    record |= {"sha256": hashlib.sha256(tar_bytes).hexdigest(), "index_sha256": hashlib.sha256(index_bytes).hexdigest()}
    write_record(out, record)
    publish(idx, index_bytes)
    publish(tar, tar_bytes)
    return record


# ----------------------------------------------------------------------------- publish


def publish_dataset(plan: Plan, records: dict[str, dict], settings: BuildSettings) -> dict:
    """Write the manifest once every shard is there (and drop an earlier build's stale shards)."""
    out = settings.out
    for s in plan.shards:  # other parts' shards count only if they are really there
        if s.name not in records and (r := finished_record(out, s.name, plan.fingerprints[s.name])):
            records[s.name] = r
    missing = [s for s in plan.shards if s.name not in records]
    if missing:
        report_waiting(out, plan, missing, settings)
        return {"complete": False, "part": list(settings.part_of), "missing": [s.name for s in missing]}
    manifest = make_manifest(plan, records, settings)
    if manifest["samples"] == 0:
        raise InputError(
            f"{source_option(settings)}: no usable {'pairs' if settings.paired else 'images'}: all "
            f"{len(manifest['skipped'])} candidates were skipped ({skip_summary(manifest['skipped'])}); "
            f"reasons in {out / MANIFEST}"
        )
    remove_stale(out, {s.name for s in plan.shards})
    publish(out / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    counts = ", ".join(f"{k} {v['samples']}" for k, v in manifest["splits"].items())
    if "scenes" in manifest:
        counts += "; scenes " + ", ".join(f"{k} {v}" for k, v in manifest["scenes"].items())
    skipped = manifest["skipped"]
    print(
        f"dataset {out}: {manifest['samples']} samples ({counts}); "
        + (
            f"{len(skipped)} files skipped ({skip_summary(skipped)}), reasons in {MANIFEST}"
            if skipped
            else "none skipped"
        ),
        file=sys.stderr,
    )
    return manifest


def report_waiting(out: Path, plan: Plan, missing: list[Shard], settings: BuildSettings) -> None:
    changed = other_settings(out, missing, plan, settings)
    unbuilt = len(missing) - sum(changed.values())
    i, n = settings.part_of
    why = [f"{n_shards(unbuilt)} of other parts not built yet"] if unbuilt else []
    if changed:
        why.append(
            f"{n_shards(sum(changed.values()))} built with other settings ({'; '.join(changed)}): "
            "run their parts with the same options as this one"
        )
    print(f"part {i}/{n} done; manifest not written yet: {', '.join(why)}", file=sys.stderr)


def n_shards(count: int) -> str:
    return f"{count} shard" + ("" if count == 1 else "s")


def skip_summary(skipped: list[dict]) -> str:
    """ "cannot decode 3, empty file 1": skipped files counted by the reason's first clause."""
    counts = Counter(s["reason"].split(":")[0] for s in skipped)
    return ", ".join(f"{reason} {count}" for reason, count in counts.most_common())


def make_manifest(plan: Plan, records: dict[str, dict], settings: BuildSettings) -> dict:
    splits = {}
    for split in SPLITS:
        shards = [
            {"name": r["name"], "samples": r["samples"], "sha256": r["sha256"], "index_sha256": r["index_sha256"]}
            for s in plan.shards
            if s.split == split and (r := records[s.name])["samples"]
        ]
        splits[split] = {"shards": shards, "samples": sum(s["samples"] for s in shards)}
    all_skipped = plan.inputs.skipped + [sk for s in plan.shards for sk in records[s.name]["skipped"]]
    content = settings.content()
    scenes = {} if plan.inputs.scenes is None else {"scenes": plan.inputs.scenes}
    return scenes | {
        "format": FORMAT,
        "source": plan.source,
        "seed": settings.seed,
        "split_rule": plan.inputs.split_rule,
        "val_fraction": settings.val_fraction,
        "test_fraction": settings.test_fraction,
        "shard_size": settings.shard_size,
        "min_size": settings.min_size,
        "max_pixels": settings.max_pixels,
        "jpeg_quality": content["jpeg_quality"],
        "store_size": settings.store_size,
        "blur": content["blur"]
        | (
            {"note": "photographed pairs: the blur is real, no kernel; each json names both source files"}
            if settings.paired
            else {
                "scaling": "ranges are at reference_size px; multiplied by min(w, h) / reference_size "
                "of the source; params at source size (deblur.shard.blur.stored_blur rescales)"
            }
        ),
        "members": list(SAMPLE_MEMBERS),
        "samples": sum(v["samples"] for v in splits.values()),
        "splits": splits,
        "skipped": sorted(all_skipped, key=lambda s: s["path"]),
    }


# ----------------------------------------------------------------------------- CLI


class Terminated(KeyboardInterrupt):
    """SIGTERM, unwinding the build the way Ctrl-C's KeyboardInterrupt does."""


@contextlib.contextmanager
def sigterm_interrupts():
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return

    def stop(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def verify_command(options: dict) -> int:
    from deblur.shard.verify import verify

    root, progress = options.pop("verify"), options.pop("progress", True)
    if options:
        given = ", ".join(option_name(tuple(dest.split("."))) for dest in options)
        raise InputError(f"--verify checks a built dataset and takes no build options (got {given})")
    problems = verify(root, progress=progress)
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{root}: " + (f"{len(problems)} problems" if problems else "OK"))
    return 1 if problems else 0


def _main(argv: list[str] | None) -> int:
    parser = make_parser("python -m deblur.shard", __doc__)
    parser.add_argument(
        "--verify", type=Path, metavar="DIR", default=argparse.SUPPRESS, help="check a built dataset and exit"
    )
    options = vars(parser.parse_args(argv))
    if "verify" in options:
        return verify_command(options)
    settings = settings_from_options(options)
    try:
        with sigterm_interrupts():
            build_shards(settings)
    except KeyboardInterrupt as stop:
        print(INTERRUPTED, file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: _main(argv))
