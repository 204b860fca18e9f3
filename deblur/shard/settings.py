"""The shard build's settings: one typed model, and the command line generated from it.

    settings = BuildSettings(src="photos", out="shards/photos", seed=3)            # from Python
    settings = settings_from_options(vars(make_parser(prog, doc).parse_args(argv)))  # the CLI

Every option of ``python -m deblur.shard`` is a field of :class:`BuildSettings` (its name,
default, check and help are written here once): ``val_fraction`` is ``--val-fraction``, a bool
that defaults to true is a ``--no-...`` flag, a pair is two values (``--sigma-range LO HI``), and
the fields of the nested :class:`~deblur.shard.blur.BlurConfig` are options of their own
(``--motion-fraction``). A field whose ``json_schema_extra`` has ``"cli": False`` is fixed.

From the command line every value arrives as text and is checked here, so a bad value is one
line naming the option and the value: ``--val-fraction: must be <= 1, got 1.5``.
"""

from __future__ import annotations

import argparse
import os
import typing
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from deblur.errors import InputError
from deblur.images import DEFAULT_MAX_PIXELS
from deblur.shard.blur import REAL_BLUR, BlurConfig

JPEG_QUALITY = 95  # blurred member, and the sharp member when the source cannot be stored as-is
SHARD_SIZE = 1000  # ~25 MB tars for CelebA: about 200 train shards to spread over ranks
# The demo has ~300 training crops; small shards still give every rank and loader worker
# whole shards of its own (webdataset splits by shard, not by sample).
DEMO_SHARD_SIZE = 64
# The settings that decide the bytes of every shard: recorded per shard and in the manifest, and
# part of the resume fingerprint (with the JPEG quality, fixed, and the shard's inputs).
CONTENT = ("seed", "val_fraction", "test_fraction", "shard_size", "min_size", "max_pixels", "blur", "store_size")
# The sources a build can read; exactly one is given. A new kind of source is a field here
# (and an entry in this tuple), planned by deblur.shard.build.find_inputs. PAIRED sources bring
# their own blurred images (real blur): deblur/shard/pairs.py plans them.
SOURCES = ("src", "demo", "sharp", "gopro", "pairs")
PAIRED = ("sharp", "gopro", "pairs")


def _not_empty(value):
    # Path("") is "." (the current folder): an empty --out would silently mean "here".
    if isinstance(value, str) and not value.strip():
        raise ValueError("must not be empty")
    return value


