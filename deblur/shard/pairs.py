"""Paired sources: sharp images that come with their own blurred copies (real blur).

Three layouts, one plan. Like :mod:`deblur.shard.sources` it is a pure function of the folder
listings, the list files and the settings: no image is decoded here.

- **Two trees** (``--sharp DIR --blurred DIR``, the original description's layout): a sharp
  file and a blurred file pair when their paths relative to their folders are the same but for
  the extension (``a/1.png`` and ``a/1.jpg``). A pair's scene is its folder (``a``); a pair
  directly in the top folder is a scene of its own (independent photographs, as CelebA's faces).
- **GoPro** (``--gopro DIR``): ``train/<scene>/sharp/<frame>`` pairs with
  ``train/<scene>/blur/<frame>``, the same under ``test/``. The scene is ``<scene>``; ``test/``
  is the test split. Other folders (GoPro_Large's ``blur_gamma/``, say) are not read.
- **List files** (``--pairs FILE [--test-pairs FILE]``, RealBlur's format): one pair per line,
  the sharp path then the blurred path, relative to the list's folder, optionally a third
  column naming the scene; blank lines and ``#`` comments are skipped. Without the third column
  a pair's scene is the deepest folder its two paths share (RealBlur's ``.../scene230`` of
  ``.../scene230/gt/gt_1.png`` and ``.../scene230/blur/blur_1.png``), or the pair itself when
  they share none. ``--test-pairs``' pairs are the test split.

Pairing problems never stop the plan and are never dropped silently: a sharp image without its
blurred partner, a blurred image without a sharp one, several files that could be the partner,
and a pair listed twice are skipped with a reason (the builder's workers add members of
different sizes and undecodable members; deblur/shard/work.py).

**Splits never cut a scene.** Scenes (of the pairs not in an official test split) are ranked by
a hash of (seed, scene); the first ``round(test_fraction * n)`` are test, the next
``round(val_fraction * n)`` val (at least one each when its fraction is above 0 and there are
two or more scenes), the rest train. Counting scenes rather than comparing each hash with the
fraction keeps the shares right for datasets of a few dozen scenes (GoPro has 22 for training:
a hash per scene would leave val empty one time in three); adding a scene moves only the
scenes at the boundaries. Where the dataset brings a test split (GoPro's ``test/``,
``--test-pairs``) that is the test split and ``test_fraction`` is not used.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from deblur.errors import InputError
from deblur.shard.sources import Inputs, Item, check_folder, list_files, make_keys, not_regular

GOPRO_SPLITS = {"train": None, "test": "test"}  # GoPro's folders -> the split they force (None: by scene)
GOPRO_SHARP, GOPRO_BLURRED = "sharp", "blur"
COMMENT = "#"


@dataclass(frozen=True)
class Candidate:
    """A sharp file and its blurred partner, before keys, splits and stat()."""

    sharp: str  # relative path, "/"-separated: the json "source"
    blurred: str  # relative path: the json "blurred_source"
    sharp_path: Path
    blurred_path: Path
    scene: str
    split: str | None = None  # forced by the dataset's own test split; None = by scene


@dataclass
class Found:
    """What one layout offers: its pairs, what could not be paired, how it splits."""

    pairs: list[Candidate]
    skipped: list[dict]
    rule: str  # how the splits were made: the manifest's "split_rule"


def discover_pairs(
    *,
    sharp: Path | None = None,
    blurred: Path | None = None,
    gopro: Path | None = None,
    pairs: Path | None = None,
    test_pairs: Path | None = None,
    exclude: Path | None,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    limit: int | None,
) -> Inputs:
    """The candidates of the one paired source given (see the module docstring), keyed, split
    by scene, each member a regular file; the rest skipped with a reason."""
    if sharp is not None:
        found = tree_pairs(sharp, blurred, exclude)
    elif gopro is not None:
        found = gopro_pairs(gopro, exclude)
    else:
        found = list_pairs(pairs, test_pairs)
    candidates = sorted(found.pairs, key=lambda c: c.sharp)
    if limit is not None:
        candidates = candidates[:limit]
    splits, counts = scene_splits(candidates, seed, val_fraction, test_fraction)
    keys = make_keys([c.sharp for c in candidates])
    items, skipped = [], list(found.skipped)
    for c in candidates:
        sharp_size, blurred_size = (_file_size(path) for path in (c.sharp_path, c.blurred_path))
        if isinstance(sharp_size, str) or isinstance(blurred_size, str):
            reason = sharp_size if isinstance(sharp_size, str) else f"{blurred_size} (the blurred image {c.blurred})"
            skipped.append({"path": c.sharp, "reason": reason})
            continue
        items.append(
            Item(
                keys[c.sharp],
                c.sharp,
                str(c.sharp_path.resolve()),
                c.split or splits[c.scene],
                sharp_size,
                blurred_rel=c.blurred,
                blurred_path=str(c.blurred_path.resolve()),
                blurred_size=blurred_size,
            )
        )
    return Inputs(items, sorted(skipped, key=lambda s: s["path"]), found.rule, scenes=counts)


def _file_size(path: Path) -> int | str:
    """A member's size in bytes, or why it cannot be one (missing, not a regular file)."""
    try:
        info = path.stat()
    except OSError as e:  # a missing list entry, a dangling symlink
        return f"cannot read: {e.strerror or e}"
    return not_regular(info.st_mode) or info.st_size