class BuildSettings(BaseModel):
    """Everything one run of the builder is told: where from and to, what to make, how."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    src: Path | None = Field(None, description="folder of sharp images (searched recursively)")
    demo: bool = Field(False, description="use the built-in demo photographs")
    sharp: Path | None = Field(
        None,
        description="folder of sharp images, paired with --blurred by relative path",
        json_schema_extra={"metavar": "DIR"},
    )
    blurred: Path | None = Field(
        None,
        description="folder of the blurred copies of --sharp: same relative paths, the extension may differ",
        json_schema_extra={"metavar": "DIR"},
    )
    gopro: Path | None = Field(
        None,
        description="GoPro-layout folder: train|test/<scene>/sharp|blur/<frame>; its test/ is the test split",
        json_schema_extra={"metavar": "DIR"},
    )
    pairs: Path | None = Field(
        None,
        description="list file, one pair per line: sharp path, blurred path (relative to the file's folder), "
        "optionally a scene name (RealBlur's lists)",
        json_schema_extra={"metavar": "FILE"},
    )
    test_pairs: Path | None = Field(
        None, description="a list like --pairs whose pairs are the test split", json_schema_extra={"metavar": "FILE"}
    )
    out: Path = Field(description="dataset folder to write: new, empty, or one this builder made")
    workers: int | None = Field(None, ge=1, description="processes (default: all cores)")
    seed: int = Field(0, ge=0, description="decides splits, shuffle and every sample's blur")
    val_fraction: float = Field(
        0.05, ge=0.0, le=1.0, description="share of images (of scenes, for pairs) for validation"
    )
    test_fraction: float = Field(
        0.05, ge=0.0, le=1.0, description="share of images (of scenes, for pairs) for test, unless the dataset has one"
    )
    shard_size: int = Field(
        SHARD_SIZE, ge=1, description=f"samples per tar (default {SHARD_SIZE}; {DEMO_SHARD_SIZE} with --demo)"
    )
    limit: int | None = Field(None, ge=1, description="only the first N files (sorted), for trials")
    part: tuple[int, int] | None = Field(
        None, description="build only portion I of N (0 <= I < N)", json_schema_extra={"metavar": "I/N"}
    )
    blur: BlurConfig = BlurConfig()
    min_size: int = Field(64, ge=1, description="skip images whose shorter side is below this many px")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="refuse larger images as decompression bombs")
    # Shorter side of the stored members in px (never upscaled); None = the source's size.
    store_size: int | None = Field(
        None,
        ge=1,
        description="store both members downscaled so the shorter side is PX (never upscaled; default: source "
        "size); blur is still applied at source size",
        json_schema_extra={"metavar": "PX"},
    )
    progress: bool = Field(True, description="show a progress bar")

    _empty_paths = field_validator("src", "out", "sharp", "blurred", "gopro", "pairs", "test_pairs", mode="before")(
        _not_empty
    )

    @model_validator(mode="before")
    @classmethod
    def _demo_shard_size(cls, data):
        if isinstance(data, dict) and data.get("shard_size") is None:
            data = {k: v for k, v in data.items() if k != "shard_size"}
            if data.get("demo") is True:
                data["shard_size"] = DEMO_SHARD_SIZE
        return data

    @field_validator("part", mode="before")
    @classmethod
    def _part(cls, value):
        if isinstance(value, str):
            try:
                i, n = (int(v) for v in value.split("/"))
            except ValueError:
                raise ValueError(f"must look like I/N (e.g. 0/4), got {value!r}") from None
            value = (i, n)
        return value

    @field_validator("part")
    @classmethod
    def _part_range(cls, value):
        if value is not None and not (value[1] >= 1 and 0 <= value[0] < value[1]):
            raise ValueError(f"must be I/N with 0 <= I < N, got {value[0]}/{value[1]}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> BuildSettings:
        given = [name for name in SOURCES if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            *first, last = (option_name((name,)) for name in SOURCES)
            names = f"{', '.join(first)} or {last}"
            if given:
                got = " and ".join(option_name((name,)) for name in given)
                raise ValueError(f"give one of {names}, not several (got {got})")
            raise ValueError(f"{names} is required")
        for alone, partner in (("sharp", "blurred"), ("blurred", "sharp"), ("test_pairs", "pairs")):
            if getattr(self, alone) is not None and getattr(self, partner) is None:
                raise ValueError(f"{option_name((alone,))} needs {option_name((partner,))}")
        if self.paired and "blur" in self.model_fields_set:
            raise ValueError(
                f"{option_name((given[0],))} brings real blurred images: the blur options (--motion-fraction, "
                "--sigma-range, --motion-length-range) only apply to --src and --demo"
            )
        if self.val_fraction + self.test_fraction > 1.0:
            raise ValueError(
                f"--val-fraction + --test-fraction must be <= 1, got {self.val_fraction:g} + {self.test_fraction:g}"
            )
        if self.min_size**2 > self.max_pixels:
            raise ValueError(
                f"--min-size {self.min_size} and --max-pixels {self.max_pixels} exclude every image "
                f"(a {self.min_size}x{self.min_size} image has {self.min_size**2} pixels)"
            )
        return self

    @property
    def paired(self) -> bool:
        """Whether the source brings its own blurred images (real blur, no kernel)."""
        return any(getattr(self, name) is not None for name in PAIRED)

    @property
    def processes(self) -> int:
        """The worker count to use: ``workers``, or every core."""
        return self.workers or os.cpu_count() or 1

    @property
    def part_of(self) -> tuple[int, int]:
        """(I, N) of ``--part``; (0, 1) builds everything."""
        return self.part or (0, 1)

    def content(self) -> dict:
        """The settings that decide the bytes of every shard, as JSON-ready values.

        The layout (and ``store_size`` left out when unset) is that of earlier versions'
        ``ShardSettings``, so the resume fingerprints of their builds stay the same.
        """
        content = self.model_dump(mode="json", include=set(CONTENT)) | {"jpeg_quality": JPEG_QUALITY}
        if content["store_size"] is None:
            del content["store_size"]
        if self.paired:  # the blur options make nothing of a real pair
            content["blur"] = dict(REAL_BLUR)
        return content


# ----------------------------------------------------------------------------- the command line


def _options(model: type[BaseModel], loc: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], FieldInfo]]:
    """(field location, field) of every field that is an option, nested models flattened."""
    for name, field in model.model_fields.items():
        if _extra(field).get("cli") is False:
            continue
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _options(field.annotation, loc + (name,))
        else:
            yield loc + (name,), field


def _extra(field: FieldInfo) -> dict:
    return field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}


def _negated(field: FieldInfo) -> bool:
    """A bool that is true unless told otherwise: its option is ``--no-<name>``."""
    return field.annotation is bool and field.default is True


def option_name(loc: tuple[str, ...]) -> str:
    """The command-line option of a field location: ("blur", "sigma_range") -> --sigma-range."""
    field = _FIELDS.get(loc)
    name = loc[-1].replace("_", "-")
    return f"--no-{name}" if field is not None and _negated(field) else f"--{name}"


_FIELDS = dict(_options(BuildSettings))


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other bad option."""

    def error(self, message: str):
        raise InputError(f"{message} (see {self.prog} --help)")


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The builder's argparse parser, one option per field. Options left out are absent from the
    parsed namespace (argparse.SUPPRESS), so every default comes from :class:`BuildSettings`."""
    parser = _Parser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for loc, field in _FIELDS.items():
        extra, help_text = _extra(field), field.description or ""
        kwargs: dict = {"dest": ".".join(loc), "default": argparse.SUPPRESS}
        if field.annotation is bool:
            kwargs["action"] = "store_false" if field.default else "store_true"
            help_text = ("do not " if field.default else "") + help_text
        else:
            args = typing.get_args(field.annotation)
            if typing.get_origin(field.annotation) is tuple:
                kwargs |= {"nargs": len(args), "metavar": tuple(extra.get("metavar", ("LO", "HI")))}
            elif "metavar" in extra:
                kwargs["metavar"] = extra["metavar"]
            if field.default is not None and not field.is_required() and "default" not in help_text:
                shown = " ".join(map(str, field.default)) if isinstance(field.default, tuple) else field.default
                help_text += f" (default: {shown})"
        parser.add_argument(option_name(loc), help=help_text, **kwargs)
    return parser


def settings_from_options(options: dict) -> BuildSettings:
    """:class:`BuildSettings` from parsed options ({"blur.sigma_range": [...], ...}); a bad value
    is an :class:`InputError` naming each option at fault."""
    tree: dict = {}
    for dest, value in options.items():
        *path, name = dest.split(".")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[name] = value
    try:
        return BuildSettings.model_validate(tree)
    except ValidationError as error:
        raise InputError("; ".join(_describe(e) for e in error.errors())) from None


_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
_KINDS = {
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "int_type": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "missing": "is required",
    "extra_forbidden": "is not a setting",
}


def _describe(error: dict) -> str:
    """One pydantic error as "--option: what is wrong, got VALUE"."""
    loc = tuple(error["loc"])
    while loc and not isinstance(loc[-1], str):  # ("blur", "sigma_range", 0): the option, not its item
        loc = loc[:-1]
    kind, got = error["type"], error.get("input")
    if kind == "value_error":  # our own validators' messages say it all
        text = str(error["ctx"]["error"])
    elif kind in _BOUNDS:
        bound = next(iter(error["ctx"].values()))
        text = f"must be {_BOUNDS[kind]} {bound:g}, got {got}"
    elif kind in _KINDS:
        text = _KINDS[kind] + ("" if kind == "missing" else f", got {got!r}")
    else:
        text = error["msg"].replace("Input should be", "must be") + f", got {got!r}"
    return f"{option_name(loc)}: {text}" if loc in _FIELDS or (loc and kind == "missing") else text


def _leaves(tree: dict, loc: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], object]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, loc + (key,))
        else:
            yield loc + (key,), value


def describe_change(theirs: dict | None, ours: dict) -> str:
    """What differs between an earlier build's :meth:`BuildSettings.content` and this run's, by
    option: "--seed 3 instead of 4"."""
    if not isinstance(theirs, dict):
        return "an earlier version's build, settings not recorded"
    mine, other = dict(_leaves(ours)), dict(_leaves(theirs))

    def shown(value) -> str:
        return "unset" if value is None else " ".join(map(str, value)) if isinstance(value, list) else str(value)

    diffs = [
        f"{option_name(loc) if loc in _FIELDS else ' '.join(loc).replace('_', ' ')} {shown(other.get(loc))} "
        f"instead of {shown(mine.get(loc))}"
        for loc in sorted(mine.keys() | other.keys())
        if mine.get(loc) != other.get(loc)
    ]
    return ", ".join(diffs) or "the same settings, other inputs (source files or --limit)"