# ----------------------------------------------------------------------------- matching


def stem(rel: str) -> str:
    """A relative path without its extension: what pairs a sharp file with its blurred partner."""
    return posixpath.splitext(rel)[0]


def match(
    sharp: dict[str, list[str]], blurred: dict[str, list[str]], sharp_side: str, blurred_side: str
) -> tuple[list[tuple[str, str]], list[dict]]:
    """(sharp rel, blurred rel) of every pair id with exactly one file on each side; every other
    file skipped with why. ``*_side`` say where the files are, for the reasons."""
    pairs, skipped = [], []
    for pair_id in sorted(sharp.keys() | blurred.keys()):
        mine, theirs = sharp.get(pair_id, []), blurred.get(pair_id, [])
        name = f"{posixpath.basename(pair_id)}.*"
        if len(mine) == 1 and len(theirs) == 1:
            pairs.append((mine[0], theirs[0]))
        else:
            if not theirs:
                reason = f"no blurred partner: nothing named {name} in {blurred_side}"
            elif not mine:
                reason = f"no sharp partner: nothing named {name} in {sharp_side}"
            else:
                reason = f"ambiguous partner: {len(mine)} sharp and {len(theirs)} blurred files named {name}"
            skipped += [{"path": rel, "reason": reason} for rel in mine + theirs]
    return pairs, skipped


def _listed(root: Path, exclude: Path | None, side: str) -> tuple[list[str], list[dict]]:
    rels, unreadable = list_files(root, exclude=exclude)
    return rels, [{"path": u["path"], "reason": f"{u['reason']} (in {side})"} for u in unreadable]


# ----------------------------------------------------------------------------- layouts


def tree_pairs(sharp: Path, blurred: Path, exclude: Path | None) -> Found:
    """``--sharp DIR --blurred DIR``: pairs by relative path, the extension may differ."""
    check_folder(sharp, "--sharp")
    check_folder(blurred, "--blurred")
    sides = []
    skipped: list[dict] = []
    for root, side in ((sharp, "--sharp"), (blurred, "--blurred")):
        rels, unreadable = _listed(root, exclude, side)
        skipped += unreadable
        by_id = defaultdict(list)
        for rel in rels:
            by_id[stem(rel)].append(rel)
        sides.append(by_id)
    matched, unpaired = match(*sides, "--sharp", "--blurred")
    pairs = [
        Candidate(s, b, sharp / s, blurred / b, scene=posixpath.dirname(s) or f"pair:{stem(s)}") for s, b in matched
    ]
    rule = "scenes: a pair's folder (a pair in the top folder is a scene of its own), ranked by a hash of (seed, scene)"
    return Found(pairs, skipped + unpaired, rule)


def gopro_pairs(root: Path, exclude: Path | None) -> Found:
    """``--gopro DIR``: ``train|test/<scene>/sharp|blur/<frame>``."""
    check_folder(root, "--gopro")
    if not (root / "train").is_dir():
        raise InputError(f"--gopro {root}: no train/ folder (expected train/<scene>/sharp/<frame> and blur/<frame>)")
    rels, skipped = _listed(root, exclude, "--gopro")
    sides = {GOPRO_SHARP: defaultdict(list), GOPRO_BLURRED: defaultdict(list)}
    for rel in rels:
        parts = rel.split("/")
        # train|test / scene / sharp|blur / frame: anything else (blur_gamma/, notes) is no member
        if len(parts) >= 4 and parts[0] in GOPRO_SPLITS and parts[2] in sides:
            pair_id = "/".join(parts[:2] + [stem("/".join(parts[3:]))])
            sides[parts[2]][pair_id].append(rel)
    matched, unpaired = match(sides[GOPRO_SHARP], sides[GOPRO_BLURRED], "sharp/", "blur/")
    pairs = []
    for s, b in matched:
        split_dir, scene = s.split("/")[:2]
        pairs.append(Candidate(s, b, root / s, root / b, scene=f"{split_dir}/{scene}", split=GOPRO_SPLITS[split_dir]))
    has_test = any(p.split for p in pairs)
    rule = "GoPro: test/ is the test split; " if has_test else "GoPro (no test/): "
    rule += "scenes of train/ ranked by a hash of (seed, scene)"
    return Found(pairs, skipped + unpaired, rule)


def read_list(path: Path, option: str) -> list[tuple[int, str, str, str | None]]:
    """(line number, sharp path, blurred path, scene or None) of every pair in a list file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{option} {path}: not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{option} {path}: cannot read the list: {error}") from None
    entries = []
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith(COMMENT):
            continue
        if len(fields) not in (2, 3):
            raise InputError(f"{path}:{n}: expected 'SHARP BLURRED [SCENE]' (paths without spaces), got {line[:80]!r}")
        entries.append((n, fields[0], fields[1], fields[2] if len(fields) == 3 else None))
    return entries


def shared_folder(sharp: str, blurred: str) -> str:
    """The deepest folder two relative paths share, below the list's folder; the pair itself
    (a scene of its own) when they share none. ``..`` alone is no shared folder: a list beside
    its data's folders (``../gt/1.png``) would otherwise make all its pairs one scene."""
    common = posixpath.commonpath([posixpath.dirname(sharp), posixpath.dirname(blurred)])
    return common if common.strip("./") else f"pair:{sharp}"


def list_pairs(pairs: Path, test_pairs: Path | None) -> Found:
    """``--pairs FILE [--test-pairs FILE]``: RealBlur-style lists (see the module docstring)."""
    root = pairs.parent
    found: list[Candidate] = []
    skipped: list[dict] = []
    first_line: dict[str, str] = {}
    for path, option, split in ((pairs, "--pairs", None), (test_pairs, "--test-pairs", "test")):
        if path is None:
            continue
        for n, sharp, blurred, scene in read_list(path, option):
            # Paths relative to the list's folder, shown relative to --pairs' folder: one namespace
            # for keys and messages even when the two lists lie in different folders.
            s = Path(os.path.normpath(path.parent / sharp))
            b = Path(os.path.normpath(path.parent / blurred))
            s_rel, b_rel = (Path(os.path.relpath(p, root)).as_posix() for p in (s, b))
            where = f"{path.name} line {n}"
            if s_rel in first_line:
                skipped.append({"path": s_rel, "reason": f"listed twice: {where}, first at {first_line[s_rel]}"})
                continue
            first_line[s_rel] = where
            found.append(Candidate(s_rel, b_rel, s, b, scene=scene or shared_folder(s_rel, b_rel), split=split))
    scenes = defaultdict(set)
    for c in found:
        scenes[c.scene].add(c.split)
    for scene, splits in sorted(scenes.items()):
        if len(splits) > 1:
            raise InputError(
                f"--pairs {pairs} and --test-pairs {test_pairs} both list pairs of scene {scene!r}: "
                "the frames of one scene must stay in one split"
            )
    rule = "list file" + ("; --test-pairs is the test split" if test_pairs else "")
    rule += "; scenes (third column, else the folder both paths share) ranked by a hash of (seed, scene)"
    return Found(found, skipped, rule)


# ----------------------------------------------------------------------------- splits


def scene_rank(seed: int, scene: str) -> bytes:
    return hashlib.sha256(f"scene\x00{seed}\x00{scene}".encode()).digest()


def scene_splits(
    candidates: list[Candidate], seed: int, val_fraction: float, test_fraction: float
) -> tuple[dict[str, str], dict[str, int]]:
    """({scene: split} for the scenes no official split claims, {split: scene count} of all)."""
    forced = {c.scene: c.split for c in candidates if c.split}
    free = sorted({c.scene for c in candidates if not c.split}, key=lambda s: scene_rank(seed, s))
    n = len(free)

    def share(fraction: float, left: int) -> int:
        wanted = round(fraction * n)
        if fraction > 0 and n > 1:
            wanted = max(wanted, 1)
        return min(wanted, left)

    n_test = 0 if forced else share(test_fraction, n)
    n_val = share(val_fraction, n - n_test)
    splits = {scene: "test" for scene in free[:n_test]}
    splits |= {scene: "val" for scene in free[n_test : n_test + n_val]}
    splits |= {scene: "train" for scene in free[n_test + n_val :]}
    counts = dict.fromkeys(("train", "val", "test"), 0)
    for split in list(splits.values()) + list(forced.values()):
        counts[split] += 1
    return splits, counts
